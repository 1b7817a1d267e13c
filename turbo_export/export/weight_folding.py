"""Weights that the exporter left behind a Transpose, folded into initializers so that the quantizer sees them.

ONNX Runtime's quantizer turns a MatMul into an integer MatMul only when its weight input is an initializer. The
dynamo exporter's constant folding usually writes ``x @ W.T`` with W already transposed, but in SD 1.5's Turbo UNet
it left 32 weights behind a Transpose, feeding 48 MatMuls (none in the unaccelerated UNet), so those stayed float
at int8 and the two UNets were quantized differently (152 integer MatMuls in Turbo's, 200 once folded).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import numpy_helper


def fold_weight_transposes(model: Any, base_dir: str) -> int:
    """``MatMul(x, Transpose(W))``, W a 2-D initializer and every consumer of the Transpose a MatMul taking it as
    its weight, becomes ``MatMul(x, W_t)`` with W_t the transposed weight as a new initializer (W's external data is
    read from ``base_dir``; W stays where anything else uses it). ``model`` is changed in place; returns how many
    Transposes were folded."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded, dropped = 0, set()
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        weight = initializers[node.input[0]]
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        users = consumers.get(node.output[0], [])
        if len(weight.dims) != 2 or perm not in ([], [[1, 0]]) or not users or any(
                u.op_type != "MatMul" or list(u.input).index(node.output[0]) != 1 for u in users):
            continue
        name = f"{weight.name}.transposed"
        while name in initializers:
            name += "_"
        array = np.ascontiguousarray(numpy_helper.to_array(weight, base_dir=base_dir).T)
        graph.initializer.append(numpy_helper.from_array(array, name))
        initializers[name] = graph.initializer[-1]
        for user in users:
            user.input[1] = name
        graph.node.remove(node)
        folded += 1
        if all(c is node for c in consumers.get(weight.name, [])):
            dropped.add(weight.name)
    if dropped:
        kept = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return folded
