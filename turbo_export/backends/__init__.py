"""Runtimes behind one interface (``Runner``); pipelines and benchmarks never name a concrete runtime."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from turbo_export.backends.base import Runner, TensorInfo
from turbo_export.errors import TurboExportError

BACKENDS = ("onnxruntime", "tensorrt")


def tensorrt_unavailable_reason() -> str | None:
    """Exactly what is missing for TensorRT here (the package, its libraries, a CUDA GPU), or None when it can run."""
    import importlib.util

    try:
        installed = importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):  # a broken or half-imported package: the import below says why
        installed = True
    if not installed:
        return "the tensorrt Python package is not installed"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from missing shared libraries
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the tensorrt Python package cannot be imported ({type(exc).__name__}: {first})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def require_backend(backend: str) -> None:
    """Raise the one-line reason when ``backend`` cannot run here; call it before any export work starts."""
    if backend not in BACKENDS:
        raise TurboExportError(f"backend: unknown '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        reason = tensorrt_unavailable_reason()
        if reason:
            raise TurboExportError(f"backend tensorrt: {reason}; --backend onnxruntime works on this machine")


def make_runner(path: str, backend: str = "onnxruntime", log: Callable[[str], None] | None = None,
                engine_options: Any = None, cache_dir: str | None = None, reuse_dirs: tuple[str, ...] = (),
                cuda_graph: bool = False, **kwargs) -> Runner:
    """A runner on ``path``: an ONNX file (onnxruntime; tensorrt builds or reuses a cached engine of it under
    ``cache_dir``, default ``<folder of path>/engines``) or, for tensorrt, a ``.plan`` file."""
    require_backend(backend)
    if backend == "onnxruntime":
        from turbo_export.backends.ort import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, **kwargs)
    from turbo_export.backends.trt import TensorRTRunner

    if path.endswith(".plan"):
        return TensorRTRunner(path, cuda_graph=cuda_graph)
    from turbo_export.backends.trt_build import BuildOptions, get_engine

    if not os.path.isfile(path):
        raise TurboExportError(f"ONNX file '{path}' does not exist")
    from turbo_export.core.plugin_ops import tensorrt_plugin_modules

    # the plugins follow from the graph (a --merge-impl plugin export holds turbo.TurboMerge nodes), not the caller
    engine_options = dataclasses.replace(engine_options or BuildOptions(), plugin_modules=tensorrt_plugin_modules(path))
    engine = get_engine(path, engine_options, cache_dir or os.path.join(os.path.dirname(path), "engines"),
                        log or (lambda message: None), reuse_dirs=reuse_dirs)
    return TensorRTRunner(engine.path, cuda_graph=cuda_graph, name=os.path.splitext(os.path.basename(path))[0])


__all__ = ["Runner", "TensorInfo", "make_runner", "require_backend", "tensorrt_unavailable_reason", "BACKENDS"]
