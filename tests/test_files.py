"""Atomic JSON writes: whole file or the old one, no leftovers, ordinary permissions."""

from __future__ import annotations

import json
import os

import pytest

from turbo_export.files import write_json_atomic


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
