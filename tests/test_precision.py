"""--precision int8 through the one export job for every family (dynamic, and static QDQ with calibration), the
fp32 reference in the same interleaved run, and the precision checks that run before any export work."""

from __future__ import annotations

import json
import os

import onnx
import pytest
from click.testing import CliRunner

from turbo_export.cli import main
from turbo_export.export.precision import INT8_MIN_COSINE

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


def _run(args):
    return CliRunner().invoke(main, args)


def _report(folder):
    return json.load(open(os.path.join(folder, "report.json")))


def _ops(path):
    return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


@pytest.fixture(scope="module")
def vit_int8(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("int8") / "vit")
    result = _run(["vit", "--model", "random:tiny", "--ratio", "4", "--batch", "2", "--runs", "2",
                   "--precision", "int8", "--out", out])
    assert result.exit_code == 0, result.output
    return out


def test_int8_vit_graphs_quantized_merge_float_and_close_to_fp32(vit_int8):
    report = _report(vit_int8)
    assert report["precision"] == "int8" and report["int8"]["mode"] == "dynamic"
    for name in ("baseline", "turbo"):
        check = report["parity_int8"][name]
        assert check["ok"] and check["cosine"] >= INT8_MIN_COSINE
        assert "DynamicQuantizeLinear" in _ops(os.path.join(vit_int8, f"{name}.onnx"))
    assert "TopK" in _ops(os.path.join(vit_int8, "turbo.onnx"))
    assert "TopK x" in report["int8"]["graphs"]["turbo"]["excluded"]
    assert report["int8"]["graphs"]["baseline"]["excluded"].startswith("no merge nodes")
    assert report["files_fp32"] == {"baseline": "baseline.fp32.onnx"}
    assert "DynamicQuantizeLinear" not in _ops(os.path.join(vit_int8, "baseline.fp32.onnx"))


def test_int8_bench_times_the_fp32_graph_beside_the_int8_ones(vit_int8):
    bench = _report(vit_int8)["bench"]
    rows = {(p["name"], p["precision"]) for p in bench["peers"]}
    assert {("unaccelerated", "fp32"), ("unaccelerated", "int8"), ("turbo", "int8")} <= rows
    fp32 = next(p for p in bench["peers"] if p["name"] == "unaccelerated" and p["precision"] == "fp32")
    assert bench["speedup_vs_fp32"] == pytest.approx(bench["turbo_ips"] / fp32["items_per_s"])


def test_static_int8_on_a_random_preset_calibrates_on_seeded_inputs(tmp_path):
    out = str(tmp_path / "static")
    result = _run(["vit", "--model", "random:tiny-dinov2", "--ratio", "4", "--batch", "2", "--no-bench",
                   "--precision", "int8", "--int8-mode", "static", "--out", out])
    assert result.exit_code == 0, result.output
    report = _report(out)
    assert report["int8"]["mode"] == "static"
    assert all("seeded random" in c for c in report["int8"]["calibration"].values())
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(os.path.join(out, "turbo.onnx"))


@pytest.fixture(scope="module")
def grey_checkpoint(tmp_path_factory):
    """A tiny 1-channel ViT classifier saved as a local checkpoint (a real checkpoint as far as the CLI knows)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = str(tmp_path_factory.mktemp("grey") / "vit-grey")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=4, num_channels=1, num_labels=10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.1307], image_std=[0.3081], do_resize=True,
                      size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


def test_static_int8_calibrates_on_real_images(grey_checkpoint, tmp_path):
    out = str(tmp_path / "calibrated")
    result = _run(["vit", "--model", grey_checkpoint, "--ratio", "4", "--batch", "4", "--no-bench",
                   "--precision", "int8", "--int8-mode", "static", "--calib-data", DIGITS, "--out", out])
    assert result.exit_code == 0, result.output
    calibration = _report(out)["int8"]["calibration"]
    assert all(c.startswith("32 images of") for c in calibration.values())


@pytest.mark.parametrize("args,fragments", [
    (["--precision", "int8", "--backend", "tensorrt"], ("backend tensorrt:",)),
    (["--precision", "int8", "--int8-mode", "static", "--calib-data", "/nonexistent-folder"], ("/nonexistent-folder",)),
    (["--precision", "int8", "--calib-data", DIGITS], ("calib-data:", "--int8-mode static")),
    (["--calib-data", DIGITS], ("calib-data:", "--precision int8")),
    (["--precision", "fp16"], ("precision: fp16 needs --backend tensorrt",)),
])
def test_precision_errors_are_one_line_before_any_work(args, fragments, tmp_path):
    out = tmp_path / "out"
    result = _run(["vit", "--model", "random:tiny", "--ratio", "4", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert all(f in result.stderr for f in fragments), result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_static_int8_on_a_real_checkpoint_needs_calibration_data(grey_checkpoint, tmp_path):
    result = _run(["vit", "--model", grey_checkpoint, "--ratio", "4", "--precision", "int8", "--int8-mode", "static",
                   "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "calib-data: --int8-mode static on a real checkpoint" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run(["vit", "--model", grey_checkpoint, "--ratio", "4", "--precision", "int8", "--int8-mode", "static",
                   "--calib-data", str(empty), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and str(empty) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [
    ["blip", "--model", "random:tiny", "--ratio", "4", "--min-tokens", "0", "--batch", "2", "--max-new-tokens", "4"],
    ["sd-unet", "--model", "random:tiny", "--ratio", "0.5"],
])
def test_int8_every_family(command, tmp_path):
    out = str(tmp_path / "out")
    result = _run([*command, "--precision", "int8", "--no-bench", "--out", out])
    assert result.exit_code == 0, result.output
    report = _report(out)
    assert report["precision"] == "int8"
    assert set(report["parity_int8"]) - {"compared"} == set(report["files"])
    assert all(r["ok"] for k, r in report["parity_int8"].items() if k != "compared")


def test_validate_reports_an_int8_export_against_its_fp32_graph(vit_int8, tmp_path):
    out = tmp_path / "validate.json"
    result = _run(["validate", vit_int8, "--data", DIGITS, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "against baseline.fp32.onnx (the unaccelerated fp32 graph):" in result.output
    report = json.load(open(out))
    assert report["precision"] == "int8"
    cmp = report["precision_vs_fp32"]
    assert set(cmp) == {"reference", "unaccelerated", "turbo", "turbo_fp32_pytorch"}
    assert all(0 <= cmp[k]["agreement"] <= 1 and "turbo_top1" in cmp[k]
               for k in ("unaccelerated", "turbo", "turbo_fp32_pytorch"))


def test_sweep_at_int8_rows_against_the_fp32_graph(tmp_path):
    out = tmp_path / "sweep.json"
    result = _run(["sweep", "--model", "random:tiny", "--ratios", "0,4", "--alphas", "150", "--data", DIGITS,
                   "--batch", "8", "--no-bench", "--precision", "int8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    sweep = json.load(open(out))
    assert sweep["precision"] == "int8"
    assert [(r["r"], r["precision"]) for r in sweep["rows"]] == [(0, "fp32"), (0, "int8"), (4, "int8")]
    assert sweep["rows"][0]["parity"]["agreement"] == 1.0 and 0 < sweep["rows"][1]["parity"]["agreement"] <= 1.0
    assert "| 4 | 150 | int8 |" in result.output
