"""Python implementations of the turbo.TurboMerge / turbo.TurboUnmerge nodes for ONNX Runtime.

Importing this module registers them with onnxruntime-extensions; ``session_options()`` returns
SessionOptions with the extensions library loaded, so a plugin-node graph runs in ONNX Runtime (slowly:
for validation and tests, not for benchmarks). float32 only. TensorRT's attributes (``plugin_namespace``,
``plugin_version``, ``aot``) are not declared, so ONNX Runtime ignores them.
"""

from __future__ import annotations

from typing import Any

from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from . import reference

DOMAIN = "turbo"
_F, _I32 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32


@onnx_op(op_type=f"{DOMAIN}::TurboMerge", inputs=[_F, _F, _F, _F, _I32, _I32], outputs=[_F, _F, _I32, _I32, _I32],
         attrs={"r": PyCustomOpDef.dt_int64, "alpha": PyCustomOpDef.dt_float, "protected": PyCustomOpDef.dt_int64})
def turbo_merge(x, size, metric, semantic, a_idx, b_idx, **attrs):
    return reference.turbo_merge(x, size, metric, semantic, a_idx, b_idx, int(attrs["r"]), float(attrs["alpha"]),
                                 int(attrs["protected"]))


@onnx_op(op_type=f"{DOMAIN}::TurboUnmerge", inputs=[_F, _I32, _I32, _I32, _I32, _I32], outputs=[_F])
def turbo_unmerge(x, unm, src, dst, a_idx, b_idx):
    return reference.turbo_unmerge(x, unm, src, dst, a_idx, b_idx)


def session_options(options: Any = None) -> Any:
    """onnxruntime SessionOptions (new, or the given ones) with the custom-op library registered."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
