"""Atomic output (everything is written to a staging folder and moved into place only on success, after checking up
front that the target can be written at all), and the checked reading of an export folder: report.json and the ONNX
files it names."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
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
    """The report.json of an export folder, checked once before anything reads it: a JSON object whose ``files``
    (and ``engines``) name files inside the folder, and whose common fields have their types; else a one-line
    TurboExportError naming the file and the field. A family's own fields: ``Family.check_report``."""
    path = os.path.join(export_dir, "report.json")
    if not os.path.isdir(export_dir):
        raise TurboExportError(f"export folder '{export_dir}' does not exist")
    if not os.path.isfile(path):
        raise TurboExportError(f"'{export_dir}' has no report.json; pass a folder written by '{made_by}'")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise TurboExportError(f"'{path}' is unreadable: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                               ) from None
    check_fields(report, COMMON_REPORT_FIELDS, path)
    for key in ("files", "engines"):
        for name, file in (report.get(key) or {}).items():
            if not GRAPH_NAME.fullmatch(name):
                raise TurboExportError(f"{path}: {key} name '{name[:60]}' is not a plain graph name (letters, digits, "
                                       "'_', '-', '.')")
            check_inside(export_dir, file, f"{path}: {key}.{name}")
    return report


GRAPH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# report.json fields every reader may rely on ("?": may be missing or null); a family adds its own (families.base)
COMMON_REPORT_FIELDS = {
    "files": "file-map", "engines": "file-map?", "family": "str?", "model": "str?", "model_class": "str?",
    "precision": "str?", "flops": "dict?", "flops.baseline": "number?", "flops.turbo": "number?",
    "flops.ratio": "number?", "parity": "dict?", "parity_baseline": "dict?", "bench": "dict?",
    "bench.baseline_ms": "number-list?", "bench.turbo_ms": "number-list?",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "pos-int": (lambda v: _is_int(v) and 1 <= v < 2 ** 31, "an integer from 1 to 2^31 - 1"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "int-list": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers"),
    "number-list": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    "int|int-list": (lambda v: _is_int(v) or (isinstance(v, list) and v != [] and all(_is_int(x) for x in v)),
                     "an integer or a list of integers"),
    "file-map": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) and x
                                                        for k, x in v.items()),
                 "an object of graph name -> file name"),
}


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def check_fields(data: Any, fields: dict[str, str], where: str) -> None:
    """Check ``data`` (parsed JSON) against ``fields``: dotted path -> a FIELD_TYPES name (``str:a|b``: one of the
    strings a, b), ``?`` at the end when the field may be missing or null (its children are then checked only when it is there). One-line error naming
    ``where`` and the first field that is wrong."""
    from turbo_export.errors import TurboExportError

    if not isinstance(data, dict):
        raise TurboExportError(f"{where}: expected a JSON object, got {_describe(data)}")
    for dotted, kind in fields.items():
        optional = kind.endswith("?")
        name, _, choices = kind.rstrip("?").partition(":")  # "str:a|b": one of the strings a, b
        test, wanted = FIELD_TYPES[name]
        if choices:
            allowed = choices.split("|")
            test, wanted = (lambda v, allowed=allowed: v in allowed), "one of " + ", ".join(f"'{c}'" for c in allowed)
        value: Any = data
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                break
        if value is None:
            parent = dotted.rsplit(".", 1)[0] if "." in dotted else None
            parent_missing = parent is not None and _lookup(data, parent) is None
            if optional or parent_missing and fields.get(parent, "").endswith("?"):
                continue
            raise TurboExportError(f"{where}: field '{dotted}' is missing (expected {wanted})")
        if not test(value):
            raise TurboExportError(f"{where}: field '{dotted}' must be {wanted}, got {_describe(value)}")


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def check_inside(folder: str, name: str, what: str) -> str:
    """``folder/name`` for a file name read from a report, refused when it would lie outside ``folder`` (an absolute
    path, a ``..`` component); never opened otherwise."""
    from turbo_export.errors import TurboExportError

    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\", "~")) or ".." in parts or "\0" in name:
        raise TurboExportError(f"{what}: '{name}' lies outside the export folder; report.json may name only files "
                               "inside it")
    return os.path.join(folder, name)


def read_onnx(path: str, what: str = "ONNX file") -> Any:
    """An ONNX ModelProto (external weights not read), or a one-line error naming the file: missing, empty, not
    parseable, or parseable but not a model (no graph outputs, no opset: protobuf reads almost any bytes)."""
    import onnx

    from turbo_export.errors import TurboExportError

    if not os.path.isfile(path):
        raise TurboExportError(f"{what} '{path}' does not exist")
    if os.path.getsize(path) == 0:
        raise TurboExportError(f"{what} '{path}' is empty (0 bytes), not a valid ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (DecodeError, RuntimeWarning-as-error, ...: all mean "not ONNX")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TurboExportError(f"{what} '{path}' is not a valid ONNX model ({first})") from None
    if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
        raise TurboExportError(f"{what} '{path}' is not a valid ONNX model (no IR version, opset or graph output)")
    return model


# The most pixels an input image may have: 64 M (8192 x 8192), far above any model's input size and far below what
# a decompression bomb (a small file declaring gigapixels) would make PIL allocate. PIL's own limit is set to it.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def open_image(path: str, what: str = "image") -> Any:
    """A PIL image, fully decoded, or a one-line error naming the file: missing, not an image, unreadable, or more
    than MAX_IMAGE_PIXELS pixels (refused from the header, before decoding: decompression bombs)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from turbo_export.errors import TurboExportError

    if not os.path.isfile(path):
        raise TurboExportError(f"{what}: '{path}' is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # Image.open reads the header only; the size is checked here, named
            try:
                image = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # and PIL's own guard, for frames and later opens
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                image.close()
                raise TurboExportError(f"{what}: '{path}' is too large ({width} x {height} pixels); at most "
                                       f"{MAX_IMAGE_PIXELS:,} pixels are read, a guard against decompression bombs")
            image.load()
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TurboExportError(f"{what}: '{path}' is too large ({str(exc).split(',')[0]}); at most "
                               f"{MAX_IMAGE_PIXELS:,} pixels are read, a guard against decompression bombs") from None
    except UnidentifiedImageError:
        raise TurboExportError(f"{what}: '{path}' is not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TurboExportError(f"{what}: cannot read image '{path}': {reason}") from None
