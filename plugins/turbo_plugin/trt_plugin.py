"""TensorRT plugins ``turbo::TurboMerge`` and ``turbo::TurboUnmerge`` (``tensorrt.plugin``, TensorRT 10.9+).

Importing this module registers both plugins with TensorRT's plugin registry; do it in the process that
parses the ONNX file and builds the engine (TensorRT's ONNX parser maps a node whose op_type is the plugin
name and whose ``plugin_namespace`` attribute is ``turbo`` onto it). Two implementations each:

- ``aot_impl``: the Triton kernel compiled to PTX at build time (for the GPU that builds) and embedded in the
  engine. Nodes exported with ``aot=1`` (what ``--merge-impl plugin`` writes) use it; the engine then runs in
  any TensorRT runtime (``trtexec --loadEngine``, C++, Triton Inference Server) with no Python at inference.
- ``impl``: the same kernel launched from Python at inference (JIT); needs this module imported where the
  engine runs. Used for nodes with ``aot=0`` (without ``aot``: as the network's PREFER_*_PYTHON_PLUGINS flag says).

fp32 and fp16 tokens (``autotune``); index tensors and the plan are int32. Static token counts: the tile
sizes are compiled in (every export here is static-shape).
"""

# No "from __future__ import annotations": tensorrt.plugin inspects the annotations as classes.

from typing import Tuple, Union

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp

from . import aot, attribute_conversion_problem, kernels

_PROBLEM = attribute_conversion_problem(trt.__version__, np.__version__)
if _PROBLEM:
    raise ImportError(_PROBLEM)

COMPILE_TARGET = None  # GPU architecture of the AOT PTX (e.g. 90); None: the GPU that builds the engine
MERGE_ID = "turbo::TurboMerge"
UNMERGE_ID = "turbo::TurboUnmerge"


def _type(dtype) -> str:
    if dtype == trt.float32:
        return "fp32"
    if dtype == trt.float16:
        return "fp16"
    raise TypeError(f"Turbo plugins support float32 and float16 tokens, not {dtype}")


def _static(expr, what: str) -> int:
    if not expr.is_constant:  # a property in tensorrt.plugin (ShapeExpr), constant_value() a method
        raise ValueError(f"Turbo plugins need a static {what} (the tile sizes are compiled in); export with static "
                         "shapes")
    return int(expr.constant_value())


@trtp.register(MERGE_ID)
def merge_desc(x: trtp.TensorDesc, size: trtp.TensorDesc, metric: trtp.TensorDesc, semantic: trtp.TensorDesc,
               a_idx: trtp.TensorDesc, b_idx: trtp.TensorDesc, r: int, alpha: float, protected: int
               ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    batch, n_tokens, channels = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
    num_a = a_idx.shape_expr[0]
    return (trtp.from_shape_expr((batch, n_tokens - r, channels), dtype=x.dtype),
            trtp.from_shape_expr((batch, n_tokens - r, 1), dtype=size.dtype),
            trtp.from_shape_expr((batch, num_a - r), dtype=trt.int32),
            trtp.from_shape_expr((batch, r), dtype=trt.int32),
            trtp.from_shape_expr((batch, r), dtype=trt.int32))


@trtp.autotune(MERGE_ID)
def merge_autotune(x, size, metric, semantic, a_idx, b_idx, outputs):
    f = "FP32|FP16"
    return [trtp.AutoTuneCombination(f"{f}, {f}, {f}, {f}, INT32, INT32, {f}, {f}, INT32, INT32, INT32")]


@trtp.aot_impl(MERGE_ID)
def merge_aot(x: trtp.TensorDesc, size: trtp.TensorDesc, metric: trtp.TensorDesc, semantic: trtp.TensorDesc,
              a_idx: trtp.TensorDesc, b_idx: trtp.TensorDesc, r: int, alpha: float, protected: int,
              outputs: Tuple[trtp.TensorDesc], tactic: int
              ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    num_a, num_b = _static(a_idx.shape_expr[0], "A token count"), _static(b_idx.shape_expr[0], "B token count")
    dim, channels = _static(metric.shape_expr[2], "metric width"), _static(x.shape_expr[2], "channel count")
    compiled = aot.compile_merge(_type(x.dtype), int(r), float(alpha), int(protected), num_a, num_b, dim, channels,
                                COMPILE_TARGET)
    params = trtp.KernelLaunchParams()
    params.grid_x = x.shape_expr[0]
    params.grid_y = trtp.cdiv(x.shape_expr[2], compiled.blocks["BLOCK_C"])
    params.block_x = compiled.block_x
    params.shared_mem = compiled.shared
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (
        x.shape_expr[1], x.shape_expr[2], metric.shape_expr[2], a_idx.shape_expr[0], b_idx.shape_expr[0])])
    return compiled.name, compiled.ptx, params, scalars


@trtp.impl(MERGE_ID)
def merge_jit(x: trtp.Tensor, size: trtp.Tensor, metric: trtp.Tensor, semantic: trtp.Tensor, a_idx: trtp.Tensor,
              b_idx: trtp.Tensor, r: int, alpha: float, protected: int, outputs: Tuple[trtp.Tensor],
              stream: int) -> None:
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        args = [torch.as_tensor(t, device="cuda") for t in (x, size, metric, semantic, a_idx, b_idx)]
        out = tuple(torch.as_tensor(t, device="cuda") for t in outputs)
        kernels.launch_merge(*args, int(r), float(alpha), int(protected), out=out)


@trtp.register(UNMERGE_ID)
def unmerge_desc(x: trtp.TensorDesc, unm: trtp.TensorDesc, src: trtp.TensorDesc, dst: trtp.TensorDesc,
                 a_idx: trtp.TensorDesc, b_idx: trtp.TensorDesc) -> trtp.TensorDesc:
    n_tokens = a_idx.shape_expr[0] + b_idx.shape_expr[0]
    return trtp.from_shape_expr((x.shape_expr[0], n_tokens, x.shape_expr[2]), dtype=x.dtype)


@trtp.autotune(UNMERGE_ID)
def unmerge_autotune(x, unm, src, dst, a_idx, b_idx, outputs):
    return [trtp.AutoTuneCombination("FP32|FP16, INT32, INT32, INT32, INT32, INT32, FP32|FP16")]


@trtp.aot_impl(UNMERGE_ID)
def unmerge_aot(x: trtp.TensorDesc, unm: trtp.TensorDesc, src: trtp.TensorDesc, dst: trtp.TensorDesc,
                a_idx: trtp.TensorDesc, b_idx: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int
                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    compiled = aot.compile_unmerge(_type(x.dtype), _static(x.shape_expr[2], "channel count"), COMPILE_TARGET)
    n_tokens = a_idx.shape_expr[0] + b_idx.shape_expr[0]
    params = trtp.KernelLaunchParams()
    params.grid_x = x.shape_expr[0]
    params.grid_y = trtp.cdiv(n_tokens, compiled.blocks["BLOCK_T"])
    params.grid_z = trtp.cdiv(x.shape_expr[2], compiled.blocks["BLOCK_C"])
    params.block_x = compiled.block_x
    params.shared_mem = compiled.shared
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (
        n_tokens, x.shape_expr[2], a_idx.shape_expr[0], b_idx.shape_expr[0], n_tokens - x.shape_expr[1])])
    return compiled.name, compiled.ptx, params, scalars


@trtp.impl(UNMERGE_ID)
def unmerge_jit(x: trtp.Tensor, unm: trtp.Tensor, src: trtp.Tensor, dst: trtp.Tensor, a_idx: trtp.Tensor,
                b_idx: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        args = [torch.as_tensor(t, device="cuda") for t in (x, unm, src, dst, a_idx, b_idx)]
        kernels.launch_unmerge(*args, out=torch.as_tensor(outputs[0], device="cuda"))
