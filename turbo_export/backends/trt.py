"""TensorRT runner: the Runner interface over a serialized engine, with torch CUDA tensors as device buffers.

Inputs are copied into fixed device buffers whose addresses are bound once (``set_tensor_address``; a dynamic
engine's buffers have its optimization profile's largest shapes, and each run sets the input shapes), the engine
is enqueued with ``execute_async_v3`` on a private stream, optionally replayed as a captured CUDA graph, and the
outputs are copied back as numpy. ``timed_run`` times the device work alone with CUDA events (the benchmark uses it
when every runner has one). Imports tensorrt and needs a CUDA GPU; everything is imported inside the class.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from turbo_export.backends.base import TensorInfo, to_numpy
from turbo_export.errors import TurboExportError


class TensorRTRunner:
    backend = "tensorrt"

    def __init__(self, plan_path: str, cuda_graph: bool = False, name: str | None = None) -> None:
        import torch

        from turbo_export.backends.trt_build import _trt, trt_logger

        trt = _trt()
        if not torch.cuda.is_available():
            raise TurboExportError("backend tensorrt: no CUDA GPU is visible to torch; --backend onnxruntime works "
                                   "on this machine")
        if not os.path.isfile(plan_path):
            raise TurboExportError(f"engine file '{plan_path}' does not exist")
        self.path = plan_path
        self.name = name or os.path.splitext(os.path.basename(plan_path))[0]
        self.providers = [f"TensorRT {trt.__version__}"]
        logger = trt_logger(trt)
        self._runtime = trt.Runtime(logger)
        with open(plan_path, "rb") as f:
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise TurboExportError(f"engine '{plan_path}' cannot be deserialized by TensorRT {trt.__version__} on this "
                                   "GPU (built elsewhere, or corrupt); delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.device = torch.device("cuda")
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self.buffers: dict[str, Any] = {}
        self.dynamic = False
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(tensor))
            is_input = self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            dtype = _numpy_dtype(trt, self.engine.get_tensor_dtype(tensor))
            (self._inputs if is_input else self._outputs).append(TensorInfo(tensor, shape, dtype))
            if any(d < 0 for d in shape):
                self.dynamic = True
        # A dynamic engine (an optimization profile over the batch / symbolic dims): device buffers of the
        # profile's largest shapes, bound once; each run sets the input shapes and uses their leading elements.
        for info in self._inputs:
            shape = self._max_shape(info.name) if any(d < 0 for d in info.shape) else info.shape
            if self.dynamic:
                self.context.set_input_shape(info.name, shape)
            self._allocate(info.name, shape, info.dtype)
        for info in self._outputs:
            self._allocate(info.name, tuple(int(d) for d in self.context.get_tensor_shape(info.name)), info.dtype)
        self.graph = None
        if cuda_graph and not self.dynamic:  # a captured graph replays one set of shapes
            self._capture()

    def _max_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.engine.get_tensor_profile_shape(name, 0)[2])

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        import torch

        buffer = torch.empty(shape, dtype=_torch_dtype(dtype), device=self.device)
        self.buffers[name] = buffer
        self.context.set_tensor_address(name, buffer.data_ptr())

    def _view(self, name: str, shape: tuple[int, ...]) -> Any:
        """The first elements of a (largest-shape) buffer as a tensor of ``shape``."""
        count = int(np.prod(shape)) if shape else 1
        return self.buffers[name].view(-1)[:count].view(shape)

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for '{self.path}'")

    def _capture(self) -> None:
        """Capture one enqueue as a CUDA graph (after one plain run, which lets TensorRT finish lazy setup)."""
        import torch

        with torch.cuda.stream(self.stream):
            self._enqueue()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._enqueue()
        self.graph = graph

    def execute(self) -> None:
        """Run the engine on what is in the input buffers (asynchronously on ``self.stream``)."""
        import torch

        with torch.cuda.stream(self.stream):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._enqueue()

    def load(self, feed: Mapping[str, Any]) -> None:
        """Copy the inputs into the bound device buffers (numpy or torch, shapes checked)."""
        import torch

        missing = [i.name for i in self._inputs if i.name not in feed]
        if missing:
            raise TurboExportError(f"{self.name}: missing inputs {missing}; the engine takes "
                                   f"{[i.name for i in self._inputs]}")
        with torch.cuda.stream(self.stream):
            for info in self._inputs:
                value = feed[info.name]
                tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(
                    to_numpy(value)))
                shape = tuple(tensor.shape)
                if not _fits(shape, info.shape):
                    raise TurboExportError(f"{self.name}: input '{info.name}' has shape {shape}, the engine was "
                                           f"built for {info.shape}")
                if self.dynamic:
                    self.context.set_input_shape(info.name, shape)
                self._view(info.name, shape).copy_(tensor.to(self.buffers[info.name].dtype), non_blocking=False)

    def run(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self.load(feed)
        self.execute()
        self.stream.synchronize()
        return {o.name: self._view(o.name, tuple(int(d) for d in self.context.get_tensor_shape(o.name))).cpu().numpy()
                for o in self._outputs}

    def timed_run(self, feed: Mapping[str, Any] | None = None) -> float:
        """Seconds of device time for one execution, measured with CUDA events (inputs loaded untimed)."""
        import torch

        if feed is not None:
            self.load(feed)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        self.execute()
        end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _fits(shape: tuple[int, ...], engine_shape: tuple[int, ...]) -> bool:
    """A shape the engine takes: the same rank, equal where the engine's dimension is fixed (-1: any)."""
    return len(shape) == len(engine_shape) and all(e < 0 or s == e for s, e in zip(shape, engine_shape))


_TRT_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
              "UINT8": np.uint8, "BOOL": np.bool_}


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    if name in _TRT_TYPES:
        return np.dtype(_TRT_TYPES[name])
    try:
        return np.dtype(trt.nptype(dtype))
    except (AttributeError, TypeError):
        raise TurboExportError(f"engine tensor type {name} has no numpy type; export float32/float16 graphs"
                               ) from None


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    table = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.int8): torch.int8,
             np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}
    if dtype not in table:
        raise TurboExportError(f"engine tensor type {dtype} has no torch buffer type here")
    return table[dtype]
