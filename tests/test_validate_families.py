"""`turbo-export validate` on BLIP (caption, retrieval) and Stable Diffusion export folders: known answers of the
parity functions, one-line errors, and end-to-end runs on random:tiny exports (turbo == baseline gives the
perfect scores: the Turbo graphs replaced by copies of the unaccelerated ones)."""

import json
import math
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from turbo_export.cli import main
from turbo_export.evaluate.validate_diffusion import DEFAULT_PROMPTS
from turbo_export.evaluate.validate_vl import generation_parity, retrieval_agreement
from turbo_export.pipelines.blip import TokenIds

DIGITS = os.path.join(os.path.dirname(__file__), "data", "mnist")
IDS = TokenIds(bos=1, eos=2, pad=0)


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


class _Words:
    def decode(self, row, skip_special_tokens=True):
        return " ".join(f"w{t}" for t in row if not (skip_special_tokens and t in (0, 1, 2)))


# ---------------------------------------------------------------------------------------------- known answers


def test_generation_parity_known_answers():
    base = [[1, 10, 11, 12, 13, 2], [1, 20, 21, 22, 23, 2, 0], [1, 30, 31, 32, 33, 2]]
    same = generation_parity({"baseline": base, "turbo": [list(r) for r in base]}, IDS, _Words(),
                             ["a.png", "b.png", "c.png"], "caption")
    assert same["bleu4"] == pytest.approx(1.0) and same["cider_d"] == pytest.approx(10.0)
    assert same["token_agreement"] == 1.0 and same["exact_match"] == 1.0 and "cider_d_note" not in same
    assert same["examples"][1] == {"image": "b.png", "baseline": "w20 w21 w22 w23", "turbo": "w20 w21 w22 w23"}

    turbo = [list(base[0]), [1, 20, 21, 22, 99, 2, 0], [1, 30, 31, 32, 33, 2]]  # one token of one caption differs
    one_off = generation_parity({"baseline": base, "turbo": turbo}, IDS, _Words(), ["a", "b", "c"], "caption")
    assert one_off["exact_match"] == pytest.approx(2 / 3)
    assert one_off["token_agreement"] == pytest.approx(18 / 19)
    assert 0 < one_off["bleu4"] < 1 and 0 < one_off["cider_d"] < 10

    # identical references: every idf is 0, so CIDEr-D is 0 and the JSON says why
    dull = generation_parity({"baseline": [base[0]] * 3, "turbo": [base[0]] * 3}, IDS, _Words(), list("abc"),
                             "answer")
    assert dull["cider_d"] == 0.0 and "idf is 0" in dull["cider_d_note"] and dull["bleu4"] == pytest.approx(1.0)


class _FakeRetrieval:
    """encode_images / encode_texts of a retrieval pipeline from fixed features."""

    def __init__(self, image_feat, text_feat):
        self.image_feat, self.text_feat = image_feat, text_feat

    def encode_images(self, pixels):
        return {"image_feat": self.image_feat, "image_embeds": self.image_feat[:, None, :]}

    def encode_texts(self, ids, mask):
        return self.text_feat


def test_retrieval_agreement_known_answers():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(6, 8)), rng.normal(size=(7, 8))
    ids = np.zeros((7, 4), np.int64)
    same = retrieval_agreement({"baseline": _FakeRetrieval(images, texts), "turbo": _FakeRetrieval(images, texts)},
                            np.zeros((6, 3, 2, 2)), ids, ids)
    for key in ("image_to_text_recall@1_agreement", "image_to_text_recall@5_agreement",
                "text_to_image_recall@1_agreement", "text_to_image_recall@5_agreement", "itc_rank_correlation"):
        assert same[key] == 1.0, key
    assert same["image_feat_cosine"]["min"] == pytest.approx(1.0) and same["itc_max_abs_diff"] == 0.0

    # Turbo's image features reversed: every image ranks the texts as another image does
    swapped = retrieval_agreement({"baseline": _FakeRetrieval(images, texts),
                                "turbo": _FakeRetrieval(images[::-1].copy(), texts)},
                               np.zeros((6, 3, 2, 2)), ids, ids)
    base_top = (images @ texts.T).argmax(1)
    expected = float(np.mean(base_top[::-1] == base_top))
    assert expected < 1.0 and swapped["image_to_text_recall@1_agreement"] == pytest.approx(expected)
    assert swapped["image_feat_cosine"]["min"] < 0.99


# ---------------------------------------------------------------------------------------------- errors


def _fake_export(folder, report):
    folder.mkdir()
    for name in report["files"].values():
        (folder / name).write_bytes(b"")
    (folder / "report.json").write_text(json.dumps(report))
    return str(folder)


def test_validate_family_errors(tmp_path):
    sd = _fake_export(tmp_path / "sd", {"family": "sd-unet", "model": "random:tiny",
                                        "files": {"baseline": "baseline.onnx", "turbo": "turbo.onnx"}})
    result = _run(["validate", sd, "--data", DIGITS])
    assert result.exit_code == 2 and "--prompts" in result.stderr and "not --data" in result.stderr
    result = _run(["validate", sd, "--prompts", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "prompts: " in result.stderr and "not a file" in result.stderr
    (tmp_path / "blank.txt").write_text("\n  \n")
    result = _run(["validate", sd, "--prompts", str(tmp_path / "blank.txt")])
    assert result.exit_code == 2 and "no non-empty line" in result.stderr

    blip = _fake_export(tmp_path / "blip", {"family": "blip", "model": "random:tiny", "task": {"name": "caption"},
                                            "files": {"baseline_vision": "baseline_vision.onnx"}})
    result = _run(["validate", blip])
    assert result.exit_code == 2 and "--data is required for a blip export" in result.stderr
    result = _run(["validate", blip, "--data", DIGITS, "--question", "what?"])
    assert result.exit_code == 2 and "--question is for vqa exports" in result.stderr
    assert "caption export" in result.stderr
    result = _run(["validate", blip, "--data", DIGITS, "--images", str(tmp_path / "pngs")])
    assert result.exit_code == 2 and "--images is for sd-unet exports" in result.stderr
    (tmp_path / "texts.txt").write_text("a dog\n")
    result = _run(["validate", sd, "--texts", str(tmp_path / "texts.txt")])
    assert result.exit_code == 2 and "--texts is for retrieval exports" in result.stderr
    os.remove(os.path.join(blip, "baseline_vision.onnx"))
    result = _run(["validate", blip, "--data", DIGITS])
    assert result.exit_code == 2 and "has no baseline_vision.onnx" in result.stderr

    other = _fake_export(tmp_path / "other", {"family": "llama", "files": {}})
    result = _run(["validate", other, "--data", DIGITS])
    assert result.exit_code == 2 and "family 'llama'" in result.stderr


# ---------------------------------------------------------------------------------------------- end to end


def _as_unaccelerated(folder, tmp_path, name):
    """A copy of an export folder whose Turbo graphs are the unaccelerated ones."""
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    for path in copy.iterdir():
        if path.name.startswith("baseline") and path.suffix == ".onnx":
            shutil.copyfile(path, copy / ("turbo" + path.name[len("baseline"):]))
    return str(copy)


@pytest.fixture(scope="module")
def caption_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("blip-caption") / "export"
    result = _run(["blip", "--task", "caption", "--model", "random:tiny", "--ratio", "4", "--batch", "2",
                   "--max-new-tokens", "6", "--no-bench", "--no-validate", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return str(out)


@pytest.mark.slow
def test_validate_blip_caption_cli(caption_export, tmp_path):
    json_path = tmp_path / "caption.json"
    result = _run(["validate", caption_export, "--data", DIGITS, "--limit", "5", "--json", str(json_path)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(json_path.read_text())
    assert report["family"] == "blip" and report["task"] == "caption" and report["images"] == 5
    assert report["max_new_tokens"] == 6 and report["num_beams"] == 1 and "weak evidence" in report["note"]
    onnx = report["onnx"]
    assert onnx["count"] == 5 and len(onnx["examples"]) == 5 and onnx["examples"][0]["image"] == "digit_00.png"
    for key in ("bleu4", "token_agreement", "exact_match"):
        assert 0.0 <= onnx[key] <= 1.0
    assert 0.0 <= onnx["cider_d"] <= 10.0
    assert "BLEU-4" in result.output and "weak evidence" in result.output

    same = _as_unaccelerated(caption_export, tmp_path, "same")
    json_path = tmp_path / "same.json"
    result = _run(["validate", same, "--data", DIGITS, "--limit", "5", "--json", str(json_path)])
    assert result.exit_code == 0, result.output + result.stderr
    onnx = json.loads(json_path.read_text())["onnx"]
    assert onnx["bleu4"] == pytest.approx(1.0) and onnx["exact_match"] == 1.0 and onnx["token_agreement"] == 1.0
    assert all(e["baseline"] == e["turbo"] for e in onnx["examples"])


@pytest.fixture(scope="module")
def retrieval_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("blip-retrieval") / "export"
    result = _run(["blip", "--task", "retrieval", "--model", "random:tiny", "--ratio", "4", "--batch", "2",
                   "--min-tokens", "0", "--text-len", "8", "--no-bench", "--no-validate", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return str(out)


@pytest.mark.slow
def test_validate_blip_retrieval_cli(retrieval_export, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a dog\na cat on a bed\n\na red car\n")
    json_path = tmp_path / "retrieval.json"
    result = _run(["validate", retrieval_export, "--data", DIGITS, "--limit", "7", "--texts", str(texts),
                   "--json", str(json_path)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(json_path.read_text())
    assert report["task"] == "retrieval" and report["texts"] == 3 and report["texts_source"] == "--texts"
    onnx = report["onnx"]
    assert onnx["images"] == 7 and onnx["texts"] == 3
    assert onnx["image_to_text_recall@5_agreement"] == 1.0  # 3 texts: the top 5 hold every text
    for key in ("image_to_text_recall@1_agreement", "text_to_image_recall@1_agreement",
                "text_to_image_recall@5_agreement"):
        assert 0.0 <= onnx[key] <= 1.0
    assert -1.0 <= onnx["itc_rank_correlation"] <= 1.0 and onnx["image_feat_cosine"]["count"] == 7

    too_long = tmp_path / "long.txt"
    too_long.write_text("a dog sitting on the grass near a tree\n")
    result = _run(["validate", retrieval_export, "--data", DIGITS, "--texts", str(too_long)])
    assert result.exit_code == 2 and "longer than the export's text length 8" in result.stderr

    same = _as_unaccelerated(retrieval_export, tmp_path, "same")
    json_path = tmp_path / "same.json"
    result = _run(["validate", same, "--data", DIGITS, "--limit", "7", "--json", str(json_path)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(json_path.read_text())
    assert report["texts"] == 10 and report["texts_source"].startswith("built-in")
    onnx = report["onnx"]
    assert onnx["image_to_text_recall@1_agreement"] == onnx["text_to_image_recall@1_agreement"] == 1.0
    assert onnx["itc_rank_correlation"] == 1.0 and onnx["itc_max_abs_diff"] == 0.0


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd") / "export"
    result = _run(["sd-unet", "--model", "random:tiny", "--ratio", "0.5", "--no-bench", "--no-validate",
                   "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return str(out)


@pytest.mark.slow
def test_validate_sd_cli(sd_export, tmp_path):
    json_path, images = tmp_path / "sd.json", tmp_path / "images"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle\na lighthouse at sunset\n")
    result = _run(["validate", sd_export, "--prompts", str(prompts), "--steps", "2", "--seed", "5",
                   "--images", str(images), "--json", str(json_path)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(json_path.read_text())
    assert report["family"] == "sd-unet" and report["prompts"] == 2 and report["steps"] == 2
    rows = report["onnx"]["per_prompt"]
    assert [r["seed"] for r in rows] == [5, 6] and rows[0]["prompt"] == "a red bicycle"
    for r in rows:
        assert 0 < r["images_psnr_db"] < math.inf and -1 <= r["images_ssim"] <= 1 and r["latents_psnr_db"] > 0
    mean = report["onnx"]["mean"]
    assert mean["images_psnr_db"] == pytest.approx(np.mean([r["images_psnr_db"] for r in rows]))
    assert sorted(os.listdir(images)) == [f"prompt0{i}-{n}.png" for i in (0, 1) for n in ("baseline", "turbo")]
    assert "weak evidence" in report["note"] and "mean turbo vs baseline" in result.output

    same = _as_unaccelerated(sd_export, tmp_path, "same")
    json_path = tmp_path / "same.json"
    result = _run(["validate", same, "--steps", "2", "--json", str(json_path)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(json_path.read_text())
    assert report["prompts"] == len(DEFAULT_PROMPTS) and report["prompts_source"].startswith("built-in")
    mean = report["onnx"]["mean"]
    assert mean["latents_psnr_db"] == math.inf and mean["images_psnr_db"] == math.inf
    assert mean["images_ssim"] == pytest.approx(1.0)
