"""Triton model repositories: `config.pbtxt` written by a small serializer of Triton's ModelConfig text format,
the tensor signatures read from the exported ONNX files, and `turbo-export triton-repo`'s repository for a full
(multi-GPU / multi-node) Triton deployment with the onnxruntime or TensorRT backend.

Our exports have a static batch dimension. Triton's ONNX Runtime and TensorRT backends only accept
``max_batch_size > 0`` (and so ``dynamic_batching``) for a model whose first dimension is dynamic; for a static
batch the repository says ``max_batch_size: 0`` with the full shapes and explains why in the file. `turbo-export
serve` batches dynamically anyway: its Python-backend models split and pad requests to the export's batch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from turbo_export.core.plugin_contract import MERGE_OP, UNMERGE_OP
from turbo_export.errors import TurboExportError
from turbo_export.files import check_inside, check_writable_target, read_onnx, read_report, staged_output
from turbo_export.limits import MAX_BATCH, MAX_GPU_ID, MAX_INSTANCES, check_range

# numpy dtype name -> (Triton config type, KServe v2 datatype)
TRITON_TYPES = {
    "float32": ("TYPE_FP32", "FP32"), "float16": ("TYPE_FP16", "FP16"), "float64": ("TYPE_FP64", "FP64"),
    "int64": ("TYPE_INT64", "INT64"), "int32": ("TYPE_INT32", "INT32"), "int8": ("TYPE_INT8", "INT8"),
    "uint8": ("TYPE_UINT8", "UINT8"), "bool": ("TYPE_BOOL", "BOOL"), "bytes": ("TYPE_STRING", "BYTES"),
}
ONNX_ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                   11: "float64"}
# ONNX op domains every runtime knows; anything else is a custom node (a TensorRT plugin / ORT custom op)
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "pkg.onnxscript.torch_lib.common"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of TRITON_TYPES
    dims: tuple[int, ...]  # -1 for a variable dimension
    optional: bool = False  # an input a request may leave out (Triton's `optional: true`)

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype][0]

    @property
    def datatype(self) -> str:
        """The KServe v2 datatype name (FP32, INT64, BYTES ...)."""
        return TRITON_TYPES[self.dtype][1]


@dataclass
class ModelConfig:
    """The parts of Triton's ModelConfig protobuf that turbo-export writes."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    platform: str | None = None  # onnxruntime_onnx, tensorrt_plan
    backend: str | None = None  # python
    max_batch_size: int = 0
    dynamic_batching: bool = False
    preferred_batch_size: Sequence[int] = ()
    max_queue_delay_us: int = 0
    instance_kind: str = "KIND_CPU"  # KIND_GPU, KIND_CPU, KIND_MODEL
    instance_count: int = 1
    gpus: Sequence[int] = ()
    parameters: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(t: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    optional = "\n    optional: true" if t.optional else ""
    return f"  {{\n    name: {_quote(t.name)}\n    data_type: {t.triton_type}\n    dims: [ {dims} ]{optional}\n  }}"


def to_pbtxt(config: ModelConfig) -> str:
    """Protobuf text format of a Triton ModelConfig (parses with tritonclient's model_config_pb2)."""
    lines = [f"# {c}" for c in config.comments]
    lines.append(f"name: {_quote(config.name)}")
    if config.platform:
        lines.append(f"platform: {_quote(config.platform)}")
    if config.backend:
        lines.append(f"backend: {_quote(config.backend)}")
    lines.append(f"max_batch_size: {config.max_batch_size}")
    lines.append("input [\n" + ",\n".join(_tensor(t) for t in config.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(t) for t in config.outputs) + "\n]")
    if config.dynamic_batching:
        body = [f"  preferred_batch_size: [ {', '.join(str(b) for b in config.preferred_batch_size)} ]"] \
            if config.preferred_batch_size else []
        body.append(f"  max_queue_delay_microseconds: {config.max_queue_delay_us}")
        lines.append("dynamic_batching {\n" + "\n".join(body) + "\n}")
    group = [f"    kind: {config.instance_kind}", f"    count: {config.instance_count}"]
    if config.gpus:
        group.append(f"    gpus: [ {', '.join(str(g) for g in config.gpus)} ]")
    lines.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    for key, value in config.parameters.items():
        lines.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def onnx_signature(path: str) -> tuple[list[TensorSpec], list[TensorSpec], set[str]]:
    """Inputs, outputs (full shapes, -1 for symbolic dims) and the custom op types of an ONNX file."""
    model = read_onnx(path)
    initializers = {i.name for i in model.graph.initializer}

    def specs(values: Iterable[Any]) -> list[TensorSpec]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            tensor = v.type.tensor_type
            dtype = ONNX_ELEM_TYPES.get(tensor.elem_type)
            if dtype is None:
                raise TurboExportError(f"'{path}': tensor '{v.name}' has ONNX element type {tensor.elem_type}, "
                                       "which Triton cannot serve")
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            out.append(TensorSpec(v.name, dtype, dims))
        return out

    custom = {f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in _all_nodes(model.graph)
              if n.domain not in STANDARD_DOMAINS or n.op_type in (MERGE_OP, UNMERGE_OP)}
    return specs(model.graph.input), specs(model.graph.output), custom


def _all_nodes(graph: Any) -> Iterable[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _static_batch(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> bool:
    return any(not t.dims or t.dims[0] != -1 for t in inputs + outputs)


def _external_data_files(path: str) -> list[str]:
    """The external-data files of an ONNX file (beside it), each refused if it lies outside the file's folder."""
    names = set()
    for init in read_onnx(path).graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    for name in names:
        check_inside(os.path.dirname(path), name, f"'{path}': external data")
    return sorted(names)


PLUGIN_NOTE = """\
This model's graph contains custom nodes: {ops}.

TensorRT builds them as plugins. Before loading this model, give tritonserver the Turbo plugin library:

    tritonserver --model-repository <repo> --backend-config=tensorrt,plugins=/path/to/libturbo_plugins.so

(or LD_PRELOAD it). A Python plugin (tensorrt.plugin, `@trtp.register`) must instead be imported by the process
that builds and runs the engine; Triton's TensorRT backend cannot import Python, so serve such an engine with an
ahead-of-time compiled plugin (`@trtp.aot_impl`), which is embedded in the plan.
"""


@dataclass
class RepoModel:
    name: str
    config: ModelConfig
    files: dict[str, str]  # file name in the version folder -> source path
    custom_ops: set[str]


def machine_has_gpu() -> bool:
    """Whether this machine has a CUDA GPU: nvidia-smi lists one, or torch sees one."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
            if listed.returncode == 0 and any(line.startswith("GPU ") for line in listed.stdout.splitlines()):
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001  (no torch, or a broken CUDA install: no usable GPU either way)
        return False


def instance_kind(kind: str) -> str:
    """``auto`` (a GPU if this machine has one), ``gpu`` or ``cpu`` -> Triton's KIND_GPU / KIND_CPU."""
    if kind not in ("auto", "gpu", "cpu"):
        raise TurboExportError(f"kind: unknown '{kind}'; choose auto, cpu or gpu")
    if kind == "auto":
        kind = "gpu" if machine_has_gpu() else "cpu"
    return "KIND_GPU" if kind == "gpu" else "KIND_CPU"


def plan_repository(export_dir: str, backend: str = "onnxruntime", max_batch: int = 8, instances: int = 1,
                    kind: str = "auto", gpus: Sequence[int] = (), queue_delay_us: int = 100,
                    names: Sequence[str] | None = None) -> list[RepoModel]:
    """What `write_repository` writes: one Triton model per exported graph of the folder. ``kind``: auto (KIND_GPU
    when this machine has a GPU, else KIND_CPU), gpu or cpu."""
    check_range("max-batch", max_batch, 1, MAX_BATCH)
    check_range("instances", instances, 1, MAX_INSTANCES)
    check_range("queue-delay-us", queue_delay_us, 0, 10 ** 7)
    for gpu in gpus:
        check_range("gpus", gpu, 0, MAX_GPU_ID)
    report = read_report(export_dir)
    from turbo_export.families import REGISTRY, families

    families()  # the registry, filled
    if report.get("family") in REGISTRY:  # the family's fields that are there have their types
        REGISTRY[report["family"]].check_report(report, os.path.join(export_dir, "report.json"), present_only=True)
    files: dict[str, str] = dict(report["files"])
    if not files:
        raise TurboExportError(f"{os.path.join(export_dir, 'report.json')}: 'files' lists no graph")
    if names:
        unknown = [n for n in names if n not in files]
        if unknown:
            raise TurboExportError(f"model: {', '.join(unknown)} not in '{export_dir}'; it has {', '.join(files)}")
        files = {n: files[n] for n in names}
    if backend not in ("onnxruntime", "tensorrt"):
        raise TurboExportError(f"backend: unknown '{backend}'; choose onnxruntime or tensorrt")
    group_kind = instance_kind("gpu" if kind == "auto" and gpus else kind)  # GPU ids given: instances on GPUs
    if gpus and group_kind != "KIND_GPU":
        raise TurboExportError(f"gpus: --gpus {','.join(str(g) for g in gpus)} needs instances on GPUs (--kind gpu)")
    models = []
    for name, filename in files.items():
        onnx_path = os.path.join(export_dir, filename)
        inputs, outputs, custom = onnx_signature(onnx_path)
        config = ModelConfig(name=name, inputs=inputs, outputs=outputs,
                             instance_kind=group_kind, instance_count=instances,
                             gpus=tuple(gpus))
        if backend == "tensorrt":
            plan = _find_plan(export_dir, name)
            config.platform = "tensorrt_plan"
            model_files = {"model.plan": plan}
        else:
            config.platform = "onnxruntime_onnx"
            model_files = {"model.onnx": onnx_path}
            model_files.update({f: os.path.join(export_dir, f) for f in _external_data_files(onnx_path)})
        if _static_batch(inputs, outputs):
            config.comments.append(f"{filename} has a static batch of {inputs[0].dims[0] if inputs[0].dims else '?'}: "
                                   "Triton's dynamic batcher needs a dynamic first dimension, so "
                                   "max_batch_size is 0 and the dims are the full shapes.")
        else:
            config.inputs = [TensorSpec(t.name, t.dtype, t.dims[1:]) for t in inputs]
            config.outputs = [TensorSpec(t.name, t.dtype, t.dims[1:]) for t in outputs]
            config.max_batch_size = max_batch
            config.dynamic_batching = True
            config.max_queue_delay_us = queue_delay_us
        if custom:
            config.comments.append(f"custom nodes {', '.join(sorted(custom))}: see PLUGINS.md")
        config.comments.insert(0, f"written by turbo-export triton-repo from {os.path.abspath(onnx_path)}")
        models.append(RepoModel(name, config, model_files, custom))
    return models


def _find_plan(export_dir: str, name: str) -> str:
    for candidate in (f"{name}.plan", f"{name}.engine", os.path.join("engines", f"{name}.plan")):
        path = os.path.join(export_dir, candidate)
        if os.path.isfile(path):
            return path
    raise TurboExportError(f"backend tensorrt: no TensorRT engine '{name}.plan' in '{export_dir}'; build one with "
                           "--backend tensorrt on a machine with TensorRT, or write an onnxruntime repository")


def write_repository(models: list[RepoModel], out_dir: str, link: bool = False) -> list[str]:
    """Write ``<out>/<model>/config.pbtxt`` and ``<out>/<model>/1/<files>`` atomically (all models or none; the
    folder's other models stay); returns the model folders."""
    check_writable_target(out_dir, "out", folder=True)
    taken = [m.name for m in models if os.path.exists(os.path.join(out_dir, m.name))]
    if taken:
        raise TurboExportError(f"out: '{out_dir}' already has model folder(s) {', '.join(taken)}; remove them or "
                               "choose another --out")
    with staged_output(out_dir, merge=True) as stage:
        for m in models:
            folder = os.path.join(stage, m.name)
            os.makedirs(os.path.join(folder, "1"))
            with open(os.path.join(folder, "config.pbtxt"), "w") as f:
                f.write(to_pbtxt(m.config))
            for target, source in m.files.items():
                dest = os.path.join(folder, "1", target)
                if link:
                    os.symlink(os.path.abspath(source), dest)
                else:
                    shutil.copyfile(source, dest)
            if m.custom_ops:
                with open(os.path.join(folder, "PLUGINS.md"), "w") as f:
                    f.write(PLUGIN_NOTE.format(ops=", ".join(sorted(m.custom_ops))))
    return [os.path.join(os.path.abspath(out_dir), m.name) for m in models]


def run_hints(export_dir: str, out_dir: str, models: list[RepoModel]) -> list[str]:
    """Commands that serve what was written, with what this machine has installed: a full tritonserver on the PATH,
    the one bundled with nvidia-pytriton (Python backend only: it cannot load onnxruntime_onnx / tensorrt_plan
    models, so `turbo-export serve` serves the export folder with it), and NVIDIA's container."""
    import importlib.util

    out = os.path.abspath(out_dir)
    gpu = any(m.config.instance_kind == "KIND_GPU" for m in models)
    plugins = " --backend-config=tensorrt,plugins=/path/to/libturbo_plugins.so" if any(m.custom_ops for m in models) \
        else ""
    lines = []
    full = shutil.which("tritonserver")
    if full and os.path.isdir(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(full))), "backends",
                                           "onnxruntime")):
        lines.append(f"run: tritonserver --model-repository {out}{plugins}")
    if importlib.util.find_spec("pytriton") is not None:
        lines.append(f"run here: turbo-export serve {export_dir}  (the tritonserver bundled with nvidia-pytriton has "
                     "only the Python backend, so it cannot load this repository; `serve` runs the export with it)")
    lines.append(f"with NVIDIA's container: docker run --rm{' --gpus all' if gpu else ''} -p 8000:8000 -p 8001:8001 "
                 f"-v {out}:/models nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository /models"
                 f"{plugins}")
    return lines
