"""int8 quantization of exported graphs with ONNX Runtime, the Turbo merge kept in float.

``quantize_graph(src, dst, mode)`` works on any exported graph (ViT, BLIP vision / text, SD UNet, plain or Turbo):

1. **Cleanup** (float graph in, float graph out; ``cleanup_graph``): Reshape -> Gemm -> Reshape chains that ONNX
   Runtime's graph optimizer writes for a Linear on a 3-D activation go back to MatMul + Add, duplicate nodes
   (same op, same inputs, same attributes; equal small constants count as the same input) become one, Identity
   nodes go, and an Add of a constant all-zero tensor that does not change the shape (the attention mask of an
   unmasked image model) is bypassed. Why it matters: the quantizer puts one DynamicQuantizeLinear (or one Q/DQ
   pair) on each distinct activation a MatMul reads, so q, k and v reading three reshaped copies of the same
   LayerNorm output cost three quantizations instead of one. The dynamo export itself has q, k and v share the
   LayerNorm output (ViT-B: 50 DynamicQuantizeLinear, 49 Reshapes, as in optimum's graph); the copies come from
   ONNX Runtime's quantization pre-processing (``quant_pre_process``, which ``quantize_dynamic``'s warning asks
   for, or any model saved by an ONNX Runtime session): its MatMulAddFusion turns every MatMul + Add on a 3-D
   activation into Reshape -> Gemm -> Reshape, one input Reshape per projection (ViT-B: 74 and 193). The
   cleanup makes either input give the same 50 / 49, and the quantizer's warning is answered (shapes inferred).
2. **Merge exclusion** (``merge_nodes``): the Turbo merge's nodes are found from the graph's structure and passed
   as ``nodes_to_exclude``, so the matching (similarity of the normalised keys, ReduceMax / ArgMax, TopK) and the
   token movement (GatherElements / ScatterElements / ScatterND and the size bookkeeping around them) stay float.
3. **Quantization**: ``dynamic`` = ``quantize_dynamic`` (int8 weights, activations quantized at run time);
   ``static`` = ``quantize_static`` in QDQ format (int8 weights and activations), calibrated on the caller's feeds
   (``calibration``) or, when none are given, on seeded random inputs (``seeded_calibration``), which the report
   says; a random-weight preset has nothing better to calibrate on, a real checkpoint should pass real data.

The returned ``QuantizeReport`` says what was excluded and why, and counts DynamicQuantizeLinear / Q / DQ /
Reshape / MatMul nodes before the cleanup, after it, and in the quantized graph.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from turbo_export.errors import TurboExportError

MODES = ("dynamic", "static")
TWO_GB = 2**31
TURBO_DOMAIN = "turbo"

# ops that decide which tokens merge: their inputs are the similarity scores
DECISION_OPS = frozenset({"TopK", "ArgMax", "ArgMin", "ReduceMax", "ReduceMin"})
# ops that move tokens (or their indices) by index
INDEX_OPS = frozenset({"GatherElements", "ScatterElements", "ScatterND", "GatherND"})
# ops the merge's bookkeeping is made of (normalising keys, slicing the bipartite sets, weighting by size, the
# log-size bias): the region grows through these and through an activation x activation MatMul, never through
# an op that computes the model itself (a MatMul / Gemm / Conv with a weight, LayerNormalization, Softmax, Add)
BOOKKEEPING_OPS = frozenset({
    "Slice", "Concat", "Split", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Identity", "Cast",
    "Gather", "Div", "Mul", "Sub", "Neg", "Log", "Sqrt", "Pow", "Abs", "Clip", "Max", "Min", "ReduceMean",
    "ReduceSum", "ReduceL2", "Where", "Equal", "Less", "Greater", "Not", "And", "Or", "Shape", "ConstantOfShape",
    "Range", "Tile", "Flatten",
})
MERGE_REASON = (
    "Turbo's merge stays float: the similarity of the normalised keys and the score feeding TopK / ArgMax decide "
    "which tokens merge (int8 rounding would flip near-tied decisions), and GatherElements / ScatterElements / "
    "ScatterND with the size bookkeeping around them move tokens and indices, which have no int8 kernels"
)
# what the report counts
COUNTED_OPS = ("DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "Reshape", "MatMul", "Gemm",
               "MatMulInteger", "ConvInteger", "Add")
# static QDQ: quantize the ops that carry the FLOPs; QDQ around LayerNorm / Softmax / elementwise ops only adds
# conversions on a CPU (no int8 kernels for them) and costs accuracy
STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")


# ---- the report ------------------------------------------------------------------------------------------------

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


@dataclass
class QuantizeReport:
    src: str
    dst: str
    mode: str
    weight_type: str
    activation_type: str
    per_channel: bool
    op_types: list[str]
    excluded: MergeExclusion
    # also kept float: the caller's nodes_to_exclude and, in static mode with MatMulConstBOnly, attention's
    # activation x activation MatMuls (ONNX Runtime's QDQ quantizer ignores that option)
    extra_excluded: list[str]
    # op counts of the graph as given, after the cleanup (float), and quantized
    counts_src: dict[str, int]
    counts_cleaned: dict[str, int]
    counts_dst: dict[str, int]
    cleanup: list[str]
    calibration: str | None
    seconds: float
    dst_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["excluded"]["summary"] = self.excluded.summary()
        return out

    def lines(self) -> list[str]:
        def counts(c: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {c.get(k, 0)}" for k in ("DynamicQuantizeLinear", "QuantizeLinear", "Reshape",
                                                                "MatMul", "MatMulInteger") if c.get(k, 0))
        channel = ", per channel" if self.per_channel else ""
        out = [(f"int8 {self.mode} ({self.weight_type} weights{channel}, {self.activation_type} activations): "
                f"{os.path.basename(self.src)} -> {os.path.basename(self.dst)} in {self.seconds:.1f} s")]
        out.append(f"  cleanup: {'; '.join(self.cleanup) if self.cleanup else 'nothing to do'}")
        out.append(f"  float graph: {counts(self.counts_src)}; cleaned: {counts(self.counts_cleaned)}")
        out.append(f"  int8 graph: {counts(self.counts_dst)}")
        out.append(f"  merge: {self.excluded.summary()}")
        if self.excluded.names:
            out.append(f"    why: {self.excluded.reason}")
        if self.calibration:
            out.append(f"  calibration: {self.calibration}")
        return out


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
    consumed inside the region, forward to a node whose inputs all come from the region or are constants. It never
    takes in a MatMul / Gemm / Conv with a weight, a LayerNormalization, a Softmax or an Add, so it stops at the
    keys, the attention probabilities and the residual stream the merge reads from, and at the LayerNorm /
    residual Add / attention-bias Add that read the merged tokens and their sizes.
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
        return n.op_type in BOOKKEEPING_OPS and n.domain in ("", "ai.onnx")

    def consumed_inside(n: Any) -> bool:
        outs = [o for o in n.output if o]
        if not outs or any(o in index.graph_outputs for o in outs):
            return False
        users = [c for o in outs for c in index.consumers.get(o, [])]
        return bool(users) and all(c in region for c in users)

    def fed_from_inside(n: Any) -> bool:
        sources = [index.producer.get(i) for i in n.input if i and not index.is_constant(i)]
        return bool(sources) and all(s is not None and s in region for s in sources)

    changed = True
    while changed:
        changed = False
        for i, n in enumerate(nodes):
            if i in region or not candidate(n):
                continue
            if consumed_inside(n) or fed_from_inside(n):
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
    n = _remove_identities(model)
    if n:
        notes.append(f"removed {n} Identity nodes")
    n = _unfuse_reshaped_gemms(model)
    if n:
        notes.append(f"{n} Reshape -> Gemm -> Reshape chains back to MatMul + Add (one shared activation per input)")
    n = _dedupe(model)
    if n:
        notes.append(f"merged {n} duplicate nodes (same op, inputs and attributes)")
    n = _bypass_zero_adds(model)
    if n:
        notes.append(f"bypassed {n} Adds of an all-zero tensor computed from constants (a mask that masks nothing)")
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
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else -1 for d in dims] if all(
                d.HasField("dim_value") for d in dims) else None
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
    unchanged (an attention mask built by Expand / Where for an unmasked image model). A zero initializer (the
    zero bias of a random-weight preset) is left alone: a real checkpoint has a real bias there."""
    index = _Index(model.graph)
    cache: dict[str, np.ndarray | None] = {}
    bypassed = 0
    for n in list(index.nodes):
        if n.op_type != "Add" or n.domain not in ("", "ai.onnx") or n.output[0] in index.graph_outputs:
            continue
        for k in (0, 1):
            x, c = n.input[1 - k], n.input[k]
            if c not in index.producer or c in index.constant_nodes:
                continue
            value = _fold(index, c, cache, limit)
            if value is None or np.any(value):
                continue
            shape = _shape_of(model, x)
            out = _shape_of(model, n.output[0])
            if shape is None or out is None or shape != out:
                continue
            _rename_input(model, n.output[0], x)
            model.graph.node.remove(n)
            bypassed += 1
            break
    return bypassed


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


# ---- calibration -----------------------------------------------------------------------------------------------

class SeededCalibration(list):
    """Calibration feeds drawn from a seeded generator (a list of feeds), with the sentence the report shows."""

    description: str = ""


def seeded_calibration(input_specs: Any, n: int = 8, seed: int = 0, int_high: int = 2) -> SeededCalibration:
    """``n`` seeded random feeds for a graph's inputs, to calibrate a random-weight preset that has no data.

    ``input_specs``: an ONNX file's path, a runner's ``inputs`` (objects with name / shape / dtype), or a mapping
    name -> (shape, dtype) or name -> example array. Float inputs draw from N(0, 1), integer inputs from
    [0, ``int_high``). The result is a list of feeds; its ``description`` says what they are, for the report.
    """
    if n < 1:
        raise TurboExportError(f"calibration: need at least one seeded feed, got n={n}")
    specs = _input_specs(input_specs)
    rng = np.random.default_rng(seed)
    feeds = SeededCalibration()
    for _ in range(n):
        feed = {}
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            if np.issubdtype(dtype, np.floating):
                feed[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[name] = np.ones(shape, dtype=bool)
            else:
                feed[name] = rng.integers(0, int_high, size=shape).astype(dtype)
        feeds.append(feed)
    feeds.description = (f"{n} seeded random feeds (seed {seed}; float inputs N(0, 1)): no calibration data was "
                         "given; fine for a random-weight preset, not representative of real inputs")
    return feeds


def _input_specs(input_specs: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    if isinstance(input_specs, (str, os.PathLike)):
        import onnx
        from onnx import helper

        model = onnx.load(str(input_specs), load_external_data=False)
        inits = {t.name for t in model.graph.initializer}
        specs = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim)
            specs[vi.name] = (shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        return specs
    if isinstance(input_specs, Mapping):
        out = {}
        for name, spec in input_specs.items():
            if hasattr(spec, "shape") and hasattr(spec, "dtype"):
                out[name] = (tuple(spec.shape), np.dtype(str(spec.dtype).replace("torch.", "")))
            else:
                shape, dtype = spec
                out[name] = (tuple(shape), np.dtype(dtype))
        return out
    out = {}
    for info in input_specs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in info.shape)
        out[info.name] = (shape, np.dtype(info.dtype))
    return out


def _calibration_reader(feeds: list[dict[str, np.ndarray]], input_names: Sequence[str]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._it, None)
            return None if feed is None else {k: feed[k] for k in input_names}

        def rewind(self) -> None:
            self._it = iter(feeds)

    return FeedReader()


def _check_feeds(feeds: list[Mapping[str, Any]], input_names: Sequence[str], src: str) -> list[dict[str, np.ndarray]]:
    if not feeds:
        raise TurboExportError(f"calibration: no feeds to calibrate {os.path.basename(src)} on (an empty list); "
                               "give at least one, or calibration=None to calibrate on seeded random inputs")
    out = []
    for k, feed in enumerate(feeds):
        missing = [n for n in input_names if n not in feed]
        if missing:
            raise TurboExportError(f"calibration: feed {k} lacks input(s) {', '.join(missing)} of "
                                   f"{os.path.basename(src)} (it has {', '.join(sorted(feed)) or 'none'})")
        out.append({n: np.asarray(feed[n].detach().cpu().numpy() if hasattr(feed[n], "detach") else feed[n])
                    for n in input_names})
    return out


# ---- the entry point -------------------------------------------------------------------------------------------

def quantize_graph(
    src: str,
    dst: str,
    mode: str = "dynamic",
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    *,
    per_channel: bool | None = None,
    op_types: Sequence[str] | None = None,
    exclude_merge: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    cleanup: bool = True,
    calibration_size: int = 8,
    calibration_method: str = "minmax",
    symmetric_activations: bool = False,
    extra_options: Mapping[str, Any] | None = None,
) -> QuantizeReport:
    """Quantize the ONNX file ``src`` to int8 into ``dst``; the merge's nodes stay float.

    mode: ``dynamic`` (int8 weights, uint8 activations quantized at run time by DynamicQuantizeLinear; the ONNX
    Runtime CPU default) or ``static`` (QDQ: int8 weights and int8 activations with scales from calibration).
    calibration (static): the feeds to calibrate on, each {input name: array}; None calibrates on
    ``calibration_size`` seeded random feeds (``seeded_calibration``), which the report says; an empty
    iterable is a TurboExportError. Its ``description`` attribute, if any, goes into the report.
    per_channel: per-output-channel weight scales; default True for static, False for dynamic (per tensor is
    what one ``quantize_dynamic`` call does; on ViT-B with seeded weights per channel moves the logits' cosine to
    the fp32 graph only from 0.99893 to 0.99917).
    op_types: the op types to quantize; default ONNX Runtime's dynamic set (MatMul, Conv, Gather, ...) for dynamic,
    ``STATIC_OP_TYPES`` (MatMul, Gemm, Conv) for static. MatMuls whose B is an activation (attention scores,
    probabilities x values) stay float in both modes unless ``extra_options`` says ``MatMulConstBOnly: False``.
    symmetric_activations (static): zero-point-0 activation scales, which TensorRT's explicit quantization needs;
    the default (asymmetric) suits ONNX Runtime's CPU kernels.
    cleanup: run ``cleanup_graph`` first (fewer quantize nodes and Reshapes; see the module docstring).
    extra_options: passed to ONNX Runtime's quantizer on top of the above.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    if mode not in MODES:
        raise TurboExportError(f"int8 mode: unknown '{mode}'; choose one of {', '.join(MODES)}")
    if not os.path.isfile(src):
        raise TurboExportError(f"ONNX file '{src}' does not exist")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise TurboExportError(f"quantize: the int8 graph needs its own file, not '{src}' itself")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibration_method not in methods:
        raise TurboExportError(f"calibration method: unknown '{calibration_method}'; choose one of "
                               f"{', '.join(methods)}")
    start = time.perf_counter()
    feeds: list[dict[str, np.ndarray]] | None = None
    calibration_note = None
    if mode == "static":
        input_names = _graph_input_names(src)
        if calibration is None:
            calibration = seeded_calibration(src, calibration_size)
        description = getattr(calibration, "description", None)
        feeds = _check_feeds(list(calibration), input_names, src)
        calibration_note = description or f"{len(feeds)} caller-supplied feeds"
    per_channel = (mode == "static") if per_channel is None else per_channel
    if op_types is None:
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        op_types = list(IntegerOpsRegistry) if mode == "dynamic" else list(STATIC_OP_TYPES)
    options = {"MatMulConstBOnly": True, **dict(extra_options or {})}

    large = _file_bytes(src) >= TWO_GB
    model = onnx.load(src, load_external_data=True)
    counts_src = op_counts(model)
    notes: list[str] = []
    if cleanup:
        model, notes = cleanup_graph(model)
    counts_cleaned = op_counts(model)
    exclusion = merge_nodes(model, op_types) if exclude_merge else MergeExclusion(reason="merge exclusion off")
    exclude = list(dict.fromkeys([*exclusion.names, *nodes_to_exclude]))
    activation_matmuls: list[str] = []
    if mode == "static" and options["MatMulConstBOnly"]:
        # ONNX Runtime's QDQ quantizer ignores MatMulConstBOnly: keep attention's activation x activation MatMuls
        # (scores, probabilities x values) float ourselves, as dynamic mode does
        merged = set(exclude)
        activation_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in merged
                              and not any(_is_initializer(model, i) for i in n.input[:2])]
        exclude += activation_matmuls
    add_pre_process_metadata(model)  # shape inference and cleanup done: no pre-processing warning
    has_turbo = any(n.domain == TURBO_DOMAIN for n in model.graph.node)
    if any(n.domain not in ("", "ai.onnx", "com.microsoft") for n in model.graph.node):
        # shape inference knows no custom op (turbo.TurboMerge): a tensor it cannot type is float
        options.setdefault("DefaultTensorType", onnx.TensorProto.FLOAT)

    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=os.path.dirname(os.path.abspath(dst))) as tmp, \
            _quiet_quantizer():
        cleaned = os.path.join(tmp, "cleaned.onnx")
        onnx.save_model(model, cleaned, save_as_external_data=large, all_tensors_to_one_file=True,
                        location="cleaned.onnx.data")
        del model
        if mode == "dynamic":
            quantize_dynamic(cleaned, dst, op_types_to_quantize=list(op_types), per_channel=per_channel,
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=large,
                             extra_options=options)
            weight_type, activation_type = "int8", "uint8 (dynamic)"
        else:
            reader = _calibration_reader(feeds, _graph_input_names(src))
            static_options = {
                "ActivationSymmetric": symmetric_activations,
                # Q/DQ on the inputs only: ONNX Runtime runs DQ -> MatMul as one integer MatMul with a float output
                "OpTypesToExcludeOutputQuantization": list(op_types), **options}
            with _turbo_ops_in_calibration(has_turbo):
                quantize_static(cleaned, dst, reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(op_types), per_channel=per_channel,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=exclude, use_external_data_format=large,
                                calibrate_method=methods[calibration_method], extra_options=static_options)
            weight_type, activation_type = "int8", "int8 (static, QDQ)"
    return QuantizeReport(
        src=src, dst=dst, mode=mode, weight_type=weight_type, activation_type=activation_type,
        per_channel=per_channel, op_types=sorted(op_types), excluded=exclusion,
        extra_excluded=[*nodes_to_exclude, *activation_matmuls],
        counts_src=_counted(counts_src), counts_cleaned=_counted(counts_cleaned), counts_dst=_counted(op_counts(dst)),
        cleanup=notes, calibration=calibration_note, seconds=time.perf_counter() - start, dst_bytes=_file_bytes(dst),
    )


def naive_quantize_dynamic(src: str, dst: str) -> None:
    """One plain ``quantize_dynamic`` call (int8 weights): what a user does to any ONNX file; the reference."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=_file_bytes(src) >= TWO_GB)


def _is_initializer(model: Any, name: str) -> bool:
    return any(t.name == name for t in model.graph.initializer) or any(
        n.op_type == "Constant" and name in n.output for n in model.graph.node)


def _graph_input_names(path: str) -> list[str]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _file_bytes(path: str) -> int:
    total = os.path.getsize(path)
    folder = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(Exception):
        import onnx

        model = onnx.load(path, load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        total += sum(os.path.getsize(os.path.join(folder, loc)) for loc in locations
                     if os.path.isfile(os.path.join(folder, loc)))
    return total


@contextlib.contextmanager
def _turbo_ops_in_calibration(active: bool):
    """Calibration runs the graph in an ONNX Runtime session that ``quantize_static`` makes itself; a graph with
    turbo.TurboMerge nodes (--merge-impl plugin) needs their Python reference kernels registered in it."""
    if not active:
        yield
        return
    from onnxruntime.quantization import calibrate

    from turbo_export.core.plugin_ops import import_turbo_plugin

    import_turbo_plugin()
    try:
        from turbo_plugin import ort_ops
    except ImportError as exc:
        raise TurboExportError(f"static int8 of a graph with turbo.TurboMerge nodes calibrates through "
                               f"onnxruntime-extensions ({exc}); pip install 'turbo-export[plugin]'") from None

    real = calibrate.onnxruntime

    class WithTurboOps:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def SessionOptions() -> Any:  # onnxruntime's name
            return ort_ops.session_options(real.SessionOptions())

    calibrate.onnxruntime = WithTurboOps()
    try:
        yield
    finally:
        calibrate.onnxruntime = real


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs warnings and progress at the root logger; keep output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---- fp16 ------------------------------------------------------------------------------------------------------

def check_fp16_onnxruntime() -> str | None:
    """None when ONNX Runtime has the CUDA execution provider (fp16 graphs run there), else the one-line reason."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime cannot be imported ({exc})"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return None
    return (f"fp16 with ONNX Runtime needs the CUDA execution provider (onnxruntime-gpu and a CUDA GPU); this "
            f"onnxruntime {ort.__version__} has only {', '.join(providers)}, and its CPU kernels lack fp16 for most "
            "ops, Turbo's ScatterElements(reduction='add') among them")
