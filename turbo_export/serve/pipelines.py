"""What `turbo-export serve` serves for each kind of family: one function per kind in PIPELINES (export folder, its
report, options, a scratch folder -> the served models as `Binding`s; their handlers in `serve.handlers`).

Every kind serves its exported graphs at the tensor level (``turbo``, ``baseline`` and any other graph under its file
name) plus the pipelines of the kind, each in a Turbo and an unaccelerated flavour.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from turbo_export.errors import TurboExportError
from turbo_export.serve.request_checks import integer_input_ranges
from turbo_export.serve.triton_repo import TensorSpec, onnx_signature

FLAVOURS = ("turbo", "baseline")
DEFAULT_MAX_REQUEST_MB = 16.0


@dataclass
class Binding:
    """One served model: its Triton signature and what its handler needs (JSON, read in the stub)."""

    name: str
    inputs: list[TensorSpec]  # per-row dims when max_batch > 0, full shapes otherwise
    outputs: list[TensorSpec]
    max_batch: int
    handler: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeOptions:
    backend: str = "onnxruntime"
    max_batch: int = 8
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB
    queue_delay_us: int = 500
    instances: int = 1
    threads: int = 0  # ONNX Runtime intra-op threads per model instance (0: its default)
    top_k: int = 5
    pipelines: bool = True


# ---- what to serve --------------------------------------------------------------------------------------------


def tensor_binding(name: str, onnx_path: str, batch: int, options: ServeOptions) -> Binding:
    inputs, outputs, _ = onnx_signature(onnx_path)
    # every first dimension the batch; a symbolic batch must be symbolic everywhere (a KV cache [layers, batch, ...]
    # of as many layers as the exported batch has rows is not batch-first)
    lead = inputs[0].dims[0] if inputs and inputs[0].dims else None
    batch_first = lead in (batch, -1) and all(t.dims and t.dims[0] == lead for t in inputs + outputs)
    if batch_first:
        inputs = [TensorSpec(t.name, t.dtype, t.dims[1:]) for t in inputs]
        outputs = [TensorSpec(t.name, t.dtype, t.dims[1:]) for t in outputs]
    return Binding(name, inputs, outputs, options.max_batch if batch_first else 0,
                   {"handler": "tensor", "onnx": os.path.abspath(onnx_path), "batched": batch_first,
                    "ranges": integer_input_ranges(onnx_path)})


def vit_bindings(export_dir: str, report: dict[str, Any], options: ServeOptions) -> list[Binding]:
    files, batch = report["files"], int(report["batch"])
    bindings = [tensor_binding(f, os.path.join(export_dir, files[f]), batch, options) for f in FLAVOURS]
    if not options.pipelines:
        return bindings
    outputs = [t.name for t in bindings[0].outputs]
    if outputs != ["logits"]:
        return bindings  # a backbone (DINOv2, ViTModel): features only, served at the tensor level
    labels, preprocess = vit_labels_and_preprocess(report, bindings[0].outputs[0].dims[-1])
    k = min(options.top_k, len(labels))
    for flavour in FLAVOURS:
        bindings.append(Binding(
            f"vit-classify-{flavour}", [TensorSpec("image", "bytes", (1,))],
            [TensorSpec("labels", "bytes", (k,)), TensorSpec("scores", "float32", (k,)),
             TensorSpec("class_ids", "int64", (k,))],
            options.max_batch,
            {"handler": "vit-classify", "onnx": os.path.abspath(os.path.join(export_dir, files[flavour])),
             "labels": labels, "top_k": k, "preprocess": preprocess}))
    return bindings


def vit_labels_and_preprocess(report: dict[str, Any], num_classes: int) -> tuple[list[str], dict[str, Any]]:
    """Class names and the image preprocessing of the exported checkpoint (ViT's 0.5/0.5 for random: presets)."""
    from turbo_export.families import get_family
    from turbo_export.models.presets import RANDOM_PREFIX

    source = report["model"]
    id2label: dict[int, str] = {}
    try:
        import transformers

        if source.startswith(RANDOM_PREFIX):
            id2label = get_family(report["family"]).preset_config(source[len(RANDOM_PREFIX):]).id2label
        elif os.path.isdir(os.path.expanduser(source)):
            id2label = transformers.AutoConfig.from_pretrained(os.path.expanduser(source)).id2label
    except Exception:  # labels are a convenience: fall back to class indices
        id2label = {}
    labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_classes)]
    return labels, image_preprocess(report)


def image_preprocess(report: dict[str, Any]) -> dict[str, Any]:
    """The exported checkpoint's image normalisation: its image processor's from a local folder, else [-1, 1]
    (0.5 / 0.5, bilinear: what validate feeds random: presets)."""
    preprocess = {"size": int(report["image_size"]), "mean": [0.5] * 3, "std": [0.5] * 3, "resample": 2}
    path = os.path.expanduser(str(report["model"]))
    if os.path.isdir(path):
        with contextlib.suppress(Exception):
            import transformers

            proc = transformers.AutoImageProcessor.from_pretrained(path)
            preprocess.update(mean=list(proc.image_mean), std=list(proc.image_std),
                              resample=int(getattr(proc, "resample", 2)))
    return preprocess


def blip_tensor_bindings(export_dir: str, report: dict[str, Any], options: ServeOptions) -> list[Binding]:
    """Every graph of a BLIP / BLIP-2 export at the tensor level, the image graphs as ``turbo`` and ``baseline``."""
    batch = int(report["batch"])
    return [tensor_binding(key[:-len("_vision")] if key.endswith("_vision") else key,
                           os.path.join(export_dir, filename), batch, options)
            for key, filename in report["files"].items()]


def blip_bindings(export_dir: str, report: dict[str, Any], options: ServeOptions, work_dir: str) -> list[Binding]:
    task = report["task"]
    bindings = blip_tensor_bindings(export_dir, report, options)
    if not options.pipelines or task["name"] not in ("caption", "vqa"):
        return bindings
    tokenizer_dir, preprocess, token_ids = blip_processor_files(report, work_dir)
    common = {"handler": "blip", "export_dir": os.path.abspath(export_dir), "task": task["name"],
              "tokenizer_dir": tokenizer_dir, "preprocess": preprocess, "token_ids": token_ids,
              "max_new_tokens": int(task.get("max_new_tokens", 20)), "num_beams": int(task.get("num_beams", 1)),
              "size_aware": bool(task.get("size_aware_cross_attention")), "text_len": int(task.get("text_len", 0))}
    for flavour in FLAVOURS:
        if task["name"] == "caption":
            bindings.append(Binding(f"blip-caption-{flavour}", [TensorSpec("image", "bytes", (1,))],
                                    [TensorSpec("text", "bytes", (1,))], options.max_batch,
                                    {**common, "flavour": flavour}))
        else:
            bindings.append(Binding(f"blip-vqa-{flavour}", [TensorSpec("image", "bytes", (1,)),
                                                            TensorSpec("question", "bytes", (1,))],
                                    [TensorSpec("answer", "bytes", (1,))], options.max_batch,
                                    {**common, "flavour": flavour}))
    return bindings


def blip_processor_files(report: dict[str, Any], work_dir: str) -> tuple[str, dict[str, Any], dict[str, int]]:
    """Save the checkpoint's tokenizer for the stub; the image preprocessing and token ids as JSON."""
    from turbo_export.families import get_family
    from turbo_export.models.presets import RANDOM_PREFIX

    source = report["model"]
    if source.startswith(RANDOM_PREFIX):
        from turbo_export.models.tokenizer import offline_blip_processor

        text = get_family(report["family"]).preset_config(source[len(RANDOM_PREFIX):]).text_config
        processor = offline_blip_processor(text.vocab_size, text.bos_token_id, int(report["image_size"]))
    else:
        from transformers import AutoConfig, AutoProcessor

        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise TurboExportError(f"report.json: the BLIP model '{source}' is not a local folder here; serving "
                                   "needs its tokenizer and image processor")
        text = AutoConfig.from_pretrained(path).text_config
        processor = AutoProcessor.from_pretrained(path)
    tokenizer_dir = os.path.join(work_dir, "tokenizer")
    processor.tokenizer.save_pretrained(tokenizer_dir)
    image_proc = processor.image_processor
    preprocess = {"size": int(report["image_size"]), "mean": list(image_proc.image_mean),
                  "std": list(image_proc.image_std), "resample": int(getattr(image_proc, "resample", 3))}
    token_ids = {"bos": int(text.bos_token_id), "eos": int(text.sep_token_id), "pad": int(text.pad_token_id)}
    return tokenizer_dir, preprocess, token_ids


def vl_llm_bindings(export_dir: str, report: dict[str, Any], options: ServeOptions, work_dir: str) -> list[Binding]:
    """BLIP-2 (kind "vision-language-llm"): every graph at the tensor level, and per flavour
    ``blip2-caption-<flavour>`` (image bytes -> caption text) or ``blip2-retrieval-<flavour>`` (image bytes + text ->
    ITM match probability and ITC score, the best query's cosine)."""
    from dataclasses import asdict

    from turbo_export.families import get_family

    task = report["task"]
    bindings = blip_tensor_bindings(export_dir, report, options)
    if not options.pipelines:
        return bindings
    processing = get_family(report["family"]).processing(str(report["model"]), task["name"])
    if hasattr(processing.tokenizer, "to_json"):  # a random: preset's offline tokenizer
        tokenizer: dict[str, Any] = {"offline": processing.tokenizer.to_json()}
    else:
        tokenizer = {"dir": os.path.join(work_dir, "tokenizer")}
        processing.tokenizer.save_pretrained(tokenizer["dir"])
    common = {"handler": "blip2", "export_dir": os.path.abspath(export_dir), "files": report["files"],
              "task": task["name"], "tokenizer": tokenizer, "preprocess": image_preprocess(report),
              "token_ids": asdict(processing.ids), "image_token": processing.image_token,
              "queries": processing.queries, "max_new_tokens": int(task.get("max_new_tokens", 20)),
              "text_len": int(task.get("text_len", 0))}
    for flavour in FLAVOURS:
        if task["name"] == "caption":
            bindings.append(Binding(f"blip2-caption-{flavour}", [TensorSpec("image", "bytes", (1,))],
                                    [TensorSpec("text", "bytes", (1,))], options.max_batch,
                                    {**common, "flavour": flavour}))
        else:
            scores = [TensorSpec("itm_score", "float32", (1,)), TensorSpec("itc_score", "float32", (1,))]
            bindings.append(Binding(f"blip2-retrieval-{flavour}", [TensorSpec("image", "bytes", (1,)),
                                                                   TensorSpec("text", "bytes", (1,))],
                                    scores, options.max_batch, {**common, "flavour": flavour}))
    return bindings


SD_MAX_STEPS = 100
SD_DEFAULT_STEPS = 25
SD_DEFAULT_GUIDANCE = 7.5


def unbatched_tensor_binding(name: str, onnx_path: str) -> Binding:
    """A graph served with its full shapes (max_batch_size 0): its first dimension is not a request batch."""
    inputs, outputs, _ = onnx_signature(onnx_path)
    return Binding(name, inputs, outputs, 0,
                   {"handler": "tensor", "onnx": os.path.abspath(onnx_path), "batched": False,
                    "ranges": integer_input_ranges(onnx_path)})


def sd_bindings(export_dir: str, report: dict[str, Any], options: ServeOptions, work_dir: str) -> list[Binding]:
    """The SD UNets (``turbo``, ``baseline``; their batch 2B holds classifier-free guidance pairs, so they are not
    batched across requests) and ``sd-generate-<flavour>``: prompt + seed (+ steps, guidance) -> PNG bytes."""
    files = report["files"]
    bindings = [unbatched_tensor_binding(f, os.path.join(export_dir, files[f])) for f in FLAVOURS]
    if not options.pipelines:
        return bindings
    source = str(report["model"])
    if importlib.util.find_spec("diffusers") is None:
        raise TurboExportError("serving sd-generate needs diffusers (a dependency of turbo-export): "
                               "pip install 'diffusers>=0.30', or pass --no-pipelines for the UNets alone")
    from turbo_export.families import get_family
    from turbo_export.models.presets import RANDOM_PREFIX

    if source.startswith(RANDOM_PREFIX):
        get_family(report["family"]).preset_config(source[len(RANDOM_PREFIX):])  # an unknown preset: one line
    elif not os.path.isdir(os.path.expanduser(source)):
        raise TurboExportError(f"report.json: the SD model '{source}' is not a local folder here; serving "
                               "sd-generate needs its text encoder, tokenizer, VAE and scheduler")
    common = {"handler": "sd-generate", "model": source, "text_len": int(report.get("text_len", 77)),
              "max_steps": SD_MAX_STEPS, "default_steps": SD_DEFAULT_STEPS,
              "default_guidance": SD_DEFAULT_GUIDANCE}
    for flavour in FLAVOURS:
        bindings.append(Binding(
            f"sd-generate-{flavour}",
            [TensorSpec("prompt", "bytes", (1,)), TensorSpec("seed", "int64", (1,)),
             TensorSpec("steps", "int32", (1,), optional=True), TensorSpec("guidance", "float32", (1,), optional=True)],
            [TensorSpec("image", "bytes", (1,))], options.max_batch,
            {**common, "onnx": os.path.abspath(os.path.join(export_dir, files[flavour]))}))
    return bindings


def image_text_bindings(export_dir: str, report: dict[str, Any], options: ServeOptions,
                        work_dir: str) -> list[Binding]:
    """CLIP / SigLIP zero-shot (``turbo-export clip``): the image towers (``turbo``, ``baseline``) and the text tower
    (``text``) at the tensor level; ``clip-classify-<flavour>`` (image bytes, optional ``candidate_labels`` -> top-k labels,
    probabilities, label ids), ``clip-image-<flavour>`` (image bytes -> image embedding) and ``clip-text`` (texts
    -> text embeddings, tokenized as the export tokenized its label prompts)."""
    files, batch, zero_shot = report["files"], int(report["batch"]), report["zero_shot"]
    bindings = [tensor_binding(name, os.path.join(export_dir, files[name]), batch, options)
                for name in (*FLAVOURS, "text")]
    if not options.pipelines:
        return bindings
    output = zero_shot["image_output"]
    embed_dim = next(t.dims[-1] for t in bindings[0].outputs if t.name == output)
    text_dim = next(t.dims[-1] for t in bindings[2].outputs if t.name == "text_embeds")
    common = {"handler": "zero-shot", "text_onnx": os.path.abspath(os.path.join(export_dir, files["text"])),
              "tokenizer": zero_shot_tokenizer(report, work_dir), "length": len(zero_shot["input_ids"][0]),
              "mask": "attention_mask" in zero_shot, "template": zero_shot["template"]}
    bindings.append(Binding("clip-text", [TensorSpec("text", "bytes", (1,))],
                            [TensorSpec("text_embeds", "float32", (text_dim,))], options.max_batch,
                            {**common, "mode": "text"}))
    scale = {k: zero_shot[k] for k in ("logit_scale", "logit_bias") if k in zero_shot} or logit_scale_of(report)
    for flavour in FLAVOURS:
        image = {**common, "onnx": os.path.abspath(os.path.join(export_dir, files[flavour])), "image_output": output,
                 "preprocess": image_preprocess(report)}
        bindings.append(Binding(
            f"clip-classify-{flavour}",
            [TensorSpec("image", "bytes", (1,)), TensorSpec("candidate_labels", "bytes", (-1,), optional=True)],
            [TensorSpec("labels", "bytes", (-1,)), TensorSpec("scores", "float32", (-1,)),
             TensorSpec("class_ids", "int64", (-1,))],
            options.max_batch,
            {**image, "mode": "classify", "labels": zero_shot["labels"], "input_ids": zero_shot["input_ids"],
             "attention_mask": zero_shot.get("attention_mask"), "top_k": options.top_k,
             "logit_scale": float(scale["logit_scale"]), "logit_bias": scale.get("logit_bias")}))
        bindings.append(Binding(f"clip-image-{flavour}", [TensorSpec("image", "bytes", (1,))],
                                [TensorSpec(output, "float32", (embed_dim,))], options.max_batch,
                                {**image, "mode": "image"}))
    return bindings


def zero_shot_tokenizer(report: dict[str, Any], work_dir: str) -> dict[str, Any]:
    """How the stub tokenizes texts as the export did: the offline hashed words of a ``random:`` preset (its text
    config's ids), or the checkpoint's tokenizer, saved to ``work_dir``."""
    from turbo_export.families import get_family
    from turbo_export.models.presets import RANDOM_PREFIX

    source = str(report["model"])
    if source.startswith(RANDOM_PREFIX):
        text = get_family(report["family"]).preset_config(source[len(RANDOM_PREFIX):]).text_config
        return {"offline": {k: getattr(text, k) for k in ("max_position_embeddings", "vocab_size", "bos_token_id",
                                                          "eos_token_id", "pad_token_id")}}
    path = os.path.expanduser(source)
    if not os.path.isdir(path):
        raise TurboExportError(f"report.json: the model '{source}' is not a local folder here; serving the zero-shot "
                               "pipelines needs its tokenizer (or pass --no-pipelines for the graphs alone)")
    from transformers import AutoTokenizer

    folder = os.path.join(work_dir, "tokenizer")
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    return {"dir": folder}


def logit_scale_of(report: dict[str, Any]) -> dict[str, float]:
    """An export written before report.json recorded them: the logit scale and bias read from the model."""
    from turbo_export.families import get_family
    from turbo_export.families.clip_zero_shot import logit_scale_and_bias

    try:
        return logit_scale_and_bias(get_family(report["family"]).load(report["model"]).model)
    except TurboExportError:
        raise
    except Exception as exc:
        raise TurboExportError(f"report.json: no zero_shot.logit_scale, and the model '{report['model']}' cannot be "
                               f"loaded to read it ({type(exc).__name__}); re-export, or pass --no-pipelines") from None


# The models served for each kind of family: export folder, its report, options, a scratch folder -> bindings
# (handlers in serve.handlers.HANDLERS). Keyed by the family declaration's ``kind``, never by a family's name.
PIPELINES: dict[str, Callable[..., list[Binding]]] = {
    "image-encoder": lambda export_dir, report, options, work_dir: vit_bindings(export_dir, report, options),
    "vision-language": blip_bindings,
    "vision-language-llm": vl_llm_bindings,
    "text-to-image": sd_bindings,
    "image-text": image_text_bindings,
}

