"""The graph work before int8 quantization: where Turbo's merge is in an exported graph (it stays float), and a
cleanup that undoes what makes the quantizer add one DynamicQuantizeLinear per copy of an activation.

``export.quantize`` explains why both matter; this module only reads and rewrites ONNX graphs (onnx, numpy).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TURBO_DOMAIN = "turbo"
COUNTED_OPS = ("DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "Reshape", "MatMul", "Gemm",
               "MatMulInteger", "ConvInteger", "Add")

# ops that decide which tokens merge: their inputs are the similarity scores
DECISION_OPS = frozenset({"TopK", "ArgMax", "ArgMin", "ReduceMax", "ReduceMin"})
# ops that move tokens (or their indices) by index
INDEX_OPS = frozenset({"GatherElements", "ScatterElements", "ScatterND", "GatherND"})
# ops the merge's bookkeeping is made of (normalising keys, slicing the bipartite sets, weighting by size, the
# log-size bias): the region grows through these, through an activation x activation MatMul and forward through an
# Add, never through an op that computes the model itself (a MatMul / Gemm / Conv with a weight, LayerNormalization,
# Softmax, a residual Add)
BOOKKEEPING_OPS = frozenset({
    "Slice", "Concat", "Split", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Identity", "Cast",
    "Gather", "Div", "Mul", "Sub", "Neg", "Log", "Sqrt", "Pow", "Abs", "Clip", "Max", "Min", "ReduceMean",
    "ReduceSum", "ReduceL2", "Where", "Equal", "Less", "Greater", "Not", "And", "Or", "Shape", "ConstantOfShape",
    "Range", "Tile", "Flatten",
})
MERGE_REASON = (
    "Turbo's merge stays float: the similarity of the normalised keys and the score feeding TopK / ArgMax decide "
    "which tokens merge (int8 rounding would flip near-tied decisions), and the Gathers / GatherElements / "
    "ScatterElements / ScatterND, the one-hot MatMul and the size bookkeeping around them move and sum tokens by "
    "index: quantizing them would only add rounding, no speed"
)

@dataclass
class MergeExclusion:
    """The merge's nodes found in a graph: names, op-type counts, and why they stay float."""

    names: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    # the excluded nodes the quantizer would otherwise have quantized (their op type is in op_types)
    quantizable: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def summary(self) -> str:
        if not self.names:
            return "no merge nodes (the graph has no TopK / ArgMax / GatherElements / ScatterElements / turbo nodes)"
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        kept = ", ".join(f"{op} x{n}" for op, n in sorted(self.quantizable.items()))
        return f"{len(self.names)} nodes kept float ({ops})" + (
            f"; of op types the quantizer handles: {kept}" if kept else "")



# ---- graph helpers ---------------------------------------------------------------------------------------------

def op_counts(model_or_path: Any) -> dict[str, int]:
    """Node counts by op type (main graph), for a ModelProto or an ONNX file (weights not loaded)."""
    import onnx

    model = onnx.load(model_or_path, load_external_data=False) if isinstance(model_or_path, str) else model_or_path
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def _counted(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: int(counts.get(k, 0)) for k in COUNTED_OPS}


class _Index:
    """Producers, consumers and constants of a graph's nodes."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = collections.defaultdict(list)
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for name in _node_inputs(n):
                self.consumers[name].append(i)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.nodes
                               if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
        self.graph_outputs = {o.name for o in graph.output}

    def is_constant(self, name: str) -> bool:
        return name == "" or name in self.initializers or name in self.constant_nodes


def _node_inputs(node: Any) -> list[str]:
    """A node's inputs, and the outer names its subgraphs (If / Loop bodies) read."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [i for n in g.node for i in _node_inputs(n) if i not in inner]
    return names


# ---- the merge region ------------------------------------------------------------------------------------------

def merge_nodes(model: Any, op_types: Iterable[str] = ()) -> MergeExclusion:
    """The nodes of Turbo's merge in ``model`` (a ModelProto), found from the graph's structure.

    Seeds: TopK / ArgMax / ArgMin / ReduceMax / ReduceMin (the matching), GatherElements / ScatterElements /
    ScatterND / GatherND (moving tokens by index) and every node of the ``turbo`` domain (TurboMerge plugin nodes).
    The region then grows to a fixed point through the bookkeeping ops (Slice, Concat, Div, Mul, ReduceL2, ...)
    and through MatMuls of two activations (the similarity matrix): backward to a node all of whose outputs are
    consumed inside the region, forward to a node whose inputs all come from the region or are constants (or a
    Gather whose indices do: token rows picked by the merge). It never takes in a MatMul / Gemm / Conv with a weight, a
    LayerNormalization or a Softmax, and an Add only forward (all its inputs from the region: index arithmetic, the
    merged rows plus what they receive), so it stops at the keys, the attention probabilities and the residual
    stream the merge reads from, and at the LayerNorm / residual Add / attention-bias Add that read the merged
    tokens and their sizes.
    """
    index = _Index(model.graph)
    nodes = index.nodes
    region: set[int] = {i for i, n in enumerate(nodes)
                        if n.op_type in DECISION_OPS | INDEX_OPS or n.domain == TURBO_DOMAIN}
    if not region:
        return MergeExclusion(reason=MERGE_REASON)

    def candidate(n: Any) -> bool:
        if n.op_type == "MatMul":
            return not any(index.is_constant(i) for i in n.input)  # activation x activation
        if n.op_type == "Add":  # only forward (index arithmetic, merged rows + what they receive), never the residual
            return n.domain in ("", "ai.onnx")
        return n.op_type in BOOKKEEPING_OPS and n.domain in ("", "ai.onnx")

    def consumed_inside(n: Any) -> bool:
        outs = [o for o in n.output if o]
        if not outs or any(o in index.graph_outputs for o in outs):
            return False
        users = [c for o in outs for c in index.consumers.get(o, [])]
        return bool(users) and all(c in region for c in users)

    def fed_from_inside(n: Any) -> bool:
        if n.op_type == "Gather" and len(n.input) > 1 and index.producer.get(n.input[1]) in region:
            return True  # rows of the tokens picked by the merge's indices (merge.take_rows)
        sources = [index.producer.get(i) for i in n.input if i and not index.is_constant(i)]
        return bool(sources) and all(s is not None and s in region for s in sources)

    changed = True
    while changed:
        changed = False
        for i, n in enumerate(nodes):
            if i in region or not candidate(n):
                continue
            if fed_from_inside(n) or (n.op_type != "Add" and consumed_inside(n)):
                region.add(i)
                changed = True
    members = [nodes[i] for i in sorted(region)]
    wanted = set(op_types)
    counts = collections.Counter(n.op_type for n in members)
    quantizable = collections.Counter(n.op_type for n in members if n.op_type in wanted)
    return MergeExclusion(names=[n.name for n in members], op_counts=dict(counts), quantizable=dict(quantizable),
                          reason=MERGE_REASON)


# ---- cleanup before quantizing -------------------------------------------------------------------------------

def cleanup_graph(model: Any) -> tuple[Any, list[str]]:
    """Simplify ``model`` (a ModelProto, changed in place) for quantization; returns it and what was done."""
    notes: list[str] = []
    with contextlib.suppress(Exception):  # shapes are a help (zero-add check), not a requirement
        model = _infer_shapes(model)
    passes = (
        (_remove_identities, "removed {} Identity nodes"),
        (_unfuse_reshaped_gemms, "{} Reshape -> Gemm -> Reshape chains back to MatMul + Add (one shared activation "
                                 "per input)"),
        (_dedupe, "merged {} duplicate nodes (same op, inputs and attributes)"),
        (_bypass_zero_adds, "bypassed {} Adds of an all-zero tensor computed from constants (a mask that masks "
                            "nothing)"),
    )
    for rewrite, note in passes:
        count = rewrite(model)
        if count:
            notes.append(note.format(count))
    _drop_dead(model)
    return model, notes


def _infer_shapes(model: Any) -> Any:
    """ONNX shape inference on a weightless copy (large initializers keep their dims, not their bytes: the
    shapes need no weights and copying them costs seconds on a large model); the value_info goes into ``model``."""
    import onnx

    skeleton = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, name, getattr(model, name))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)  # the exporter's types of custom-domain outputs stay
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= 4096:
            g.initializer.append(t)
        else:  # dims and type only, its data marked external (never read)
            stub = g.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "weights-not-loaded"
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _rename_input(model: Any, old: str, new: str) -> None:
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                for inner in g.node:
                    for k, name in enumerate(inner.input):
                        if name == old:
                            inner.input[k] = new


def _remove_identities(model: Any) -> int:
    outputs = {o.name for o in model.graph.output}
    removed = 0
    for n in list(model.graph.node):
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.output[0] not in outputs:
            _rename_input(model, n.output[0], n.input[0])
            model.graph.node.remove(n)
            removed += 1
    return removed


def _const_value(index: _Index, name: str, limit: int = 1 << 16) -> np.ndarray | None:
    """The value of an initializer or Constant output with at most ``limit`` elements, else None."""
    from onnx import numpy_helper

    if name in index.initializers:
        t = index.initializers[name]
        if int(np.prod(t.dims)) > limit or t.data_location == 1:  # EXTERNAL
            return None
        return numpy_helper.to_array(t)
    node = index.constant_nodes.get(name)
    if node is not None:
        for a in node.attribute:
            if a.name == "value" and int(np.prod(a.t.dims)) <= limit:
                return numpy_helper.to_array(a.t)
    return None


def _unfuse_reshaped_gemms(model: Any) -> int:
    """Reshape(x, [-1, K]) -> Gemm(., W, b) -> Reshape(., [..., N]) back to MatMul(x, W') + Add(b).

    ONNX Runtime's MatMulAddFusion writes this chain for every Linear on a 3-D activation when a model is saved
    after its graph optimization (which ``quant_pre_process`` does): q, k and v then each read a reshaped copy
    of the LayerNorm output, and dynamic quantization quantizes each copy separately.
    """
    from onnx import helper, numpy_helper

    index = _Index(model.graph)
    done = 0
    for gemm in [n for n in index.nodes if n.op_type == "Gemm" and n.domain in ("", "ai.onnx")]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        pre = index.producer.get(gemm.input[0])
        users = index.consumers.get(gemm.output[0], [])
        if pre is None or len(users) != 1:
            continue
        pre_node, post_node = index.nodes[pre], index.nodes[users[0]]
        if pre_node.op_type != "Reshape" or post_node.op_type != "Reshape":
            continue
        if len(index.consumers.get(pre_node.output[0], [])) != 1 or gemm.output[0] in index.graph_outputs:
            continue
        w_name = gemm.input[1]
        if w_name not in index.initializers:
            continue
        w = index.initializers[w_name]
        if len(w.dims) != 2:
            continue
        # the chain is a Linear on the last axis only when the output keeps every leading dim of the input
        in_shape, out_shape = _shape_of(model, pre_node.input[0]), _shape_of(model, post_node.output[0])
        n_out = w.dims[0] if attrs.get("transB", 0) else w.dims[1]
        if in_shape is None or out_shape is None or list(in_shape[:-1]) != list(out_shape[:-1]) \
                or out_shape[-1] != n_out:
            continue
        if attrs.get("transB", 0):
            w_t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w_name + "_t")
            model.graph.initializer.append(w_t)
            w_name = w_t.name
        x = pre_node.input[0]
        out = post_node.output[0]
        new = [helper.make_node("MatMul", [x, w_name], [out + "_matmul" if len(gemm.input) > 2 else out],
                                name=gemm.name + "_matmul")]
        if len(gemm.input) > 2 and gemm.input[2]:
            new.append(helper.make_node("Add", [new[0].output[0], gemm.input[2]], [out], name=gemm.name + "_bias"))
        else:
            new[0].output[0] = out
        pos = list(model.graph.node).index(gemm)
        for k, node in enumerate(new):
            model.graph.node.insert(pos + k, node)
        for node in (pre_node, gemm, post_node):
            model.graph.node.remove(node)
        done += 1
    return done


def _shape_of(model: Any, name: str) -> list[int] | None:
    """``name``'s shape when every dim is a number, else None."""
    dims = _dims_of(model, name)
    return dims if dims is not None and all(isinstance(d, int) for d in dims) else None


def _dims_of(model: Any, name: str) -> list[int | str] | None:
    """``name``'s shape from the value_info, symbolic dims by name; None when any dim is unknown."""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
            return None if any(d in ("", 0) for d in dims) else dims
    return None


def _dedupe(model: Any) -> int:
    """Common-subexpression elimination: a node equal to an earlier one (op, domain, attributes, inputs; equal
    small constants count as one input) is dropped and its outputs read from the earlier node's."""
    index = _Index(model.graph)
    fingerprint: dict[str, str] = {}

    def canonical(name: str) -> str:
        if name in fingerprint:
            return fingerprint[name]
        value = _const_value(index, name, limit=4096)
        if value is not None:
            key = "const:" + hashlib.sha1(str(value.dtype).encode() + str(value.shape).encode()
                                          + np.ascontiguousarray(value).tobytes()).hexdigest()
        else:
            key = name
        fingerprint[name] = key
        return key

    seen: dict[tuple, Any] = {}
    renames: dict[str, str] = {}
    dropped = 0
    for n in list(model.graph.node):
        for k, name in enumerate(n.input):
            if name in renames:
                n.input[k] = renames[name]
        if n.op_type in ("Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli", "Dropout") or any(a.HasField("g") or a.graphs
                                                                       for a in n.attribute):
            continue
        if any(o in index.graph_outputs for o in n.output):
            continue
        key = (n.domain, n.op_type, tuple(canonical(i) for i in n.input),
               tuple(sorted(a.SerializeToString(deterministic=True) for a in n.attribute)), len(n.output))
        first = seen.get(key)
        if first is None:
            seen[key] = n
            continue
        for mine, theirs in zip(n.output, first.output):
            if mine:
                renames[mine] = theirs
        model.graph.node.remove(n)
        dropped += 1
    if renames:
        for old, new in renames.items():
            _rename_input(model, old, new)
    return dropped


def _bypass_zero_adds(model: Any, limit: int = 1 << 24) -> int:
    """Add(x, c) -> x where c is computed from constants only, is all zeros, and its broadcast leaves x's shape
    unchanged (an attention mask built by Expand / Where for an unmasked image model). With a symbolic batch the
    mask's shape comes from the input's, so it is not a constant, but its value still is: every element zero
    (``_uniform``). A zero initializer (the zero bias of a random-weight preset) is left alone: a real checkpoint
    has a real bias there."""
    index = _Index(model.graph)
    cache: dict[str, np.ndarray | None] = {}
    uniform: dict[str, np.ndarray | None] = {}
    bypassed = 0
    for n in list(index.nodes):
        if n.op_type != "Add" or n.domain not in ("", "ai.onnx") or n.output[0] in index.graph_outputs:
            continue
        for k in (0, 1):
            x, c = n.input[1 - k], n.input[k]
            if c not in index.producer or c in index.constant_nodes:
                continue
            value = _fold(index, c, cache, limit)
            if value is None:
                value = _uniform(index, c, uniform)
            if value is None or np.any(value):
                continue
            shape = _dims_of(model, x)
            if shape is None or shape != _dims_of(model, n.output[0]):
                continue
            _rename_input(model, n.output[0], x)
            model.graph.node.remove(n)
            bypassed += 1
            break
    return bypassed


_SHAPE_ONLY = ("Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Flatten")
_ELEMENTWISE = ("Cast", "Mul", "Add", "Sub", "Not", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And",
                "Or", "Where")


def _uniform(index: _Index, name: str, cache: dict[str, np.ndarray | None]) -> np.ndarray | None:
    """The one value every element of ``name`` holds when that follows from constants whatever the shapes (a
    mask Expand-ed to the batch of the input), as a 0-d array; else None."""
    if name in cache:
        return cache[name]
    cache[name] = None
    value = _const_value(index, name)
    if value is not None:
        value = value.reshape(-1)[:1].reshape(()) if value.size and np.all(value == value.reshape(-1)[0]) else None
    elif name in index.producer:
        node = index.nodes[index.producer[name]]
        if node.domain not in ("", "ai.onnx"):
            pass
        elif node.op_type in _SHAPE_ONLY:
            value = _uniform(index, node.input[0], cache)
        elif node.op_type == "ConstantOfShape":
            attr = [a for a in node.attribute if a.name == "value"]
            value = (_attr_array(attr[0]) if attr else np.zeros(1, np.float32)).reshape(-1)[:1].reshape(())
        elif node.op_type in _ELEMENTWISE:
            args = [_uniform(index, i, cache) for i in node.input]
            if all(a is not None for a in args):
                value = _run_node(node, list(args), 1)
                value = None if value is None else value.reshape(())
    cache[name] = value
    return value


def _attr_array(attr: Any) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(attr.t)


def _fold(index: _Index, name: str, cache: dict[str, np.ndarray | None], limit: int) -> np.ndarray | None:
    """Evaluate ``name`` when it depends on constants only (a small chain of standard ops), else None."""
    if name in cache:
        return cache[name]
    cache[name] = None  # cycles / recursion guard
    value = _const_value(index, name, limit)
    if value is None and name in index.producer:
        node = index.nodes[index.producer[name]]
        if node.domain in ("", "ai.onnx") and node.op_type in ("Expand", "Where", "Cast", "Reshape", "Unsqueeze",
                                                               "Squeeze", "Mul", "Add", "Sub", "ConstantOfShape",
                                                               "Not", "Equal", "Greater", "GreaterOrEqual", "Less",
                                                               "LessOrEqual", "And", "Or", "Transpose"):
            args = [_fold(index, i, cache, limit) if i else None for i in node.input]
            if all(a is not None for a, i in zip(args, node.input) if i):
                value = _run_node(node, args, limit)
    cache[name] = value
    return value


def _run_node(node: Any, args: list[np.ndarray | None], limit: int) -> np.ndarray | None:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    if node.op_type in ("Expand", "ConstantOfShape") and args[1 if node.op_type == "Expand" else 0] is not None:
        shape = args[1] if node.op_type == "Expand" else args[0]
        if int(np.prod(np.maximum(shape, 1))) > limit:
            return None
    names = [f"in{k}" if a is not None else "" for k, a in enumerate(args)]
    single = helper.make_node(node.op_type, names, [f"out{k}" for k in range(len(node.output))],
                              domain=node.domain)
    single.attribute.extend(node.attribute)
    try:
        result = ReferenceEvaluator(single).run(None, {n: a for n, a in zip(names, args) if n})
    except Exception:  # noqa: BLE001 (an op the reference runtime cannot evaluate: leave the graph)
        return None
    out = result[0]
    return np.asarray(out) if out is not None and np.asarray(out).size <= limit else None


def _drop_dead(model: Any) -> None:
    """Remove nodes whose outputs nothing reads (left behind by the passes above)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in _node_inputs(n)} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in _node_inputs(n)} | outputs
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)


