"""Each intermediate tensor gets its own name for the graph's symbolic dimensions, so that ONNX Runtime does not
tie the blocks of a model to a few shared buffers.

ONNX Runtime's allocation planner lets an output take over the buffer of a tensor freed earlier when the two have
the same inferred shape, symbolic dimensions compared by name. With one symbolic ``batch`` on every tensor, the
twelve blocks of a ViT-B have identical shapes, so each block's tensors reuse the buffers of the block before it.
Measured with ONNX Runtime 1.32 on this project's 2-core CPU (ViT-B/16, batch 8, docs/precision.md): that reuse
made the int8 graph 13% slower, and the peak memory of a process running it 24% larger (460 MB against 371 MB),
than the same graph with one name per tensor; the fp32 graph 3% slower; a Turbo graph not at all, as its blocks
have different token counts and so never matched. optimum's export escapes it by accident: its run-time reshape
arithmetic gives every block a new unknown dimension. The names are only annotations (``value_info``); nothing a
runtime computes changes, and ONNX Runtime still plans memory by lifetime (its memory pattern).
"""

from __future__ import annotations

import re
from typing import Any

# a symbol this pass wrote: the graph input's symbol, "__t" and a number
_RENAMED = re.compile(r"^(?P<base>.+)__t\d+$")


def name_symbols_per_tensor(model: Any) -> int:
    """Infer every intermediate tensor's shape (``onnx.shape_inference``; no weights needed, so ``model`` may be
    loaded without its external data) and give each symbolic dimension that comes from a graph input's symbol a
    name of its own, ``<symbol>__t<k>``. Graph inputs and outputs keep their names. ``model`` is changed in place
    (its ``value_info`` becomes the inferred one); running it again renumbers. Returns how many dimensions were
    named; 0 for a graph without symbolic inputs."""
    from onnx import shape_inference

    graph = model.graph
    symbols = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    if not symbols:
        return 0
    inferred = shape_inference.infer_shapes(model).graph.value_info
    boundary = {v.name for v in [*graph.input, *graph.output]}
    named = 0
    for value in inferred:
        if value.name in boundary or not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            match = _RENAMED.match(dim.dim_param)
            base = match.group("base") if match else dim.dim_param
            if base in symbols:
                dim.dim_param = f"{base}__t{named}"
                named += 1
    del graph.value_info[:]
    graph.value_info.extend(inferred)
    return named


def share_symbols(model: Any) -> int:
    """The inverse, to measure what the names are for: every ``<symbol>__t<k>`` dimension becomes ``<symbol>``
    again, as exports had them before. ``model`` is changed in place; returns how many were renamed."""
    renamed = 0
    for value in model.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            match = _RENAMED.match(dim.dim_param)
            if match:
                dim.dim_param = match.group("base")
                renamed += 1
    return renamed
