"""Accuracy parity of Turbo against the unaccelerated model on real inputs, through the exported graphs.

``validate_folder`` dispatches on report.json's family: ViT (below), BLIP caption / VQA / retrieval and the SD
UNet (``validate_blip``, ``validate_sd``; see their section).

``validate_export`` reads an export folder made by ``turbo-export vit`` (its ``report.json`` says the family, the
checkpoint, the Turbo settings, the static batch and the files), runs ``baseline.onnx`` and ``turbo.onnx`` on a
data set (static batches, the last one zero-padded and its padding dropped: Turbo merges within each image, so
padding cannot change the real rows), optionally runs the PyTorch Turbo model on the same data for reference,
and measures parity:

* a classifier (``logits``): top-1 of both against the labels (when labelled), top-1 agreement between them,
  and the cosine of the logits;
* a backbone (``pooler_output``, CLS after the final norm): CLS cosine, and, when labelled, the accuracy of a
  linear probe trained on the unaccelerated features and evaluated on Turbo's (``linear_probe``).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from turbo_export import files, metrics
from turbo_export.backends import Runner, make_runner
from turbo_export.errors import TurboExportError
from turbo_export.evaluate import datasets
from turbo_export.models.presets import LoadedModel, load_model

INPUT = "pixel_values"
PROBE_SEED = 0


# --------------------------------------------------------------------------------------------------
# Batched inference
# --------------------------------------------------------------------------------------------------


def pad_batch(chunk: np.ndarray, batch: int) -> np.ndarray:
    """Zero-pad ``chunk`` along dim 0 up to the static ``batch``."""
    if len(chunk) == batch:
        return chunk
    return np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])


def run_batched(forward: Callable[[np.ndarray], dict[str, np.ndarray]], inputs: np.ndarray, batch: int,
                desc: str = "", progress: bool = True) -> dict[str, np.ndarray]:
    """Apply a static-batch ``forward`` (array -> named outputs) to ``inputs`` batch by batch."""
    outputs: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(inputs), batch), desc=desc, unit="batch", leave=False, disable=not progress,
                      file=sys.stderr):
        chunk = inputs[start:start + batch]
        for name, value in forward(pad_batch(chunk, batch)).items():
            outputs.setdefault(name, []).append(np.asarray(value)[:len(chunk)])
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def onnx_forward(runner: Runner) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    return lambda x: runner.run({INPUT: x})


def torch_forward(model: torch.nn.Module, output_names: list[str], forward_kwargs: dict[str, Any]
                  ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    def forward(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(x), **forward_kwargs)
        return {name: out[name].float().numpy() for name in output_names}
    return forward


# --------------------------------------------------------------------------------------------------
# Linear probe (softmax regression in torch: no sklearn needed)
# --------------------------------------------------------------------------------------------------


@dataclass
class LinearProbe:
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # [D, K]
    bias: np.ndarray  # [K]
    classes: np.ndarray  # the label value of each column

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (features.astype(np.float64) - self.mean) / self.std
        return self.classes[(z @ self.weight + self.bias).argmax(-1)]


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, weight_decay: float = 1e-3,
                     steps: int = 200) -> LinearProbe:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, float64, deterministic)."""
    classes, targets = np.unique(labels, return_inverse=True)
    mean = features.mean(0, dtype=np.float64)
    std = features.std(0, dtype=np.float64) + 1e-6
    x = torch.from_numpy((features.astype(np.float64) - mean) / std)
    y = torch.from_numpy(targets.astype(np.int64))
    weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + weight_decay * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach().numpy(), bias.detach().numpy(), classes)


def split_indices(count: int, seed: int = PROBE_SEED, train_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/test split of ``count`` items."""
    order = np.random.default_rng(seed).permutation(count)
    cut = int(round(count * train_fraction))
    return np.sort(order[:cut]), np.sort(order[cut:])


def probe_parity(base: np.ndarray, turbo: np.ndarray, labels: np.ndarray, seed: int = PROBE_SEED) -> dict[str, Any]:
    """Probe trained on unaccelerated train features; accuracy on unaccelerated and on Turbo test features."""
    train, test = split_indices(len(labels), seed)
    if len(np.unique(labels[train])) < 2 or len(test) == 0:
        raise TurboExportError("data: a linear probe needs at least two classes in the training half and a "
                               "non-empty test half; use more images (--limit)")
    probe = fit_linear_probe(base[train], labels[train])
    base_pred, turbo_pred = probe.predict(base[test]), probe.predict(turbo[test])
    return {"train": int(len(train)), "test": int(len(test)), "seed": seed,
            "baseline_accuracy": metrics.top1(base_pred, labels[test]),
            "turbo_accuracy": metrics.top1(turbo_pred, labels[test]),
            "agreement": metrics.agreement(turbo_pred, base_pred)}


# --------------------------------------------------------------------------------------------------
# Parity metrics of one configuration
# --------------------------------------------------------------------------------------------------


def classification_parity(base_logits: np.ndarray, turbo_logits: np.ndarray, labels: np.ndarray | None
                          ) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "classification", "images": int(len(base_logits)),
                           "agreement": metrics.agreement(turbo_logits, base_logits),
                           "logits_cosine": metrics.cosine_stats(turbo_logits, base_logits)}
    if labels is not None:
        out["baseline_top1"] = metrics.top1(base_logits, labels)
        out["turbo_top1"] = metrics.top1(turbo_logits, labels)
        out["top1_drop_points"] = 100.0 * (out["baseline_top1"] - out["turbo_top1"])
    return out


def embedding_parity(base: np.ndarray, turbo: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "embedding", "images": int(len(base)),
                           "cls_cosine": metrics.cosine_stats(turbo, base)}
    if labels is not None and len(np.unique(labels)) > 1:
        out["linear_probe"] = probe_parity(base, turbo, labels)
    return out


def parity(outputs_base: dict[str, np.ndarray], outputs_turbo: dict[str, np.ndarray], labels: np.ndarray | None
           ) -> dict[str, Any]:
    if "logits" in outputs_base:
        return classification_parity(outputs_base["logits"], outputs_turbo["logits"], labels)
    if "pooler_output" in outputs_base:
        return embedding_parity(outputs_base["pooler_output"], outputs_turbo["pooler_output"], labels)
    raise TurboExportError(f"validate: no 'logits' or 'pooler_output' among the outputs {sorted(outputs_base)}")


def torch_check(onnx_out: dict[str, np.ndarray], torch_out: dict[str, np.ndarray], atol: float
                ) -> dict[str, Any]:
    """How far ONNX Runtime is from PyTorch on the whole data set (per-image max abs diff, predictions)."""
    name = "logits" if "logits" in onnx_out else "pooler_output"
    diff = np.abs(onnx_out[name].astype(np.float64) - torch_out[name]).reshape(len(onnx_out[name]), -1).max(-1)
    out = {"output": name, "max_abs_diff": float(diff.max()), "images_beyond_atol": int((diff > atol).sum()),
           "images": int(len(diff)), "min_cosine": float(metrics.rowwise_cosine(onnx_out[name], torch_out[name]).min())}
    if name == "logits":
        out["prediction_agreement"] = metrics.agreement(onnx_out[name], torch_out[name])
    return out


# --------------------------------------------------------------------------------------------------
# An export folder
# --------------------------------------------------------------------------------------------------


FAMILIES = {"vit": "turbo-export vit", "blip": "turbo-export blip", "sd-unet": "turbo-export sd-unet"}


def read_report(folder: str, families: tuple[str, ...] = ("vit",)) -> dict[str, Any]:
    """The export folder's report.json, of one of ``families``, with every graph it lists present."""
    report = files.read_report(folder, made_by=" / ".join(FAMILIES[f] for f in families))
    if report.get("family") not in families:
        raise TurboExportError(f"validate: family '{report.get('family')}' is not one validate knows (exports of "
                               + ", ".join(f"'{FAMILIES[f]}'" for f in families) + ")")
    for name in (report.get("files") or {}).values():
        if not os.path.isfile(os.path.join(folder, name)):
            raise TurboExportError(f"validate: {folder} has no {name}")
    return report


def fallback_pixels(images: datasets.ImageSet, channels: int, image_size: int) -> np.ndarray:
    """Resize to ``image_size`` and scale to [-1, 1]: for random: presets, which have no image processor."""
    from PIL import Image

    out = []
    for image in images.images:
        array = datasets.to_channels(image, channels)
        mode = "L" if channels == 1 else "RGB"
        resized = Image.fromarray(array[..., 0] if channels == 1 else array, mode).resize(
            (image_size, image_size), Image.BILINEAR)
        pixels = np.asarray(resized, np.float32).reshape(image_size, image_size, channels) / 127.5 - 1.0
        out.append(pixels.transpose(2, 0, 1))
    return np.stack(out)


def model_inputs(loaded: LoadedModel, images: datasets.ImageSet, image_size: int) -> np.ndarray:
    if loaded.image_processor is None:
        return fallback_pixels(images, loaded.num_channels, image_size)
    override = None if image_size == loaded.image_size else image_size
    return datasets.pixel_values(images, loaded.image_processor, loaded.num_channels, override)


def turbo_model(loaded: LoadedModel, report: dict[str, Any]) -> torch.nn.Module:
    """The PyTorch Turbo model with the export's settings (for the reference run)."""
    from turbo_export.export.specs import SPECS, TurboOptions

    options = TurboOptions(ratio=report["r_schedule"], alpha=report["alpha"], min_tokens=report["min_tokens"],
                           prop_attn=report["prop_attn"], batch=report["batch"], image_size=report["image_size"])
    return SPECS["vit"].make_turbo(copy.deepcopy(loaded.model), options)


def validate_export(
    folder: str,
    source: str,
    limit: int | None = None,
    model: str | None = None,
    torch_reference: bool = True,
    backend: str = "onnxruntime",
    progress: bool = True,
    loaded: LoadedModel | None = None,
    baseline_outputs: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Parity of an export folder's turbo.onnx against its baseline.onnx on ``source`` (see module doc).

    ``loaded`` / ``baseline_outputs`` let a sweep reuse the model and the unaccelerated outputs across folders.
    """
    from turbo_export.export.specs import SPECS

    report = read_report(folder, ("vit",))
    images = datasets.load_images(source, limit)
    if loaded is None:
        loaded = load_model(model or report["model"], "vit", SPECS["vit"].supported())
    image_size, batch = int(report["image_size"]), int(report["batch"])
    pixels = model_inputs(loaded, images, image_size)
    if pixels.shape[1:] != (loaded.num_channels, image_size, image_size):
        raise TurboExportError(f"data: images became {pixels.shape[1:]}, the export expects "
                               f"{(loaded.num_channels, image_size, image_size)}")

    runners = {name: make_runner(os.path.join(folder, report["files"][name]), backend)
               for name in ("baseline", "turbo")}
    base = baseline_outputs if baseline_outputs is not None else run_batched(
        onnx_forward(runners["baseline"]), pixels, batch, "baseline.onnx", progress)
    turbo = run_batched(onnx_forward(runners["turbo"]), pixels, batch, "turbo.onnx", progress)
    result: dict[str, Any] = {
        "export": os.path.abspath(folder), "model": report["model"], "data": source, "images": len(images),
        "labelled": images.labels is not None, "ratio": report["ratio"], "alpha": report["alpha"],
        "min_tokens": report["min_tokens"], "batch": batch, "image_size": image_size, "backend": backend,
        "tokens_per_layer": report["tokens_per_layer"]["turbo"], "flops_ratio": report["flops"]["ratio"],
        "onnx": parity(base, turbo, images.labels),
    }
    # The headline figures (ONNX Runtime) also at the top level of the JSON.
    result.update({k: result["onnx"][k] for k in ("baseline_top1", "turbo_top1", "agreement")
                   if k in result["onnx"]})
    if torch_reference:
        spec = SPECS["vit"]
        names, kwargs = spec.output_names(loaded), spec.forward_kwargs(loaded, image_size)
        torch_turbo = run_batched(torch_forward(turbo_model(loaded, report), names, kwargs), pixels, batch,
                                  "turbo (PyTorch)", progress)
        result["pytorch"] = parity(base, torch_turbo, images.labels)
        result["onnx_vs_pytorch"] = torch_check(turbo, torch_turbo, float((report.get("parity") or {}).get(
            "atol", 1e-4)))
    result["_baseline_outputs"] = base
    return result


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the private arrays (what goes into JSON)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def summary_lines(result: dict[str, Any]) -> list[str]:
    if result.get("family", "vit") != "vit":
        return family_summary_lines(result)
    p = result["onnx"]
    head = (f"{result['model']}: r={result['ratio']} alpha={result['alpha']:g}, {result['images']} images of "
            f"{result['data']} ({result['backend']}, batch {result['batch']}, {result['flops_ratio']:.2f}x fewer FLOPs)")
    lines = [head]
    if p["kind"] == "classification":
        if "baseline_top1" in p:
            lines.append(f"top-1: baseline {p['baseline_top1']:.4f}, turbo {p['turbo_top1']:.4f} "
                         f"(drop {p['top1_drop_points']:+.2f} points)")
        lines.append(f"top-1 agreement turbo vs baseline: {p['agreement']:.4f}; "
                     f"logits cosine mean {p['logits_cosine']['mean']:.5f}, min {p['logits_cosine']['min']:.5f}")
    else:
        c = p["cls_cosine"]
        lines.append(f"CLS cosine turbo vs baseline: mean {c['mean']:.5f}, p05 {c['p05']:.5f}, min {c['min']:.5f}")
        if "linear_probe" in p:
            lp = p["linear_probe"]
            lines.append(f"linear probe (trained on baseline features, {lp['train']} train / {lp['test']} test): "
                         f"baseline {lp['baseline_accuracy']:.4f}, turbo {lp['turbo_accuracy']:.4f}, "
                         f"agreement {lp['agreement']:.4f}")
    if "onnx_vs_pytorch" in result:
        t = result["onnx_vs_pytorch"]
        extra = (f", same prediction {t['prediction_agreement']:.4f}" if "prediction_agreement" in t else "")
        lines.append(f"turbo.onnx vs PyTorch Turbo on this data: max abs diff {t['max_abs_diff']:.2e}, "
                     f"{t['images_beyond_atol']}/{t['images']} images beyond atol{extra}")
    return lines


# --------------------------------------------------------------------------------------------------
# BLIP (caption, VQA, retrieval) and Stable Diffusion export folders
# --------------------------------------------------------------------------------------------------

RANDOM_NOTE = ("random weights (random: presets): these figures only show that the Turbo graphs track the "
               "unaccelerated ones; they are weak evidence of quality on real weights")
DEFAULT_TEXTS = (  # short (at most 5 words), so they fit a small exported --text-len
    "a photo of a person", "a dog on the grass", "a cat on a bed", "a red car", "a plate of food",
    "a city street", "a bird in the sky", "a boat on the water", "people in a field", "a white flower",
)
DEFAULT_QUESTION = "what is in the picture?"
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse", "a red bicycle leaning against a brick wall",
    "a bowl of fruit on a wooden table", "a lighthouse on a cliff at sunset",
)
EXAMPLES = 5  # caption / answer pairs kept in the JSON


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a text file (texts, prompts), or a one-line error."""
    if not os.path.isfile(path):
        raise TurboExportError(f"{what}: '{path}' is not a file (one {what[:-1]} per line)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise TurboExportError(f"{what}: '{path}' has no non-empty line")
    return lines


def weights_note(model: str) -> dict[str, str]:
    return {"note": RANDOM_NOTE} if str(model).startswith("random:") else {}


def load_blip(report: dict[str, Any]) -> LoadedModel:
    """The export's checkpoint with its processor (image processor + tokenizer)."""
    from turbo_export.models.presets import BLIP_TASK_CLASSES, RANDOM_PREFIX, build_random_blip, load_pretrained

    source, task = report["model"], report["task"]["name"]
    if source.startswith(RANDOM_PREFIX):
        loaded = build_random_blip(source[len(RANDOM_PREFIX):], task)
    else:
        loaded = load_pretrained(source, sorted(BLIP_TASK_CLASSES.values()), with_processor="blip")
    if getattr(loaded.image_processor, "tokenizer", None) is None:
        raise TurboExportError(f"model: '{source}' has no BLIP processor (image processor and tokenizer)")
    return loaded


def blip_pixels(loaded: LoadedModel, images: datasets.ImageSet, image_size: int) -> np.ndarray:
    processor = loaded.image_processor
    resize = {} if image_size == loaded.image_size else {"size": {"height": image_size, "width": image_size}}
    arrays = [datasets.to_channels(image, 3) for image in images.images]
    out = [np.asarray(processor(images=arrays[s:s + 256], return_tensors="np", **resize)["pixel_values"], np.float32)
           for s in range(0, len(arrays), 256)]
    pixels = np.concatenate(out)
    if pixels.shape[1:] != (3, image_size, image_size):
        raise TurboExportError(f"data: images became {pixels.shape[1:]}, the export expects "
                               f"{(3, image_size, image_size)}")
    return pixels


def tokenize(tokenizer: Any, texts: list[str], length: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    for text, ids in zip(texts, tokenizer(texts)["input_ids"]):
        if len(ids) > length:
            raise TurboExportError(f"{what}: '{text}' is {len(ids)} tokens, longer than the export's text length "
                                   f"{length} (re-export with a larger --text-len)")
    enc = tokenizer(texts, padding="max_length", max_length=length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def blip_pipelines(folder: str, report: dict[str, Any], loaded: LoadedModel, backend: str) -> tuple[dict, Any]:
    """The baseline and Turbo pipelines over the folder's graphs, as `turbo-export blip` built them."""
    from turbo_export.export.blip import TASKS, BlipOptions
    from turbo_export.pipelines.blip import TokenIds

    task = report["task"]
    options = BlipOptions(task=task["name"], ratio=report["ratio"], out_dir=folder, batch=int(report["batch"]),
                          max_new_tokens=int(task.get("max_new_tokens", 20)), num_beams=int(task.get("num_beams", 1)),
                          text_len=int(task.get("text_len", 32)),
                          size_aware=bool(task.get("size_aware_cross_attention", False)), backend=backend)
    runners = {name: make_runner(os.path.join(folder, path), backend) for name, path in report["files"].items()}
    ids = TokenIds.from_text_config(loaded.model.config.text_config)
    return TASKS[options.task].pipelines(runners, ids, options), options


def generation_parity(tokens: dict[str, list[list[int]]], ids: Any, tokenizer: Any, names: list[str],
                      unit: str) -> dict[str, Any]:
    """Turbo's captions / answers against the unaccelerated ones as references."""
    from turbo_export.export.blip import sequence_agreement, token_agreement

    special = {ids.bos, ids.eos, ids.pad}
    turbo = [metrics.strip_special(t, special) for t in tokens["turbo"]]
    base = [metrics.strip_special(t, special) for t in tokens["baseline"]]
    texts = {n: [tokenizer.decode(r, skip_special_tokens=True) for r in tokens[n]] for n in ("baseline", "turbo")}
    out = {
        "kind": unit, "count": len(base),
        "bleu4": metrics.corpus_bleu(turbo, base),
        "cider_d": metrics.cider_d(turbo, [[b] for b in base]),
        "token_agreement": token_agreement([np.array(t) for t in tokens["turbo"]],
                                           [np.array(t) for t in tokens["baseline"]]),
        "exact_match": sequence_agreement(tokens["turbo"], tokens["baseline"], ids.pad),
        "examples": [{"image": names[i], "baseline": texts["baseline"][i], "turbo": texts["turbo"][i]}
                     for i in range(min(EXAMPLES, len(base)))],
        "references": f"the unaccelerated model's {unit}s (one reference per image)",
    }
    if len({tuple(b) for b in base}) < 2:
        out["cider_d_note"] = (f"every reference {unit} is the same, so every n-gram's idf is 0 and CIDEr-D is 0 "
                               "whatever Turbo says; it needs varied references (real weights, varied images)")
    return out


def validate_blip(folder: str, report: dict[str, Any], source: str, limit: int | None, backend: str,
                  texts: list[str] | None, question: str | None, progress: bool) -> dict[str, Any]:
    from turbo_export.export.blip import _generate_rows

    task = report["task"]["name"]
    images = datasets.load_images(source, limit)
    loaded = load_blip(report)
    image_size, batch = int(report["image_size"]), int(report["batch"])
    pixels = blip_pixels(loaded, images, image_size)
    tokenizer = loaded.image_processor.tokenizer
    pipelines, options = blip_pipelines(folder, report, loaded, backend)
    result: dict[str, Any] = {
        "family": "blip", "task": task, "export": os.path.abspath(folder), "model": report["model"], "data": source,
        "images": len(images), "ratio": report["ratio"], "alpha": report["alpha"],
        "min_tokens": report["min_tokens"], "batch": batch, "image_size": image_size, "backend": backend,
        "tokens_per_layer": report["tokens_per_layer"]["turbo"], "flops_ratio": report["flops"]["ratio"],
    }
    if task in ("caption", "vqa"):
        extra: dict[str, np.ndarray] = {}
        if task == "vqa":
            question = question or DEFAULT_QUESTION
            q_ids, q_mask = tokenize(tokenizer, [question], options.text_len, "question")
            extra = {"input_ids": np.repeat(q_ids, len(pixels), 0), "attention_mask": np.repeat(q_mask, len(pixels), 0)}
            result["question"] = question
        tokens = {}
        for name in tqdm(("baseline", "turbo"), desc=f"{task} pipelines", leave=False, disable=not progress,
                         file=sys.stderr):
            p = pipelines[name]
            fn = (lambda pixel_values, p=p: p.generate(pixel_values, options.max_new_tokens, options.num_beams)) \
                if task == "caption" else (lambda pixel_values, input_ids, attention_mask, p=p: p.generate(
                    pixel_values, input_ids, attention_mask, options.max_new_tokens, options.num_beams))
            tokens[name] = _generate_rows(fn, batch, pixel_values=pixels, **extra)
        result.update(max_new_tokens=options.max_new_tokens, num_beams=options.num_beams)
        result["onnx"] = generation_parity(tokens, pipelines["baseline"].ids, tokenizer, images.names,
                                           "caption" if task == "caption" else "answer")
    else:
        result["texts_source"] = "--texts" if texts else (
            f"built-in list of {len(DEFAULT_TEXTS)} generic texts; pass --texts FILE (one text per line) for your own")
        texts = list(texts or DEFAULT_TEXTS)
        result["texts"] = len(texts)
        result["onnx"] = retrieval_parity(pipelines, pixels, *tokenize(tokenizer, texts, options.text_len, "texts"))
    result.update(weights_note(report["model"]))
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of all entries (1.0 when either side is constant)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        return np.asarray(x).ravel().argsort(kind="stable").argsort(kind="stable").astype(np.float64)

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 1.0


def retrieval_parity(pipelines: dict[str, Any], pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray
                     ) -> dict[str, Any]:
    """ITC similarity of every image with every text, Turbo against unaccelerated (whose top-1 is the answer)."""
    feats, itc = {}, {}
    for name, p in pipelines.items():
        feats[name] = p.encode_images(pixels)
        itc[name] = feats[name]["image_feat"] @ p.encode_texts(ids, mask).T  # [images, texts]
    base, turbo = itc["baseline"], itc["turbo"]
    out: dict[str, Any] = {"kind": "retrieval", "images": int(len(pixels)), "texts": int(len(ids))}
    for k in (1, 5):
        out[f"image_to_text_recall@{k}_agreement"] = metrics.recall_agreement(turbo, base, k)
        out[f"text_to_image_recall@{k}_agreement"] = metrics.recall_agreement(turbo.T, base.T, k)
    out["itc_rank_correlation"] = spearman(turbo, base)
    out["itc_max_abs_diff"] = float(np.abs(turbo - base).max())
    out["image_feat_cosine"] = metrics.cosine_stats(feats["turbo"]["image_feat"], feats["baseline"]["image_feat"])
    out["image_cls_cosine"] = metrics.cosine_stats(feats["turbo"]["image_embeds"][:, 0],
                                                   feats["baseline"]["image_embeds"][:, 0])
    return out


def validate_sd(folder: str, report: dict[str, Any], prompts: list[str] | None, steps: int, seed: int,
                guidance: float, backend: str, images_dir: str | None, progress: bool) -> dict[str, Any]:
    """Both UNets through the same text-to-image pipeline at the same seeds: PSNR/SSIM of latents and images."""
    from turbo_export.models.sd_presets import load_sd
    from turbo_export.pipelines.sd import generate

    if steps < 1:
        raise TurboExportError(f"steps: must be >= 1, got {steps}")
    components = load_sd(report["model"], with_unet=False)
    runners = {name: make_runner(os.path.join(folder, report["files"][name]), backend)
               for name in ("baseline", "turbo")}
    rows, saved = [], []
    for i, prompt in enumerate(prompts or DEFAULT_PROMPTS):
        gens = {name: generate(runner, components, prompt, steps=steps, seed=seed + i, guidance=guidance,
                               progress=progress, desc=f"{name} UNet, prompt {i + 1}")
                for name, runner in runners.items()}
        base, turbo = gens["baseline"], gens["turbo"]
        row: dict[str, Any] = {"prompt": prompt, "seed": seed + i,
                               "latents_psnr_db": metrics.psnr(base.latents, turbo.latents),
                               "images_psnr_db": metrics.psnr(base.images, turbo.images, data_range=255.0),
                               "images_ssim": float(np.mean([metrics.ssim(b, t, data_range=255.0)
                                                             for b, t in zip(base.images, turbo.images)]))}
        try:
            row["latents_ssim"] = float(np.mean([metrics.ssim(b.transpose(1, 2, 0), t.transpose(1, 2, 0))
                                                 for b, t in zip(base.latents, turbo.latents)]))
        except ValueError:
            row["latents_ssim"] = None  # latents smaller than the SSIM window
        rows.append(row)
        if images_dir:
            saved += save_pngs(images_dir, i, base.images, turbo.images)
    mean = {key: (float(np.mean([r[key] for r in rows])) if all(r[key] is not None for r in rows) else None)
            for key in ("latents_psnr_db", "latents_ssim", "images_psnr_db", "images_ssim")}
    result: dict[str, Any] = {
        "family": "sd-unet", "export": os.path.abspath(folder), "model": report["model"], "ratio": report["ratio"],
        "alpha": report["alpha"], "blocks": report.get("blocks"), "resolution": report.get("resolution"),
        "batch": report["batch"], "backend": backend, "flops_ratio": report["flops"]["ratio"], "steps": steps,
        "seed": seed, "guidance": guidance, "prompts": len(rows),
        "prompts_source": "--prompts" if prompts else f"built-in list of {len(DEFAULT_PROMPTS)} prompts",
        "onnx": {"kind": "generation", "per_prompt": rows, "mean": mean,
                 "compared": "Turbo UNet vs unaccelerated UNet, same prompt, seed, scheduler and steps"},
    }
    if saved:
        result["images_written"] = saved
    result.update(weights_note(report["model"]))
    return result


def save_pngs(folder: str, index: int, baseline: np.ndarray, turbo: np.ndarray) -> list[str]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, images in (("baseline", baseline), ("turbo", turbo)):
        path = os.path.join(folder, f"prompt{index:02d}-{name}.png")
        tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}")
        Image.fromarray(np.concatenate(list(images), axis=1)).save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def validate_folder(folder: str, source: str | None = None, limit: int | None = None, *, model: str | None = None,
                    torch_reference: bool = True, backend: str = "onnxruntime", progress: bool = True,
                    texts: list[str] | None = None, question: str | None = None, prompts: list[str] | None = None,
                    steps: int = 10, seed: int = 0, guidance: float = 7.5, images_dir: str | None = None
                    ) -> dict[str, Any]:
    """Any export folder: dispatch on report.json's family (and BLIP task)."""
    report = read_report(folder, tuple(FAMILIES))
    family = report["family"]
    kind = report["task"]["name"] if family == "blip" else family
    for option, given, fits in (("--texts", texts, "retrieval"), ("--question", question, "vqa"),
                                ("--prompts", prompts, "sd-unet"), ("--images", images_dir, "sd-unet")):
        if given and kind != fits:
            raise TurboExportError(f"{option.lstrip('-')}: {option} is for {fits} exports; '{folder}' is a {kind} "
                                   "export")
    if family == "sd-unet":
        if source is not None:
            raise TurboExportError("data: an sd-unet export generates images from prompts; pass --prompts FILE "
                                   "(or nothing, for the built-in prompts), not --data")
        return validate_sd(folder, report, prompts, steps, seed, guidance, backend, images_dir, progress)
    if source is None:
        raise TurboExportError(f"data: --data is required for a {family} export (a folder of images or builtin:<name>)")
    if family == "blip":
        return validate_blip(folder, report, source, limit, backend, texts, question, progress)
    return validate_export(folder, source, limit, model=model, torch_reference=torch_reference, backend=backend,
                           progress=progress)


def family_summary_lines(result: dict[str, Any]) -> list[str]:
    """The printed summary of a BLIP or SD result (ViT: ``summary_lines``)."""
    p = result["onnx"]
    if result["family"] == "sd-unet":
        m = p["mean"]
        lines = [f"{result['model']}: ratio {result['ratio']:g}, alpha {result['alpha']:g}, {result['prompts']} "
                 f"prompts ({result['prompts_source']}), {result['steps']} steps, seeds {result['seed']}.."
                 f"{result['seed'] + result['prompts'] - 1}, guidance {result['guidance']:g} ({result['backend']})"]
        for r in p["per_prompt"]:
            lat = "n/a" if r["latents_ssim"] is None else f"{r['latents_ssim']:.4f}"
            lines.append(f"  '{r['prompt']}': latents PSNR {r['latents_psnr_db']:.2f} dB SSIM {lat}; images PSNR "
                         f"{r['images_psnr_db']:.2f} dB SSIM {r['images_ssim']:.4f}")
        lat = "n/a" if m["latents_ssim"] is None else f"{m['latents_ssim']:.4f}"
        lines.append(f"mean turbo vs baseline: latents PSNR {m['latents_psnr_db']:.2f} dB SSIM {lat}; images PSNR "
                     f"{m['images_psnr_db']:.2f} dB SSIM {m['images_ssim']:.4f}")
    else:
        lines = [f"{result['model']} ({result['task']}): r={result['ratio']} alpha={result['alpha']:g}, "
                 f"{result['images']} images of {result['data']} ({result['backend']}, batch {result['batch']}, "
                 f"{result['flops_ratio']:.2f}x fewer image-encoder FLOPs)"]
        if p["kind"] == "retrieval":
            lines.append(f"{p['texts']} texts: {result['texts_source']}")
            lines.append(f"ITC recall agreement (unaccelerated top-1 as the answer): image->text R@1 "
                         f"{p['image_to_text_recall@1_agreement']:.3f} "
                         f"R@5 {p['image_to_text_recall@5_agreement']:.3f}; "
                         f"text->image R@1 {p['text_to_image_recall@1_agreement']:.3f} "
                         f"R@5 {p['text_to_image_recall@5_agreement']:.3f}")
            lines.append(f"ITC rank correlation {p['itc_rank_correlation']:.4f}; image feature cosine mean "
                         f"{p['image_feat_cosine']['mean']:.5f}, min {p['image_feat_cosine']['min']:.5f}")
        else:
            if "question" in result:
                lines.append(f"question: {result['question']}")
            lines.append(f"{p['kind']}s, Turbo against the unaccelerated ones: BLEU-4 {p['bleu4']:.4f}, CIDEr-D "
                         f"{p['cider_d']:.4f}, token agreement {p['token_agreement']:.4f}, exact match "
                         f"{p['exact_match']:.4f}")
            if "cider_d_note" in p:
                lines.append(f"  (CIDEr-D: {p['cider_d_note']})")
            for e in p["examples"]:
                lines.append(f"  {e['image']}: baseline '{e['baseline']}' | turbo '{e['turbo']}'")
    if "note" in result:
        lines.append(f"[{result['note']}]")
    return lines


__all__ = ["validate_export", "validate_folder", "parity", "probe_parity", "fit_linear_probe", "run_batched", "public",
           "summary_lines"]
