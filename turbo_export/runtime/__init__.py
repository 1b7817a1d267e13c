"""Runtimes behind one interface (``Runner``); pipelines and benchmarks never name a concrete runtime."""

from __future__ import annotations

from ..errors import TurboExportError
from .base import Runner, TensorInfo

BACKENDS = ("onnxruntime", "tensorrt")


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (no tensorrt package, no CUDA GPU), or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from missing shared libraries
        return f"the tensorrt Python package cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def make_runner(path: str, backend: str = "onnxruntime", **kwargs) -> Runner:
    if backend == "onnxruntime":
        from .ort import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, **kwargs)
    if backend == "tensorrt":
        reason = tensorrt_unavailable_reason()
        if reason:
            raise TurboExportError(f"backend tensorrt: {reason}; --backend onnxruntime works on this machine")
        raise TurboExportError("backend tensorrt: the TensorRT runner is not implemented yet; use --backend onnxruntime")
    raise TurboExportError(f"backend: unknown '{backend}'; choose one of {', '.join(BACKENDS)}")


__all__ = ["Runner", "TensorInfo", "make_runner", "BACKENDS"]
