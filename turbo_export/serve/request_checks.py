"""What a request may hold, read from the graph, and one line for what went wrong (never a runtime's raw message).

Runs inside Triton's Python-backend stub: numpy and onnx only.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Sequence

import numpy as np

Feed = dict[str, np.ndarray]


class RequestError(Exception):
    """A bad request: the client gets the message with a 4xx status."""


class ModelError(Exception):
    """The model failed on one request for a reason that is not the request's (HTTP 500): one line saying what
    failed, without the runtime's multi-line report (that goes to the server log)."""


MAX_ERROR_CHARS = 600
_ORT_ERROR = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*(\w+)\s*:\s*(.*)", re.DOTALL)
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: (.*)",
                       re.DOTALL)
# ONNX Runtime status codes that mean "these inputs are not valid for this graph"
_ORT_CLIENT_CODES = {"INVALID_ARGUMENT"}


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line (whitespace collapsed); an over-long one says how much the server log holds besides."""
    text = " ".join(text.split())
    if len(text) > limit:
        return f"{text[:limit]} [{len(text) - limit} more characters in the server log]"
    return text


def describe_failure(exc: BaseException, what: str = "the model") -> RequestError | ModelError:
    """The answer for one request whose run raised ``exc``: RequestError (400) when the runtime says the inputs
    are invalid, else ModelError (500); one line naming the operator and node where ONNX Runtime reports them.
    The full message is printed to stderr (the server log)."""
    if isinstance(exc, (RequestError, ModelError)):
        return exc
    text = str(exc).strip()
    print(f"turbo-export: {what} failed on a request: {type(exc).__name__}: {text}", file=sys.stderr, flush=True)
    match = _ORT_ERROR.match(text)
    if match:
        code, detail = match.group(1), match.group(2)
        node = _ORT_NODE.match(detail.strip())
        if node:
            name = f" '{node.group(2)}'" if node.group(2) else ""
            detail = f"{node.group(1)} node{name}: {node.group(3)}"
        detail = one_line(detail)
        if code in _ORT_CLIENT_CODES:
            return RequestError(f"{what} cannot run this request's inputs (ONNX Runtime {code}: {detail})")
        return ModelError(f"{what} failed on this request (ONNX Runtime {code}: {detail})")
    return ModelError(f"{what} failed on this request ({type(exc).__name__}: {one_line(text) or 'no message'})")


# ---- what the integer inputs of a graph may hold ---------------------------------------------------------------

_INT_TYPES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 12: "uint32", 13: "uint64"}
# ops whose output holds (a subset of) the values of their first input: an index keeps its meaning through them
_VALUE_PRESERVING = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose", "Tile",
                     "Slice", "Concat", "Cast", "Gather"}


def integer_input_ranges(onnx_path: str) -> dict[str, list[Any]]:
    """Per integer graph input, ``[lo, hi, why]``: the values the graph accepts, read from the graph.

    - an index into a table: the input (through reshapes, casts, slices, ...) is the indices of a Gather over a
      constant of V rows (an embedding: vocabulary, positions) -> [0, V-1] (Gather also takes -V..-1, counting
      from the end; no embedding means that, so they are refused);
    - a slot selector: compared with Equal to a constant arange(T) (the position of a static KV cache: which slot
      the token is written to) -> [0, T-1];
    - a mask (the input's name ends in "mask") -> [0, 1].
    Inputs with none of these are left out: any value of their type is accepted."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path, load_external_data=False)
    graph = model.graph
    constants: dict[str, Any] = {t.name: t for t in graph.initializer}
    producers: dict[str, Any] = {}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and node.output:
                constants[node.output[0]] = value
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))

    def constant(name: str) -> Any:
        """The constant tensor ``name`` is, seen through Identity / Cast; None if it is computed."""
        for _ in range(8):
            if name in constants:
                return constants[name]
            node = producers.get(name)
            if node is None or node.op_type not in ("Identity", "Cast") or not node.input:
                return None
            name = node.input[0]
        return None

    def arange_length(tensor: Any) -> int | None:
        if len(tensor.dims) != 1 or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind not in "iu" or not np.array_equal(values, np.arange(len(values))):
            return None
        return len(values)

    ranges: dict[str, list[Any]] = {}
    for graph_input in graph.input:
        if graph_input.name in constants or graph_input.type.tensor_type.elem_type not in _INT_TYPES:
            continue
        lo, hi, why = None, None, ""
        if graph_input.name.lower().endswith("mask"):
            lo, hi, why = 0, 1, "a mask holds 0 (masked) or 1"
        seen, frontier = {graph_input.name}, [graph_input.name]
        while frontier:
            tensor = frontier.pop()
            for node, k in consumers.get(tensor, []):
                if node.op_type == "Gather" and k == 1:
                    table = constant(node.input[0])
                    if table is not None and table.dims:
                        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(table.dims)
                        rows = int(table.dims[axis])
                        if hi is None or rows - 1 < hi:
                            lo, hi = 0, rows - 1
                            why = f"{rows} rows in the table '{node.input[0]}' it indexes"
                        continue
                if node.op_type == "Equal":
                    other = constant(node.input[1 - k]) if len(node.input) == 2 else None
                    length = arange_length(other) if other is not None else None
                    if length is not None:
                        if hi is None or length - 1 < hi:
                            lo, hi = 0, length - 1
                            why = f"it selects one of {length} cache slots (compared with arange({length}))"
                        continue
                if node.op_type in _VALUE_PRESERVING and (k == 0 or node.op_type == "Concat"):
                    if node.op_type == "Cast":
                        to = next((a.i for a in node.attribute if a.name == "to"), 0)
                        if to not in _INT_TYPES:
                            continue
                    for out in node.output[:1]:
                        if out not in seen:
                            seen.add(out)
                            frontier.append(out)
        if hi is not None:
            ranges[graph_input.name] = [lo, hi, why]
    return ranges


def check_integer_ranges(feed: Feed, ranges: dict[str, Sequence[Any]]) -> None:
    """RequestError naming the input, the allowed range and why, for the first integer input out of range."""
    for name, (lo, hi, *why) in ranges.items():
        value = feed.get(name)
        if value is None or value.size == 0 or value.dtype.kind not in "iub":
            continue
        smallest, largest = int(value.min()), int(value.max())
        if smallest < lo or largest > hi:
            bad = smallest if smallest < lo else largest
            reason = f" ({why[0]})" if why and why[0] else ""
            raise RequestError(f"input '{name}': {bad} is out of range; this model accepts {lo}..{hi}{reason}")


