"""Atomic output (everything is written to a staging folder and moved into place only on success), and the checked
reading of an export folder: report.json and the ONNX files it names."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any


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
    """The report.json of an export folder, checked once before anything reads it: a JSON object whose ``files``
    (and ``engines``) name files inside the folder, and whose common fields have their types; else a one-line
    TurboExportError naming the file and the field. A family's own fields: ``Family.check_report``."""
    from turbo_export.errors import TurboExportError

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
