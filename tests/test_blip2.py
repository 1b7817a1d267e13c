"""BLIP-2 (random:tiny-blip2): r = 0 is transformers bit for bit and remove_turbo restores it, the caption pipeline
equals transformers' generate token for token (also when rows stop early), the CLI end to end from a checkpoint
folder (caption) and a preset (retrieval), and bad input as one line with exit code 2."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from turbo_export import apply_turbo, remove_turbo
from turbo_export.backends.torch_runner import TorchRunner
from turbo_export.cli import main
from turbo_export.families.blip2 import Blip2Options, _token_ids, build_random_blip2, caption_graphs
from turbo_export.pipelines.blip2 import Blip2CaptionPipeline

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


def _pixels(batch=2, seed=5):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _outputs(model, pixels):
    """What transformers computes end to end: the greedy caption, or the ITM and ITC scores."""
    if type(model).__name__ == "Blip2ForConditionalGeneration":
        return {"caption": model.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False),
                "image_features": model.get_image_features(pixel_values=pixels).pooler_output}
    ids = torch.randint(3, 120, (len(pixels), 6), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([torch.full((len(pixels), 8), 127), ids], 1)  # the processor's image placeholders
    mask = torch.ones_like(ids)
    return {head: model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                        use_image_text_matching_head=head == "itm").logits_per_image for head in ("itm", "itc")}


@pytest.mark.parametrize("task", ["caption", "retrieval"])
def test_ratio_zero_is_transformers_and_remove_turbo_restores_it(task):
    model = build_random_blip2("tiny-blip2", task).model
    pixels = _pixels()
    with torch.no_grad():
        before = _outputs(model, pixels)
        apply_turbo(model, 0)
        at_zero = _outputs(model, pixels)
        apply_turbo(model, 8, alpha=6.0)
        merged = model.vision_model(pixel_values=pixels)
        remove_turbo(model)
        after = _outputs(model, pixels)
    assert merged.last_hidden_state.shape[1] == 65 - 2 * 8  # CLS protected, two blocks merge 8 each
    torch.testing.assert_close(merged.token_sizes.sum(dim=1), torch.full((2, 1), 65.0))
    for name in before:
        assert torch.equal(before[name], at_zero[name]), name
        assert torch.equal(before[name], after[name]), name
    assert "_turbo" not in model.__dict__


def test_caption_pipeline_equals_generate_and_stops_like_it():
    model = build_random_blip2("tiny-blip2", "caption").model
    turbo = apply_turbo(copy.deepcopy(model), 8)
    options = Blip2Options(task="caption", ratio=8, min_tokens=0, batch=2, max_new_tokens=8)
    graphs = caption_graphs(model, turbo, options, 32, 8 + 1 + 8)
    runners = {k: TorchRunner(g.module, g.example_inputs, g.output_names, k) for k, g in graphs.items()}
    pixels = _pixels()
    pipelines = {name: Blip2CaptionPipeline(runners[f"{name}_vision"], runners["lm_prefill"], runners["decoder"],
                                            _token_ids(model), 127) for name in ("baseline", "turbo")}
    for name, m in (("baseline", model), ("turbo", turbo)):
        with torch.no_grad():
            ref = m.generate(pixel_values=pixels, max_new_tokens=8, do_sample=False).numpy()
        np.testing.assert_array_equal(pipelines[name].generate(pixels.numpy(), 8), ref)
    ids = _token_ids(model)
    with torch.no_grad():  # eos likelier where token 20 is likely: row 0 stops (then padding), row 1 does not
        weight = model.language_model.lm_head.weight
        weight[ids.eos] += weight[20]
        ref = model.generate(pixel_values=pixels, max_new_tokens=8, do_sample=False).numpy()
    assert ids.eos in ref[0] and ref[0, -1] == ids.pad and ids.eos not in ref[1]
    np.testing.assert_array_equal(pipelines["baseline"].generate(pixels.numpy(), 8), ref)


def _export(args, out):
    return CliRunner().invoke(main, ["blip2", *args, "--ratio", "8", "--min-tokens", "0", "--batch", "2",
                                     "--runs", "2", "--no-peers", "--out", str(out)])


def test_caption_cli_from_a_checkpoint_folder(tmp_path):
    folder = tmp_path / "tiny-blip2-caption"
    build_random_blip2("tiny-blip2", "caption").model.save_pretrained(folder)
    out = tmp_path / "caption"
    result = _export(["--model", str(folder), "--max-new-tokens", "6"], out)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "blip2" and report["model_class"] == "Blip2ForConditionalGeneration"
    task = report["task"]
    assert task["name"] == "caption" and task["baseline_onnx_equals_pytorch"] and task["turbo_onnx_equals_pytorch"]
    assert len(task["tokens"]["baseline"][0]) >= 8 + 1 + 1  # image placeholders, bos, new tokens
    assert report["tokens_per_layer"]["turbo"] == [65, 57] and report["num_query_tokens"] == 8
    assert sorted(report["parity"]["graphs"]) == ["baseline_vision", "decoder", "lm_prefill", "turbo_vision"]
    for name, parity in report["parity"]["graphs"].items():
        assert parity["max_abs_diff"] < 1e-4, name
    assert report["flops"]["scope"] == "image encoder + Q-Former" and report["flops"]["ratio"] > 1
    assert report["bench"]["pipeline"]["turbo_per_s"] > 0
    assert report["language_model"]["model_type"] == "opt"
    # validate reads the folder's processor (tokenizer, image processor); save_pretrained of the model alone has none
    result = CliRunner().invoke(main, ["validate", str(out), "--data", DIGITS, "--limit", "2"])
    assert result.exit_code == 2 and "has no BLIP-2 processor" in result.stderr, result.output + result.stderr


def test_retrieval_cli_scores_equal_transformers(tmp_path):
    out = tmp_path / "retrieval"
    result = _export(["--task", "retrieval", "--model", "random:tiny-blip2", "--text-len", "8"], out)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "report.json").read_text())
    task = report["task"]
    assert task["baseline_onnx_equals_pytorch"] and task["turbo_onnx_equals_pytorch"]
    assert max(max(d.values()) for d in task["max_abs_diff"].values()) < 1e-4
    assert sorted(report["files"]) == ["baseline_itm", "baseline_vision", "text_itc", "turbo_itm", "turbo_vision"]
    assert "ITM top-1" in result.output and 0.0 <= task["agreement"]["itm_rank_correlation"] <= 1.0


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    from turbo_export.families.blip import build_random_blip

    blip = tmp_path / "blip"
    build_random_blip("tiny", "caption").model.save_pretrained(blip)
    retrieval = tmp_path / "tiny-blip2-retrieval"
    build_random_blip2("tiny-blip2", "retrieval").model.save_pretrained(retrieval)
    cases = [
        (["--model", str(blip)], "is a BlipForConditionalGeneration checkpoint; supported classes: Blip2"),
        (["--model", str(retrieval), "--task", "caption"], "--task caption needs a Blip2ForConditionalGeneration"),
        (["--model", "random:tiny-blip2", "--ratio", "40"], "ratio: 40 is above the maximum 32"),
        (["--model", "random:nope"], "unknown preset 'random:nope'"),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["blip2", "--ratio", "8", *args, "--out", str(out)])
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("turbo-export: error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr
        assert result.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in result.stderr
        assert not out.exists()
