"""The allowed range of every number a user gives (sizes, counts, seeds, tolerances, ports), and the one check.

The library checks its arguments with :func:`check_range` before any work starts (the export job, validate, sweep,
visualize, compare, serve, triton-repo), so the CLI and the Python API refuse the same values with the same one-line
message: ``<option>: must be >= LOW and <= HIGH, got VALUE``. Non-finite floats (nan, inf) are always refused.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from turbo_export.errors import TurboExportError

MAX_IMAGE_SIZE = 4096  # pixels per side (--image-size, --resolution); the family also asks for a multiple of its patch
MAX_BATCH = 4096  # static batch of an exported graph, rows of one served call
MAX_BATCH_PIXELS = 2 ** 28  # batch x image-size^2 of one graph call (about 3 GiB of float32 RGB)
MAX_ATTENTION_SCORES = 2 ** 31  # batch x tokens^2 of one attention head (8 GiB of float32)
MAX_STEPS = 1000  # denoising steps
MAX_SEED = 2 ** 63 - 1  # seeds are 0 .. 2^63 - 1 (torch.Generator.manual_seed takes 64 bits)
MAX_RUNS = 10_000  # timed runs, warm-up runs, comparison iterations
MAX_ALPHA = 1e6  # Turbo's alpha (E = R - alpha * I); 0 is ToMe
MAX_GUIDANCE = 100.0  # classifier-free guidance scale
MAX_TOLERANCE = 1e3  # --atol / --rtol
MAX_MIN_TOKENS = 1_000_000
MAX_RATIO = 1_000_000  # tokens merged per block; the model's token count bounds it further
MAX_NEW_TOKENS = 1024
MAX_BEAMS = 64
MAX_TEXT_LEN = 4096  # the text model's positions bound it further
MAX_IMAGES = 100_000_000  # --limit
MAX_INSTANCES = 256  # model instances per served model
MAX_THREADS = 1024  # ONNX Runtime intra-op threads
MAX_REQUEST_MB = 4096.0  # largest request body the server accepts, in MiB
MAX_PORT = 65535
MAX_GPU_ID = 1023


def _show(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def check_range(name: str, value: Any, low: float, high: float, *, integer: bool = True,
                low_open: bool = False) -> Any:
    """``value`` if it is a (finite) number in [low, high] (``low_open``: (low, high]); else one-line
    TurboExportError naming the option ``name`` and the allowed range. ``integer``: whole numbers only."""
    bounds = f"{'>' if low_open else '>='} {_show(low)} and <= {_show(high)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integer and not isinstance(value, numbers.Integral)):
        kind = "an integer" if integer else "a number"
        raise TurboExportError(f"{name}: must be {kind} {bounds}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise TurboExportError(f"{name}: must be a finite number {bounds}, got {_show(value)}")
    if value > high or value < low or (low_open and value == low):
        raise TurboExportError(f"{name}: must be {bounds}, got {_show(value)}")
    return value


def check_optional(name: str, value: Any, low: float, high: float, **kwargs: Any) -> Any:
    """:func:`check_range` unless ``value`` is None (an option left at its default)."""
    return value if value is None else check_range(name, value, low, high, **kwargs)
