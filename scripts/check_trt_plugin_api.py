"""Check plugins/turbo_plugin/trt_plugin.py against TensorRT's REAL ``tensorrt.plugin`` package, on a CPU.

  python scripts/check_trt_plugin_api.py --wheel tensorrt_cu13_bindings-11.4.0.106-....whl   (or its unpacked dir)
  python scripts/check_trt_plugin_api.py --download [--spec tensorrt-cu13-bindings==11.4.0.106] [--cache DIR]

The ``tensorrt-cu*-bindings`` wheels hold ``tensorrt.plugin`` as plain Python (``<pkg>/plugin/*.py``) next to
the compiled core ``tensorrt.so``, which needs libnvinfer and cannot load here. This script mounts the wheel's
plugin package, unmodified, as ``tensorrt.plugin`` on top of a small FAKE core module (written here, below:
enums, PluginField, the plugin registry, IDimensionExpr / IExprBuilder, the interface base classes) and then:

- imports turbo_plugin.trt_plugin: the real ``@register`` / ``@autotune`` / ``@aot_impl`` / ``@impl`` run their
  real signature validation (``_validate.py``) and register real ``_TemplatePluginCreator`` objects;
- turns the exporter's node attributes into plugin fields the way TensorRT's ONNX parser does
  (onnx-tensorrt ``loadFields``: the creator's field names, ONNX INT -> kINT32, FLOAT -> kFLOAT32; node
  attribute ``aot`` -> QuickPluginCreationRequest), and via the network API (``trtp.op.turbo.TurboMerge``);
- calls the real creator's ``create_plugin`` and then the real plugin object's methods in the order TensorRT's
  builder calls them: get_output_data_types, get_output_shapes (symbolic shapes, static and dynamic batch),
  get_supported_format_combinations (our autotune), configure_plugin, get_valid_tactics, get_launch_params (our
  aot_impl: the Triton kernel really compiled to PTX for --target), get_kernel; for the JIT plugin
  get_fields_to_serialize and enqueue up to the call of our impl (whose body needs CUDA: not run).

Faked (no TensorRT here): the compiled core (the C++ side: the registry, the builder's calls and their
arguments, the shape-expression arithmetic); everything named ``tensorrt.plugin.*`` is NVIDIA's own code.
Prints one line per check and exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import glob
import inspect
import os
import re
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_SPEC = "tensorrt-cu13-bindings==11.4.0.106"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "turbo-export", "trt-bindings")


# ----------------------------------------------------------------------------------------------------------
# Locating the wheel's tensorrt.plugin package
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Bindings:
    package_dir: str  # the folder that holds plugin/ (tensorrt_bindings/ or tensorrt/)
    version: str
    source: str


def _version_of(package_dir: str) -> str:
    init = os.path.join(package_dir, "__init__.py")
    if os.path.exists(init):
        m = re.search(r'__version__\s*=\s*"([^"]+)"', open(init, encoding="utf-8").read())
        if m:
            return m.group(1)
    for meta in glob.glob(os.path.join(os.path.dirname(package_dir), "*.dist-info", "METADATA")):
        m = re.search(r"^Version:\s*(\S+)", open(meta, encoding="utf-8").read(), re.M)
        if m:
            return m.group(1)
    return "unknown"


def locate_bindings(path: str, cache: str = DEFAULT_CACHE) -> Bindings:
    """The plugin package of a tensorrt bindings wheel (.whl, or the folder it was unpacked into)."""
    path = os.path.abspath(path)
    if os.path.isfile(path) and path.endswith(".whl"):
        target = os.path.join(cache, os.path.basename(path)[:-4])
        with zipfile.ZipFile(path) as whl:
            wanted = [n for n in whl.namelist() if re.fullmatch(r"[^/]+/(plugin/[^/]+\.py|__init__\.py)", n)
                      or re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if not any(n.endswith("/plugin/_lib.py") for n in wanted):
                raise SystemExit(f"{path}: no <package>/plugin/_lib.py in this wheel (tensorrt.plugin needs 10.6+)")
            for name in wanted:  # only the pure-Python files; never the compiled core
                whl.extract(name, target)
        path = target
    if not os.path.isdir(path):
        raise SystemExit(f"--wheel {path}: not a .whl file nor a folder")
    hits = sorted(glob.glob(os.path.join(path, "plugin", "_lib.py")) + glob.glob(os.path.join(path, "*", "plugin",
                                                                                              "_lib.py")))
    if not hits:
        raise SystemExit(f"--wheel {path}: no plugin/_lib.py below it (expected tensorrt_bindings/plugin/)")
    package_dir = os.path.dirname(os.path.dirname(hits[0]))
    return Bindings(package_dir, _version_of(package_dir), path)


def download_wheel(spec: str, cache: str) -> str:
    """``pip download --no-deps`` of a bindings wheel into ``cache`` (the wheel for this interpreter)."""
    os.makedirs(cache, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    version = spec.split("==")[1] if "==" in spec else ""
    have = sorted(glob.glob(os.path.join(cache, f"{name}-{version}*.whl")))
    if have:
        return have[-1]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", cache],
                   check=True)
    have = sorted(glob.glob(os.path.join(cache, f"{name}-{version}*.whl")))
    if not have:
        raise SystemExit(f"pip download {spec} left no wheel in {cache}")
    return have[-1]


# ----------------------------------------------------------------------------------------------------------
# The fake compiled core: only what tensorrt.plugin and trt_plugin.py touch. Behaviour follows TensorRT's
# pybind11 bindings (NVIDIA/TensorRT python/src/infer/pyPlugin.cpp) where the plugin code depends on it.
# ----------------------------------------------------------------------------------------------------------

class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    HWC = 8


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


# PluginField.data's numpy type per field type (pyPlugin.cpp: the "data" property); others raise there.
_FIELD_NUMPY = {PluginFieldType.INT32: np.int32, PluginFieldType.UNKNOWN: np.int8, PluginFieldType.INT8: np.int8,
                PluginFieldType.INT16: np.int16, PluginFieldType.FLOAT32: np.float32,
                PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8}
_FIELD_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _FIELD_NUMPY.items()}, PluginFieldType.FLOAT16: 2,
                   PluginFieldType.BF16: 2}


class PluginField:
    """Holds the raw bytes, like the C++ struct's ``void const* data``: ``data`` reinterprets them per ``type``."""

    def __init__(self, name: str = "", data: Any = None, type: PluginFieldType = PluginFieldType.UNKNOWN):
        self.name = name
        self.type = type
        raw = b"" if data is None else (data.tobytes() if isinstance(data, np.ndarray) else bytes(data))
        self._raw = raw
        self.size = len(raw) // _FIELD_ITEMSIZE.get(type, 1)

    @property
    def data(self) -> np.ndarray:
        if self.type not in _FIELD_NUMPY:
            raise AttributeError("No known conversion for returning data from PluginField")
        return np.frombuffer(self._raw, dtype=_FIELD_NUMPY[self.type], count=self.size).copy()

    def __repr__(self) -> str:
        return f"PluginField({self.name!r}, {self.type.name}, {self.data.tolist() if self.type in _FIELD_NUMPY else '?'})"


class PluginFieldCollection(list):
    pass


class TensorRTPhase(enum.Enum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.Enum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


class PluginArgType(enum.Enum):
    INT = 0


class PluginArgDataType(enum.Enum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


_OPS: dict[DimensionOperation, Callable[[int, int], int]] = {
    DimensionOperation.SUM: lambda a, b: a + b, DimensionOperation.PROD: lambda a, b: a * b,
    DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: lambda a, b: a - b,
    DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: lambda a, b: a // b, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}


class IDimensionExpr:
    """A build-time shape expression: a constant, a named symbol (a dynamic dimension) or an operation."""

    def __init__(self, value: int | None = None, symbol: str | None = None, op=None, args=()):
        self._value, self._symbol, self._op, self._args = value, symbol, op, args

    def is_constant(self) -> bool:
        return self._value is not None

    def get_constant_value(self) -> int:
        return self._value if self._value is not None else -1

    def is_size_tensor(self) -> bool:
        return False

    def evaluate(self, env: dict[str, int]) -> int:
        if self._value is not None:
            return self._value
        if self._symbol is not None:
            return env[self._symbol]
        return _OPS[self._op](*(a.evaluate(env) for a in self._args))


class IExprBuilder:
    def __init__(self):
        self.calls = 0

    def constant(self, value: int) -> IDimensionExpr:
        self.calls += 1
        return IDimensionExpr(int(value))

    def operation(self, op: DimensionOperation, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        self.calls += 1
        if first.is_constant() and second.is_constant():
            return IDimensionExpr(_OPS[op](first.get_constant_value(), second.get_constant_value()))
        return IDimensionExpr(op=op, args=(first, second))

    def declare_size_tensor(self, *args):
        raise NotImplementedError("size tensors: not used by the Turbo plugins")


class DimsExprs(list):
    def __init__(self, arg=()):
        super().__init__([None] * arg if isinstance(arg, int) else list(arg))


class Dims(list):
    MAX_DIMS = 8

    def __init__(self, arg=()):
        super().__init__([] if isinstance(arg, int) else list(arg))


class PluginTensorDesc:
    def __init__(self):
        self.dims, self.type, self.format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, 1.0


class DynamicPluginTensorDesc:
    def __init__(self):
        self.desc, self.min, self.opt, self.max = PluginTensorDesc(), Dims(), Dims(), Dims()


class ITensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple):
        self.name, self.dtype, self.shape = name, dtype, shape


class _Interface:
    def __init__(self, *args, **kwargs):
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class ISymExpr(_Interface):
    pass


class ISymExprs:
    """What TensorRT hands get_launch_params to receive the kernel's scalar arguments."""

    def __init__(self):
        self.nbSymExprs = 0
        self.items: dict[int, Any] = {}

    def __setitem__(self, index: int, value) -> None:
        if index >= self.nbSymExprs:
            raise IndexError(index)
        self.items[index] = value

    def __len__(self) -> int:
        return self.nbSymExprs


class CoreKernelLaunchParams:
    """The C++ IKernelLaunchParams that get_launch_params fills (grid_x ... shared_mem, each an ISymExpr)."""

    def __init__(self):
        for name in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem"):
            setattr(self, name, None)


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)
    messages: list = []

    def __init__(self, min_severity: int = 2):
        self.min_severity = min_severity

    def log(self, severity: int, msg: str) -> None:
        Logger.messages.append((severity, msg))


class PluginRegistry:
    """Records register_creator calls; get_creator looks them up by (name, version, namespace)."""

    def __init__(self):
        self.creators: dict[tuple[str, str, str], Any] = {}
        self.rejected: list = []

    def register_creator(self, creator, plugin_namespace: str = "") -> bool:
        key = (creator.name, creator.plugin_version, plugin_namespace)
        if key in self.creators:  # TensorRT refuses a second creator with the same name/version/namespace
            self.rejected.append(key)
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, type: str, version: str, plugin_namespace: str = ""):
        return self.creators.get((type, version, plugin_namespace))


def fake_core(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    for obj in (DataType, TensorFormat, PluginFieldType, PluginField, PluginFieldCollection, TensorRTPhase,
                QuickPluginCreationRequest, DimensionOperation, PluginArgType, PluginArgDataType, IDimensionExpr,
                IExprBuilder, DimsExprs, Dims, PluginTensorDesc, DynamicPluginTensorDesc, ITensor, IPluginV3,
                IPluginV3QuickCore, IPluginV3QuickBuild, IPluginV3QuickRuntime, IPluginV3QuickAOTBuild,
                IPluginCreatorV3Quick, ISymExpr, ISymExprs, Logger):
        setattr(trt, obj.__name__, obj)
    trt.KernelLaunchParams = CoreKernelLaunchParams
    trt.IPluginRegistry = PluginRegistry
    D = DataType
    trt.float32, trt.float16, trt.int8, trt.int32, trt.int64 = D.FLOAT, D.HALF, D.INT8, D.INT32, D.INT64
    trt.bool, trt.uint8, trt.bfloat16, trt.fp8, trt.int4, trt.fp4 = D.BOOL, D.UINT8, D.BF16, D.FP8, D.INT4, D.FP4
    numpy_of = {D.FLOAT: np.float32, D.HALF: np.float16, D.INT8: np.int8, D.INT32: np.int32, D.INT64: np.int64,
                D.BOOL: np.bool_, D.UINT8: np.uint8}

    def nptype(trt_type):
        if trt_type in numpy_of:
            return numpy_of[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    trt.nptype = nptype
    registry = PluginRegistry()
    trt.get_plugin_registry = lambda: registry
    return trt


@contextlib.contextmanager
def mounted(bindings: Bindings, turbo_plugin_path: str):
    """``tensorrt`` = the fake core whose ``plugin`` subpackage is the wheel's; sys.modules restored after."""
    names = lambda: [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")  # noqa: E731
                     or n == "turbo_plugin.trt_plugin"]
    saved = {n: sys.modules.pop(n) for n in names()}
    trt = fake_core(bindings.version)
    trt.__path__ = [bindings.package_dir]  # `import tensorrt.plugin` finds <package_dir>/plugin/ (and only it)
    trt.__file__ = os.path.join(bindings.package_dir, "__init__.py (fake core)")
    sys.modules["tensorrt"] = trt
    added_path = turbo_plugin_path not in sys.path
    if added_path:
        sys.path.insert(0, turbo_plugin_path)
    try:
        yield trt
    finally:
        for n in names():
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        if added_path:
            sys.path.remove(turbo_plugin_path)
        pkg = sys.modules.get("turbo_plugin")
        if pkg is not None and "trt_plugin" in vars(pkg) and "turbo_plugin.trt_plugin" not in saved:
            delattr(pkg, "trt_plugin")


# ----------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    bindings: Bindings
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        head = [f"tensorrt.plugin {self.bindings.version} from {self.bindings.package_dir} (real Python code); "
                "compiled core: faked"]
        body = [f"[{'ok' if c.ok else 'FAIL'}] {c.name}" + (f": {c.detail}" if c.detail else "") for c in self.checks]
        tail = [f"{sum(c.ok for c in self.checks)}/{len(self.checks)} checks passed"]
        return head + body + tail


def _attempt(report: Report, name: str, fn: Callable[[], Any], expect: Callable[[Any], tuple[bool, str]] | None = None):
    """Run one step; an exception is a failed check (with the exception as the detail), not a crash."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        report.add(name, False, f"{type(exc).__name__}: {exc}")
        return None
    if expect is None:
        report.add(name, True)
    else:
        ok, detail = expect(value)
        report.add(name, ok, detail)
    return value


def onnx_node_attributes(r: int, alpha: float, protected: int, merge: bool = True) -> dict[str, tuple[str, Any]]:
    """The attributes the exporter writes on a TurboMerge / TurboUnmerge node: name -> (ONNX type, value).

    Types come from turbo_export.core.plugin_ops.register_schemas() (the schema the exporter builds its nodes with),
    values as in plugin_ops.custom_translation_table()."""
    from onnx import defs

    from turbo_export.core import plugin_ops

    plugin_ops.register_schemas()
    op = plugin_ops.MERGE_OP if merge else plugin_ops.UNMERGE_OP
    schema = defs.get_schema(op, 1, plugin_ops.DOMAIN)
    values = {"plugin_namespace": plugin_ops.NAMESPACE, "plugin_version": plugin_ops.PLUGIN_VERSION, "aot": 1}
    if merge:
        values.update(r=r, alpha=alpha, protected=protected)
    return {name: (schema.attributes[name].type.name, value) for name, value in values.items()}


def parser_fields(trt, creator, attrs: dict[str, tuple[str, Any]]) -> tuple[list, list[str]]:
    """onnx-tensorrt's loadFields (onnxOpImporters.cpp): one field per CREATOR field name found on the node, typed
    by the ONNX attribute type (INT -> kINT32 int32, FLOAT -> kFLOAT32 float32, STRING -> kCHAR)."""
    fields, missing = [], []
    for declared in creator.field_names:
        if declared.name not in attrs:
            missing.append(declared.name)  # the parser warns and passes nothing
            continue
        kind, value = attrs[declared.name]
        if kind == "INT":
            fields.append(trt.PluginField(declared.name, np.array([value], np.int32), trt.PluginFieldType.INT32))
        elif kind == "FLOAT":
            fields.append(trt.PluginField(declared.name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
        elif kind == "STRING":
            fields.append(trt.PluginField(declared.name, value.encode() + b"\0", trt.PluginFieldType.CHAR))
        else:
            raise ValueError(f"attribute type {kind} not modelled")
    return fields, missing


def parser_request(trt, attrs: dict[str, tuple[str, Any]], prefer: str | None = None):
    """onnx-tensorrt createPlugin for a V3Quick creator: node attribute ``aot`` decides, else the network flags."""
    Q = trt.QuickPluginCreationRequest
    if "aot" in attrs:
        return Q.STRICT_AOT if attrs["aot"][1] else Q.STRICT_JIT
    return {"aot": Q.PREFER_AOT, "jit": Q.PREFER_JIT}.get(prefer, Q.UNKNOWN)


def _dims_exprs(trt, shape) -> Any:
    """DimsExprs for an input: ints are build-time constants, strings name dynamic dimensions."""
    return trt.DimsExprs([trt.IDimensionExpr(symbol=d) if isinstance(d, str) else trt.IDimensionExpr(int(d))
                          for d in shape])


def _dyn_desc(trt, dtype, shape, env) -> Any:
    d = trt.DynamicPluginTensorDesc()
    d.desc.type, d.desc.format, d.desc.scale = dtype, trt.TensorFormat.LINEAR, 1.0
    concrete = [env[s] if isinstance(s, str) else s for s in shape]
    d.desc.dims = trt.Dims(concrete)
    d.min = d.opt = d.max = trt.Dims(concrete)
    return d


def _plain_desc(trt, dyn) -> Any:
    p = trt.PluginTensorDesc()
    p.dims, p.type, p.format, p.scale = dyn.desc.dims, dyn.desc.type, dyn.desc.format, dyn.desc.scale
    return p


def _ptx_params(ptx: str, name: str) -> list[str]:
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        return []
    return [p.split()[1] for p in m.group(1).strip().split(",") if p.strip()]


@dataclass
class Case:
    """One plugin node: input dtypes/shapes (str = a dynamic dimension), attributes, expected outputs."""
    label: str
    plugin: str  # "TurboMerge" / "TurboUnmerge"
    dtypes: list
    shapes: list
    attrs: dict
    expected_shapes: list  # evaluated with env
    expected_types: list
    env: dict
    scalars: list  # the kernel's int32 arguments, in order
    grid: tuple


def _cases(trt, batch=2, tokens=17, channels=24, dim=8, r=4, protected=1, alpha=6.0) -> list[Case]:
    from turbo_plugin import kernels

    num_a, num_b = (tokens + 1) // 2, tokens // 2
    mb, ub = kernels.merge_blocks(num_a, num_b, dim, channels), kernels.unmerge_blocks(channels)
    out = []
    for tname, t in (("fp32", trt.float32), ("fp16", trt.float16)):
        for b_label, b in (("static batch", batch), ("dynamic batch", "B")):
            env = {"B": batch}
            merge_in = [(b, tokens, channels), (b, tokens, 1), (b, tokens, dim), (b, tokens), (num_a,), (num_b,)]
            i32 = trt.int32
            out.append(Case(
                f"TurboMerge {tname} {b_label}", "TurboMerge", [t, t, t, t, i32, i32], merge_in,
                {"r": r, "alpha": alpha, "protected": protected},
                [(batch, tokens - r, channels), (batch, tokens - r, 1), (batch, num_a - r), (batch, r), (batch, r)],
                [t, t, i32, i32, i32], env, [tokens, channels, dim, num_a, num_b],
                (batch, -(-channels // mb["BLOCK_C"]), 1)))
            unmerge_in = [(b, tokens - r, channels), (b, num_a - r), (b, r), (b, r), (num_a,), (num_b,)]
            out.append(Case(
                f"TurboUnmerge {tname} {b_label}", "TurboUnmerge", [t, i32, i32, i32, i32, i32], unmerge_in, {},
                [(batch, tokens, channels)], [t], env, [tokens, channels, num_a, num_b, r],
                (batch, -(-tokens // ub["BLOCK_T"]), -(-channels // ub["BLOCK_C"]))))
    return out


def _check_case(report: Report, trt, trtp, lib, trt_plugin, case: Case, target: int) -> None:
    creator = trt.get_plugin_registry().get_creator(case.plugin, "1", "turbo")
    node = onnx_node_attributes(**case.attrs) if case.plugin == "TurboMerge" else onnx_node_attributes(
        0, 0.0, 0, merge=False)
    fields, missing = parser_fields(trt, creator, node)
    request = parser_request(trt, node)
    tag = case.label
    report.add(f"{tag}: ONNX parser fields", not missing and request == trt.QuickPluginCreationRequest.STRICT_AOT,
               f"{[f'{f.name}:{f.type.name}={f.data.tolist()}' for f in fields]}, request {request.name}"
               + (f"; creator fields missing on the node: {missing}" if missing else ""))

    plugin = _attempt(report, f"{tag}: create_plugin(STRICT_AOT)", lambda: creator.create_plugin(
        case.plugin, "turbo", trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD, request),
        lambda p: (type(p).__name__ == "_TemplateAOTPlugin" and all(
            type(p.attrs[k]) is type(v) and p.attrs[k] == v for k, v in case.attrs.items()),
            f"{type(p).__name__}, attrs {{{', '.join(f'{k}: {type(v).__name__} {v!r}' for k, v in p.attrs.items())}}}"))
    if plugin is None:
        return
    n_in = len(case.dtypes)
    ranks = [len(s) for s in case.shapes]
    out_types = _attempt(report, f"{tag}: get_output_data_types", lambda: plugin.get_output_data_types(
        list(case.dtypes), ranks), lambda v: (list(v) == case.expected_types, str([t.name for t in v])))
    builder = trt.IExprBuilder()
    in_exprs = [_dims_exprs(trt, s) for s in case.shapes]
    out_exprs = _attempt(report, f"{tag}: get_output_shapes", lambda: plugin.get_output_shapes(in_exprs, [], builder))
    if out_exprs is None or out_types is None:
        return
    shapes = [tuple(e.evaluate(case.env) for e in dims) for dims in out_exprs]
    report.add(f"{tag}: output shapes", shapes == case.expected_shapes,
               f"{shapes} (B={case.env['B']})" if "B" in str(case.shapes) else str(shapes))

    in_out = [_dyn_desc(trt, t, s, case.env) for t, s in zip(case.dtypes, case.shapes)] + \
             [_dyn_desc(trt, t, s, case.env) for t, s in zip(case.expected_types, case.expected_shapes)]
    combos = _attempt(report, f"{tag}: get_supported_format_combinations (autotune)",
                      lambda: plugin.get_supported_format_combinations(in_out, n_in))
    if combos is None:
        return
    width = len(in_out)
    rows = [combos[i:i + width] for i in range(0, len(combos), width)]
    consistent, listed = True, []
    for row in rows:
        types_ = [d.type for d in row]
        listed.append("/".join(sorted({t.name for t in types_[:1]})))
        produced = list(plugin.get_output_data_types(types_[:n_in], ranks))
        consistent &= produced == types_[n_in:] and all(d.format == trt.TensorFormat.LINEAR for d in row)
    plugin.get_output_data_types(list(case.dtypes), ranks)  # back to this case's types
    wanted = list(case.dtypes) + list(case.expected_types)
    report.add(f"{tag}: autotune combinations", consistent and any([d.type for d in r] == wanted for r in rows),
               f"{len(rows)} combination(s) ({', '.join(listed)} tokens), each one's output types = "
               f"register()'s for its input types: {consistent}; this case's types listed: "
               f"{any([d.type for d in r] == wanted for r in rows)}")

    chosen_in = [_dyn_desc(trt, t, s, case.env) for t, s in zip(case.dtypes, case.shapes)]
    chosen_out = [_dyn_desc(trt, t, s, case.env) for t, s in zip(case.expected_types, case.expected_shapes)]
    plugin.configure_plugin(chosen_in, chosen_out)
    tactics = _attempt(report, f"{tag}: configure_plugin + get_valid_tactics", plugin.get_valid_tactics,
                       lambda v: (v == [], f"{v} (TensorRT then uses the default tactic 0)"))
    if tactics is None:
        return
    plugin.set_tactic(0)
    launch, sym = trt.KernelLaunchParams(), trt.ISymExprs()
    old_target = trt_plugin.COMPILE_TARGET
    trt_plugin.COMPILE_TARGET = target  # no GPU here: compile for an explicit architecture
    try:
        done = _attempt(report, f"{tag}: get_launch_params (aot_impl, Triton -> PTX sm_{target})",
                        lambda: plugin.get_launch_params(in_exprs, chosen_in + chosen_out, n_in, launch, sym,
                                                         trt.IExprBuilder()) or True)
    finally:
        trt_plugin.COMPILE_TARGET = old_target
    if done is None:
        return
    val = {k: getattr(launch, k).expr.evaluate(case.env) for k in ("grid_x", "grid_y", "grid_z", "block_x",
                                                                  "block_y", "block_z", "shared_mem")}
    scal = [sym.items[i] for i in range(sym.nbSymExprs)]
    scal_ok = all(s.dtype == trt.PluginArgDataType.INT32 and s.type == trt.PluginArgType.INT for s in scal)
    scal_vals = [s.expr.evaluate(case.env) for s in scal]
    dynamic = any(isinstance(d, str) for d in case.shapes[0])
    report.add(f"{tag}: launch parameters", (val["grid_x"], val["grid_y"], val["grid_z"]) == case.grid
               and launch.grid_x.expr.is_constant() != dynamic
               and val["block_y"] == val["block_z"] == 1 and val["block_x"] % 32 == 0 and scal_ok
               and scal_vals == case.scalars,
               f"grid {val['grid_x']}x{val['grid_y']}x{val['grid_z']}, block {val['block_x']}, shared "
               f"{val['shared_mem']} B, int32 args {scal_vals}"
               + (" (grid_x symbolic in B)" if dynamic else ""))
    kernel = _attempt(report, f"{tag}: get_kernel", lambda: plugin.get_kernel(
        [_plain_desc(trt, d) for d in chosen_in], [_plain_desc(trt, d) for d in chosen_out]))
    if kernel is None:
        return
    name, ptx = kernel
    name = name.decode() if isinstance(name, bytes) else name
    params = _ptx_params(ptx.decode(), name)
    n_out, n_sc = len(case.expected_types), len(scal)
    layout = params[:n_in + n_sc + n_out] == [".u64"] * n_in + [".u32"] * n_sc + [".u64"] * n_out
    report.add(f"{tag}: PTX entry matches TensorRT's AOT argument order", isinstance(ptx, bytes) and layout
               and f".target sm_{target}" in ptx.decode(),
               f".entry {name}: {n_in} input pointers, {n_sc} int32, {n_out} output pointers "
               f"(+{len(params) - n_in - n_sc - n_out} trailing Triton scratch pointers, null at launch)")


def _check_jit(report: Report, trt, trtp, trt_plugin, case: Case) -> None:
    """The JIT plugin (aot=0 -> STRICT_JIT): serialized fields and enqueue up to the call of our impl."""
    creator = trt.get_plugin_registry().get_creator(case.plugin, "1", "turbo")
    node = onnx_node_attributes(**case.attrs)
    node["aot"] = ("INT", 0)
    fields, _ = parser_fields(trt, creator, node)
    request = parser_request(trt, node)
    tag = f"{case.label} JIT (aot=0)"
    plugin = _attempt(report, f"{tag}: create_plugin({request.name})", lambda: creator.create_plugin(
        case.plugin, "turbo", trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD, request),
        lambda p: (type(p).__name__ == "_TemplateJITPlugin", type(p).__name__))
    if plugin is None:
        return
    ser = _attempt(report, f"{tag}: get_fields_to_serialize", plugin.get_fields_to_serialize,
                   lambda fc: ({f.name: f.data.tolist()[0] for f in fc} == case.attrs,
                               str([f"{f.name}:{f.type.name}={f.data.tolist()}" for f in fc])))
    if ser is None:
        return
    # what TensorRT's runtime does with the serialized fields: create_plugin(RUNTIME) from exactly them
    again = _attempt(report, f"{tag}: create_plugin from the serialized fields (engine load)",
                     lambda: creator.create_plugin(case.plugin, "turbo", ser, trt.TensorRTPhase.RUNTIME,
                                                   trt.QuickPluginCreationRequest.STRICT_JIT),
                     lambda p: (p.attrs == case.attrs and all(type(p.attrs[k]) is type(v)
                                                              for k, v in case.attrs.items()), str(p.attrs)))
    if again is None:
        return
    plugin.get_output_data_types(list(case.dtypes), [len(s) for s in case.shapes])
    plugin.get_output_shapes([_dims_exprs(trt, s) for s in case.shapes], [], trt.IExprBuilder())
    plugin.set_tactic(0)
    calls = []
    signature = inspect.signature(plugin.impl_function)

    def recorder(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)

    plugin.impl_function = recorder  # our impl's body launches on CUDA: record what TensorRT passes instead
    ins = [_plain_desc(trt, _dyn_desc(trt, t, s, case.env)) for t, s in zip(case.dtypes, case.shapes)]
    outs = [_plain_desc(trt, _dyn_desc(trt, t, s, case.env)) for t, s in zip(case.expected_types,
                                                                              case.expected_shapes)]
    strides = lambda shape: tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))  # noqa: E731
    done = _attempt(report, f"{tag}: enqueue binds to merge_jit's signature", lambda: plugin.enqueue(
        ins, outs, [0x1000 * (i + 1) for i in range(len(ins))], [0x9000 * (i + 1) for i in range(len(outs))],
        [strides(d.dims) for d in ins], [strides(d.dims) for d in outs], 7))
    if done is None and not calls:
        return
    bound = calls[0]
    x = bound["x"]
    cai = x.__cuda_array_interface__
    np_t = np.dtype(trt.nptype(case.dtypes[0])).str
    report.add(f"{tag}: impl arguments", {k: bound[k] for k in case.attrs} == case.attrs
               and all(type(bound[k]) is type(v) for k, v in case.attrs.items()) and bound["stream"] == 7
               and len(bound["outputs"]) == len(outs) and cai["typestr"] == np_t
               and cai["shape"] == tuple(case.shapes[0]),
               f"attrs {{{', '.join(f'{k}: {bound[k]!r}' for k in case.attrs)}}}, stream {bound['stream']}, "
               f"x.__cuda_array_interface__ shape {cai['shape']} typestr {cai['typestr']}")


def run_checks(bindings: Bindings, target: int = 80) -> Report:
    report = Report(bindings)
    with mounted(bindings, os.path.join(ROOT, "plugins")) as trt:
        trtp = _attempt(report, "import tensorrt.plugin (the wheel's code) on the fake core",
                        lambda: __import__("tensorrt.plugin", fromlist=["_lib"]),
                        lambda m: (m._export.IS_AOT_ENABLED, f"{m.__file__}; AOT enabled: "
                                   f"{m._export.IS_AOT_ENABLED}"))
        if trtp is None:
            return report
        lib = sys.modules["tensorrt.plugin._lib"]
        trt_plugin = _attempt(report, "import turbo_plugin.trt_plugin (real @register/@autotune/@aot_impl/@impl "
                              "signature validation)", lambda: __import__("turbo_plugin.trt_plugin",
                                                                          fromlist=["MERGE_ID"]))
        if trt_plugin is None:
            return report
        for pid, attrs, n_out in (("turbo::TurboMerge", {"r": int, "alpha": float, "protected": int}, 5),
                                  ("turbo::TurboUnmerge", {}, 1)):
            d = lib.QDP_REGISTRY.get(pid)
            report.add(f"{pid}: registered definition", d is not None and d.input_attrs == attrs
                       and d.num_outputs == n_out and None not in (d.impl_func, d.aot_impl_func, d.autotune_func)
                       and d.aot_impl_attr_names == list(attrs) and d.impl_attr_names == list(attrs),
                       "" if d is None else f"inputs {d.input_tensor_names}, attrs "
                       f"{ {k: v.__name__ for k, v in d.input_attrs.items()} }, {d.num_outputs} outputs, impl + "
                       f"aot_impl + autotune")
        registry = trt.get_plugin_registry()
        creators = {k: [(f.name, f.type.name) for f in c.field_names] for k, c in registry.creators.items()}
        report.add("plugin registry: creators registered", set(creators) == {("TurboMerge", "1", "turbo"),
                                                                            ("TurboUnmerge", "1", "turbo")}
                   and not registry.rejected, str(creators))

        # a node whose `aot` attribute is absent: TensorRT falls back to the network's PREFER_* flags
        creator = registry.get_creator("TurboMerge", "1", "turbo")
        node = onnx_node_attributes(4, 6.0, 1)
        del node["aot"]
        fields, _ = parser_fields(trt, creator, node)
        outcome = {}
        for prefer in (None, "aot", "jit"):
            try:
                p = creator.create_plugin("TurboMerge", "turbo", trt.PluginFieldCollection(fields),
                                          trt.TensorRTPhase.BUILD, parser_request(trt, node, prefer))
                outcome[prefer or "no flag"] = type(p).__name__
            except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
                outcome[prefer or "no flag"] = f"{type(exc).__name__} ({str(exc)[:60]}...)"
        report.add("node without `aot`: needs NetworkDefinitionCreationFlag.PREFER_AOT/JIT_PYTHON_PLUGINS",
                   outcome.get("no flag", "").startswith("ValueError")
                   and outcome.get("aot") == "_TemplateAOTPlugin" and outcome.get("jit") == "_TemplateJITPlugin",
                   str(outcome))

        cases = _cases(trt)
        for case in cases:
            _check_case(report, trt, trtp, lib, trt_plugin, case, target)
        _check_jit(report, trt, trtp, trt_plugin, cases[0])

        # network API (INetworkDefinition.add_plugin(trtp.op.turbo.TurboMerge(...))): fields INT64/FLOAT64
        c = cases[0]
        tensors = [trt.ITensor(f"in{i}", t, s) for i, (t, s) in enumerate(zip(c.dtypes, c.shapes))]
        factory = _attempt(report, "network API: trtp.op.turbo.TurboMerge(*tensors, r=, alpha=, protected=)",
                           lambda: trtp.op.turbo.TurboMerge(*tensors, **c.attrs))
        if factory is not None:
            _attempt(report, "network API: factory(STRICT_AOT) -> plugin", lambda: factory(
                trt.QuickPluginCreationRequest.STRICT_AOT), lambda res: (
                type(res[2]).__name__ == "_TemplateAOTPlugin" and res[2].attrs == c.attrs, str(res[2].attrs)))
        try:
            trtp.op.turbo.TurboMerge(*tensors, r=4, alpha=6, protected=1)
            report.add("network API: alpha must be a Python float", False, "alpha=6 (int) was accepted")
        except ValueError as exc:
            report.add("network API: alpha must be a Python float", True, f"alpha=6 refused: {exc}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="a tensorrt-cu1x-bindings .whl, or the folder it was unpacked into")
    src.add_argument("--download", action="store_true", help="pip download --no-deps --spec into --cache first")
    parser.add_argument("--spec", default=DEFAULT_SPEC, help=f"with --download (default {DEFAULT_SPEC})")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"wheel / unpack cache (default {DEFAULT_CACHE})")
    parser.add_argument("--target", type=int, default=80, help="GPU architecture of the AOT PTX (default 80)")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    wheel = download_wheel(args.spec, args.cache) if args.download else args.wheel
    report = run_checks(locate_bindings(wheel, args.cache), args.target)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
