"""One runner interface for every runtime: named numpy (or torch) inputs in, named numpy outputs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[Any, ...]  # ints, or a str for a dynamic dimension
    dtype: np.dtype


@runtime_checkable
class Runner(Protocol):
    """What pipelines, benchmarks and servers use; implemented by ONNX Runtime (and TensorRT).

    Optional, where a runner can: ``close()`` drops what it holds and ``reopen()`` builds it anew (ONNX Runtime: a
    new session over the same file), which ``bench.interleaved`` uses to rotate the order sessions are created in.
    """

    name: str
    backend: str

    @property
    def inputs(self) -> list[TensorInfo]: ...

    @property
    def outputs(self) -> list[TensorInfo]: ...

    def run(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]: ...


def to_numpy(value: Any) -> np.ndarray:
    """numpy arrays pass through; torch tensors are detached and copied to host memory."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
