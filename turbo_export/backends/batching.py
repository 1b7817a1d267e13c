"""Any number of rows through a graph of static batch: the one padding rule of the package.

Full batches, the last one padded by repeating its last row (a real input, so token ids, masks and positions stay
valid), and the padding rows dropped from the outputs. Turbo merges within each row, so padding never changes the
real rows. A dynamic-batch graph (``batch`` 0) takes every row in one call.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

Feed = dict[str, np.ndarray]


def static_batch(runner: Any) -> int:
    """The static batch of a runner's graph (its first input's first dimension); 0 when that is symbolic."""
    dims = runner.inputs[0].shape
    return int(dims[0]) if dims and isinstance(dims[0], int) and dims[0] > 0 else 0


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` padded along axis 0 to ``rows`` by repeating its last row."""
    return x if len(x) >= rows else np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def run_in_batches(fn: Callable[[Feed], Any], batch: int, feed: Feed,
                   progress: Callable[[Iterable[int]], Iterable[int]] = lambda chunks: chunks) -> Any:
    """``fn`` (a feed of ``batch`` rows -> named outputs) over every row of ``feed``, in order: the outputs
    concatenated. An ``fn`` that returns one array (token rows, whose lengths may differ between calls) gives the
    list of its rows."""
    total = len(next(iter(feed.values())))
    if batch == 0:
        return fn(feed)
    parts: list[Any] = []
    for start in progress(range(0, total, batch)):
        chunk = {k: v[start:start + batch] for k, v in feed.items()}
        real = len(next(iter(chunk.values())))
        out = fn({k: pad_rows(v, batch) for k, v in chunk.items()})
        if isinstance(out, dict):
            parts.append({k: np.asarray(v)[:real] for k, v in out.items()})
        else:
            parts.extend(out[:real])
    if parts and isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return parts
