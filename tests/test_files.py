"""Atomic JSON writes: whole file or the old one, no leftovers, ordinary permissions."""

from __future__ import annotations

import json
import os

import pytest

from turbo_export.files import staged_output, write_json_atomic


def test_write_json_atomic_writes_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(str(tmp_path / "report.json"), {"a": 1})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "report.json").read_text()) == {"a": 1}
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(str(path), {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"bad": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["report.json"]


# ---- staged output: the folder is replaced whole or not at all --------------------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write(folder, **files):
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def test_staged_output_replaces_the_folder_whole_with_ordinary_permissions(tmp_path):
    out = tmp_path / "out"
    _write(out, **{"old.onnx": "old", "report.json": "{}"})
    (out / "turbo.onnx").mkdir()  # an entry of the wrong kind: replaced with the rest
    old = os.umask(0o022)
    try:
        with staged_output(str(out)) as stage:
            _write(stage, **{"turbo.onnx": "new", "report.json": "{}"})
    finally:
        os.umask(old)
    assert sorted(os.listdir(out)) == ["report.json", "turbo.onnx"] and (out / "turbo.onnx").read_text() == "new"
    assert out.stat().st_mode & 0o777 == 0o755
    assert os.listdir(tmp_path) == ["out"]


def test_staged_output_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, **{"turbo.onnx": "old"})
    real_rename = os.rename

    def rename(src, dst):
        if ".staging-" in os.path.basename(str(src)):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError), staged_output(str(out)) as stage:
        _write(stage, **{"turbo.onnx": "new"})
    assert os.listdir(out) == ["turbo.onnx"] and (out / "turbo.onnx").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_staged_output_error_leaves_the_folder_untouched(tmp_path):
    out = tmp_path / "out"
    _write(out, **{"turbo.onnx": "old"})
    with pytest.raises(RuntimeError), staged_output(str(out)) as stage:
        _write(stage, **{"turbo.onnx": "partial"})
        raise RuntimeError("export failed")
    assert (out / "turbo.onnx").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_staged_output_merge_adds_all_entries_or_none(tmp_path, monkeypatch):
    out = tmp_path / "repo"
    _write(out / "other", **{"config.pbtxt": "kept"})
    with staged_output(str(out), merge=True) as stage:
        _write(os.path.join(stage, "a"), **{"config.pbtxt": "a"})
    assert sorted(os.listdir(out)) == ["a", "other"]

    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError), staged_output(str(out), merge=True) as stage:
        for name in ("b", "c"):
            _write(os.path.join(stage, name), **{"config.pbtxt": name})
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["a", "other"]  # b was moved in, then back out
    assert os.listdir(tmp_path) == ["repo"]


def test_staging_left_by_a_killed_process_is_removed_and_a_cut_swap_restored(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    _write(tmp_path / f".out.staging-{dead}-0123abcd", **{"baseline.onnx": "partial"})
    _write(tmp_path / f".out.staging-{os.getpid()}-0123abce", x="in flight")  # a live process's: kept
    _write(tmp_path / f".out.old-{dead}-0123abcf", **{"turbo.onnx": "the previous export"})  # out is missing
    with staged_output(str(out)) as stage:
        assert sorted(os.listdir(tmp_path)) == sorted([f".out.staging-{os.getpid()}-0123abce", "out",
                                                       os.path.basename(stage)])
        assert (out / "turbo.onnx").read_text() == "the previous export"
        _write(stage, **{"turbo.onnx": "new"})
    assert (out / "turbo.onnx").read_text() == "new"


# ---- output paths checked before any work ------------------------------------------------------------------------

def test_check_writable_target(tmp_path):
    from turbo_export.errors import TurboExportError
    from turbo_export.files import check_writable_target

    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    os.symlink(tmp_path / "missing", tmp_path / "dangling-dir")
    bad = {
        (str(tmp_path / "file" / "out"), True): "is a file, not a folder",
        (str(tmp_path / "file"), True): "is a file, not a folder",
        (str(tmp_path / "folder"), False): "is a folder",
        (str(tmp_path / "dangling"), False): "which does not exist",
        (str(tmp_path / "dangling-dir" / "sub" / "out"), True): "which does not exist",
        ("/proc/turbo-export/out", True): "nothing can be created",
        (str(tmp_path / ("x" * 230)), True): "too long",
        ("", True): "empty path",
    }
    for (path, folder), words in bad.items():
        with pytest.raises(TurboExportError, match=words):
            check_writable_target(path, "out", folder=folder)
    for path, folder in ((tmp_path / "new" / "deeper", True), (tmp_path / "folder", True), (tmp_path / "file", False),
                         (tmp_path / "new.json", False)):
        check_writable_target(str(path), "out", folder=folder)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "dangling-dir", "file", "folder"]  # nothing created
