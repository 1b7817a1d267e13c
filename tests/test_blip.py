"""BLIP captioning: the adapter, the static text graphs, the caption pipeline and the CLI on random:tiny."""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from turbo_export import apply_turbo, remove_turbo
from turbo_export.backends.torch_runner import TorchRunner
from turbo_export.cli import main
from turbo_export.families.blip import BlipOptions, build_random_blip
from turbo_export.families.blip_tasks import caption_graphs
from turbo_export.pipelines.blip import CaptionPipeline, TokenIds, cross_bias


def _pixels(batch=3, seed=5):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("task", ["caption", "retrieval", "vqa"])
def test_blip_remove_turbo_restores_bit_for_bit(task):
    model = build_random_blip("tiny", task).model
    pixels = _pixels()
    with torch.no_grad():
        before = model.vision_model(pixel_values=pixels).last_hidden_state
        apply_turbo(model, 8, alpha=6.0)
        out = model.vision_model(pixel_values=pixels)
        assert out.last_hidden_state.shape == (3, 65 - 16, 32)  # two blocks merge 8 each
        torch.testing.assert_close(out.token_sizes.sum(dim=1), torch.full((3, 1), 65.0))
        remove_turbo(model)
        assert torch.equal(model.vision_model(pixel_values=pixels).last_hidden_state, before)


def _torch_pipelines(num_beams: int, max_new_tokens: int = 12):
    model = build_random_blip("tiny", "caption").model
    turbo = apply_turbo(copy.deepcopy(model), 8, min_tokens=0)
    options = BlipOptions(task="caption", ratio=8, batch=3, max_new_tokens=max_new_tokens,
                          num_beams=num_beams, min_tokens=0)
    graphs = caption_graphs(model, turbo, options, 32, {"baseline": 65, "turbo": 65 - 16})
    runners = {k: TorchRunner(g.module, g.example_inputs, g.output_names, k) for k, g in graphs.items()}
    ids = TokenIds.from_text_config(model.config.text_config)
    pipelines = {n: CaptionPipeline(runners[f"{n}_vision"], runners[f"{n}_cross_kv"], runners["decoder"], ids)
                 for n in ("baseline", "turbo")}
    return {"baseline": model, "turbo": turbo}, pipelines


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_pipeline_equals_transformers_generate(num_beams):
    models, pipelines = _torch_pipelines(num_beams)
    pixels = _pixels()
    for name in ("baseline", "turbo"):
        mine = pipelines[name].generate(pixels.numpy(), 12, num_beams)
        with torch.no_grad():
            ref = models[name].generate(pixel_values=pixels, max_new_tokens=12, num_beams=num_beams,
                                        do_sample=False).numpy()
        np.testing.assert_array_equal(mine, ref)


def test_caption_pipeline_stops_and_pads_like_generate():
    models, pipelines = _torch_pipelines(1)
    ids = pipelines["baseline"].ids
    # force an early stop: make [SEP] the most likely token after the second generated token
    decoder = pipelines["baseline"].decoder.runner.module
    bias = decoder.cls.predictions.decoder.bias
    with torch.no_grad():
        bias[ids.eos] += 50.0
        tokens = pipelines["baseline"].generate(_pixels().numpy(), 12)
        ref = models["baseline"].generate(pixel_values=_pixels(), max_new_tokens=12, do_sample=False).numpy()
    np.testing.assert_array_equal(tokens, ref)
    assert tokens.shape[1] == 2 and (tokens[:, 1] == ids.eos).all()  # bos then eos, nothing after


def test_prompt_too_long_for_cache_is_an_error():
    _, pipelines = _torch_pipelines(1, max_new_tokens=4)
    with pytest.raises(ValueError, match="cache"):
        pipelines["baseline"].generate(_pixels().numpy(), 4, prompt=list(range(110, 130)))


def test_size_aware_cross_bias():
    sizes = np.array([[1.0, 2.0, 4.0]], np.float32)
    np.testing.assert_array_equal(cross_bias(sizes, False), np.zeros((1, 1, 1, 3), np.float32))
    np.testing.assert_allclose(cross_bias(sizes, True).ravel(), np.log(sizes).ravel())


def test_size_aware_changes_turbo_decoding_inputs_only_where_tokens_merged():
    models, pipelines = _torch_pipelines(1)
    pixels = _pixels().numpy()
    plain = pipelines["turbo"].encode(pixels)
    pipelines["turbo"].size_aware = True
    aware = pipelines["turbo"].encode(pixels)
    np.testing.assert_array_equal(plain[0], aware[0])
    assert (aware[2] > 0).any() and (plain[2] == 0).all()
    pipelines["baseline"].size_aware = True  # unmerged tokens have size 1: the bias is zero
    assert (pipelines["baseline"].encode(pixels)[2] == 0).all()


def test_blip_caption_cli_end_to_end(tmp_path):
    out = tmp_path / "caption"
    result = CliRunner().invoke(main, ["blip", "--model", "random:tiny", "--ratio", "8", "--batch", "2",
                                       "--max-new-tokens", "5", "--runs", "2", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "blip" and report["task"]["name"] == "caption"
    assert report["min_tokens"] == 40  # the caption default
    assert report["task"]["baseline_onnx_equals_pytorch"] and report["task"]["turbo_onnx_equals_pytorch"]
    assert 0.0 <= report["task"]["turbo_vs_baseline_token_agreement"] <= 1.0
    assert report["tokens_per_layer"]["turbo"] == [65, 57]
    assert report["bench"]["scope"] == "image encoder" and report["bench"]["pipeline"]["turbo_per_s"] > 0
    pipeline_flops = report["bench"]["pipeline"]["flops"]
    assert pipeline_flops["baseline"] > report["flops"]["baseline"]  # the text side adds to the encoder
    assert pipeline_flops["ratio"] == pytest.approx(pipeline_flops["baseline"] / pipeline_flops["turbo"])
    for name, parity in report["parity"]["graphs"].items():
        assert parity["max_abs_diff"] < 1e-4, name
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f + ".onnx" for f in report["files"]), "report.json"])


def test_caption_text_flops_hand_count():
    from transformers import BlipConfig

    from turbo_export.families.blip_tasks import PROMPT_ALLOWANCE, caption_text_flops

    cfg = BlipConfig()  # BERT-base text side: width 768, MLP 3072, 12 layers, vocab 30524
    w, m, v, n, t = 768, 3072, 30524, 100, 2
    cache = t + PROMPT_ALLOWANCE
    layer = 8 * w * w + 4 * cache * w + 4 * w * w + 4 * n * w + 4 * w * m
    expected = 12 * 4 * n * w * w + t * (12 * layer + 2 * w * w + 2 * w * v)
    assert caption_text_flops(cfg, n, t) == expected
    assert caption_text_flops(cfg, 247, 20) < caption_text_flops(cfg, 577, 20)


def test_blip_checkpoint_folder_and_task_mismatch(tmp_path):
    loaded = build_random_blip("tiny", "caption")
    folder = tmp_path / "blip-tiny-caption"
    loaded.model.save_pretrained(folder)
    loaded.image_processor.save_pretrained(folder)
    result = CliRunner().invoke(main, ["blip", "--task", "vqa", "--model", str(folder), "--ratio", "4",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "BlipForQuestionAnswering" in result.stderr and "--task caption" in result.stderr
    assert not (tmp_path / "out").exists()
