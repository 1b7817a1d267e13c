"""Dynamic batch (the default) and the peers of the benchmark: symbolic batch in every exported graph, parity at
batch 1 and at --batch, TensorRT's optimization profile, serving without padding rows, and the PyTorch peers."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from turbo_export.cli import main
from turbo_export.export.job import tensorrt_profile
from turbo_export.families.base import GraphSpec


def _first_dims(path: str) -> dict[str, object]:
    model = onnx.load(path, load_external_data=False)
    return {i.name: (i.type.tensor_type.shape.dim[0].dim_param or i.type.tensor_type.shape.dim[0].dim_value)
            for i in model.graph.input}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    runner = CliRunner()
    out = {}
    for name, extra in (("dynamic", []), ("static", ["--static-batch"])):
        folder = str(root / name)
        result = runner.invoke(main, ["vit", "--model", "random:tiny", "--ratio", "4", "--batch", "3", "--runs", "2",
                                      "--out", folder, *extra])
        assert result.exit_code == 0, result.output
        out[name] = folder
    return out


def test_symbolic_batch_by_default_and_static_on_request(exports):
    dynamic = json.load(open(os.path.join(exports["dynamic"], "report.json")))
    static = json.load(open(os.path.join(exports["static"], "report.json")))
    assert dynamic["batch_dim"] == "symbolic" and static["batch_dim"] == "static"
    for name in ("baseline", "turbo"):
        assert _first_dims(os.path.join(exports["dynamic"], f"{name}.onnx")) == {"pixel_values": "batch"}
        assert _first_dims(os.path.join(exports["static"], f"{name}.onnx")) == {"pixel_values": 3}
        # each intermediate tensor has a batch name of its own (export.tensor_symbols)
        named = [d.dim_param for v in onnx.load(os.path.join(exports["dynamic"], f"{name}.onnx")).graph.value_info
                 for d in v.type.tensor_type.shape.dim if d.dim_param.startswith("batch")]
        assert len(named) > 20 and len(set(named)) == len(named) and "batch" not in named
    assert dynamic["parity"]["batches"] == [3, 1] and dynamic["parity_baseline"]["batches"] == [3, 1]
    assert static["parity"]["batches"] == [3]


def test_dynamic_graph_matches_pytorch_at_any_batch(exports):
    import onnxruntime as ort

    from turbo_export.families import get_family
    from turbo_export.families.vit import VitOptions

    vit = get_family("vit")
    loaded = vit.load("random:tiny")
    turbo = vit.make_turbo(loaded.model, VitOptions(ratio=4, alpha=150.0))
    session = ort.InferenceSession(os.path.join(exports["dynamic"], "turbo.onnx"), providers=["CPUExecutionProvider"])
    for rows in (1, 2, 5):
        x = torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            expected = turbo(pixel_values=x).logits.numpy()
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        assert got.shape == (rows, 10) and np.abs(got - expected).max() < 1e-4


def test_benchmark_times_the_pytorch_peers_in_the_same_run(exports):
    bench = json.load(open(os.path.join(exports["dynamic"], "report.json")))["bench"]
    names = {(p["name"], p["runtime"], p["precision"]) for p in bench["peers"]}
    assert names == {("unaccelerated", "onnxruntime", "fp32"), ("turbo", "onnxruntime", "fp32"),
                     ("pytorch eager, unaccelerated", "pytorch", "fp32"), ("pytorch eager, Turbo", "pytorch", "fp32")}
    assert all(p["items_per_s"] > 0 and p["min_ms"] <= p["median_ms"] <= p["max_ms"] for p in bench["peers"])
    assert bench["speedup_vs_fp32"] == pytest.approx(bench["speedup"])  # fp32: the same reference


def test_tensorrt_profile_covers_batch_and_symbolic_dims():
    g = GraphSpec("decoder", torch.nn.Identity(), {
        "input_ids": torch.zeros(4, 1, dtype=torch.long), "position": torch.zeros(1, dtype=torch.long),
        "past_keys": torch.zeros(2, 4, 2, 9, 8), "cross_keys": torch.zeros(2, 4, 2, 65, 8)}, ["logits"],
        batch_axes={"input_ids": 0, "past_keys": 1, "cross_keys": 1}, symbolic_dims={"cross_keys": {3: "image_tokens"}},
        dim_ranges={"image_tokens": (33, 33, 65)})
    profile = {name: shapes for name, *shapes in tensorrt_profile(g, True, 16)}
    assert profile["input_ids"] == [(1, 1), (4, 1), (16, 1)]
    assert profile["past_keys"] == [(2, 1, 2, 9, 8), (2, 4, 2, 9, 8), (2, 16, 2, 9, 8)]
    assert profile["cross_keys"] == [(2, 1, 2, 33, 8), (2, 4, 2, 33, 8), (2, 16, 2, 65, 8)]
    assert "position" not in profile
    static = {name: shapes for name, *shapes in tensorrt_profile(g, False)}
    assert set(static) == {"cross_keys"} and static["cross_keys"][2] == (2, 4, 2, 65, 8)


def test_served_dynamic_graph_runs_requests_without_padding_rows(exports):
    from turbo_export.serve.handlers import make_handler

    handler = make_handler({"handler": "tensor", "name": "turbo", "onnx": os.path.join(exports["dynamic"], "turbo.onnx"),
                            "backend": "onnxruntime", "batched": True})
    assert handler.batch == 0  # symbolic: no static batch to pad to
    seen = []
    run = handler.runner.run
    handler.runner.run = lambda feed: (seen.append(len(feed["pixel_values"])), run(feed))[1]
    one = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    two = {"pixel_values": np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    results = handler.handle([one])
    assert seen == [1] and results[0]["logits"].shape == (1, 10)
    results = handler.handle([one, two])
    assert seen[-1] == 3 and [r["logits"].shape for r in results] == [(1, 10), (2, 10)]


def test_exported_graphs_carry_no_all_zero_mask(exports):
    """transformers builds an all-True attention mask for an unmasked image model; Where turns it into zeros that
    every attention Add adds. With a symbolic batch the mask's shape depends on the input, so it is no constant,
    yet the export's cleanup still drops it (from both sides: the unaccelerated graph must not pay for it)."""
    from turbo_export.export.graph_cleanup import op_counts

    for kind in ("dynamic", "static"):
        counts = op_counts(os.path.join(exports[kind], "baseline.onnx"))
        assert counts.get("Where", 0) == 0, (kind, counts)
        model = onnx.load(os.path.join(exports[kind], "baseline.onnx"))
        producers = {o: n for n in model.graph.node for o in n.output}
        softmax_inputs = [producers[n.input[0]].op_type for n in model.graph.node if n.op_type == "Softmax"]
        assert softmax_inputs and "Add" not in softmax_inputs, (kind, softmax_inputs)


def test_uniform_mask_expanded_to_the_batch_is_bypassed(tmp_path):
    """The cleanup pass on a hand-built graph: Add(x, Where(Expand(all-True, shape(x)), 0, -inf)) -> x, whatever the
    batch; an Add of a mask that is not all zero stays."""
    from onnx import TensorProto, helper

    from turbo_export.export.graph_cleanup import cleanup_graph, op_counts

    def graph(mask_value: bool) -> onnx.ModelProto:
        nodes = [helper.make_node("Shape", ["x"], ["shape"]),
                 helper.make_node("Expand", ["mask", "shape"], ["big"]),
                 helper.make_node("Where", ["big", "zero", "neg"], ["bias"]),
                 helper.make_node("Add", ["x", "bias"], ["sum"]),
                 helper.make_node("Softmax", ["sum"], ["y"], axis=-1)]
        inits = [helper.make_tensor("mask", TensorProto.BOOL, [1, 1, 1], [mask_value]),
                 helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                 helper.make_tensor("neg", TensorProto.FLOAT, [], [-3.4e38])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 5])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    cleaned, notes = cleanup_graph(graph(True))
    assert op_counts(cleaned) == {"Softmax": 1} and any("all-zero" in n for n in notes)
    x = np.random.RandomState(0).randn(3, 4, 5).astype(np.float32)
    import onnxruntime as ort

    before = ort.InferenceSession(graph(True).SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(cleaned.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(before.run(None, {"x": x})[0], after.run(None, {"x": x})[0])
    kept, _ = cleanup_graph(graph(False))
    assert op_counts(kept).get("Add") == 1
