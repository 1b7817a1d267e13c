"""ONNX -> serialized TensorRT engine, cached under the output folder.

The only export module that imports tensorrt, and only inside functions. Written against TensorRT's documented
Python API for 10.x and 11.x (11: networks are always strongly typed and ``BuilderFlag.FP16`` is gone, so fp16 lives
in the exported graph; 10: the fp16 graph is built weakly typed with the FP16 flag as well).

Engines are cached as ``<cache_dir>/<name>-<key[:16]>.plan`` with a JSON sidecar holding the full key: a hash of
the ONNX bytes (external data included), the TensorRT version, the GPU name and compute capability and the build
options. An engine whose sidecar does not match (a stale one, one built for another GPU or TensorRT, or a plan whose
bytes changed) is rebuilt, with a log line saying why, never used.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from turbo_export.errors import TurboExportError
from turbo_export.files import write_json_atomic

Log = Callable[[str], None]
PRECISIONS = ("fp32", "fp16", "int8")
KEY_VERSION = 1  # bump when the key's meaning changes


@dataclass(frozen=True)
class BuildOptions:
    # the graph's precision; on TensorRT 10 "fp16" graphs also get BuilderFlag.FP16 and "int8" (QDQ) graphs
    # BuilderFlag.INT8 (explicit quantization); TensorRT 11 reads both from the graph alone
    precision: str = "fp32"
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3  # IBuilderConfig.builder_optimization_level (0..5)
    tf32: bool = False  # TensorRT enables TF32 for fp32 layers by default; off keeps fp32 engines fp32-accurate
    timing_cache: str | None = None  # a file shared across builds; loaded if present, saved after each build
    plugin_modules: tuple[str, ...] = ()  # Python modules that register TensorRT plugins (imported before parsing)
    # input name -> (min, opt, max) shapes: the optimization profile of a graph with symbolic dimensions
    profile: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()

    def key_fields(self) -> dict[str, Any]:
        # the timing cache speeds builds up but does not change what is built: not part of the key
        return {"precision": self.precision, "tf32": self.tf32, "workspace_bytes": self.workspace_bytes,
                "optimization_level": self.optimization_level, "plugin_modules": list(self.plugin_modules),
                "profile": [[n, list(lo), list(opt), list(hi)] for n, lo, opt, hi in self.profile]}

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise TurboExportError(f"precision: unknown '{self.precision}'; choose one of {', '.join(PRECISIONS)}")
        if not 0 <= self.optimization_level <= 5:
            raise TurboExportError(f"optimization level: must be 0..5, got {self.optimization_level}")
        if self.workspace_bytes <= 0:
            raise TurboExportError(f"workspace: must be > 0 bytes, got {self.workspace_bytes}")


@dataclass(frozen=True)
class Target:
    """What an engine is built for: it runs only with the same TensorRT version on the same kind of GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass
class Engine:
    path: str
    key: str
    built: bool  # False: reused from the cache
    sidecar: dict[str, Any] = field(default_factory=dict)


def onnx_digest(onnx_path: str) -> str:
    """sha256 of the ONNX file and of every external-data file it names."""
    import onnx

    digest = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    model = onnx.load(onnx_path, load_external_data=False)
    folder = os.path.dirname(os.path.abspath(onnx_path))
    external = sorted({entry.value for t in model.graph.initializer if t.data_location == 1
                       for entry in t.external_data if entry.key == "location"})
    for location in external:
        digest.update(location.encode())
        with open(os.path.join(folder, location), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def key_fields(onnx_sha256: str, options: BuildOptions, target: Target) -> dict[str, Any]:
    return {"key_version": KEY_VERSION, "onnx_sha256": onnx_sha256, **asdict(target), **options.key_fields()}


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    names = sorted(set(old) | set(new))
    return [n for n in names if old.get(n) != new.get(n)]


def _valid_entry(plan: str, sidecar: str, key: str, fields: dict[str, Any]) -> tuple[bool, str]:
    """Is ``plan`` a complete engine for ``key``? (ok, why not)"""
    try:
        with open(sidecar) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False, "its sidecar is missing or unreadable"
    if meta.get("key") != key:
        return False, f"it was built for different {', '.join(_differences(meta.get('fields', {}), fields))}"
    if not os.path.isfile(plan):
        return False, "its plan file is missing"
    if meta.get("plan_sha256") != file_sha256(plan):
        return False, "its plan file does not match the sidecar (changed or truncated)"
    return True, ""


def get_engine(
    onnx_path: str,
    options: BuildOptions,
    cache_dir: str,
    log: Log,
    target: Target | None = None,
    build: Callable[[str, BuildOptions], bytes] | None = None,
    reuse_dirs: tuple[str, ...] = (),
    name: str | None = None,
) -> Engine:
    """The engine for ``onnx_path`` from ``cache_dir`` (or one of ``reuse_dirs``), else a fresh build.

    ``target`` and ``build`` default to the local TensorRT and GPU and :func:`build_serialized`; tests pass fakes.
    Entries of the same graph with another key are reported (which fields differ) and never used; those built from
    another version of the ONNX file are removed from ``cache_dir``.
    """
    options.check()
    target = target or local_target()
    build = build or build_serialized
    name = name or os.path.splitext(os.path.basename(onnx_path))[0]
    fields = key_fields(onnx_digest(onnx_path), options, target)
    key = cache_key(fields)
    stem = f"{name}-{key[:16]}"
    plan, sidecar = os.path.join(cache_dir, stem + ".plan"), os.path.join(cache_dir, stem + ".json")

    ok, why = _valid_entry(plan, sidecar, key, fields)
    if ok:
        log(f"      engine {stem}.plan: cached (same ONNX, TensorRT {target.tensorrt_version}, {target.gpu_name}, "
            "options)")
        with open(sidecar) as f:
            return Engine(plan, key, False, json.load(f))
    if os.path.exists(plan) or os.path.exists(sidecar):
        log(f"      engine {stem}.plan: not reused, {why}; rebuilding")
    for folder in reuse_dirs:
        old_plan, old_sidecar = os.path.join(folder, stem + ".plan"), os.path.join(folder, stem + ".json")
        if os.path.abspath(old_plan) != os.path.abspath(plan) and _valid_entry(old_plan, old_sidecar, key, fields)[0]:
            os.makedirs(cache_dir, exist_ok=True)
            shutil.copyfile(old_plan, plan + ".tmp")
            os.replace(plan + ".tmp", plan)
            shutil.copyfile(old_sidecar, sidecar + ".tmp")
            os.replace(sidecar + ".tmp", sidecar)
            log(f"      engine {stem}.plan: cached in {folder}")
            with open(sidecar) as f:
                return Engine(plan, key, False, json.load(f))

    for folder in (cache_dir, *reuse_dirs):
        for other in sorted(glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(name)}-*.json"))):
            if os.path.basename(other) == stem + ".json":
                continue
            try:
                with open(other) as f:
                    old_fields = json.load(f).get("fields", {})
            except (OSError, ValueError):
                old_fields = {}
            if old_fields.get("onnx_sha256") is None:
                continue
            diff = _differences(old_fields, fields)
            if "onnx_sha256" in diff:
                kind = "stale (built from another version of this ONNX file)"
            elif set(diff) & {"tensorrt_version", "gpu_name", "compute_capability"}:
                kind = "foreign (built for another TensorRT or GPU)"
            else:
                kind = "built with other options"
            log(f"      engine {os.path.basename(other)[:-5]}.plan is {kind}, differs in: {', '.join(diff)}; not used")
            if folder == cache_dir and "onnx_sha256" in diff:  # can never be right for this file again
                for stale in (other, other[:-5] + ".plan"):
                    with contextlib.suppress(OSError):
                        os.unlink(stale)

    log(f"      building engine {stem}.plan (TensorRT {target.tensorrt_version}, {target.gpu_name}, "
        f"{options.precision}, optimisation level {options.optimization_level}) ...")
    data = build(onnx_path, options)
    write_bytes_atomic(plan, data)
    meta = {"key": key, "fields": fields, "plan_sha256": file_sha256(plan), "onnx": os.path.basename(onnx_path)}
    write_json_atomic(sidecar, meta)  # written last: a plan without its sidecar is never used
    return Engine(plan, key, True, meta)


# ---- TensorRT ---------------------------------------------------------------------------------------------------


def _trt() -> Any:
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError from missing shared libraries
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TurboExportError(f"backend tensorrt: the tensorrt Python package cannot be imported "
                               f"({type(exc).__name__}: {first}); --backend onnxruntime works on this machine"
                               ) from None
    return trt


def local_target() -> Target:
    trt = _trt()
    import torch

    if not torch.cuda.is_available():
        raise TurboExportError("backend tensorrt: no CUDA GPU is visible to torch; --backend onnxruntime works on "
                               "this machine")
    major, minor = torch.cuda.get_device_capability()
    return Target(trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}")


def major_version(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def strongly_typed(trt: Any) -> bool:
    """TensorRT 11 networks are always strongly typed (its FP16 builder flag is gone, or deprecated in builds that
    still carry it); on 10 fp16 graphs are built weakly typed with BuilderFlag.FP16, TensorRT 10's own fp16 path."""
    return major_version(trt) >= 11 or not hasattr(trt.BuilderFlag, "FP16")


def network_flags(trt: Any) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed(trt) and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)  # the default on 11; explicit where the flag still exists
    return flags


_LOGGER = None


def trt_logger(trt: Any) -> Any:
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(_LOGGER, "")  # the ScatterElements reduction plugin lives there
    return _LOGGER


def _import_plugins(modules: tuple[str, ...]) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise TurboExportError(f"plugin: cannot import plugin module '{module}': {exc}") from None


def build_serialized(onnx_path: str, options: BuildOptions) -> bytes:
    """Parse ``onnx_path`` (external data read from beside it) and build a serialized engine: static shapes, or one
    optimization profile (``options.profile``) over the symbolic ones (the batch, a shared decoder's image tokens)."""
    trt = _trt()
    logger = trt_logger(trt)
    _import_plugins(options.plugin_modules)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TurboExportError(f"TensorRT's ONNX parser rejected '{onnx_path}': {errors[0] if errors else '?'}"
                               f"{f' (+{len(errors) - 1} more)' if len(errors) > 1 else ''}; "
                               f"run 'turbo-export check-trt {onnx_path}'")
    config = builder.create_builder_config()
    ranges = {name: (lo, opt, hi) for name, lo, opt, hi in options.profile}
    profile = builder.create_optimization_profile() if ranges else None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if not any(d < 0 for d in tuple(tensor.shape)):
            continue
        if tensor.name not in ranges:
            raise TurboExportError(f"'{onnx_path}': input '{tensor.name}' has dynamic shape {tuple(tensor.shape)} and "
                                   "no optimization profile covers it")
        profile.set_shape(tensor.name, *ranges[tensor.name])
    if profile is not None:
        config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    if not options.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.precision == "fp16" and not strongly_typed(trt):
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10; on 11 the fp16 graph alone decides
    if options.precision == "int8" and not strongly_typed(trt) and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)  # TensorRT 10: the Q/DQ nodes say where; 11: the graph alone
    cache = _load_timing_cache(config, options.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TurboExportError(f"TensorRT could not build an engine from '{onnx_path}' (see the TensorRT log above)")
    if options.timing_cache and cache is not None:
        write_bytes_atomic(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _load_timing_cache(config: Any, path: str | None) -> Any:
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False) and data:
        # a cache from another GPU or TensorRT version: start a fresh one rather than mix timings
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache
