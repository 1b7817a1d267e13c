"""TensorRT path: the check-trt lint (hand-made graphs with known answers, and every graph the tiny exports
produce), the engine cache key and rebuild logic (with a fake build function), the TensorRT 10 / 11 builder branches
(with a fake tensorrt module), CUDA-event benchmarking dispatch, `compare DIR` with ONNX Runtime alone, and the
one-line exit-2 answer of `--backend tensorrt` where TensorRT or a GPU is missing.

Tests marked `gpu` build and run real engines; tests/conftest.py skips them with the reason where TensorRT or a
CUDA GPU is missing.
"""

import copy
import json
import os
import sys
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from turbo_export import apply_turbo
from turbo_export.backends import bench, tensorrt_unavailable_reason
from turbo_export.backends import trt_build as trt_export
from turbo_export.backends.trt_lint import (
    NEEDS_PLUGIN,
    NEEDS_PLUGIN_LIBRARY,
    NEEDS_TURBO_PLUGIN,
    REJECTED,
    WARNING,
    lint_file,
    lint_model,
)
from turbo_export.cli import main
from turbo_export.errors import TurboExportError
from turbo_export.export.onnx import export_onnx
from turbo_export.files import staged_output


def _cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    result = _cli(["vit", "--model", "random:tiny", "--ratio", "8", "--batch", "2", "--no-bench", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


# ---- the lint on hand-made graphs ------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers=(), functions=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("custom", 1)],
                             functions=list(functions), ir_version=10)


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _i64(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _const(name, values, dtype=TensorProto.INT64):
    return helper.make_tensor(name, dtype, [len(values)], values)


def _topk(k, sorted_=1, length=5000):
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1, sorted=sorted_)
    return _model([node], [_f32("x", [2, length])], [_f32("v", [2, k]), _i64("i", [2, k])], [_const("k", [k])])


def _one(result):
    assert len(result.findings) == 1, [f.line() for f in result.findings]
    return result.findings[0]


def test_topk_k_at_or_above_3840_is_rejected_below_is_fine():
    f = _one(lint_model(_topk(4000)))
    assert (f.rule, f.severity, f.op_type, f.node) == ("topk-k", REJECTED, "TopK", "topk")
    assert "4000" in f.why and "3840" in f.why
    assert _one(lint_model(_topk(3840))).severity == REJECTED
    assert lint_model(_topk(3839)).findings == [] and lint_model(_topk(3839)).ok


def test_topk_unsorted_and_runtime_k_on_a_long_axis_are_rejected():
    assert _one(lint_model(_topk(8, sorted_=0, length=64))).rule == "topk-sorted"
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk_dyn")
    model = _model([node], [_f32("x", [2, 5000]), _i64("k", [1])], [_f32("v", [2, 8]), _i64("i", [2, 8])])
    assert _one(lint_model(model)).rule == "topk-k"
    short = _model([node], [_f32("x", [2, 64]), _i64("k", [1])], [_f32("v", [2, 8]), _i64("i", [2, 8])])
    assert lint_model(short).ok  # K <= 64 < 3840 whatever it is at run time


@pytest.mark.parametrize("reduction, severity", [("add", REJECTED), ("mul", REJECTED), (None, None)])
def test_scatternd_reduction_is_rejected(reduction, severity):
    attrs = {"reduction": reduction} if reduction else {}
    node = helper.make_node("ScatterND", ["x", "idx", "u"], ["y"], name="snd", **attrs)
    model = _model([node], [_f32("x", [4, 3]), _i64("idx", [2, 1]), _f32("u", [2, 3])], [_f32("y", [4, 3])])
    result = lint_model(model)
    if severity is None:
        assert result.findings == []
    else:
        f = _one(result)
        assert (f.rule, f.severity) == ("scatternd-reduction", severity) and reduction in f.why
        assert not result.ok


def test_scatterelements_add_needs_the_plugin_library_int32_indices_rejected():
    node = helper.make_node("ScatterElements", ["x", "idx", "u"], ["y"], name="sel", axis=1, reduction="add")
    model = _model([node], [_f32("x", [2, 8]), _i64("idx", [2, 3]), _f32("u", [2, 3])], [_f32("y", [2, 8])])
    result = lint_model(model)
    f = _one(result)
    assert (f.rule, f.severity) == ("scatterelements-reduction", NEEDS_PLUGIN_LIBRARY)
    assert result.ok  # a plugin-library node is built by TensorRT, not rejected
    idx32 = helper.make_tensor_value_info("idx", TensorProto.INT32, [2, 3])
    model32 = _model([node], [_f32("x", [2, 8]), idx32, _f32("u", [2, 3])], [_f32("y", [2, 8])])
    assert _one(lint_model(model32)).severity == REJECTED
    plain = helper.make_node("ScatterElements", ["x", "idx", "u"], ["y"], name="sel", axis=1)
    assert lint_model(_model([plain], [_f32("x", [2, 8]), _i64("idx", [2, 3]), _f32("u", [2, 3])],
                             [_f32("y", [2, 8])])).findings == []


def test_cumsum_axis_must_be_constant():
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")
    dynamic = _model([node], [_f32("x", [2, 8]), _i64("axis", [])], [_f32("y", [2, 8])])
    f = _one(lint_model(dynamic))
    assert (f.rule, f.severity, f.op_type) == ("constant-input", REJECTED, "CumSum") and "axis" in f.why
    const = _model([node], [_f32("x", [2, 8])], [_f32("y", [2, 8])], [helper.make_tensor("axis", TensorProto.INT64,
                                                                                          [], [1])])
    assert lint_model(const).findings == []
    by_node = _model([helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("v", TensorProto.INT64,
                                                                                           [], [1])), node],
                     [_f32("x", [2, 8])], [_f32("y", [2, 8])])
    assert lint_model(by_node).findings == []


def test_dynamic_dimensions_are_flagged_unless_allowed():
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = _model([node], [_f32("x", ["batch", 8])], [_f32("y", ["batch", 8])])
    result = lint_model(model)
    assert {(f.rule, f.node, f.severity) for f in result.findings} == {("dynamic-shape", "x", REJECTED),
                                                                       ("dynamic-shape", "y", REJECTED)}
    assert "batch" in result.findings[0].why
    assert lint_model(model, static=False).findings == []


def test_dtypes_string_and_uint16_rejected_double_warned():
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    for dtype, severity in ((TensorProto.STRING, REJECTED), (TensorProto.UINT16, REJECTED),
                            (TensorProto.DOUBLE, WARNING)):
        value = helper.make_tensor_value_info("x", dtype, [2])
        out = helper.make_tensor_value_info("y", dtype, [2])
        findings = {(f.rule, f.severity) for f in lint_model(_model([node], [value], [out])).findings}
        assert findings == {("dtype", severity)}, (dtype, findings)


def test_unsupported_op_custom_ops_subgraphs_and_functions():
    unique = helper.make_node("Unique", ["x"], ["u"], name="uniq")
    assert _one(lint_model(_model([unique], [_f32("x", [8])], [_f32("u", [8])]))).rule == "unsupported-op"

    merge = helper.make_node("TurboMerge", ["x"], ["y"], name="merge0", domain="turbo")
    other = helper.make_node("MyOp", ["y"], ["z"], name="mine", domain="custom")
    result = lint_model(_model([merge, other], [_f32("x", [8])], [_f32("z", [8])]))
    severities = {f.node: f.severity for f in result.findings}
    assert severities == {"merge0": NEEDS_TURBO_PLUGIN, "mine": NEEDS_PLUGIN}
    assert [f.node for f in result.rejected] == ["mine"]

    # a node inside an If branch is found, with where it sits
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["b"], name="deep")], "then", [], [_f32("b", [8])])
    cond = helper.make_node("If", ["c"], ["y"], name="if0", then_branch=branch, else_branch=branch)
    result = lint_model(_model([cond], [helper.make_tensor_value_info("c", TensorProto.BOOL, []), _f32("x", [8])],
                               [_f32("y", [8])]))
    assert {(f.node, f.where) for f in result.findings} == {("deep", "graph/if0.then_branch"),
                                                           ("deep", "graph/if0.else_branch")}

    # a local function: its body is linted, the call itself is not a custom op
    body = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Unique", ["a"], ["b"], name="inner")],
                                [helper.make_opsetid("", 18)])
    call = helper.make_node("F", ["x"], ["y"], name="call", domain="local")
    model = _model([call], [_f32("x", [8])], [_f32("y", [8])], functions=[body])
    model.opset_import.append(helper.make_opsetid("local", 1))
    f = _one(lint_model(model))
    assert (f.node, f.where) == ("inner", "function local::F")


def test_check_trt_cli_exit_codes_and_json(tmp_path):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_topk(100), good)
    onnx.save(_topk(4000), bad)
    result = _cli(["check-trt", str(good)])
    assert result.exit_code == 0 and "would accept it" in result.output
    result = _cli(["check-trt", str(good), str(bad)])
    assert result.exit_code == 1 and "[rejected] topk-k: TopK 'topk'" in result.output
    result = _cli(["check-trt", "--json", str(bad)])
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and data[0]["ok"] is False and data[0]["findings"][0]["rule"] == "topk-k"
    result = _cli(["check-trt", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


# ---- the lint on every graph the tiny exports produce ----------------------------------------------------------


def _vit_graph_files(preset, folder, names=("baseline", "turbo")):
    from turbo_export.families import get_family
    from turbo_export.families.vit import VitOptions as TurboOptions

    spec = get_family("vit")
    loaded = spec.load(f"random:{preset}")
    options = TurboOptions(ratio=8, batch=2)
    models = {"baseline": loaded.model, "turbo": spec.make_turbo(copy.deepcopy(loaded.model), options)}
    return [export_onnx(spec.graph(n, models[n], loaded, options), str(folder / f"{preset}-{n}.onnx")) for n in names]


# The BLIP graphs each task exports, less baseline_* twins of turbo_* graphs (same operators, longer token axis)
# and the caption vision graph that VQA exports again.
BLIP_LINTED = {"caption": ("turbo_vision", "turbo_cross_kv", "decoder", "baseline_vision"),
               "retrieval": ("turbo_vision", "text_itc", "turbo_itm"),
               "vqa": ("turbo_question", "answer_cross_kv", "answer_decoder")}


def _blip_graph_files(task, folder):
    from turbo_export.families import get_family
    from turbo_export.families.blip import BlipOptions, build_random_blip
    from turbo_export.families.blip_tasks import TASKS

    loaded = build_random_blip("tiny", task)
    options = BlipOptions(task=task, ratio=8, batch=2, max_new_tokens=4, text_len=8,
                          min_tokens=40)  # retrieval's default (100) would merge nothing in 65 tokens
    tokens = get_family("blip").token_plan(loaded, options, loaded.image_size)
    num_tokens, final = tokens.num_tokens, tokens.final_tokens()
    assert final["turbo"] < num_tokens  # Turbo merges in these graphs
    turbo = apply_turbo(copy.deepcopy(loaded.model), 8, alpha=6.0, min_tokens=options.resolved_min_tokens())
    graphs = TASKS[task].graphs(loaded.model, turbo, options, loaded.image_size, final)
    assert set(BLIP_LINTED[task]) <= set(graphs)
    return [export_onnx(graphs[n], str(folder / f"{task}-{n}.onnx")) for n in BLIP_LINTED[task]]


def _assert_accepted(files, merges_expected):
    merge_graphs = 0
    for path in files:
        result = lint_file(path)
        assert result.ok and not result.findings, "\n".join(result.lines())  # the row merge needs no plugin library
        merge_graphs += any(n.op_type == "TopK" for n in onnx.load(path, load_external_data=False).graph.node)
    assert merge_graphs == merges_expected  # the Turbo merges are in the linted graphs


def test_no_graph_of_the_cli_export_is_rejected_by_tensorrt(tiny_export):
    _assert_accepted([str(tiny_export / "baseline.onnx"), str(tiny_export / "turbo.onnx")], 1)
    result = _cli(["check-trt", str(tiny_export / "baseline.onnx"), str(tiny_export / "turbo.onnx")])
    assert result.exit_code == 0 and result.stdout.count("would accept it") == 2


@pytest.mark.parametrize("preset", ["tiny-deit", "tiny-dinov2"])
def test_no_turbo_vit_variant_is_rejected_by_tensorrt(preset, tmp_path):
    _assert_accepted(_vit_graph_files(preset, tmp_path, names=("turbo",)), 1)


@pytest.mark.slow
@pytest.mark.parametrize("task, merges", [("caption", 1), ("retrieval", 1), ("vqa", 0)])
def test_no_blip_graph_is_rejected_by_tensorrt(task, merges, tmp_path):
    _assert_accepted(_blip_graph_files(task, tmp_path), merges)


# ---- engine cache -----------------------------------------------------------------------------------------------

TARGET = trt_export.Target("10.9.0", "NVIDIA H100 80GB HBM3", "9.0")


class FakeBuild:
    def __init__(self):
        self.calls = 0

    def __call__(self, onnx_path, options):
        self.calls += 1
        return f"plan {self.calls} of {os.path.basename(onnx_path)} {options.precision}".encode()


@pytest.fixture
def tiny_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_topk(8, length=64), path)
    return str(path)


def test_cache_key_changes_with_onnx_options_version_and_gpu(tiny_onnx, tmp_path):
    base = trt_export.BuildOptions()
    digest = trt_export.onnx_digest(tiny_onnx)
    key = trt_export.cache_key(trt_export.key_fields(digest, base, TARGET))
    assert key == trt_export.cache_key(trt_export.key_fields(digest, trt_export.BuildOptions(), TARGET))
    other = tmp_path / "other.onnx"
    onnx.save(_topk(9, length=64), other)
    variants = [
        trt_export.key_fields(trt_export.onnx_digest(str(other)), base, TARGET),
        trt_export.key_fields(digest, trt_export.BuildOptions(precision="fp16"), TARGET),
        trt_export.key_fields(digest, trt_export.BuildOptions(optimization_level=5), TARGET),
        trt_export.key_fields(digest, trt_export.BuildOptions(workspace_bytes=1 << 30), TARGET),
        trt_export.key_fields(digest, trt_export.BuildOptions(tf32=True), TARGET),
        trt_export.key_fields(digest, base, trt_export.Target("11.4.0", TARGET.gpu_name, "9.0")),
        trt_export.key_fields(digest, base, trt_export.Target(TARGET.tensorrt_version, "NVIDIA L4", "8.9")),
    ]
    keys = {trt_export.cache_key(v) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    # the timing cache speeds builds up, it does not change the engine
    timed = trt_export.BuildOptions(timing_cache=str(tmp_path / "timing.cache"))
    assert trt_export.cache_key(trt_export.key_fields(digest, timed, TARGET)) == key


def test_onnx_digest_covers_external_data(tmp_path):
    model = _topk(8, length=64)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(4096, np.float32), "w"))
    path = str(tmp_path / "ext.onnx")
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=1024)
    before = trt_export.onnx_digest(path)
    with open(tmp_path / "ext.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01")
    assert trt_export.onnx_digest(path) != before


def test_engine_is_built_once_then_reused(tiny_onnx, tmp_path):
    build, logs = FakeBuild(), []
    cache = str(tmp_path / "engines")
    first = trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), cache, logs.append, TARGET, build)
    assert first.built and build.calls == 1
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(first.path),
                                                os.path.basename(first.path)[:-5] + ".json"])
    sidecar = json.loads(open(first.path[:-5] + ".json").read())
    assert sidecar["key"] == first.key and sidecar["fields"]["tensorrt_version"] == "10.9.0"
    second = trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), cache, logs.append, TARGET, build)
    assert not second.built and build.calls == 1 and second.path == first.path
    assert "cached" in logs[-1]


def test_stale_or_foreign_engine_is_rebuilt_never_used(tiny_onnx, tmp_path):
    build, logs = FakeBuild(), []
    cache = str(tmp_path / "engines")
    old = trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), cache, logs.append, TARGET, build)
    foreign = trt_export.Target("11.4.0", "NVIDIA L4", "8.9")
    new = trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), cache, logs.append, foreign, build)
    assert new.built and build.calls == 2 and new.path != old.path
    foreign_line = next(line for line in logs if "foreign" in line)
    assert "tensorrt_version" in foreign_line and "gpu_name" in foreign_line and "not used" in foreign_line
    # a new version of the ONNX file: the old engine is stale, rebuilt, and removed from the cache
    onnx.save(_topk(7, length=64), tiny_onnx)
    fresh = trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), cache, logs.append, foreign, build)
    assert fresh.built and build.calls == 3 and not os.path.exists(new.path)
    assert any("stale" in line and "onnx_sha256" in line for line in logs)
    new = fresh
    # a plan whose bytes changed after it was written is rebuilt
    with open(new.path, "ab") as f:
        f.write(b"garbage")
    again = trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), cache, logs.append, foreign, build)
    assert again.built and build.calls == 4 and "does not match" in logs[-2]


def test_engine_from_a_previous_output_folder_is_reused_and_failed_builds_leave_nothing(tiny_onnx, tmp_path):
    build, logs = FakeBuild(), []
    previous = str(tmp_path / "previous")
    trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), previous, logs.append, TARGET, build)
    staged = str(tmp_path / "stage")
    engine = trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(), staged, logs.append, TARGET, build,
                                   reuse_dirs=(previous,))
    assert not engine.built and build.calls == 1 and os.path.dirname(engine.path) == staged

    def failing(onnx_path, options):
        raise TurboExportError("TensorRT could not build an engine")

    empty = str(tmp_path / "empty")
    with pytest.raises(TurboExportError):
        trt_export.get_engine(tiny_onnx, trt_export.BuildOptions(precision="fp16"), empty, logs.append, TARGET,
                              failing)
    assert not os.path.exists(empty) or os.listdir(empty) == []


def test_bad_build_options_are_user_errors(tiny_onnx, tmp_path):
    for options in (trt_export.BuildOptions(precision="int4"), trt_export.BuildOptions(optimization_level=9)):
        with pytest.raises(TurboExportError):
            trt_export.get_engine(tiny_onnx, options, str(tmp_path), print, TARGET, FakeBuild())


def test_staged_output_replaces_the_engine_folder_whole(tmp_path):
    out = tmp_path / "out"
    (out / "engines").mkdir(parents=True)
    (out / "engines" / "old.plan").write_text("old")
    with staged_output(str(out)) as stage:
        os.makedirs(os.path.join(stage, "engines"))
        open(os.path.join(stage, "engines", "new.plan"), "w").write("new")
    assert os.listdir(out / "engines") == ["new.plan"]


# ---- the TensorRT 10 / 11 builder branches, against a fake tensorrt module -------------------------------------


class _Recorder:
    """A stand-in for the tensorrt module: records what the builder code asks of it."""

    def __init__(self, version, fp16_flag):
        self.__version__ = version
        self.calls = []
        flags = {"TF32": 7, **({"FP16": 0} if fp16_flag else {})}
        self.BuilderFlag = types.SimpleNamespace(**flags)
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        rec = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Config:
            builder_optimization_level = None

            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("workspace", pool, size))

            def set_flag(self, flag):
                rec.calls.append(("flag", flag))

            def clear_flag(self, flag):
                rec.calls.append(("clear_flag", flag))

            def create_timing_cache(self, data):
                rec.calls.append(("timing_cache", len(data)))
                return "cache"

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return types.SimpleNamespace(serialize=lambda: b"timings")

        class Network:
            num_inputs = 1

            def get_input(self, i):
                return types.SimpleNamespace(name="x", shape=(2, 64))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                rec.config = Config()
                return rec.config

            def build_serialized_network(self, network, config):
                rec.calls.append(("optimization_level", config.builder_optimization_level))
                return b"serialized"

        class OnnxParser:
            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.calls.append(("parse_from_file", os.path.isabs(path)))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser

    def init_libnvinfer_plugins(self, logger, namespace):
        self.calls.append(("init_libnvinfer_plugins", namespace))


@pytest.mark.parametrize("version, fp16_flag", [("10.9.0", True), ("11.4.0", False), ("11.0.0", True)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_builder_branches_for_tensorrt_10_and_11(version, fp16_flag, precision, tiny_onnx, tmp_path, monkeypatch):
    fake = _Recorder(version, fp16_flag)
    monkeypatch.setattr(trt_export, "_trt", lambda: fake)
    monkeypatch.setattr(trt_export, "_LOGGER", None)
    timing = str(tmp_path / "timing.cache")
    options = trt_export.BuildOptions(precision=precision, optimization_level=4, workspace_bytes=1 << 30,
                                      timing_cache=timing)
    assert trt_export.build_serialized(tiny_onnx, options) == b"serialized"
    calls = fake.calls
    assert ("init_libnvinfer_plugins", "") in calls
    assert calls.index(("init_libnvinfer_plugins", "")) < calls.index(("parse_from_file", True))
    assert ("workspace", "workspace", 1 << 30) in calls and ("optimization_level", 4) in calls
    ten = version.startswith("10.")
    assert ("network_flags", 0 if ten else 1 << 1) in calls  # 11: strongly typed, whatever flags it still carries
    assert (("flag", 0) in calls) == (ten and precision == "fp16")  # FP16 flag: TensorRT 10 only
    assert ("clear_flag", 7) in calls  # TF32 off: fp32 layers stay fp32
    assert open(timing, "rb").read() == b"timings"


def test_parser_errors_become_one_line_user_errors(tiny_onnx, monkeypatch):
    fake = _Recorder("10.9.0", True)
    fake.OnnxParser = type("P", (), {"__init__": lambda self, n, l: None, "parse_from_file": lambda self, p: False,
                                     "num_errors": 1, "get_error": lambda self, i: "TopK: K exceeds the maximum"})
    monkeypatch.setattr(trt_export, "_trt", lambda: fake)
    monkeypatch.setattr(trt_export, "_LOGGER", None)
    with pytest.raises(TurboExportError, match="K exceeds the maximum.*check-trt"):
        trt_export.build_serialized(tiny_onnx, trt_export.BuildOptions())


# ---- missing TensorRT or GPU --------------------------------------------------------------------------------------


def test_unavailable_reason_names_what_is_missing(tmp_path, monkeypatch):
    import torch

    fake = tmp_path / "fake" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('libnvonnxparser.so.11: cannot open shared object file\\nmore')")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    reason = tensorrt_unavailable_reason()
    assert reason == ("the tensorrt Python package cannot be imported (OSError: libnvonnxparser.so.11: cannot open "
                      "shared object file)")
    (fake / "__init__.py").write_text("__version__ = '10.9.0'")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tensorrt_unavailable_reason() == "no CUDA GPU is visible to torch"
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present")
@pytest.mark.parametrize("command", [
    ["vit", "--model", "random:tiny", "--ratio", "4"],
    ["blip", "--model", "random:tiny", "--ratio", "4"],
    ["vit", "--model", "random:tiny", "--ratio", "4", "--precision", "fp16"],
])
def test_backend_tensorrt_stops_at_once_with_one_line(command, tmp_path):
    out = tmp_path / "out"
    result = _cli(command + ["--backend", "tensorrt", "--out", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("turbo-export: error: backend tensorrt: ")
    assert tensorrt_unavailable_reason() in lines[0] and "--backend onnxruntime works" in lines[0]
    assert not out.exists() and os.listdir(tmp_path) == []


def test_fp16_needs_tensorrt(tmp_path):
    result = _cli(["vit", "--model", "random:tiny", "--ratio", "4", "--precision", "fp16", "--out",
                   str(tmp_path / "o")])
    assert result.exit_code == 2 and "precision: fp16 needs --backend tensorrt" in result.stderr
    assert not (tmp_path / "o").exists()


# ---- benchmark dispatch -------------------------------------------------------------------------------------------


class _DeviceTimed:
    def __init__(self, seconds):
        self.seconds, self.loaded, self.runs = seconds, None, 0

    def load(self, feed):
        self.loaded = feed

    def timed_run(self, feed=None):
        self.runs += 1
        return self.seconds

    def run(self, feed):
        raise AssertionError("device-timed runners are timed with timed_run")


def test_benchmark_uses_cuda_event_timing_when_every_runner_has_it():
    runners = {"baseline": _DeviceTimed(0.004), "turbo": _DeviceTimed(0.002)}
    feeds = {n: {"x": np.zeros(2, np.float32)} for n in runners}
    timings = bench.interleaved(runners, feeds, batch=8, warmup=2, runs=5, progress=False)
    assert runners["turbo"].runs == 7 and runners["turbo"].loaded is not None
    assert timings["turbo"].timer.startswith("CUDA events")
    assert bench.speedup(timings) == pytest.approx(2.0)


# ---- compare with ONNX Runtime alone ------------------------------------------------------------------------------


def test_compare_runs_polygraphy_comparator_with_onnxruntime_alone(tiny_export):
    from turbo_export.evaluate.compare import compare_folder

    results = compare_folder(str(tiny_export))
    assert results.ok and results.runners == (["onnxruntime"] if tensorrt_unavailable_reason() else
                                              ["onnxruntime", "tensorrt"])
    assert {(e.graph, e.output) for e in results.errors} >= {("baseline", "logits"), ("turbo", "logits")}
    assert all(e.max_abs < 1e-4 for e in results.errors if e.runner == "onnxruntime")
    if tensorrt_unavailable_reason():
        assert results.tensorrt.startswith("not available here (")
    # with zero tolerance the optimiser's rounding differences fail: the comparison can fail
    strict = compare_folder(str(tiny_export), atol=0.0, rtol=0.0)
    assert not strict.ok and not all(strict.polygraphy_passed.values())


def test_compare_cli(tiny_export, tmp_path):
    result = _cli(["compare", str(tiny_export), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] and data["reference"] == "onnxruntime-noopt"
    assert {o["graph"] for o in data["outputs"]} == {"baseline", "turbo"}
    result = _cli(["compare", str(tmp_path)])
    assert result.exit_code == 2 and "no ONNX graphs" in result.stderr


# ---- on a GPU with TensorRT ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_build_run_match_onnxruntime_and_benchmark(precision, tmp_path):
    out = tmp_path / "trt"
    args = ["vit", "--model", "random:tiny", "--ratio", "8", "--batch", "2", "--runs", "5", "--backend", "tensorrt",
            "--precision", precision, "--out", str(out)]
    result = _cli(args)
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["engines"]) == {"baseline", "turbo"}
    assert all((out / path).is_file() for path in report["engines"].values())
    assert report["parity"]["ok"] and report["bench"]["timer"].startswith("CUDA events")
    assert report["bench"]["speedup"] > 0
    again = _cli(args)  # the second export reuses the cached engines
    assert again.exit_code == 0 and "cached" in again.stderr
    from turbo_export.evaluate.compare import compare_folder

    results = compare_folder(str(out), atol=5e-2 if precision == "fp16" else 1e-3, rtol=1e-2)
    assert "tensorrt" in results.runners and results.ok, "\n".join(results.lines())


@pytest.mark.gpu
def test_tensorrt_runner_cuda_graph_replay_matches_plain_execution(tmp_path):
    from turbo_export.backends import make_runner

    files = _vit_graph_files("tiny", tmp_path)
    turbo = next(f for f in files if f.endswith("turbo.onnx"))
    plain = make_runner(turbo, "tensorrt")
    graphed = make_runner(turbo, "tensorrt", cuda_graph=True)
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    a, b = plain.run(feed), graphed.run(feed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert graphed.timed_run(feed) > 0


# ---- fp16 graphs (exported here; TensorRT runs them, ONNX Runtime's CPU provider only the unmerged one) ----------


def test_fp16_export_gives_half_graphs_checked_against_the_fp32_model(tmp_path):
    import onnxruntime as ort

    from turbo_export.export.job import FP16_ATOL, half_graph, set_tolerances
    from turbo_export.export.parity import torch_outputs
    from turbo_export.families import get_family
    from turbo_export.families.vit import VitOptions as TurboOptions
    from turbo_export.metrics import compare_outputs

    spec = get_family("vit")
    loaded = spec.load("random:tiny")
    options = TurboOptions(ratio=8, batch=2)
    graphs = {"baseline": spec.graph("baseline", loaded.model, loaded, options),
              "turbo": spec.graph("turbo", spec.make_turbo(copy.deepcopy(loaded.model), options), loaded, options)}
    set_tolerances(graphs, 1e-4, "fp32", "tensorrt")
    assert graphs["turbo"].atol == 1e-3
    set_tolerances(graphs, 1e-4, "fp16", "tensorrt")
    assert graphs["turbo"].atol == FP16_ATOL
    paths = {n: export_onnx(half_graph(g), str(tmp_path / f"{n}.onnx")) for n, g in graphs.items()}
    for n, path in paths.items():
        model = onnx.load(path)
        assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        assert lint_file(path).ok
    assert next(p for p in graphs["baseline"].module.parameters()).dtype.is_floating_point  # fp32 model untouched
    assert next(p for p in graphs["baseline"].module.parameters()).dtype == __import__("torch").float32
    session = ort.InferenceSession(paths["baseline"], providers=["CPUExecutionProvider"])
    pixels = graphs["baseline"].example_inputs["pixel_values"]
    got = session.run(None, {"pixel_values": pixels.half().numpy()})
    check = compare_outputs(graphs["baseline"].output_names, [g.astype(np.float32) for g in got],
                            torch_outputs(graphs["baseline"], graphs["baseline"].example_inputs), FP16_ATOL)
    assert all(c.ok and c.max_abs_diff > 0 for c in check)


def test_engine_tensor_types_map_to_numpy_without_tensorrt():
    from turbo_export.backends.trt import _numpy_dtype

    enum = lambda name: types.SimpleNamespace(name=name)  # noqa: E731
    assert _numpy_dtype(None, enum("HALF")) == np.float16 and _numpy_dtype(None, enum("INT64")) == np.int64
    with pytest.raises(TurboExportError, match="BF16"):
        _numpy_dtype(types.SimpleNamespace(), enum("BF16"))


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present")
def test_make_runner_on_an_engine_says_what_is_missing(tmp_path):
    from turbo_export.backends import make_runner

    with pytest.raises(TurboExportError, match="backend tensorrt: .*--backend onnxruntime works"):
        make_runner(str(tmp_path / "model.plan"), "tensorrt")


def test_require_backend_only_checks_the_backend():
    from turbo_export.backends import require_backend

    assert require_backend("onnxruntime") is None
    with pytest.raises(TurboExportError, match="backend: unknown 'tvm'"):
        require_backend("tvm")
