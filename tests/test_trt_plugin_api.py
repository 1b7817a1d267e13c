"""trt_plugin.py against the REAL tensorrt.plugin code of a TensorRT bindings wheel (scripts/check_trt_plugin_api.py).

Needs TURBO_TRT_BINDINGS = a tensorrt-cu1x-bindings .whl or the folder it was unpacked into, e.g.
  pip download --no-deps tensorrt-cu13-bindings==11.4.0.106 -d /tmp/trt && export TURBO_TRT_BINDINGS=/tmp/trt/*.whl
Without it the tests skip. The fake-core tests below need no wheel.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
_spec = importlib.util.spec_from_file_location("check_trt_plugin_api", os.path.join(ROOT, "scripts",
                                                                                     "check_trt_plugin_api.py"))
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # dataclasses resolve their module while the class is built
_spec.loader.exec_module(check)

BINDINGS = os.environ.get("TURBO_TRT_BINDINGS", "")
needs_wheel = pytest.mark.skipif(
    not BINDINGS or not os.path.exists(BINDINGS),
    reason="set TURBO_TRT_BINDINGS to a tensorrt-cu13-bindings wheel or its unpacked folder (pip download --no-deps "
           "tensorrt-cu13-bindings==11.4.0.106 -d DIR) to check trt_plugin.py against the real tensorrt.plugin")


MOUNTED = ("tensorrt", "turbo_plugin.trt_plugin")  # what the check puts into sys.modules while it runs
_modules_before_check: dict = {}


def mounted_modules() -> dict:
    return {n: m for n, m in sys.modules.items() if n.startswith(MOUNTED)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _modules_before_check.update(mounted_modules())  # other tests may have imported trt_plugin on their own fake
    return check.run_checks(check.locate_bindings(BINDINGS, str(tmp_path_factory.mktemp("trt-bindings"))), target=80)


@needs_wheel
def test_every_check_passes_against_the_real_tensorrt_plugin(report):
    assert report.ok, "\n".join(report.lines())


@needs_wheel
def test_the_check_covers_registration_builder_calls_and_ptx(report):
    names = [c.name for c in report.checks]
    for part in ("import turbo_plugin.trt_plugin", "registered definition", "ONNX parser fields",
                 "create_plugin(STRICT_AOT)", "get_output_shapes", "autotune combinations", "launch parameters",
                 "PTX entry matches", "get_fields_to_serialize", "impl arguments", "network API"):
        assert any(part in n for n in names), part
    assert sum("launch parameters" in n for n in names) == 8  # merge/unmerge x fp32/fp16 x static/dynamic batch


@needs_wheel
def test_the_mount_leaves_no_trace(report):
    """After the check sys.modules holds what it held before: neither the fake core nor the plugin module the check
    imported stays behind."""
    assert getattr(sys.modules.get("tensorrt"), "IPluginRegistry", None) is not check.PluginRegistry
    assert mounted_modules() == _modules_before_check


@needs_wheel
def test_a_wrong_kernel_is_caught(report, monkeypatch):
    """The check can fail: an aot_impl handing TensorRT a kernel of the wrong argument layout is reported."""
    from turbo_plugin import aot

    wrong = aot.compile_unmerge
    monkeypatch.setattr(aot, "compile_merge", lambda dtype, r, alpha, protected, num_a, num_b, dim, channels,
                        target=None: wrong(dtype, channels, target))
    broken = check.run_checks(report.bindings, target=80)
    failed = {c.name for c in broken.checks if not c.ok}
    assert failed and all(n.startswith("TurboMerge") for n in failed), failed
    assert sum("PTX entry" in n for n in failed) == 4


def test_fake_plugin_field_reinterprets_bytes_like_tensorrt():
    """PluginField.data follows the bindings: the bytes typed by `type` (an int64 array read as INT32 is wrong)."""
    f = check.PluginField("r", np.array([4], np.int32), check.PluginFieldType.INT32)
    assert f.data.dtype == np.int32 and f.data.tolist() == [4] and f.size == 1
    g = check.PluginField("r", np.array([4], np.int64), check.PluginFieldType.INT32)
    assert g.size == 2 and g.data.tolist() == [4, 0]
    with pytest.raises(AttributeError):
        check.PluginField("h", np.array([1], np.float16).tobytes(), check.PluginFieldType.FLOAT16).data


def test_fake_expression_builder_folds_constants_and_keeps_symbols():
    b = check.IExprBuilder()
    batch = check.IDimensionExpr(symbol="B")
    e = b.operation(check.DimensionOperation.CEIL_DIV, b.operation(check.DimensionOperation.PROD, batch,
                                                                   b.constant(24)), b.constant(32))
    assert not e.is_constant() and e.evaluate({"B": 3}) == 3
    c = b.operation(check.DimensionOperation.SUB, b.constant(17), b.constant(4))
    assert c.is_constant() and c.get_constant_value() == 13


def test_parser_fields_follow_onnx_tensorrt():
    """onnx-tensorrt loadFields: creator field order, ONNX INT -> INT32, FLOAT -> FLOAT32, absent ones skipped."""
    trt = check.fake_core("test")
    creator = type("C", (), {"field_names": [trt.PluginField("alpha"), trt.PluginField("r"),
                                             trt.PluginField("missing")]})()
    fields, missing = check.parser_fields(trt, creator, check.onnx_node_attributes(3, 0.1, 1))
    assert [(f.name, f.type) for f in fields] == [("alpha", trt.PluginFieldType.FLOAT32),
                                                  ("r", trt.PluginFieldType.INT32)]
    assert fields[0].data[0] == np.float32(0.1) and missing == ["missing"]
    assert check.parser_request(trt, {"aot": ("INT", 1)}) == trt.QuickPluginCreationRequest.STRICT_AOT
    assert check.parser_request(trt, {"aot": ("INT", 0)}) == trt.QuickPluginCreationRequest.STRICT_JIT
    assert check.parser_request(trt, {}) == trt.QuickPluginCreationRequest.UNKNOWN
