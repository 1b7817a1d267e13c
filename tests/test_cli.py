import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import SHARED

from turbo_export.cli import main


def _run(args):
    runner = CliRunner()
    result = runner.invoke(main, args, catch_exceptions=False)
    return result


def test_vit_end_to_end_on_tiny(tmp_path):
    out = tmp_path / "tiny-r8"
    result = _run(["vit", "--model", "random:tiny", "--ratio", "8", "--batch", "2", "--runs", "3",
                   "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert sorted(os.listdir(out)) == ["baseline.onnx", "report.json", "turbo.onnx"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "random:tiny" and report["ratio"] == 8 and report["alpha"] == 150.0  # defaults.py: classifiers
    assert report["tokens_per_layer"] == {"baseline": [65] * 4, "turbo": [65, 57, 49, 41]}
    assert report["flops"]["baseline"] > report["flops"]["turbo"] > 0
    assert report["parity"]["max_abs_diff"] < 1e-4 and report["parity"]["cosine"] > 0.9999
    bench = report["bench"]
    assert bench["backend"] == "onnxruntime" and bench["batch"] == 2
    assert bench["baseline_ips"] > 0 and bench["turbo_ips"] > 0
    assert bench["speedup"] == pytest.approx(bench["turbo_ips"] / bench["baseline_ips"])
    assert "speedup" in result.output and "FLOPs ratio" in result.output
    assert "Validating ONNX model" in result.stderr


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("turbo-export: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "random:tiny", "--ratio", "-3"], ["ratio", ">= 0"]),
        (["--model", "random:tiny", "--ratio", "40"], ["ratio", "maximum 32"]),
        (["--model", "random:tiny", "--ratio", "abc"], ["ratio", "integer"]),
        (["--model", "random:nope", "--ratio", "4"], ["unknown preset", "random:vit-base-patch16-224"]),
        (["--model", "./no/such/folder", "--ratio", "4"], ["does not exist"]),
        (["--model", "random:tiny", "--ratio", "4", "--batch", "0"], ["batch"]),
        (["--model", "random:tiny", "--ratio", "4", "--image-size", "30"], ["image-size", "multiple"]),
        (["--model", "random:tiny", "--ratio", "4", "--backend", "tensorrt"], ["tensorrt", "--backend onnxruntime"]),
        (["--model", "random:tiny", "--ratio", "4", "--bogus"], ["--bogus"]),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, fragments):
    out = tmp_path / "out"
    result = _run(["vit", *args, "--out", str(out), "--no-bench"])
    _assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_unreadable_and_unsupported_model_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(_run(["vit", "--model", str(empty), "--ratio", "4"]), "no config.json")

    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertModel"]).save_pretrained(bert)
    _assert_one_line_error(_run(["vit", "--model", str(bert), "--ratio", "4"]), "BertModel", "ViTModel")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    _assert_one_line_error(_run(["vit", "--model", str(corrupt), "--ratio", "4"]), "unreadable config.json")


def test_existing_output_is_untouched_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("previous")
    _assert_one_line_error(_run(["vit", "--model", "random:tiny", "--ratio", "99", "--out", str(out)]), "maximum")
    assert (out / "report.json").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_console_script_reports_errors_without_traceback():
    result = subprocess.run([sys.executable, "-m", "turbo_export.cli", "vit", "--model", "random:x", "--ratio", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("turbo-export: error: model: unknown preset")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "weights", "vit-mnist")), reason="shared weights absent")
def test_real_checkpoint_folder(tmp_path):
    out = tmp_path / "mnist"
    result = _run(["vit", "--model", os.path.join(SHARED, "weights", "vit-mnist"), "--ratio", "4", "--batch", "2",
                   "--no-bench", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model_class"] == "ViTForImageClassification" and report["image_size"] == 28
    assert report["tokens_per_layer"]["turbo"] == [50, 46, 42, 38, 34, 30]
    assert report["parity"]["max_abs_diff"] < 1e-4
