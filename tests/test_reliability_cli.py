"""Issue 13, classes 1-3 and the CLI usability bugs: every bad input is one line on stderr and exit code 2, found
before any work (nothing written); output folders are replaced all or nothing; SIGTERM cleans up like SIGINT."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from turbo_export.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = str(2 ** 64)


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _tree(folder):
    """Every path under ``folder`` with its size (files) or None (folders), to see that nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), folder)] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = os.path.getsize(path) if os.path.isfile(path) else "link"
    return out


def _assert_one_line_exit_2(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    error = [line for line in lines if line.startswith("turbo-export: error:")]
    assert len(error) == 1 and lines[-1] == error[0], result.stderr
    for w in words:
        assert w in error[0], (w, error[0])
    return error[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch folder as the working directory (default output folders land here), with an empty 'export'
    folder, a tiny PNG and a regular file to put paths below."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "img.png")
    return tmp_path


# ---- class 1: absurd sizes and values ----------------------------------------------------------------------------

VIT = ["vit", "--model", "random:tiny", "--ratio", "4", "--no-bench"]
BLIP = ["blip", "--model", "random:tiny", "--ratio", "4", "--no-bench"]
SD = ["sd-unet", "--model", "random:tiny", "--ratio", "0.5", "--no-bench"]
GEN = ["sd-generate", "export", "--prompt", "a cat"]
SWEEP = ["sweep", "--model", "random:tiny", "--data", "builtin:skimage", "--no-bench"]
VIS = ["visualize", "--model", "random:tiny", "--image", "img.png", "--ratio", "4", "--out", "v.png"]
TRITON = ["triton-repo", "export", "--out", "repo"]

ABSURD = {
    # (args, the option the one line names, the range it gives)
    "vit image-size 100000": (VIT + ["--image-size", "100000"], "image-size", "<= 4096"),
    "vit image-size 0": (VIT + ["--image-size", "0"], "image-size", ">= 1"),
    "vit image-size 2048 (attention)": (VIT + ["--image-size", "2048", "--batch", "1"], "image-size",
                                        "attention scores"),
    "vit alpha inf": (VIT + ["--alpha", "inf"], "alpha", "finite"),
    "vit alpha nan": (VIT + ["--alpha", "nan"], "alpha", "finite"),
    "vit alpha -1": (VIT + ["--alpha", "-1"], "alpha", ">= 0"),
    "vit batch 0": (VIT + ["--batch", "0"], "batch", ">= 1"),
    "vit batch 10^6": (VIT + ["--batch", "1000000"], "batch", "<= 4096"),
    "vit batch x pixels": (VIT + ["--batch", "4096", "--image-size", "4096"], "batch", "pixels"),
    "vit min-tokens -1": (VIT + ["--min-tokens", "-1"], "min-tokens", ">= 0"),
    "vit runs 0": (VIT + ["--runs", "0"], "runs", ">= 1"),
    "vit runs 10^9": (VIT + ["--runs", "1000000000"], "runs", "<= 10000"),
    "vit atol nan": (VIT + ["--atol", "nan"], "atol", "finite"),
    "vit atol -1": (VIT + ["--atol", "-1"], "atol", ">= 0"),
    "vit ratio 2^64": (VIT[:4] + [BIG, "--no-bench"], "ratio", "maximum"),
    "blip num-beams 1000": (BLIP + ["--num-beams", "1000"], "num-beams", "<= 64"),
    "blip max-new-tokens 0": (BLIP + ["--max-new-tokens", "0"], "max-new-tokens", ">= 1"),
    "blip text-len 10^5": (BLIP + ["--text-len", "100000"], "text-len", "<= 4096"),
    "blip alpha nan": (BLIP + ["--alpha", "nan"], "alpha", "finite"),
    "sd-unet ratio nan": (SD[:4] + ["nan", "--no-bench"], "ratio", "(0, 0.75]"),
    "sd-unet ratio inf": (SD[:4] + ["inf", "--no-bench"], "ratio", "(0, 0.75]"),
    "sd-unet dst-seed 2^64": (SD + ["--dst-seed", BIG], "dst-seed", "<= 9223372036854775807"),
    "sd-unet dst-seed -1": (SD + ["--dst-seed", "-1"], "dst-seed", ">= 0"),
    "sd-unet resolution 10^5": (SD + ["--resolution", "100000"], "resolution", "<= 4096"),
    "sd-unet alpha inf": (SD + ["--alpha", "inf"], "alpha", "finite"),
    "sd-generate steps 10^5": (GEN + ["--steps", "100000"], "steps", "<= 1000"),
    "sd-generate steps 0": (GEN + ["--steps", "0"], "steps", ">= 1"),
    "sd-generate seed 2^64": (GEN + ["--seed", BIG], "seed", "<= 9223372036854775807"),
    "sd-generate seed -1": (GEN + ["--seed", "-1"], "seed", ">= 0"),
    "sd-generate guidance nan": (GEN + ["--guidance", "nan"], "guidance", "finite"),
    "sd-generate guidance inf": (GEN + ["--guidance", "inf"], "guidance", "finite"),
    "validate limit 0": (["validate", "export", "--limit", "0"], "limit", ">= 1"),
    "validate steps 10^5": (["validate", "export", "--steps", "100000"], "steps", "<= 1000"),
    "validate seed 2^70": (["validate", "export", "--seed", str(2 ** 70)], "seed", "<= 9223372036854775807"),
    "validate guidance -inf": (["validate", "export", "--guidance", "-inf"], "guidance", "finite"),
    "sweep alphas nan": (SWEEP + ["--alphas", "0,nan"], "alphas", "finite"),
    "sweep alphas inf": (SWEEP + ["--alphas", "inf"], "alphas", "finite"),
    "sweep batch 0": (SWEEP + ["--batch", "0"], "batch", ">= 1"),
    "sweep runs 0": (SWEEP + ["--runs", "0"], "runs", ">= 1"),
    "sweep limit 0": (SWEEP + ["--limit", "0"], "limit", ">= 1"),
    "sweep image-size 10^5": (SWEEP + ["--image-size", "100000"], "image-size", "<= 4096"),
    "sweep ratios 2^64": (SWEEP + ["--ratios", BIG], "ratios", "<= 1000000"),
    "visualize alpha inf": (VIS + ["--alpha", "inf"], "alpha", "finite"),
    "visualize min-tokens -1": (VIS + ["--min-tokens", "-1"], "min-tokens", ">= 0"),
    "visualize image-size 10^5": (VIS + ["--image-size", "100000"], "image-size", "<= 4096"),
    "serve max-request-mb inf": (["serve", "export", "--max-request-mb", "inf"], "max-request-mb", "finite"),
    "serve max-request-mb nan": (["serve", "export", "--max-request-mb", "nan"], "max-request-mb", "finite"),
    "serve max-request-mb 0": (["serve", "export", "--max-request-mb", "0"], "max-request-mb", "> 0"),
    "serve port 0": (["serve", "export", "--port", "0"], "port", ">= 1"),
    "serve port 70000": (["serve", "export", "--port", "70000"], "port", "<= 65535"),
    "serve grpc-port -1": (["serve", "export", "--grpc-port", "-1"], "grpc-port", ">= 0"),
    "serve max-batch 0": (["serve", "export", "--max-batch", "0"], "max-batch", ">= 1"),
    "serve instances 10^4": (["serve", "export", "--instances", "10000"], "instances", "<= 256"),
    "serve threads -1": (["serve", "export", "--threads", "-1"], "threads", ">= 0"),
    "triton-repo max-batch 0": (TRITON + ["--max-batch", "0"], "max-batch", ">= 1"),
    "triton-repo max-batch 10^6": (TRITON + ["--max-batch", "1000000"], "max-batch", "<= 4096"),
    "triton-repo instances 10^4": (TRITON + ["--instances", "10000"], "instances", "<= 256"),
    "triton-repo gpus -1": (TRITON + ["--gpus", "0,-1"], "gpus", ">= 0"),
    "compare atol nan": (["compare", "export", "--atol", "nan"], "atol", "finite"),
    "compare rtol inf": (["compare", "export", "--rtol", "inf"], "rtol", "finite"),
    "compare seed -1": (["compare", "export", "--seed", "-1"], "seed", ">= 0"),
    "compare iterations 0": (["compare", "export", "--iterations", "0"], "iterations", ">= 1"),
    "vit batch not a number": (VIT + ["--batch", "many"], "batch", "not a valid integer"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_number_is_one_line_naming_option_and_range(workdir, case):
    args, option, allowed = ABSURD[case]
    before = _tree(workdir)
    line = _assert_one_line_exit_2(_run(args), f"error: {option}: ", allowed)
    assert len(line) < 300
    assert _tree(workdir) == before  # nothing written: no output folder, no staging folder, no default folder


def test_library_refuses_the_same_values_as_the_cli():
    """The Python API gets the same checks (they live in the library, not in click types)."""
    from turbo_export.errors import TurboExportError
    from turbo_export.export.job import RunOptions, check_family_options, check_run_options
    from turbo_export.families.vit import VitOptions
    from turbo_export.serve.server import ServeOptions, check_serve_options

    with pytest.raises(TurboExportError, match="^alpha: must be a finite number"):
        check_family_options(VitOptions(ratio=4, alpha=float("inf")))
    with pytest.raises(TurboExportError, match="^batch: must be an integer"):
        check_family_options(VitOptions(ratio=4, batch=2.5))
    with pytest.raises(TurboExportError, match="^runs: must be >= 1"):
        check_run_options(RunOptions(bench_runs=0))
    with pytest.raises(TurboExportError, match="^max-request-mb: must be a finite number > 0"):
        check_serve_options(ServeOptions(max_request_mb=float("inf")))


# ---- class 2: output paths that cannot be written ----------------------------------------------------------------

def _unwritable(workdir, suffix=""):
    """Paths that cannot be written, by what is wrong with them."""
    os.symlink(workdir / f"nowhere{suffix}", workdir / f"dangling{suffix}")
    return {
        "below a file": f"a-file/out{suffix}",
        "under /proc": f"/proc/turbo-export-test/out{suffix}",
        "dangling symlink": f"dangling{suffix}",
        "name too long": "x" * 240 + suffix,
        "empty": "",
    }


UNWRITABLE_COMMANDS = {
    # command -> (args, OUT standing for the path; the option the one line names; a folder target?)
    "vit --out": (VIT + ["--out", "OUT"], "out", True),
    "sd-unet --out": (SD + ["--out", "OUT"], "out", True),
    "blip --out": (BLIP + ["--out", "OUT"], "out", True),
    "triton-repo --out": (["triton-repo", "export", "--out", "OUT"], "out", True),
    "validate --json": (["validate", "export", "--json", "OUT"], "json", False),
    "validate --images": (["validate", "export", "--images", "OUT"], "images", True),
    "sd-generate --out": (GEN + ["--out", "OUT"], "out", False),
    "visualize --out": (VIS[:-2] + ["--out", "OUT"], "out", False),
    "sweep --json": (SWEEP + ["--json", "OUT"], "json", False),
    "sweep --plot": (SWEEP + ["--plot", "OUT"], "plot", False),
}


@pytest.mark.parametrize("command", list(UNWRITABLE_COMMANDS))
def test_unwritable_output_is_refused_before_any_work(workdir, command):
    args, option, folder = UNWRITABLE_COMMANDS[command]
    if command == "sweep --plot":
        pytest.importorskip("matplotlib")
    places = _unwritable(workdir, ".png" if command == "sd-generate --out" else "")
    if folder:
        places["a regular file"] = "a-file"
    for place, path in places.items():
        before = _tree(workdir)
        result = _run([path if a == "OUT" else a for a in args])
        line = _assert_one_line_exit_2(result, f"error: {option}: ")
        assert "loading" not in result.stderr, (place, result.stderr)  # refused before any model load
        assert _tree(workdir) == before, (place, line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(workdir):
    ro = workdir / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        _assert_one_line_exit_2(_run(VIT + ["--out", ro / "out"]), "out: ", "not writable")
    finally:
        os.chmod(ro, 0o755)


# ---- class 3: half-written output --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny-r8"
    result = _run(["vit", "--model", "random:tiny", "--ratio", "8", "--batch", "1", "--runs", "2", "--out", out])
    assert result.exit_code == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # no progress bar when stderr is not a tty
    return out


def test_folder_with_a_wrong_kind_of_entry_is_replaced_whole_or_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "turbo.onnx").mkdir()  # a folder where the export writes a file
    (out / "turbo.onnx" / "keep").write_text("old")
    (out / "report.json").write_text(json.dumps({"family": "vit", "model": "random:tiny", "alpha": 6.0}))
    (out / "stale.txt").write_text("from an earlier export")
    before = _tree(out)
    args = ["vit", "--model", "random:tiny", "--ratio", "8", "--batch", "1", "--no-bench", "--out", out]
    _assert_one_line_exit_2(_run(args), "out: ", "--overwrite", "alpha 6.0 -> 150.0")
    assert _tree(out) == before  # untouched

    result = _run(args + ["--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(out)) == ["baseline.onnx", "report.json", "turbo.onnx"]  # replaced whole
    assert os.path.isfile(out / "turbo.onnx") and json.loads((out / "report.json").read_text())["alpha"] == 150.0
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or backup folder left


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _run(VIT + ["--out", out, "--overwrite"])
    _assert_one_line_exit_2(result, "out: ", "no report.json")
    assert os.listdir(out) == ["notes.txt"]


def _wait_for(predicate, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.005)
    return None


def test_sigterm_during_export_leaves_nothing_and_keeps_the_old_folder(tiny_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_export, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "plugins")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "turbo_export.cli", "vit", "--model", "random:tiny", "--ratio", "4", "--batch", "1",
         "--no-bench", "--out", str(out), "--overwrite"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        # wait until the export is writing into its staging folder (a file in it), then terminate it
        staged = _wait_for(lambda: [s for s in glob.glob(str(tmp_path / ".out.staging-*")) if os.listdir(s)], 180)
        assert staged, "the export never staged a file"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("turbo-export: error: terminated")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no .out.staging-* (with its partial ONNX file), no backup
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


# ---- usability ---------------------------------------------------------------------------------------------------

def test_default_folder_with_other_settings_is_not_replaced_silently(workdir):
    folder = workdir / "engines" / "tiny-r8"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"family": "vit", "model": "random:tiny", "ratio": 8,
                                                    "alpha": 6.0, "batch": 1}))
    before = _tree(workdir)
    line = _assert_one_line_exit_2(_run(["vit", "--model", "random:tiny", "--ratio", "8", "--batch", "1"]),
                                   "engines/tiny-r8", "alpha 6.0 -> 150.0", "--overwrite", "--out")
    assert "other settings" in line
    assert _tree(workdir) == before


def test_same_export_again_needs_no_overwrite_other_settings_do(tmp_path):
    from turbo_export.errors import TurboExportError
    from turbo_export.export.job import check_replace

    out = tmp_path / "out"
    out.mkdir()
    check_replace(str(out), False, {"alpha": 6.0})  # empty folder
    (out / "report.json").write_text(json.dumps({"family": "vit", "alpha": 6.0, "ratio": [8, 4],
                                                 "bench": {"backend": "onnxruntime"}}))
    check_replace(str(out), False, {"family": "vit", "alpha": 6.0, "ratio": [8, 4], "backend": "onnxruntime",
                                    "batch": 2})  # the same export again (batch not recorded: not compared)
    for changed, words in (({"alpha": 150.0}, "alpha 6.0 -> 150.0"), ({"ratio": [8, 8]}, "ratio [8, 4] -> [8, 8]"),
                           ({"backend": "tensorrt"}, "backend onnxruntime -> tensorrt")):
        with pytest.raises(TurboExportError, match="other settings") as info:
            check_replace(str(out), False, {"family": "vit", "alpha": 6.0, "ratio": [8, 4], **changed})
        assert words in str(info.value) and "--overwrite" in str(info.value)
        check_replace(str(out), True, changed)
    (out / "report.json").write_text("{not json")
    with pytest.raises(TurboExportError, match="unreadable"):
        check_replace(str(out), False, {"alpha": 6.0})


MERGES_NOTHING = {
    "vit ratio 0": (["vit", "--model", "random:tiny", "--ratio", "0"], ["ratio", "above 0"]),
    "vit ratio 0,0,0,0": (["vit", "--model", "random:tiny", "--ratio", "0,0,0,0"], ["ratio", "above 0"]),
    "vit min-tokens above the tokens": (["vit", "--model", "random:tiny", "--ratio", "4", "--min-tokens", "100"],
                                        ["min-tokens", "65 tokens", "--min-tokens 65"]),
    "blip retrieval default min-tokens": (["blip", "--task", "retrieval", "--model", "random:tiny", "--ratio", "4"],
                                          ["min-tokens", "retrieval default is 100", "--min-tokens 65"]),
}


@pytest.mark.parametrize("case", list(MERGES_NOTHING))
def test_turbo_that_merges_nothing_is_an_error_saying_what_to_change(workdir, case):
    args, words = MERGES_NOTHING[case]
    before = _tree(workdir)
    _assert_one_line_exit_2(_run(args + ["--batch", "1", "--no-bench"]), *words)
    assert _tree(workdir) == before


def test_quiet_is_accepted_before_and_after_the_command(workdir):
    for args in (["--quiet", "vit", "--model", "random:tiny", "--ratio", "0"],
                 ["vit", "-q", "--model", "random:tiny", "--ratio", "0"]):
        _assert_one_line_exit_2(_run(args), "ratio")


def test_check_trt_takes_an_export_folder(tiny_export, tmp_path):
    result = _run(["check-trt", tiny_export])
    assert "Traceback" not in result.stderr
    assert "baseline.onnx" in result.stdout and "turbo.onnx" in result.stdout, result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_exit_2(_run(["check-trt", empty]), "no .onnx files")


@pytest.mark.parametrize("drop, words", [(0.8, "0.80 points lower than unaccelerated"),
                                         (-0.5, "0.50 points higher than unaccelerated"),
                                         (0.0, "the same as unaccelerated")])
def test_top1_change_wording_is_sign_correct(drop, words):
    from turbo_export.evaluate.validate import top1_change

    assert top1_change(drop) == words


def test_full_disk_while_exporting_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capfd):
    """A disk that fills up while a graph is written (numpy's tofile raises an OSError without errno) is one line,
    exit code 1, and the staged output is gone."""
    from turbo_export.export import job

    def full(*args, **kwargs):
        raise OSError("problem writing element 1645568 to file")

    monkeypatch.setattr(job, "export_graphs", full)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["vit", "--model", "random:tiny", "--ratio", "4", "--no-bench", "--out", str(out)])
    lines = [ln for ln in capfd.readouterr().err.strip().splitlines() if not ln.startswith("loading ")]  # progress
    assert exit_info.value.code == 1 and len(lines) == 1 and "no space left" in lines[0], lines
    assert not out.exists() and os.listdir(tmp_path) == []
