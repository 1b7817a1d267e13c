"""The Turbo plugin: Triton kernels (interpreted) vs the PyTorch merge, PTX for sm_80 / sm_90, the plugin-node
ONNX graph in ONNX Runtime vs the standard-op graph and PyTorch, and (GPU + TensorRT only) an engine."""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from turbo_export.backends import make_runner, tensorrt_unavailable_reason
from turbo_export.core import merge, plugin_ops
from turbo_export.export.onnx import export_onnx
from turbo_export.export.parity import torch_outputs
from turbo_export.families import get_family
from turbo_export.families.vit import VitOptions as TurboOptions
from turbo_export.models.presets import LoadedModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
plugin_ops.import_turbo_plugin()
from turbo_plugin import aot, reference  # noqa: E402


def _inputs(batch, tokens, channels, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, channels, generator=g), torch.rand(batch, tokens, 1, generator=g) + 0.5,
            torch.randn(batch, tokens, dim, generator=g), torch.rand(batch, tokens, generator=g) * 0.05)


@pytest.fixture(scope="module")
def kernel_check():
    """scripts/check_plugin.py kernels in a subprocess: TRITON_INTERPRET must be set before triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_plugin.py"), "kernels"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_kernels_fp32_match_pytorch_merge(kernel_check):
    fp32 = [c for c in kernel_check["cases"] if c["dtype"] == "float32"]
    assert len(fp32) == 5
    assert {c["case"][1] for c in fp32} >= {257, 577}  # 129 / 128 and 289 / 288 tokens per side: many tiles
    for case in fp32:
        assert case["plan_equal"], case
        assert case["x_max_abs_err"] <= 1e-5 and case["size_max_abs_err"] <= 1e-5, case
        assert case["unmerge_max_abs_err"] <= 1e-5, case


def test_kernels_fp16_within_half_precision(kernel_check):
    fp16 = [c for c in kernel_check["cases"] if c["dtype"] == "float16"]
    for case in fp16:
        assert case["plan_equal"], case  # the kernel decides in float32, like the float32 reference
        assert case["x_max_abs_err"] <= 4e-3, case  # half an fp16 ulp at |x| < 8
        assert case["size_max_abs_err"] <= 8e-3, case
        assert case["unmerge_max_abs_err"] <= 4e-3, case
        assert case["x_max_abs_err"] > 0  # the outputs really are fp16


def test_kernels_custom_split_and_ties_match_reference(kernel_check):
    assert kernel_check["custom_split"]["plan_equal"]
    assert kernel_check["custom_split"]["x_max_abs_err"] <= 1e-5
    assert kernel_check["custom_split"]["unmerge_max_abs_err"] == 0.0
    assert kernel_check["ties"]["plan_equal"]
    assert kernel_check["ties_289"]["plan_equal"] and kernel_check["ties_289"]["x_max_abs_err"] <= 1e-5


@pytest.mark.parametrize("tokens,r,alpha,protected", [(21, 6, 6.0, 1), (20, 9, 0.0, 2), (17, 8, 3.0, 0)])
def test_numpy_reference_equals_pytorch_merge(tokens, r, alpha, protected):
    x, size, metric, sem = _inputs(2, tokens, 12, 6, seed=tokens)
    a_idx, b_idx = (t.numpy() for t in plugin_ops.alternate_split(tokens))
    got = reference.turbo_merge(x.numpy(), size.numpy(), metric.numpy(), sem.numpy(), a_idx, b_idx, r, alpha,
                                protected)
    ref_x, ref_s, plan = merge.turbo_merge(x, size, metric, sem, r, alpha, protected)
    np.testing.assert_allclose(got[0], ref_x.numpy(), atol=1e-6)
    np.testing.assert_allclose(got[1], ref_s.numpy(), atol=1e-6)
    for mine, theirs in zip(got[2:], plan):
        np.testing.assert_array_equal(mine, theirs.numpy())
    restored = reference.turbo_unmerge(got[0], *got[2:], a_idx, b_idx)
    np.testing.assert_allclose(restored, merge.unmerge(plan, ref_x, tokens).numpy(), atol=1e-6)


def _entry_params(ptx: str) -> list[str]:
    entry = re.search(r"\.entry\s+\w+\((.*?)\)", ptx, re.S).group(1)
    return [p.split()[1] for p in entry.strip().split(",")]


@pytest.mark.parametrize("arch,dtype", [(80, "fp16"), (90, "fp32")])  # (80, fp16) is reused below
def test_ptx_compiles_without_gpu(arch, dtype):
    merge_k = aot.compile_merge(dtype, 4, 6.0, 1, 9, 8, 8, 24, target=arch)
    unmerge_k = aot.compile_unmerge(dtype, 24, target=arch)
    for k, name in ((merge_k, "turbo_merge_kernel"), (unmerge_k, "turbo_unmerge_kernel")):
        assert k.name == name
        assert re.search(rf"\.target sm_{arch}a?\b", k.ptx)
        assert f".entry {name}(" in k.ptx
    # TensorRT's AOT calling convention: input pointers, int32 scalars, output pointers (then Triton's own
    # scratch pointers, which the launch leaves null: the kernels need no scratch memory)
    assert _entry_params(merge_k.ptx)[:16] == [".u64"] * 6 + [".u32"] * 5 + [".u64"] * 5
    assert _entry_params(unmerge_k.ptx)[:12] == [".u64"] * 6 + [".u32"] * 5 + [".u64"]
    assert merge_k.block_x == 256 and merge_k.shared < 48 * 1024


class _MergeUnmerge(torch.nn.Module):
    def __init__(self, merge_fn, unmerge_fn, r=4):
        super().__init__()
        self.merge_fn, self.unmerge_fn, self.r = merge_fn, unmerge_fn, r

    def forward(self, x, size, metric, semantic):
        out, out_size, plan = self.merge_fn(x, size, metric, semantic, self.r, 6.0, 1)
        return out, out_size, self.unmerge_fn(plan, out, x.shape[1])


def test_plugin_nodes_contract_and_ort(tmp_path):
    from turbo_export.errors import TurboExportError
    from turbo_export.families.base import GraphSpec

    args = _inputs(2, 13, 8, 4, seed=1)
    names = ["x", "size", "metric", "semantic"]
    module = _MergeUnmerge(plugin_ops.plugin_merge, plugin_ops.plugin_unmerge)
    spec = GraphSpec("m", module, dict(zip(names, args)), ["merged", "merged_size", "restored"])
    path = export_onnx(spec, str(tmp_path / "m.onnx"))
    nodes = {n.op_type: n for n in onnx.load(path).graph.node if n.domain == plugin_ops.DOMAIN}
    assert set(nodes) == {"TurboMerge", "TurboUnmerge"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes["TurboMerge"].attribute}
    assert attrs == {"r": 4, "alpha": pytest.approx(6.0), "protected": 1, "plugin_namespace": b"turbo",
                     "plugin_version": b"1", "aot": 1}
    assert len(nodes["TurboMerge"].output) == 5 and len(nodes["TurboMerge"].input) == 6

    with pytest.raises(TurboExportError, match="custom_ops at None"):
        make_runner(path, custom_ops=False)  # without the onnxruntime-extensions ops ONNX Runtime cannot load it
    assert plugin_ops.has_turbo_nodes(path) and plugin_ops.tensorrt_plugin_modules(path) == ("turbo_plugin.trt_plugin",)
    runner = make_runner(path)  # the turbo nodes are detected
    got = runner.run({n: a.numpy() for n, a in zip(names, args)})
    eager = _MergeUnmerge(merge.turbo_merge, merge.unmerge)(*args)
    for name, ref in zip(spec.output_names, eager):
        np.testing.assert_allclose(got[name], ref.numpy(), atol=1e-6)


def _micro_vit() -> LoadedModel:
    """2 blocks, 16 px, patch 4: 17 tokens (export time is per block)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=10)
    return LoadedModel(ViTForImageClassification(config).eval(), "micro", "test", 16, 3)


def test_tiny_vit_plugin_graph_equals_standard_graph_and_pytorch(tmp_path):
    spec = get_family("vit")
    loaded = _micro_vit()
    outputs = {}
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))}
    for impl in ("onnx", "plugin"):
        options = TurboOptions(ratio=4, alpha=6.0, batch=2, merge_impl=impl)
        graph = spec.graph(impl, spec.make_turbo(copy.deepcopy(loaded.model), options), loaded, options)
        path = export_onnx(graph, str(tmp_path / f"{impl}.onnx"))
        count = sum(n.op_type == "TurboMerge" for n in onnx.load(path).graph.node)
        assert count == (2 if impl == "plugin" else 0)
        assert plugin_ops.has_turbo_nodes(path) is (impl == "plugin")
        runner = make_runner(path)
        outputs[impl] = runner.run({k: v.numpy() for k, v in inputs.items()})["logits"]
        outputs[f"{impl}_torch"] = torch_outputs(graph, inputs)[0]
    np.testing.assert_allclose(outputs["plugin"], outputs["onnx"], atol=1e-5)
    np.testing.assert_allclose(outputs["plugin"], outputs["plugin_torch"], atol=1e-4)
    np.testing.assert_array_equal(outputs["plugin_torch"], outputs["onnx_torch"])  # same merge, eager


def test_merge_impl_flag_is_validated():
    from click.testing import CliRunner

    from turbo_export.cli import main
    from turbo_export.errors import TurboExportError

    with pytest.raises(TurboExportError, match="merge-impl"):
        plugin_ops.merge_fn("triton")
    result = CliRunner().invoke(main, ["vit", "--model", "random:tiny", "--ratio", "4", "--merge-impl", "x"])
    assert result.exit_code == 2


@pytest.mark.gpu
def test_tensorrt_engine_with_plugin_matches_onnxruntime(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(f"TensorRT engine with the Turbo plugin: {reason}")
    import tensorrt as trt
    from turbo_plugin import register_tensorrt_plugins

    register_tensorrt_plugins()
    spec = get_family("vit")
    loaded = get_family("vit").load("random:tiny")
    options = TurboOptions(ratio=8, alpha=6.0, batch=2, merge_impl="plugin")
    graph = spec.graph("turbo", spec.make_turbo(copy.deepcopy(loaded.model), options), loaded, options)
    path = export_onnx(graph, str(tmp_path / "turbo.onnx"))

    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(path), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    engine_bytes = builder.build_serialized_network(network, config)
    assert engine_bytes is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    pixels = graph.example_inputs["pixel_values"].cuda()
    logits = torch.empty(2, int(loaded.model.config.num_labels), device="cuda")
    context.set_tensor_address("pixel_values", pixels.data_ptr())
    context.set_tensor_address("logits", logits.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    expected = torch_outputs(graph, graph.example_inputs)[0]
    np.testing.assert_allclose(logits.cpu().numpy(), expected, atol=1e-4)


class _Expr:
    """A static shape expression with the arithmetic tensorrt.plugin's ShapeExpr offers."""

    def __init__(self, value):
        self.value = int(value.value if isinstance(value, _Expr) else value)

    def __add__(self, other):
        return _Expr(self.value + _Expr(other).value)

    def __sub__(self, other):
        return _Expr(self.value - _Expr(other).value)

    @property
    def is_constant(self):  # a property in tensorrt.plugin's ShapeExpr
        return True

    def constant_value(self):
        return self.value


def _fake_tensorrt(monkeypatch):
    """Just enough of tensorrt / tensorrt.plugin to call trt_plugin's functions (no TensorRT here)."""
    import types

    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.int32 = "float32", "float16", "int32"
    trt.__version__ = "11.4.0"
    trtp = types.ModuleType("tensorrt.plugin")
    identity = lambda plugin_id: (lambda fn: fn)  # noqa: E731
    trtp.register = trtp.impl = trtp.aot_impl = trtp.autotune = identity
    trtp.TensorDesc = trtp.Tensor = object
    trtp.SymExprs = object
    trtp.AutoTuneCombination = lambda spec: spec
    trtp.from_shape_expr = lambda shape, dtype: types.SimpleNamespace(
        shape=tuple(_Expr(d).value for d in shape), dtype=dtype)
    trtp.cdiv = lambda a, b: _Expr((_Expr(a).value + b - 1) // b)
    trtp.SymInt32 = lambda e: _Expr(e).value
    trtp.SymIntExprs = types.SimpleNamespace(from_tuple=list)

    class KernelLaunchParams:  # like TensorRT's: every field becomes a SymInt32
        def __setattr__(self, name, value):
            object.__setattr__(self, name, _Expr(value).value)

    trtp.KernelLaunchParams = KernelLaunchParams
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.delitem(sys.modules, "turbo_plugin.trt_plugin", raising=False)
    import turbo_plugin.trt_plugin as trt_plugin

    return trt_plugin


def _desc(shape, dtype="float32"):
    import types

    return types.SimpleNamespace(shape_expr=[_Expr(d) for d in shape], dtype=dtype)


def test_trt_plugin_definitions_follow_the_kernel_contract(monkeypatch):
    """The plugin functions against a stand-in tensorrt: output shapes, launch grid, scalar arguments, PTX."""
    trt_plugin = _fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_plugin, "COMPILE_TARGET", 80)  # no GPU to compile for here
    batch, tokens, channels, dim, r = 2, 17, 24, 8, 4
    inputs = [_desc((batch, tokens, channels), "float16"), _desc((batch, tokens, 1), "float16"),
              _desc((batch, tokens, dim), "float16"), _desc((batch, tokens), "float16"),
              _desc((9,), "int32"), _desc((8,), "int32")]
    outs = trt_plugin.merge_desc(*inputs, r, 6.0, 1)
    assert [o.shape for o in outs] == [(2, 13, 24), (2, 13, 1), (2, 5), (2, 4), (2, 4)]
    assert [o.dtype for o in outs] == ["float16", "float16", "int32", "int32", "int32"]
    assert trt_plugin.merge_autotune(*inputs, outs)[0].count(",") == 10  # 6 inputs + 5 outputs

    name, ptx, params, scalars = trt_plugin.merge_aot(*inputs, r, 6.0, 1, outs, 0)
    assert name == "turbo_merge_kernel" and ".entry turbo_merge_kernel(" in ptx
    assert (params.grid_x, params.grid_y, params.block_x) == (2, 1, 256)
    assert scalars == [tokens, channels, dim, 9, 8]  # the kernel's five int32 parameters, in order
    assert _entry_params(ptx)[:16] == [".u64"] * 6 + [".u32"] * 5 + [".u64"] * 5

    merged = _desc((batch, tokens - r, channels), "float16")
    plan = [_desc((batch, 5), "int32"), _desc((batch, r), "int32"), _desc((batch, r), "int32")]
    restored = trt_plugin.unmerge_desc(merged, *plan, inputs[4], inputs[5])
    assert restored.shape == (2, 17, 24)
    name, ptx, params, scalars = trt_plugin.unmerge_aot(merged, *plan, inputs[4], inputs[5], (restored,), 0)
    assert name == "turbo_unmerge_kernel"
    assert (params.grid_x, params.grid_y, params.grid_z) == (2, 1, 1)
    assert scalars == [tokens, channels, 9, 8, r]


@pytest.mark.parametrize("trt_version, numpy_version, refused", [
    ("10.9.0.34", "2.4.6", True), ("10.16.1.11", "2.5.0", True), ("10.16.1.11", "2.3.5", False),
    ("10.9.0.34", "1.26.4", False), ("11.4.0.106", "2.4.6", False)])
def test_tensorrt10_numpy24_attribute_problem_is_named(trt_version, numpy_version, refused):
    from turbo_plugin import attribute_conversion_problem

    problem = attribute_conversion_problem(trt_version, numpy_version)
    assert (problem is not None) is refused
    if refused:
        assert "numpy<2.4" in problem and "TensorRT 11" in problem


def test_kernels_on_the_unet_grid_split_match_the_pytorch_op(kernel_check):
    """The UNet's use (merge.grid_split, all-ones sizes, nothing protected): fp32 bit-equal, fp16 within half an
    fp16 ulp, identical plans; every case really merges."""
    cases = kernel_check["sd_cases"]
    assert {c["dtype"] for c in cases} == {"float32", "float16"} and all(c["r"] > 0 for c in cases)
    for case in cases:
        assert case["plan_equal"], case
        bound = 0.0 if case["dtype"] == "float32" else 2e-3  # |x| < 4 here: half an fp16 ulp is at most 1e-3
        assert case["x_max_abs_err"] <= bound and case["unmerge_max_abs_err"] <= bound, case
        assert case["size_max_abs_err"] == 0.0, case  # sums of ones are exact in fp16 too
