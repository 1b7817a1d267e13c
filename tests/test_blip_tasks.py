"""BLIP retrieval and VQA on random:tiny: the CLI end to end, the ONNX pipelines against transformers, the
size-aware variant, and bad --image / --question / --text input.

Each task is exported once (module fixtures); the other tests reuse those ONNX files.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from turbo_export import apply_turbo
from turbo_export.backends import make_runner
from turbo_export.backends.torch_runner import TorchRunner
from turbo_export.cli import main
from turbo_export.families.blip import BlipOptions, build_random_blip
from turbo_export.families.blip_tasks import (
    TaskInputs,
    retrieval_graphs,
    retrieval_parity,
    retrieval_pipelines,
    vqa_graphs,
    vqa_parity,
    vqa_pipelines,
)
from turbo_export.pipelines.blip import TokenIds

TEXTS = ["a dog on the grass", "two people riding bikes", "a red bus"]
QUESTION = "what color is the dog?"
TEXT_LEN = 32  # the CLI default


def _cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (size, ext) in enumerate([((60, 80), "png"), ((40, 40), "jpg")]):
        pixels = (np.random.RandomState(i).rand(*size, 3) * 255).astype(np.uint8)
        paths.append(str(folder / f"photo{i}.{ext}"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _tokens(tokenizer, texts):
    enc = tokenizer(texts, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _models(task, min_tokens):
    loaded = build_random_blip("tiny", task)  # seeded: the same weights the CLI exported
    turbo = apply_turbo(copy.deepcopy(loaded.model), 8, alpha=6.0, min_tokens=min_tokens)
    return loaded, {"baseline": loaded.model, "turbo": turbo}


def _onnx_runners(out, report):
    return {name: make_runner(os.path.join(out, file)) for name, file in report["files"].items()}


def _itc_itm(model, pixels, ids, mask):
    """Every image against every text, by BlipForImageTextRetrieval itself."""
    with torch.no_grad():
        itc = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        itm = [model(input_ids=ids, pixel_values=pixels[i:i + 1].expand(len(ids), -1, -1, -1), attention_mask=mask,
                     use_itm_head=True).itm_score.softmax(dim=-1)[:, 1] for i in range(len(pixels))]
    return itc.numpy(), torch.stack(itm).numpy()


# ---- retrieval -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("retrieval") / "out"
    args = ["blip", "--task", "retrieval", "--model", "random:tiny", "--ratio", "8", "--min-tokens", "0",
            "--batch", "2", "--runs", "2", "--out", str(out), "--image", images[0], "--image", images[1]]
    for text in TEXTS:
        args += ["--text", text]
    result = _cli(args)
    assert result.exit_code == 0, result.stderr
    return str(out), json.loads((out / "report.json").read_text()), result


def test_retrieval_cli_end_to_end(retrieval_run, images):
    out, report, result = retrieval_run
    task = report["task"]
    assert report["model_class"] == "BlipForImageTextRetrieval" and task["name"] == "retrieval"
    assert report["min_tokens"] == 0 and report["tokens_per_layer"] == {"baseline": [65, 65], "turbo": [65, 57]}
    assert task["baseline_onnx_equals_pytorch"] is True and task["turbo_onnx_equals_pytorch"] is True
    for name in ("baseline", "turbo"):
        assert max(task["max_abs_diff"][name].values()) < 1e-4
    agreement = task["agreement"]
    assert agreement["images"] == agreement["texts"] == 8
    for key in ("itc_text_to_image_top1", "itc_image_to_text_top1", "itm_text_to_image_top1",
                "itm_image_to_text_top1"):
        assert 0.0 <= agreement[key] <= 1.0
    assert -1.0 <= agreement["itm_rank_correlation"] <= 1.0 and agreement["itm_max_abs_diff"] >= 0.0

    assert list(report["files"]) == ["baseline_vision", "turbo_vision", "text_itc", "baseline_itm", "turbo_itm"]
    assert sorted(os.listdir(out)) == sorted([*(f"{n}.onnx" for n in report["files"]), "report.json"])
    graphs = report["parity"]["graphs"]
    assert all(g["ok"] and g["max_abs_diff"] < 1e-4 for g in graphs.values())
    assert graphs["turbo_vision"]["outputs"]["image_embeds"]["shape"] == [2, 49, 32]  # 65 - 2 * 8 tokens
    assert graphs["turbo_vision"]["outputs"]["image_feat"]["shape"] == [2, 32]
    assert graphs["turbo_itm"]["outputs"]["itm_logits"]["shape"] == [2, 2]

    bench = report["bench"]
    assert bench["scope"] == "image encoder"
    assert bench["speedup"] == pytest.approx(bench["turbo_ips"] / bench["baseline_ips"])
    pipeline = bench["pipeline"]
    assert pipeline["what"].startswith("ITM pairs/s") and pipeline["baseline_per_s"] > 0
    assert pipeline["speedup"] == pytest.approx(pipeline["turbo_per_s"] / pipeline["baseline_per_s"])

    assert "ONNX pipeline == transformers, scores (ITC, ITM): baseline ✓, turbo ✓" in result.output
    assert "retrieval agreement" in result.output and f'"{TEXTS[2]}"' in result.output


def test_retrieval_cli_scores_the_users_images_like_transformers(retrieval_run, images):
    """--image / --text: the processor's pixels and padded tokens through both ONNX pipelines."""
    _, report, _ = retrieval_run
    user = report["task"]["user_inputs"]
    assert user["images"] == images and user["texts"] == TEXTS
    loaded, models = _models("retrieval", 0)
    processor = loaded.image_processor
    pixels = torch.from_numpy(processor(images=[Image.open(p).convert("RGB") for p in images],
                                        return_tensors="np")["pixel_values"])
    ids, mask = _tokens(processor.tokenizer, TEXTS)
    for name, model in models.items():
        itc, itm = _itc_itm(model, pixels, ids, mask)
        np.testing.assert_allclose(user[name]["itc"], itc, atol=1e-4)
        np.testing.assert_allclose(user[name]["itm"], itm, atol=1e-4)
        assert np.shape(user[name]["itm"]) == (2, 3)


def test_retrieval_onnx_pipeline_equals_transformers(retrieval_run):
    """Any number of images and texts (3 x 4 against graphs of batch 2): ITC and ITM within 1e-4."""
    out, report, _ = retrieval_run
    loaded, models = _models("retrieval", 0)
    options = BlipOptions(task="retrieval", ratio=8, batch=2, min_tokens=0)
    pipelines = retrieval_pipelines(_onnx_runners(out, report), TokenIds.from_text_config(
        loaded.model.config.text_config), options)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ids, mask = _tokens(loaded.image_processor.tokenizer, [*TEXTS, "a cat"])
    for name, model in models.items():
        scores = pipelines[name].scores(pixels.numpy(), ids.numpy(), mask.numpy())
        itc, itm = _itc_itm(model, pixels, ids, mask)
        assert scores.itc.shape == scores.itm.shape == (3, 4)
        np.testing.assert_allclose(scores.itc, itc, atol=1e-4)
        np.testing.assert_allclose(scores.itm, itm, atol=1e-4)
        pairs = pipelines[name].score_pairs(pixels.numpy(), ids[:3].numpy(), mask[:3].numpy())
        np.testing.assert_allclose(pairs, np.diag(itm[:, :3]), atol=1e-4)


def test_retrieval_size_aware_only_changes_turbo_and_has_no_transformers_check(retrieval_run):
    out, report, _ = retrieval_run
    loaded, models = _models("retrieval", 0)
    options = BlipOptions(task="retrieval", ratio=8, batch=2, min_tokens=0, size_aware=True)
    ids = TokenIds.from_text_config(loaded.model.config.text_config)
    onnx = _onnx_runners(out, report)
    pipelines = retrieval_pipelines(onnx, ids, options)
    assert pipelines["turbo"].size_aware and not pipelines["baseline"].size_aware
    gen = torch.Generator().manual_seed(3)
    inputs = TaskInputs(torch.randn(2, 3, 32, 32, generator=gen), *_tokens(loaded.image_processor.tokenizer,
                                                                           TEXTS[:2]), False)
    log = []
    result = retrieval_parity(models, pipelines, inputs, options, log.append)
    assert result["baseline_onnx_equals_pytorch"] is True and "turbo_onnx_equals_pytorch" not in result
    assert result["size_aware_cross_attention"] is True and len(log) == 1

    feed = inputs.feed()
    aware = pipelines["turbo"].scores(*feed.values())
    plain = retrieval_pipelines(onnx, ids, BlipOptions(task="retrieval", ratio=8, batch=2))
    assert np.abs(aware.itm - plain["turbo"].scores(*feed.values()).itm).max() > 1e-6  # merged tokens weigh more
    np.testing.assert_array_equal(aware.itc, plain["turbo"].scores(*feed.values()).itc)  # ITC never sees the image
    # the size-aware ONNX pipeline equals the same pipeline run on the PyTorch modules
    graphs = retrieval_graphs(models["baseline"], models["turbo"], options, 32, {"baseline": 65, "turbo": 49})
    torch_runners = {k: TorchRunner(g.module, g.example_inputs, g.output_names, k) for k, g in graphs.items()}
    reference = retrieval_pipelines(torch_runners, ids, options)["turbo"].scores(*feed.values())
    np.testing.assert_allclose(aware.itm, reference.itm, atol=1e-4)


# ---- VQA -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("vqa") / "out"
    result = _cli(["blip", "--task", "vqa", "--model", "random:tiny", "--ratio", "8", "--batch", "2",
                   "--max-new-tokens", "6", "--runs", "2", "--out", str(out), "--image", images[0],
                   "--image", images[1], "--image", images[0], "--question", QUESTION])
    assert result.exit_code == 0, result.stderr
    return str(out), json.loads((out / "report.json").read_text()), result


def test_vqa_cli_end_to_end(vqa_run):
    out, report, result = vqa_run
    task = report["task"]
    assert report["model_class"] == "BlipForQuestionAnswering" and task["name"] == "vqa"
    assert report["min_tokens"] == 40 and report["tokens_per_layer"]["turbo"] == [65, 57]
    assert task["baseline_onnx_equals_pytorch"] is True and task["turbo_onnx_equals_pytorch"] is True
    assert task["num_beams"] == 1 and task["max_new_tokens"] == 6 and task["text_len"] == TEXT_LEN
    assert 0.0 <= task["turbo_vs_baseline_answer_agreement"] <= 1.0
    assert 0.0 <= task["turbo_vs_baseline_token_agreement"] <= 1.0
    assert len(task["tokens"]["baseline"]) == 2 and task["tokens"]["baseline"][0][0] == 510  # bos first

    assert list(report["files"]) == ["baseline_vision", "turbo_vision", "baseline_question", "turbo_question",
                                     "answer_cross_kv", "answer_decoder"]
    assert sorted(os.listdir(out)) == sorted([*(f"{n}.onnx" for n in report["files"]), "report.json"])
    graphs = report["parity"]["graphs"]
    assert all(g["ok"] and g["max_abs_diff"] < 1e-4 for g in graphs.values())
    assert graphs["turbo_question"]["outputs"]["question_embeds"]["shape"] == [2, TEXT_LEN, 32]
    assert graphs["answer_decoder"]["outputs"]["logits"]["shape"] == [2, 512]

    bench = report["bench"]
    assert bench["scope"] == "image encoder" and bench["pipeline"]["what"].startswith("answers/s")
    assert bench["pipeline"]["turbo_per_s"] > 0 and bench["pipeline"]["baseline_per_s"] > 0
    assert "ONNX pipeline == transformers, tokens: baseline ✓, turbo ✓" in result.output
    assert f"question: {QUESTION}" in result.output


def test_vqa_cli_answers_the_users_question_like_transformers(vqa_run, images):
    _, report, _ = vqa_run
    user = report["task"]["user_inputs"]
    assert user["question"] == QUESTION and user["images"] == [images[0], images[1], images[0]]
    loaded, models = _models("vqa", 40)
    processor = loaded.image_processor
    pixels = torch.from_numpy(processor(images=[Image.open(p).convert("RGB") for p in user["images"]],
                                        return_tensors="np")["pixel_values"])
    ids, mask = _tokens(processor.tokenizer, [QUESTION] * 3)
    for name, model in models.items():
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=6,
                                    num_beams=1, do_sample=False)
        assert user[name] == processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)


def test_vqa_onnx_pipeline_equals_transformers_generate(vqa_run):
    out, report, _ = vqa_run
    loaded, models = _models("vqa", 40)
    options = BlipOptions(task="vqa", ratio=8, batch=2, max_new_tokens=6)
    pipelines = vqa_pipelines(_onnx_runners(out, report), TokenIds.from_text_config(loaded.model.config.text_config),
                              options)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    ids, mask = _tokens(loaded.image_processor.tokenizer, ["how many people are there", "is it a dog"])
    for name, model in models.items():
        mine = pipelines[name].generate(pixels.numpy(), ids.numpy(), mask.numpy(), 12)  # the cache holds 6 + 8
        with torch.no_grad():
            ref = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12,
                                 num_beams=1, do_sample=False).numpy()
        np.testing.assert_array_equal(mine, ref)


def test_vqa_size_aware_only_changes_turbo_and_has_no_transformers_check(vqa_run):
    out, report, _ = vqa_run
    loaded, models = _models("vqa", 40)
    options = BlipOptions(task="vqa", ratio=8, batch=2, max_new_tokens=6, size_aware=True)
    ids = TokenIds.from_text_config(loaded.model.config.text_config)
    onnx = _onnx_runners(out, report)
    pipelines = vqa_pipelines(onnx, ids, options)
    assert pipelines["turbo"].size_aware and not pipelines["baseline"].size_aware
    inputs = TaskInputs(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
                        *_tokens(loaded.image_processor.tokenizer, [QUESTION, "is it red"]), False)
    result = vqa_parity(models, pipelines, inputs, options, lambda line: None)
    assert result["baseline_onnx_equals_pytorch"] is True and "turbo_onnx_equals_pytorch" not in result

    feed = inputs.feed()
    aware = pipelines["turbo"].encode(*feed.values())
    plain = vqa_pipelines(onnx, ids, BlipOptions(task="vqa", ratio=8, batch=2))["turbo"]
    assert np.abs(aware[0] - plain.encode(*feed.values())[0]).max() > 1e-6
    assert (aware[2] == 0).all()  # the answer decoder attends to every question position either way
    graphs = vqa_graphs(models["baseline"], models["turbo"], options, 32, {"baseline": 65, "turbo": 57})
    torch_runners = {k: TorchRunner(g.module, g.example_inputs, g.output_names, k) for k, g in graphs.items()}
    reference = vqa_pipelines(torch_runners, ids, options)["turbo"].encode(*feed.values())
    np.testing.assert_allclose(aware[0], reference[0], atol=1e-4)


def test_vqa_beam_search_and_early_stop_match_transformers():
    """On the PyTorch modules of the exported graphs (no export): beams, and a finished row padded like generate."""
    _, models = _models("vqa", 0)
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    ids, mask = _tokens(build_random_blip("tiny", "vqa").image_processor.tokenizer, [QUESTION, "is it a dog"])
    token_ids = TokenIds.from_text_config(models["baseline"].config.text_config)

    def pipelines(num_beams):
        options = BlipOptions(task="vqa", ratio=8, batch=2, max_new_tokens=8, num_beams=num_beams,
                              min_tokens=0)
        graphs = vqa_graphs(models["baseline"], models["turbo"], options, 32, {"baseline": 65, "turbo": 49})
        runners = {k: TorchRunner(g.module, g.example_inputs, g.output_names, k) for k, g in graphs.items()}
        return vqa_pipelines(runners, token_ids, options)

    def reference(model, num_beams):
        with torch.no_grad():
            return model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8,
                                  num_beams=num_beams, do_sample=False).numpy()

    beams = pipelines(3)
    for name, model in models.items():
        np.testing.assert_array_equal(beams[name].generate(pixels.numpy(), ids.numpy(), mask.numpy(), 8, 3),
                                      reference(model, 3))
    greedy = pipelines(1)["baseline"]
    with torch.no_grad():  # make [SEP] win after the first answer token: the decoder stops, like generate
        greedy.decoder.runner.module.cls.predictions.decoder.bias[token_ids.eos] += 50.0
    tokens = greedy.generate(pixels.numpy(), ids.numpy(), mask.numpy(), 8)
    np.testing.assert_array_equal(tokens, reference(models["baseline"], 1))
    assert tokens.shape[1] == 2 and (tokens[:, 1] == token_ids.eos).all()


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.txt").write_text("not an image")
    data = open(images[0], "rb").read()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return {"text": str(folder / "notes.txt"), "truncated": str(folder / "truncated.png"), "folder": str(folder),
            "missing": str(folder / "missing.png"), "image": images[0]}


@pytest.mark.parametrize("task, extra, fragments", [
    ("caption", ["--image", "{missing}"], ["image", "does not exist"]),
    ("caption", ["--image", "{text}"], ["image", "notes.txt", "not an image"]),
    ("caption", ["--image", "{truncated}"], ["image", "cannot read", "truncated.png"]),
    ("caption", ["--image", "{folder}"], ["image", "folder"]),
    ("vqa", ["--image", "{image}"], ["question", "--question"]),
    ("vqa", ["--image", "{image}", "--question", "   "], ["question", "non-empty"]),
    ("vqa", ["--question", "what is it?"], ["question", "--image"]),
    ("vqa", ["--image", "{missing}", "--question", "what is it?"], ["image", "does not exist"]),
    ("retrieval", ["--image", "{image}", "--text", ""], ["text", "empty"]),
    ("retrieval", ["--image", "{image}", "--text", "a dog", "--text", " "], ["text", "empty"]),
    ("retrieval", ["--image", "{image}"], ["text", "at least one --text"]),
    ("retrieval", ["--text", "a dog"], ["text", "--image"]),
    ("caption", ["--image", "{image}", "--question", "why?"], ["--question is for --task vqa"]),
    ("vqa", ["--image", "{image}", "--question", "why?", "--text", "a dog"], ["--text is for --task retrieval"]),
])
def test_bad_user_input_is_one_line_before_any_work(tmp_path, bad_files, task, extra, fragments):
    out = tmp_path / "out"
    args = ["blip", "--task", task, "--model", "random:tiny", "--ratio", "8", "--out", str(out)]
    result = _cli(args + [a.format(**bad_files) for a in extra])
    assert result.exit_code == 2, (result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("turbo-export: error:"), result.stderr  # nothing was loaded
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists() and result.stdout == ""


@pytest.mark.parametrize("extra, fragments", [
    (["--text", " ".join(["dog"] * 40)], ["text", "42 tokens", "--text-len 32"]),
    (["--text", "a dog", "--text-len", "100"], ["text-len", "64 positions"]),
])
def test_bad_text_for_the_checkpoint_is_an_error_before_export(tmp_path, bad_files, extra, fragments):
    out = tmp_path / "out"
    result = _cli(["blip", "--task", "retrieval", "--model", "random:tiny", "--ratio", "8", "--out", str(out),
                   "--image", bad_files["image"], *extra])
    assert result.exit_code == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("turbo-export: error:") and "exporting" not in result.stderr
    for fragment in fragments:
        assert fragment in last
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_checkpoint_of_another_task_is_an_error(tmp_path, images):
    loaded = build_random_blip("tiny", "vqa")
    folder = tmp_path / "blip-tiny-vqa"
    loaded.model.save_pretrained(folder)
    loaded.image_processor.save_pretrained(folder)
    out = tmp_path / "out"
    result = _cli(["blip", "--task", "retrieval", "--model", str(folder), "--ratio", "4", "--out", str(out),
                   "--image", images[0], "--text", "a dog"])
    assert result.exit_code == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("turbo-export: error:")
    assert "BlipForImageTextRetrieval" in last and "BlipForQuestionAnswering" in last and "--task vqa" in last
    assert not out.exists()
