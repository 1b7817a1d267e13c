"""Atomic output: everything is written to a staging folder and moved into place only on success, after checking
up front that the target can be written at all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from turbo_export.errors import TurboExportError


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


# The longest name of the output itself: its staging and backup siblings add ".NAME.staging-PID-HEX"
NAME_MAX = 255
SIBLING_EXTRA = 48


def check_writable_target(path: str, what: str, folder: bool = False) -> None:
    """One-line TurboExportError (naming the option ``what``) unless ``path`` can be written here, before any work.

    ``folder``: ``path`` is an output folder (created with its parents, or replaced whole); else a file, replaced
    atomically. Refused: an empty path, a path below a regular file, a dangling symbolic link, a folder where a file
    goes (and the reverse), a name too long for its staging sibling, and a place where nothing can be created (a
    read-only folder or file system, /proc). Nothing is left behind: a probe folder is created and removed.
    """
    if not path or not str(path).strip():
        raise TurboExportError(f"{what}: empty path")
    path = os.fspath(path)
    if "\0" in path:
        raise TurboExportError(f"{what}: the path contains a NUL byte")
    if os.path.islink(path) and not os.path.exists(path):
        raise TurboExportError(f"{what}: '{path}' is a symbolic link to '{os.readlink(path)}', which does not exist")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise TurboExportError(f"{what}: '{path}' is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise TurboExportError(f"{what}: '{path}' is a folder; give a file path")
    full = os.path.abspath(path)
    parts = [p for p in full.split(os.sep) if p]
    longest = max((len(os.fsencode(p)) for p in parts), default=0)
    if parts and (longest > NAME_MAX or len(os.fsencode(parts[-1])) > NAME_MAX - SIBLING_EXTRA):
        raise TurboExportError(f"{what}: a name in '{path}' is too long ({longest} bytes; at most "
                               f"{NAME_MAX - SIBLING_EXTRA} for the last one)")
    existing = os.path.dirname(full)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        raise TurboExportError(f"{what}: cannot write '{path}': '{existing}' is a symbolic link to "
                               f"'{os.readlink(existing)}', which does not exist")
    if not os.path.isdir(existing):
        raise TurboExportError(f"{what}: cannot write '{path}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TurboExportError(f"{what}: cannot write '{path}': '{existing}' is not writable here")
    probe = os.path.join(existing, f".turbo-export-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as exc:
        raise TurboExportError(f"{what}: cannot write '{path}': nothing can be created in '{existing}' "
                               f"({exc.strerror or exc})") from None


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (the swap of an output folder is never cut in half), then
    take effect. Outside the main thread (where handlers cannot be set) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if received:
            signal.raise_signal(received[0])


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def remove_stale_siblings(out_dir: str) -> list[str]:
    """Remove the ``.NAME.staging-PID-*`` folders beside ``out_dir`` whose process is gone (killed mid-export),
    and restore a ``.NAME.old-PID-*`` backup when a swap was cut short and ``out_dir`` is missing; returns what
    was removed or restored."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    pattern = re.compile(rf"\.{re.escape(name)}\.(staging|old)-(\d+)-[0-9a-f]+")
    done = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return done
    for entry in entries:
        match = pattern.fullmatch(entry)
        if not match or _pid_alive(int(match.group(2))):
            continue
        path = os.path.join(parent, entry)
        if match.group(1) == "old" and not os.path.lexists(out_dir):
            with contextlib.suppress(OSError):
                os.rename(path, out_dir)
                done.append(path)
                continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


def _sibling(out_dir: str, kind: str) -> str:
    parent, name = os.path.split(out_dir)
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _swap_in(stage: str, out_dir: str) -> None:
    """``stage`` becomes ``out_dir`` in one rename; an old ``out_dir`` is renamed aside first and put back if the
    second rename fails, so ``out_dir`` is always the whole old folder or the whole new one."""
    if not os.path.lexists(out_dir):
        os.rename(stage, out_dir)
        return
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise TurboExportError(f"out: '{out_dir}' is not a folder; nothing was changed")
    with contextlib.suppress(OSError):
        shutil.copymode(out_dir, stage)
    backup = _sibling(out_dir, "old")
    try:
        os.rename(out_dir, backup)
    except OSError as exc:
        raise TurboExportError(f"out: cannot replace '{out_dir}' ({exc.strerror or exc}); nothing was changed"
                               ) from None
    try:
        os.rename(stage, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _merge_in(stage: str, out_dir: str) -> None:
    """Add ``stage``'s entries to ``out_dir`` (none of them may exist there); on a failure the entries already
    moved are moved back, so ``out_dir`` gets all of them or none."""
    if not os.path.lexists(out_dir):
        os.rename(stage, out_dir)
        return
    names = sorted(os.listdir(stage))
    taken = [n for n in names if os.path.lexists(os.path.join(out_dir, n))]
    if taken:
        raise TurboExportError(f"out: '{out_dir}' already has {', '.join(taken)}; nothing was changed")
    moved: list[str] = []
    try:
        for n in names:
            os.rename(os.path.join(stage, n), os.path.join(out_dir, n))
            moved.append(n)
    except BaseException:
        for n in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(os.path.join(out_dir, n), os.path.join(stage, n))
        raise


@contextlib.contextmanager
def staged_output(out_dir: str, merge: bool = False) -> Iterator[str]:
    """Yield a staging folder beside ``out_dir``; on success it replaces ``out_dir`` whole (``merge``: its entries
    are added to ``out_dir``, whose other entries stay), all or nothing.

    On any error, SIGINT or SIGTERM (see ``cli.common``) the staging folder is removed and ``out_dir`` is left
    exactly as it was; staging folders of processes that died (SIGKILL) are removed by the next run.
    """
    out_dir = os.path.realpath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    remove_stale_siblings(out_dir)
    stage = _sibling(out_dir, "staging")
    os.mkdir(stage)  # ordinary permissions (mkdtemp's are 0700)
    try:
        yield stage
        with deferred_signals():
            (_merge_in if merge else _swap_in)(stage, out_dir)
    finally:
        with deferred_signals():
            shutil.rmtree(stage, ignore_errors=True)


def onnx_files_in(paths: Iterable[str]) -> list[str]:
    """The paths, with each folder replaced by the .onnx files in it (sorted); a folder without any is an error."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(f for f in os.listdir(path) if f.endswith(".onnx")
                           and os.path.isfile(os.path.join(path, f)))
            if not found:
                raise TurboExportError(f"'{path}' holds no .onnx files")
            out += [os.path.join(path, f) for f in found]
        else:
            out.append(path)
    return out


def read_report(export_dir: str, made_by: str = "turbo-export") -> dict[str, Any]:
    """The report.json of an export folder, or a one-line error saying what is wrong with the folder."""
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
