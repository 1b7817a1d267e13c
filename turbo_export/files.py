"""Atomic output: everything is written to a staging folder and moved into place only on success."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator


def write_json_atomic(path: str, data: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # open(..., "x") rather than mkstemp: the file gets the usual umask permissions, not mkstemp's 0600
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex}.json")
    try:
        with open(tmp, "x") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_output(out_dir: str) -> Iterator[str]:
    """Yield a staging folder beside ``out_dir``; on success its files replace those in ``out_dir``.

    On any error the staging folder is removed and ``out_dir`` is left exactly as it was.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.staging-")
    try:
        yield stage
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(os.listdir(stage)):
            target = os.path.join(out_dir, name)
            if os.path.isdir(os.path.join(stage, name)) and os.path.isdir(target):
                # a staged folder (the engine cache) replaces the old one whole; os.replace needs an empty target
                old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.old-")
                os.replace(target, os.path.join(old, name))
                os.replace(os.path.join(stage, name), target)
                shutil.rmtree(old, ignore_errors=True)
                continue
            os.replace(os.path.join(stage, name), target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_report(export_dir: str, made_by: str = "turbo-export") -> dict[str, Any]:
    """The report.json of an export folder, or a one-line error saying what is wrong with the folder."""
    from turbo_export.errors import TurboExportError

    path = os.path.join(export_dir, "report.json")
    if not os.path.isdir(export_dir):
        raise TurboExportError(f"export folder '{export_dir}' does not exist")
    if not os.path.isfile(path):
        raise TurboExportError(f"'{export_dir}' has no report.json; pass a folder written by '{made_by}'")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise TurboExportError(f"'{path}' is unreadable: {exc}") from None
