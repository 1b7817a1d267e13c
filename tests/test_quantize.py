"""int8 quantization of exported graphs (turbo_export.export.quantize) on tiny seeded models.

Tolerances (observed with the seeded tiny presets, fp32 graph vs its int8 graph on the same inputs, cosine of the
output): ViT logits 0.9999 (dynamic and static), BLIP vision states 0.9999, SD UNet noise 0.9987 (dynamic) and
0.998 (static, calibrated on the UNet's own kind of inputs). The asserts leave a margin: ViT / BLIP > 0.999,
SD UNet > 0.995.
"""

import collections
import copy
import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from turbo_export import apply_turbo
from turbo_export.backends import make_runner
from turbo_export.errors import TurboExportError
from turbo_export.export.onnx import export_onnx
from turbo_export.export.quantize import (
    check_fp16_onnxruntime,
    merge_nodes,
    naive_quantize_dynamic,
    op_counts,
    quantize_graph,
    seeded_calibration,
)
from turbo_export.families import get_family
from turbo_export.families.base import GraphSpec
from turbo_export.families.blip import build_random_blip
from turbo_export.metrics import cosine

VIT_ATOL_COS = 0.999
SD_ATOL_COS = 0.995


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return (self.model(pixel_values=pixel_values).logits,)


class VisionStates(nn.Module):
    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values):
        return (self.vision_model(pixel_values=pixel_values).last_hidden_state,)


class UNetNoise(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return (self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0],)


def _pixels(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """Tiny ViT exported unaccelerated and with Turbo (r=8, 4 blocks): {name: path}, and the example pixels."""
    folder = tmp_path_factory.mktemp("vit")
    model = get_family("vit").load("random:tiny").model.eval()
    turbo = apply_turbo(copy.deepcopy(model), 8)
    pixels = {"pixel_values": _pixels()}
    paths = {name: export_onnx(GraphSpec(name, Logits(m), pixels, ["out"]), str(folder / f"{name}.onnx"))
             for name, m in (("baseline", model), ("turbo", turbo))}
    return paths, {"pixel_values": pixels["pixel_values"].numpy()}


def _run(path, feed):
    return make_runner(path).run(feed)["out"]


SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
INT8_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger"}


def _assert_float(quantized_path, names, ops):
    """Every node in ``names`` is still there as itself (same op type) and reads no int8 tensor."""
    model = onnx.load(quantized_path)
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    for name in names:
        node = by_name.get(name)
        assert node is not None and node.op_type == ops[name], f"{name} was rewritten"
        feeding = {producer[i].op_type for i in node.input if i in producer}
        assert not feeding & INT8_OPS, f"{name} ({node.op_type}) reads {feeding & INT8_OPS}"


def _similarity_inputs_quantized(quantized_path):
    """Whether a quantize node feeds a MatMul (or its int8 replacement) whose output the matching reads."""
    model = onnx.load(quantized_path)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "ReduceMax":
            sim = producer[n.input[0]]
            while sim.op_type in ("Mul", "Cast", "Add"):  # MatMulInteger -> Cast -> Mul (scale) before ReduceMax
                sim = producer[sim.input[0]]
            if sim.op_type in INT8_OPS or {producer[i].op_type for i in sim.input if i in producer} & INT8_OPS:
                return True
    return False


@pytest.mark.parametrize("graph", ["baseline", "turbo"])
def test_dynamic_int8_runs_and_stays_close_to_fp32(vit, graph, tmp_path):
    paths, feed = vit
    dst = str(tmp_path / f"{graph}_int8.onnx")
    report = quantize_graph(paths[graph], dst, "dynamic")
    counts = op_counts(dst)
    assert counts.get("MatMulInteger", 0) >= 4 * 4 + 1  # every Linear of the 4 blocks and the head are int8
    assert report.counts_dst["DynamicQuantizeLinear"] == counts["DynamicQuantizeLinear"]
    assert cosine(_run(dst, feed), _run(paths[graph], feed)) > VIT_ATOL_COS
    assert report.calibration is None and report.mode == "dynamic"
    assert any("int8 dynamic" in line for line in report.lines())


def test_merge_nodes_found_and_kept_float(vit, tmp_path):
    paths, _ = vit
    model = onnx.load(paths["turbo"])
    found = merge_nodes(model)
    names = set(found.names)
    by_op = collections.defaultdict(set)
    for n in model.graph.node:
        by_op[n.op_type].add(n.name)
    for op in ("TopK", "ArgMax", "ReduceMax", "Where"):  # the decision (Where: the CLS token never a source)
        assert by_op[op] and by_op[op] <= names, op
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    # the token rows it moves: five Gathers per merge (kept, source and destination rows of the tokens; the kept
    # and source rows of the sizes), each reading indices the region computed
    row_gathers = {n.name for n in model.graph.node if n.op_type == "Gather" and n.input[1] in producer
                   and producer[n.input[1]].name in names}
    assert len(row_gathers) == 5 * len(by_op["TopK"]) // 2 and row_gathers <= names
    similarity = {producer[n.input[0]].name for n in model.graph.node if n.op_type == "ReduceMax"}
    assert similarity <= names and all(model.graph.node[[m.name for m in model.graph.node].index(s)].op_type
                                       == "MatMul" for s in similarity)
    # the region stops at the model: no weight MatMul, LayerNorm, Softmax or residual Add is in it
    for n in model.graph.node:
        if n.name in names:
            assert n.op_type not in ("LayerNormalization", "Softmax", "Gemm", "Conv"), n.name
            assert not (n.op_type == "MatMul" and any(i in inits for i in n.input)), n.name
            if n.op_type == "Add":  # index arithmetic or merged rows + what they receive, never a residual Add
                assert all(i in inits or producer[i].name in names for i in n.input if i), n.name
    assert merge_nodes(onnx.load(paths["baseline"])).names == []

    # quantized even with MatMulConstBOnly off, every merge node stays as it was and reads no int8 tensor
    ops = {n.name: n.op_type for n in model.graph.node}
    dst = str(tmp_path / "turbo_int8.onnx")
    report = quantize_graph(paths["turbo"], dst, "dynamic", extra_options={"MatMulConstBOnly": False})
    _assert_float(dst, names, ops)
    assert not _similarity_inputs_quantized(dst)
    assert set(report.excluded.names) == names and report.excluded.op_counts["TopK"] == len(by_op["TopK"])
    assert "float" in report.excluded.reason and "TopK x8" in report.excluded.summary()
    # MatMuls in the region, per merge: the similarity, the one-hot sums of the sources' sizes and values, and the
    # transposed one-hot reading each source's destination's new size
    merge_matmuls = by_op["MatMul"] & names
    assert similarity < merge_matmuls and len(merge_matmuls) == 4 * len(similarity)
    assert report.excluded.quantizable.get("MatMul") == len(merge_matmuls)
    # without the exclusion the same options quantize the similarity MatMul: the exclusion is what keeps it float
    unguarded = str(tmp_path / "turbo_int8_all.onnx")
    quantize_graph(paths["turbo"], unguarded, "dynamic", exclude_merge=False,
                   extra_options={"MatMulConstBOnly": False})
    assert _similarity_inputs_quantized(unguarded)


def test_static_qdq_with_seeded_and_given_calibration(vit, tmp_path):
    paths, feed = vit
    dst = str(tmp_path / "turbo_static.onnx")
    report = quantize_graph(paths["turbo"], dst, "static")  # no data: seeded random feeds, said in the report
    assert "seeded random" in report.calibration and report.per_channel
    counts = op_counts(dst)
    assert counts.get("QuantizeLinear", 0) > 0 and counts.get("DequantizeLinear", 0) > 0
    source = onnx.load(paths["turbo"])
    _assert_float(dst, report.excluded.names, {n.name: n.op_type for n in source.graph.node})
    assert not _similarity_inputs_quantized(dst)
    assert cosine(_run(dst, feed), _run(paths["turbo"], feed)) > VIT_ATOL_COS

    given = [{"pixel_values": _pixels(seed=s).numpy()} for s in (1, 2)]
    report = quantize_graph(paths["baseline"], str(tmp_path / "base_static.onnx"), "static", given)
    assert report.calibration == "2 caller-supplied feeds"
    # TensorRT's explicit quantization takes zero-point-0 scales only
    symmetric = str(tmp_path / "base_static_sym.onnx")
    quantize_graph(paths["baseline"], symmetric, "static", given, symmetric_activations=True)
    model = onnx.load(symmetric)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(not np.any(z) for z in zero_points)
    helper = seeded_calibration(paths["baseline"], 3)
    assert len(helper) == 3 and helper[0]["pixel_values"].shape == (2, 3, 32, 32) and "seeded" in helper.description


def test_fewer_quantize_nodes_and_reshapes_than_ort_preprocessing(vit, tmp_path):
    """ONNX Runtime's quantization pre-processing (which quantize_dynamic's warning asks for) rewrites every
    MatMul + Add on a 3-D activation into Reshape -> Gemm -> Reshape: q, k and v each read their own reshaped copy
    of the LayerNorm output and each gets a DynamicQuantizeLinear. The cleanup folds the chains back."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    paths, feed = vit
    pre = str(tmp_path / "pre.onnx")
    quant_pre_process(paths["baseline"], pre)
    naive = str(tmp_path / "naive.onnx")
    naive_quantize_dynamic(pre, naive)
    ours = str(tmp_path / "ours.onnx")
    report = quantize_graph(pre, ours, "dynamic")
    blocks = 4
    expected = blocks * 4 + 1  # per block: q/k/v (one shared), attention output, fc1, fc2; the head
    assert report.counts_dst["DynamicQuantizeLinear"] == expected
    # the patch embedding's Conv stays float (ONNX Runtime's CPU ConvInteger is several times slower); one plain
    # quantize_dynamic call makes it a ConvInteger with one more DynamicQuantizeLinear
    assert report.counts_dst["ConvInteger"] == 0 and op_counts(naive)["ConvInteger"] == 1
    assert op_counts(naive)["DynamicQuantizeLinear"] == expected + 1 + 2 * blocks
    assert report.counts_src["Reshape"] > report.counts_dst["Reshape"] == op_counts(paths["baseline"])["Reshape"]
    assert op_counts(naive)["Reshape"] == report.counts_src["Reshape"]
    assert any("Gemm" in note for note in report.cleanup)
    assert cosine(_run(ours, feed), _run(paths["baseline"], feed)) > VIT_ATOL_COS
    # on the exported file itself the pipeline is never worse than one quantize_dynamic call
    raw_naive = str(tmp_path / "raw_naive.onnx")
    naive_quantize_dynamic(paths["baseline"], raw_naive)
    raw = quantize_graph(paths["baseline"], str(tmp_path / "raw_ours.onnx"))
    assert raw.counts_dst["DynamicQuantizeLinear"] <= op_counts(raw_naive)["DynamicQuantizeLinear"]


def test_bad_calibration_and_mode_are_one_line_errors(vit, tmp_path):
    paths, _ = vit
    dst = str(tmp_path / "x.onnx")
    with pytest.raises(TurboExportError, match="calibration") as err:
        quantize_graph(paths["baseline"], dst, "static", [])
    assert "\n" not in str(err.value)
    with pytest.raises(TurboExportError, match="lacks input") as err:
        quantize_graph(paths["baseline"], dst, "static", [{"pixels": np.zeros(1)}])
    assert "\n" not in str(err.value)
    with pytest.raises(TurboExportError, match="int8 mode"):
        quantize_graph(paths["baseline"], dst, "int4")


def test_blip_vision_graph(tmp_path):
    model = build_random_blip("tiny", "caption").model.eval()
    turbo = apply_turbo(copy.deepcopy(model), 8)
    pixels = {"pixel_values": _pixels()}
    src = export_onnx(GraphSpec("vision", VisionStates(turbo.vision_model), pixels, ["out"]),
                      str(tmp_path / "vision.onnx"))
    feed = {"pixel_values": pixels["pixel_values"].numpy()}
    for mode in ("dynamic", "static"):
        dst = str(tmp_path / f"vision_{mode}.onnx")
        report = quantize_graph(src, dst, mode)
        assert report.excluded.op_counts.get("TopK", 0) == 4  # two merging blocks, two TopK each
        assert cosine(_run(dst, feed), _run(src, feed)) > VIT_ATOL_COS


@pytest.mark.slow
def test_sd_unet_graph(tmp_path):
    from turbo_export.models.sd_presets import build_random_sd
    from turbo_export.patch.unet import apply_turbo_unet

    sd = build_random_sd("tiny")
    unet = apply_turbo_unet(copy.deepcopy(sd.unet), 0.5, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.full((2,), 400.0),
              "encoder_hidden_states": sd.encode(["", "a red cat on a table"])}
    src = export_onnx(GraphSpec("unet", UNetNoise(unet), inputs, ["out"]), str(tmp_path / "unet.onnx"))
    feed = {k: v.numpy() for k, v in inputs.items()}
    reference = _run(src, feed)
    dst = str(tmp_path / "unet_dynamic.onnx")
    report = quantize_graph(src, dst, "dynamic")
    assert report.excluded.op_counts.get("ScatterElements", 0) > 0 and report.counts_dst["MatMulInteger"] > 0
    assert cosine(_run(dst, feed), reference) > SD_ATOL_COS
    # static, calibrated on the UNet's own kind of inputs (latents at a few timesteps, the same prompts)
    rng = np.random.default_rng(1)
    calibration = [{**feed, "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                    "timestep": np.full((2,), t, np.float32)} for t in (100.0, 400.0, 700.0)]
    dst = str(tmp_path / "unet_static.onnx")
    report = quantize_graph(src, dst, "static", calibration)
    assert report.calibration == "3 caller-supplied feeds"
    assert cosine(_run(dst, feed), reference) > SD_ATOL_COS


def test_plugin_merge_nodes_stay_float(tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    model = get_family("vit").load("random:tiny").model.eval()
    turbo = apply_turbo(copy.deepcopy(model), 8, merge_impl="plugin")
    pixels = {"pixel_values": _pixels()}
    src = export_onnx(GraphSpec("plugin", Logits(turbo), pixels, ["out"]), str(tmp_path / "plugin.onnx"))
    feed = {"pixel_values": pixels["pixel_values"].numpy()}
    for mode in ("dynamic", "static"):
        dst = str(tmp_path / f"plugin_{mode}.onnx")
        report = quantize_graph(src, dst, mode)
        assert report.excluded.op_counts.get("TurboMerge") == 4
        assert sum(n.domain == "turbo" for n in onnx.load(dst).graph.node) == 4
        assert cosine(_run(dst, feed), _run(src, feed)) > VIT_ATOL_COS


def test_fp16_onnxruntime_check():
    import onnxruntime as ort

    reason = check_fp16_onnxruntime()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert reason is None
    else:
        assert "CUDA" in reason and "\n" not in reason


def test_merged_token_outputs_are_compared_as_sets():
    """An int8 graph may merge other tokens than the fp32 model (rounding flips near-tied decisions) and return its
    tokens in another order; cross-attention reads them as a set. The int8 check compares such an output by its
    size-weighted mean and its first (protected) token: a reordered output passes, a wrong one does not."""
    from turbo_export.export.parity import check_graph, check_graph_as_sets

    tokens = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[1.0, 2, 1, 3, 1, 1], [1, 1, 4, 1, 1, 1]])

    class Tokens(nn.Module):
        def forward(self, pixel_values):
            return tokens, sizes

    class Runner:
        def __init__(self, order, scale=1.0):
            self.order, self.scale = order, scale

        def run(self, feed):
            return {"image_embeds": tokens[:, self.order].numpy() * self.scale,
                    "image_sizes": sizes[:, self.order].numpy()}

    spec = GraphSpec("turbo_vision", Tokens(), {"pixel_values": torch.zeros(2, 3, 4, 4)},
                     ["image_embeds", "image_sizes"], atol=1e-4, token_sets={"image_embeds": "image_sizes"})
    reordered = Runner([0, 3, 1, 5, 2, 4])  # the protected first token stays first
    assert not check_graph(spec, "x.onnx", reordered).ok
    report = check_graph_as_sets(spec, "x.onnx", reordered)
    assert report.ok and report.cosine > 0.9999
    assert [o.name for o in report.outputs] == ["image_embeds (as a set)", "image_sizes (total)"]
    assert check_graph_as_sets(spec, "x.onnx", Runner([1, 0, 2, 3, 4, 5])).cosine < 0.99  # first token moved
    assert not check_graph_as_sets(spec, "x.onnx", Runner(list(range(6)), scale=1.5)).ok


def test_fp32_weights_in_external_data_move_aside_for_the_int8_graph(tmp_path):
    """A graph over 2 GB keeps its weights in <name>.onnx.data. Before <name>.onnx becomes the int8 graph (whose own
    weights ONNX Runtime's quantizer writes to <name>.onnx.data), the fp32 graph kept for the benchmark moves to
    <name>.fp32.onnx with its weights in <name>.fp32.onnx.data, so the quantizer cannot overwrite them."""
    import os

    from onnx import TensorProto, helper, numpy_helper

    from turbo_export.export.precision import _move_external_data

    w = numpy_helper.from_array(np.random.RandomState(0).randn(8, 4).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "unet.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="unet.onnx.data", size_threshold=0)
    fp32 = str(tmp_path / "unet.fp32.onnx")
    os.replace(path, fp32)
    _move_external_data(fp32, path + ".data")
    assert sorted(os.listdir(tmp_path)) == ["unet.fp32.onnx", "unet.fp32.onnx.data"]
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose(make_runner(fp32).run({"x": x})["y"], x @ numpy_helper.to_array(w), rtol=1e-6)


def test_weights_behind_a_transpose_are_folded_and_quantized(tmp_path):
    """MatMul(x, Transpose(W)) (what the exporter left in SD 1.5's Turbo UNet) is quantized like MatMul(x, W.T): the
    transposed weight becomes an initializer, read from external data; a weight with other users stays as well."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(0)
    w, shared = rng.randn(5, 8).astype(np.float32), rng.randn(8, 8).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["a"]),
             helper.make_node("Transpose", ["s"], ["st"], perm=[1, 0]), helper.make_node("MatMul", ["x", "st"], ["b"]),
             helper.make_node("MatMul", ["b", "s"], ["c"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("a", "c")],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(shared, "s")])
    src, dst = str(tmp_path / "g.onnx"), str(tmp_path / "g.int8.onnx")
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src,
                    save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    report = quantize_graph(src, dst)
    assert "folded 2 transposed weights" in " ".join(report.cleanup)
    assert op_counts(dst)["MatMulInteger"] == 3 and "Transpose" not in op_counts(dst)
    x = rng.randn(3, 4, 8).astype(np.float32)
    out = make_runner(dst).run({"x": x})
    assert cosine(out["a"], x @ w.T) > 0.999 and cosine(out["c"], x @ shared.T @ shared) > 0.999


def test_large_graphs_share_one_arena(vit, monkeypatch):
    """Graphs over LARGE_GRAPH_BYTES (SD UNets) share a process-wide CPU arena (a benchmark's sessions run in turn,
    so one arena holds the largest peak, not the sum); smaller graphs keep their own. Same outputs either way."""
    from turbo_export.backends import ort as ort_backend

    paths, feed = vit
    own = ort_backend.OnnxRuntimeRunner(paths["baseline"])
    monkeypatch.setattr(ort_backend, "LARGE_GRAPH_BYTES", 1)
    shared = ort_backend.OnnxRuntimeRunner(paths["baseline"])
    def env_allocators(runner):
        try:
            return runner.session.get_session_options().get_session_config_entry("session.use_env_allocators")
        except RuntimeError:  # the key was never set
            return None

    assert env_allocators(own) is None and env_allocators(shared) == "1"
    np.testing.assert_array_equal(own.run(feed)["out"], shared.run(feed)["out"])


def test_profile_script_finds_the_merge_region_only_in_the_turbo_graph(vit, tmp_path, monkeypatch):
    """scripts/profile_graphs.py: per op type and merge region, the first graph against the others."""
    sys.path.insert(0, SCRIPTS)
    import profile_graphs

    paths, feed = vit
    batch = feed["pixel_values"].shape[0]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(profile_graphs.main, [paths["baseline"], paths["turbo"], "--batch", str(batch),
                                                       "--runs", "1"])
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.iterdir())  # ONNX Runtime's profile files are not left in the working folder
    lines = result.output.splitlines()
    region = [float(line.split("merge region")[1].split()[0]) for line in lines if line.endswith(" ms") and
              "median" in line]
    assert region[0] == 0 and region[1] > 0  # only the Turbo graph has merge nodes, and they take time
    assert "TopK" in result.output and "attention (QK^T, softmax, PV)" in result.output


@pytest.mark.parametrize("static", [False, True])
def test_int8_bench_script_exports_a_symbolic_batch_unless_asked(static, tmp_path, monkeypatch):
    """scripts/bench_int8.py times our graphs as turbo-export writes them (symbolic batch), or --static-batch."""
    sys.path.insert(0, SCRIPTS)
    import bench_int8

    monkeypatch.delenv("TURBO_OPTIMUM_PYTHON", raising=False)
    out = tmp_path / "bench.json"
    args = ["--model", "random:tiny", "--ratio", "4", "--batch", "2", "--runs", "3", "--warmup", "0", "--no-torch",
            "--work", str(tmp_path), "--json", str(out)] + (["--static-batch"] if static else [])
    result = CliRunner().invoke(bench_int8.main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["static_batch"] is static and report["ratios"]["turbo_int8_vs_unaccelerated_int8"] > 0
    # six ONNX Runtime sessions, three rounds: three blocks, each after re-creating the sessions in a rotated order
    assert report["blocks"] == 3 and all(len(row["block_medians_ms"]) == 3 for row in report["rows"])
    graph = onnx.load(str(tmp_path / ("turbo_static.onnx" if static else "turbo.onnx")), load_external_data=False)
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch_dim.dim_value == 2) if static else (batch_dim.dim_param != "")
