"""What TensorRT's ONNX parser would reject in a graph, or build only through a plugin library: pure onnx, no
TensorRT needed, so it runs on every export here.

The rules follow the ONNX-TensorRT parser's operator support matrix (TensorRT 10.x, docs/operators.md of
onnx/onnx-tensorrt) and its importer source, limited to what can be decided from the graph alone:

- TopK: ``K`` must be below 3840 and ``sorted`` 1.
- ScatterND: no ``reduction``.
- ScatterElements with a ``reduction``: built by the ``ScatterElements`` plugin of libnvinfer_plugin
  (``trt.init_libnvinfer_plugins``), which takes INT64 indices only.
- CumSum ``axis``, Squeeze / Unsqueeze ``axes`` and Reduce* ``axes`` inputs must be build-time constants
  (an initializer or a Constant node).
- Operators the parser does not import at all (sequence, string, optional ops, ...).
- Dynamic dimensions on graph inputs and outputs when the export promised static shapes (our engines are built
  without optimisation profiles).
- Data types TensorRT has no tensor type for (string, complex, int16, uint16/32/64); DOUBLE is cast down to
  FLOAT by the parser (a warning); UINT8 only as a network input or output.
- Custom nodes: TurboMerge / TurboUnmerge need the Turbo plugin; any other node outside the ONNX domains needs a
  plugin registered under its op_type.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from turbo_export.errors import TurboExportError

REJECTED = "rejected"
NEEDS_PLUGIN_LIBRARY = "needs plugin library"
NEEDS_TURBO_PLUGIN = "needs the turbo plugin"
NEEDS_PLUGIN = "needs a plugin"
WARNING = "warning"
SEVERITIES = (REJECTED, NEEDS_PLUGIN, NEEDS_TURBO_PLUGIN, NEEDS_PLUGIN_LIBRARY, WARNING)

TOPK_MAX_K = 3840  # the parser needs K < 3840
TURBO_OPS = ("TurboMerge", "TurboUnmerge")
ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

# ONNX operators the TensorRT 10 parser marks unsupported ("N" in its support matrix).
UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow",
    "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "STFT", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit",
    "TfIdfVectorizer", "Unique",
})
# (op_type, input index, what) whose input must be a build-time constant
CONSTANT_INPUTS = (
    [("CumSum", 1, "axis"), ("Squeeze", 1, "axes"), ("Unsqueeze", 1, "axes")]
    + [(op, 1, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                   "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")]
)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # one of SEVERITIES
    node: str  # node name (or the tensor name for graph-level findings)
    op_type: str
    why: str
    where: str = "graph"  # "graph", "function <name>", or the path of a subgraph

    def line(self) -> str:
        return f"[{self.severity}] {self.rule}: {self.op_type} '{self.node}' ({self.where}): {self.why}"


@dataclass
class LintResult:
    path: str
    findings: list[Finding]
    nodes: int

    @property
    def rejected(self) -> list[Finding]:
        return [f for f in self.findings if f.severity in (REJECTED, NEEDS_PLUGIN)]

    @property
    def ok(self) -> bool:
        """True when nothing would be rejected (plugin-library nodes and warnings are allowed)."""
        return not self.rejected

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "nodes": self.nodes, "ok": self.ok, "counts": self.counts(),
                "findings": [asdict(f) for f in self.findings]}

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        verdict = "TensorRT's ONNX parser would accept it" if self.ok else "TensorRT's ONNX parser would reject it"
        head = f"{self.path}: {self.nodes} nodes; {counts or 'no findings'}; {verdict}"
        return [head] + [f"  {f.line()}" for f in self.findings]


def _dtype_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


# Types with no TensorRT tensor type; DOUBLE is cast down (warned), UINT8 only at the network boundary.
_NO_TRT_TYPE = {"STRING", "COMPLEX64", "COMPLEX128", "INT16", "UINT16", "UINT32", "UINT64"}


class _Scope:
    """Constants and value types visible in one graph (subgraphs see their parents' names)."""

    def __init__(self, graph: Any, base_dir: str, parent: "_Scope | None" = None) -> None:
        from onnx import numpy_helper

        self.parent = parent
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants: dict[str, Any] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS and node.output:
                self.constants[node.output[0]] = node
        self.types = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type
        self._numpy = numpy_helper
        self.local_functions: set[tuple[str, str]] = parent.local_functions if parent else set()

    def is_constant(self, name: str) -> bool:
        if name in self.initializers or name in self.constants:
            return True
        return self.parent.is_constant(name) if self.parent else False

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant input, or None when it is computed at run time."""
        if name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == 1:  # EXTERNAL: small constants are never external in our exports
                from onnx.external_data_helper import load_external_data_for_tensor

                from turbo_export.files import check_inside

                tensor = type(tensor).FromString(tensor.SerializeToString())
                location = next((e.value for e in tensor.external_data if e.key == "location"), "")
                check_inside(self.base_dir, location, f"external data of '{name}'")
                try:
                    load_external_data_for_tensor(tensor, self.base_dir)
                except Exception as exc:  # noqa: BLE001  (a missing or short external file)
                    raise TurboExportError(f"external data of '{name}': cannot read '{location}' in "
                                           f"{self.base_dir}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                                           ) from None
            return self._numpy.to_array(tensor)
        if name in self.constants:
            for attr in self.constants[name].attribute:
                if attr.name == "value":
                    return self._numpy.to_array(attr.t)
                if attr.name in ("value_int", "value_float"):
                    return np.asarray(attr.i if attr.name == "value_int" else attr.f)
                if attr.name in ("value_ints", "value_floats"):
                    return np.asarray(list(attr.ints) if attr.name == "value_ints" else list(attr.floats))
            return None
        return self.parent.value(name) if self.parent else None

    def tensor_type(self, name: str) -> Any:
        if name in self.types:
            return self.types[name]
        if name in self.initializers:
            return _InitType(self.initializers[name])
        return self.parent.tensor_type(name) if self.parent else None


class _InitType:
    def __init__(self, tensor: Any) -> None:
        self.elem_type = tensor.data_type
        self.shape = None


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _static_dims(tensor_type: Any) -> list[int | None] | None:
    if tensor_type is None or getattr(tensor_type, "shape", None) is None or not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _node_findings(node: Any, scope: _Scope, where: str) -> Iterator[Finding]:
    op, name = node.op_type, node.name or (node.output[0] if node.output else "?")

    def finding(rule: str, severity: str, why: str) -> Finding:
        return Finding(rule, severity, name, op, why, where)

    if (node.domain, op) in scope.local_functions:
        return  # a call to a function defined in the model: its body is linted on its own
    if node.domain not in ONNX_DOMAINS:
        if op in TURBO_OPS:
            yield finding("custom-op", NEEDS_TURBO_PLUGIN,
                          f"custom node (domain '{node.domain}'): TensorRT builds it only with the Turbo plugin "
                          f"registered as '{op}'")
        else:
            yield finding("custom-op", NEEDS_PLUGIN,
                          f"node of domain '{node.domain}': rejected unless a TensorRT plugin named '{op}' is "
                          "registered")
        return
    if op in UNSUPPORTED_OPS:
        yield finding("unsupported-op", REJECTED, f"the ONNX-TensorRT parser has no importer for {op}")
        return
    if op == "TopK":
        k = scope.value(node.input[1]) if len(node.input) > 1 else _attr(node, "k")
        if k is not None and int(np.asarray(k).ravel()[0]) >= TOPK_MAX_K:
            yield finding("topk-k", REJECTED, f"K = {int(np.asarray(k).ravel()[0])}; TensorRT's TopK needs "
                                              f"K < {TOPK_MAX_K}")
        elif k is None:
            dims = _static_dims(scope.tensor_type(node.input[0]))
            axis = int(_attr(node, "axis", -1))
            length = dims[axis] if dims and -len(dims) <= axis < len(dims) else None
            if length is None or length >= TOPK_MAX_K:
                shown = "unknown" if length is None else str(length)
                yield finding("topk-k", REJECTED, f"K is computed at run time and the axis length is {shown}; "
                                                  f"TensorRT's TopK needs K < {TOPK_MAX_K}")
        if int(_attr(node, "sorted", 1)) != 1:
            yield finding("topk-sorted", REJECTED, "sorted=0; TensorRT's TopK needs sorted=1")
    elif op == "ScatterND":
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if reduction != "none":
            yield finding("scatternd-reduction", REJECTED,
                          f"reduction='{reduction}'; TensorRT's ScatterND supports no reduction")
    elif op == "ScatterElements":
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if reduction != "none":
            indices = scope.tensor_type(node.input[1])
            index_type = _dtype_name(indices.elem_type) if indices is not None and indices.elem_type else "unknown"
            if index_type not in ("INT64", "unknown"):
                yield finding("scatterelements-reduction", REJECTED,
                              f"reduction='{reduction}' with {index_type} indices; libnvinfer_plugin's "
                              "ScatterElements plugin takes INT64 indices only")
            else:
                yield finding("scatterelements-reduction", NEEDS_PLUGIN_LIBRARY,
                              f"reduction='{reduction}': built by the ScatterElements plugin of libnvinfer_plugin "
                              "(call trt.init_libnvinfer_plugins before parsing)")
    for rule_op, index, what in CONSTANT_INPUTS:
        if op == rule_op and len(node.input) > index and node.input[index] and not scope.is_constant(node.input[index]):
            yield finding("constant-input", REJECTED,
                          f"input '{what}' ({node.input[index]}) is computed at run time; TensorRT's parser needs "
                          "an initializer")


def _graph_findings(graph: Any, scope: _Scope, where: str) -> Iterator[Finding]:
    for node in graph.node:
        yield from _node_findings(node, scope, where)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                sub_where = f"{where}/{node.name or node.op_type}.{attr.name}"
                yield from _graph_findings(sub, _Scope(sub, scope.base_dir, scope), sub_where)


def _type_findings(graph: Any, scope: _Scope, static: bool) -> Iterator[Finding]:
    boundary = {vi.name for vi in list(graph.input) + list(graph.output)}
    seen: set[str] = set()
    values = [(vi.name, vi.type.tensor_type) for vi in list(graph.input) + list(graph.output) + list(graph.value_info)
              if vi.type.HasField("tensor_type")]
    values += [(t.name, _InitType(t)) for t in graph.initializer]
    for name, tensor_type in values:
        if name in seen or not tensor_type.elem_type:
            continue
        seen.add(name)
        dtype = _dtype_name(tensor_type.elem_type)
        if dtype in _NO_TRT_TYPE:
            yield Finding("dtype", REJECTED, name, dtype, f"TensorRT has no {dtype} tensors")
        elif dtype == "DOUBLE":
            yield Finding("dtype", WARNING, name, dtype, "DOUBLE is cast down to FLOAT by the parser")
        elif dtype == "UINT8" and name not in boundary:
            yield Finding("dtype", REJECTED, name, dtype, "UINT8 is supported only as a network input or output")
    if static:
        for kind, items in (("input", graph.input), ("output", graph.output)):
            for vi in items:
                if vi.name in scope.initializers:
                    continue
                dims = _static_dims(vi.type.tensor_type)
                if dims is None:
                    yield Finding("dynamic-shape", REJECTED, vi.name, kind,
                                  "no shape recorded, but static shapes were promised")
                elif any(d is None or d <= 0 for d in dims):
                    shape = [d.dim_param or "?" if not d.HasField("dim_value") else d.dim_value
                             for d in vi.type.tensor_type.shape.dim]
                    yield Finding("dynamic-shape", REJECTED, vi.name, kind,
                                  f"shape {shape} has dynamic dimensions, but static shapes were promised (an engine "
                                  "without an optimization profile)")


def lint_model(model: Any, path: str = "<model>", base_dir: str = ".", static: bool = True) -> LintResult:
    """All findings for an in-memory ModelProto (functions and subgraphs included)."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a help for the dtype and TopK rules, never a requirement
        pass
    scope = _Scope(model.graph, base_dir)
    scope.local_functions.update((f.domain, f.name) for f in model.functions)
    findings = list(_type_findings(model.graph, scope, static))
    findings += _graph_findings(model.graph, scope, "graph")
    nodes = len(model.graph.node)
    for function in model.functions:
        body = onnx.helper.make_graph(list(function.node), function.name, [], [])
        findings += _graph_findings(body, _Scope(body, base_dir, scope), f"function {function.domain}::{function.name}")
        nodes += len(function.node)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings.sort(key=lambda f: order[f.severity])
    return LintResult(path, findings, nodes)


def lint_file(path: str, static: bool = False) -> LintResult:
    """Lint an ONNX file; external weights are not read (only small constants, on demand)."""
    import onnx

    from turbo_export.files import read_onnx

    model = read_onnx(path)  # a missing, empty or non-ONNX file is one error, never "nothing the parser rejects"
    for tensor in model.graph.initializer:
        # weights: only their type and shape matter here; dropping the bytes keeps shape inference cheap
        if len(tensor.raw_data) > _KEEP_BYTES:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "<not read by the lint>"
    return lint_model(model, path, os.path.dirname(os.path.abspath(path)), static)


_KEEP_BYTES = 1 << 16
