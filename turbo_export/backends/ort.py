"""ONNX Runtime runner: CPU by default, the CUDA / TensorRT execution providers when present."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from turbo_export.backends.base import TensorInfo, to_numpy
from turbo_export.errors import TurboExportError

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
}
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


LARGE_GRAPH_BYTES = 1 << 30


def _file_bytes(path: str) -> int:
    """The graph file and the external-data files beside it that share its name."""
    folder, name = os.path.split(os.path.abspath(path))
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder or ".")
               if f == name or (f.startswith(name) and f.endswith(".data")))


_SHARED_ARENA: list[bool] = []


def _register_shared_arena() -> None:
    import onnxruntime as ort

    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # OrtArenaCfg(max_mem 0 = no limit, arena_extend_strategy 1 = grow by what is asked, not to a power of two,
    # initial_chunk_size_bytes / max_dead_bytes_per_chunk -1 = defaults)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
    _SHARED_ARENA.append(True)


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OnnxRuntimeRunner:
    backend = "onnxruntime"

    def __init__(
        self,
        path: str,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        session_options: Any = None,
        custom_ops: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise TurboExportError(f"ONNX file '{path}' does not exist")
        options = session_options or ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        # Idle ORT worker threads spin for a while after each run; with several sessions on few cores (baseline
        # and Turbo interleaved, pipelines of several graphs) the spinning steals the next session's cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        large = _file_bytes(path) >= LARGE_GRAPH_BYTES
        if session_options is None and not large:
            # ONNX Runtime hands a freed buffer to the next tensor of the same inferred shape, which ties each block
            # of a model whose blocks share shapes to the buffers of the block before: 12% slower for ViT-B int8,
            # the unaccelerated graph only (docs/precision.md, "buffer reuse"). Exports name the batch per tensor
            # (export/tensor_symbols.py); this covers what cannot carry such names (a static batch) and graphs from
            # elsewhere. Memory is still shared by lifetime (the memory pattern); large graphs keep the default.
            options.enable_mem_reuse = False
        elif session_options is None:
            # Large graphs (SD UNets, BLIP-2's ViT-g) share one process-wide CPU arena instead of one each: the
            # sessions of a benchmark run in turn, so one arena holds the largest peak, not the sum of them. Two SD
            # 1.5 UNet sessions after two calls each: 12.3 GB shared, 14.8 GB with an arena each; with three
            # sessions beside the PyTorch peers, separate arenas went past this machine's 24 GB. (No arena at all
            # would also fit, but re-faulting GB-sized attention buffers on every call slows the larger graph more,
            # which would flatter Turbo.)
            _register_shared_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        if custom_ops is None:
            from turbo_export.core.plugin_contract import has_turbo_nodes

            custom_ops = has_turbo_nodes(path)
        if custom_ops:  # turbo.TurboMerge / TurboUnmerge nodes (--merge-impl plugin), Python reference
            from turbo_export.core.plugin_contract import import_turbo_plugin

            import_turbo_plugin()
            try:
                from turbo_plugin import ort_ops
            except ImportError as exc:
                raise TurboExportError(f"'{path}' holds turbo.TurboMerge nodes (--merge-impl plugin), which ONNX "
                                       f"Runtime runs through onnxruntime-extensions ({exc}); pip install "
                                       "'turbo-export[plugin]', or build a TensorRT engine") from None
            ort_ops.session_options(options)
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        try:
            self.session = ort.InferenceSession(path, options, providers=list(providers or default_providers()))
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            hint = ("; it holds turbo.TurboMerge nodes (--merge-impl plugin): leave custom_ops at None (detect) "
                    "or True, or build a TensorRT engine"
                    if not custom_ops and "Turbo" in str(exc) else "")
            raise TurboExportError(f"cannot load ONNX file '{path}': {str(exc).splitlines()[0]}{hint}") from None
        self.providers = self.session.get_providers()
        self._options = options

    def close(self) -> None:
        """Drop the session (``reopen`` makes a new one)."""
        self.session = None

    def reopen(self) -> None:
        """A new session over the same file and options, placed anew in memory (see ``bench.interleaved``)."""
        import onnxruntime as ort

        self.close()
        self.session = ort.InferenceSession(self.path, self._options, providers=self.providers)

    @staticmethod
    def _info(args: Sequence[Any]) -> list[TensorInfo]:
        return [TensorInfo(a.name, tuple(a.shape), np.dtype(_ORT_TYPES.get(a.type, np.float32))) for a in args]

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._info(self.session.get_inputs())

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._info(self.session.get_outputs())

    def run(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arrays = {name: to_numpy(value) for name, value in feed.items()}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, arrays)))
