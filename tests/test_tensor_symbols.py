"""One symbolic batch name per intermediate tensor (turbo_export.export.tensor_symbols): what it renames, what it
leaves, that ONNX Runtime keeps the names after its own optimizations, and that outputs do not change."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from turbo_export.export.quantize import quantize_graph
from turbo_export.export.tensor_symbols import name_symbols_per_tensor, share_symbols


def _blocks(batch: str | int = "batch", blocks: int = 3, width: int = 16) -> onnx.ModelProto:
    """``blocks`` identical MatMul -> Relu -> MatMul -> Add(residual) blocks on a [batch, 5, width] input."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for b in range(blocks):
        for w in ("w1", "w2"):
            inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"{w}_{b}"))
        nodes += [helper.make_node("MatMul", [x, f"w1_{b}"], [f"h_{b}"]),
                  helper.make_node("Relu", [f"h_{b}"], [f"r_{b}"]),
                  helper.make_node("MatMul", [f"r_{b}", f"w2_{b}"], [f"o_{b}"]),
                  helper.make_node("Add", [x, f"o_{b}"], [f"y_{b}" if b < blocks - 1 else "y"])]
        x = f"y_{b}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, 5, width]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "blocks", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _symbols(model: onnx.ModelProto) -> dict[str, str]:
    return {v.name: v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.value_info
            if v.type.tensor_type.shape.dim}


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: str | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_each_intermediate_tensor_gets_its_own_batch_name_and_outputs_do_not_change():
    model = _blocks()
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
    before = _run(model, x)
    assert name_symbols_per_tensor(model) == 3 * 4 - 1  # every node output but the graph output
    symbols = _symbols(model)
    assert len(symbols) == 11 and len(set(symbols.values())) == 11
    assert all(s.startswith("batch__t") for s in symbols.values())
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert np.array_equal(_run(model, x), before)
    assert np.array_equal(_run(model, x[:1]), _run(_blocks(), x[:1]))

    assert name_symbols_per_tensor(model) == 11  # again: renumbered, still one name each
    assert len(set(_symbols(model).values())) == 11


def test_static_graph_is_left_alone():
    model = _blocks(batch=3)
    assert name_symbols_per_tensor(model) == 0 and not model.graph.value_info


def test_onnx_runtime_keeps_the_names_after_its_own_optimizations(tmp_path):
    """What the planner compares is ONNX Runtime's view of the shapes: without the pass the blocks' tensors share
    one shape (so their buffers are reused across blocks); with it, no two do."""
    x = np.ones((2, 5, 16), np.float32)
    shapes = {}
    for name in ("plain", "named"):
        model = onnx.shape_inference.infer_shapes(_blocks())  # as the exporter writes them
        if name == "named":
            name_symbols_per_tensor(model)
        _run(model, x, optimized=str(tmp_path / f"{name}.onnx"))
        optimized = onnx.load(str(tmp_path / f"{name}.onnx"))
        shapes[name] = collections.Counter(
            tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in optimized.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT)
    assert shapes["plain"].most_common(1)[0][1] >= 6
    assert shapes["named"].most_common(1)[0][1] == 1


def test_quantized_graph_names_its_new_tensors_too(tmp_path):
    src, dst = str(tmp_path / "blocks.onnx"), str(tmp_path / "blocks_int8.onnx")
    onnx.save(_blocks(), src)
    report = quantize_graph(src, dst, "dynamic")
    assert any("own names for the symbolic dimensions" in note for note in report.cleanup)
    quantized = onnx.load(dst)
    assert report.counts_dst["MatMulInteger"] == 6
    float_symbols = [s for v, s in _symbols(quantized).items() if s.startswith("batch")]
    assert len(float_symbols) > 11 and len(set(float_symbols)) == len(float_symbols)
    x = np.random.default_rng(2).standard_normal((4, 5, 16)).astype(np.float32)
    session = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    expected = _run(_blocks(), x)
    got = session.run(None, {"x": x})[0]
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_buffer_reuse_script_times_each_way_and_leaves_no_copy(tmp_path):
    import json
    import os
    import sys

    from click.testing import CliRunner

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import buffer_reuse

    named, plain = str(tmp_path / "named.onnx"), str(tmp_path / "plain.onnx")
    model = onnx.shape_inference.infer_shapes(_blocks())
    onnx.save(model, plain)
    name_symbols_per_tensor(model)
    onnx.save(model, named)
    shared = onnx.load(named)
    assert share_symbols(shared) == 11 and set(_symbols(shared).values()) == {"batch"}

    out = tmp_path / "reuse.json"
    result = CliRunner().invoke(buffer_reuse.main, [named, "--runs", "2", "--warmup", "0", "--batch", "3",
                                                    "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert sorted(report["median_ms"]) == ["named.onnx as exported", "named.onnx reuse off", "named.onnx shared name"]
    assert report["renamed_dims"] == {named: 11} and all(ms > 0 for ms in report["median_ms"].values())
    assert sorted(os.listdir(tmp_path)) == ["named.onnx", "plain.onnx", "reuse.json"]
    static = CliRunner().invoke(buffer_reuse.main, [plain, "--runs", "2", "--warmup", "0", "--batch", "2",
                                                    "--json", str(out)])
    assert static.exit_code == 0, static.output
    assert sorted(json.loads(out.read_text())["median_ms"]) == ["plain.onnx as exported", "plain.onnx reuse off"]
    assert "as exported / this" in static.output
    assert sorted(os.listdir(tmp_path)) == ["named.onnx", "plain.onnx", "reuse.json"]


def test_runner_switches_buffer_reuse_off_unless_given_options_or_large(tmp_path, monkeypatch):
    """A static batch cannot carry per-tensor names, so the runner itself turns ONNX Runtime's reuse off (graphs
    under LARGE_GRAPH_BYTES, no caller options); outputs stay the same."""
    from turbo_export.backends import ort as ort_backend

    path = str(tmp_path / "static.onnx")
    onnx.save(onnx.shape_inference.infer_shapes(_blocks(batch=3)), path)
    x = {"x": np.random.default_rng(3).standard_normal((3, 5, 16)).astype(np.float32)}
    default = ort_backend.OnnxRuntimeRunner(path)
    given = ort_backend.OnnxRuntimeRunner(path, session_options=ort.SessionOptions())
    monkeypatch.setattr(ort_backend, "LARGE_GRAPH_BYTES", 1)
    large = ort_backend.OnnxRuntimeRunner(path)
    reuse = {name: r.session.get_session_options().enable_mem_reuse
             for name, r in (("default", default), ("given", given), ("large", large))}
    assert reuse == {"default": False, "given": True, "large": True}
    np.testing.assert_array_equal(default.run(x)["y"], given.run(x)["y"])
