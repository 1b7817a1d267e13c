"""Accuracy parity of Turbo against the unaccelerated model on real inputs, through the exported graphs.

``validate_folder`` dispatches on the kind of report.json's family: image encoders (below), vision-language
exports (``validate_vl``: caption / VQA / retrieval; ``validate_vl_llm``: BLIP-2's caption / retrieval) and
text-to-image exports (``validate_diffusion``).

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

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from turbo_export import metrics
from turbo_export.backends import Runner, make_runner
from turbo_export.backends.batching import run_in_batches
from turbo_export.errors import TurboExportError
from turbo_export.evaluate.common import check_export, read_export, read_family_report, task_of
from turbo_export.families import families, get_family
from turbo_export.models import datasets
from turbo_export.models.presets import LoadedModel

INPUT = "pixel_values"
# The kinds with a validator here; others are refused in one line
VALIDATED_KINDS = ("image-encoder", "vision-language", "vision-language-llm", "image-text", "text-to-image")
PROBE_SEED = 0


# --------------------------------------------------------------------------------------------------
# Batched inference
# --------------------------------------------------------------------------------------------------


def run_dataset(forward: Callable[[np.ndarray], dict[str, np.ndarray]], inputs: np.ndarray, batch: int,
                desc: str = "", progress: bool = True) -> dict[str, np.ndarray]:
    """A static-batch ``forward`` (pixels -> named outputs) over a whole data set, with a progress bar."""
    def bar(chunks):
        return tqdm(chunks, desc=desc, unit="batch", leave=False, disable=not progress, file=sys.stderr)

    return run_in_batches(lambda feed: forward(feed[INPUT]), batch, {INPUT: inputs}, bar)


def onnx_forward(runner: Runner) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    return lambda x: runner.run({INPUT: x})


def torch_forward(module: torch.nn.Module, output_names: list[str]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``module``: the family's graph module (pixel_values -> the tuple of ``output_names``)."""
    def forward(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        return {name: value.float().numpy() for name, value in zip(output_names, out)}
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


def turbo_model(loaded: LoadedModel, report: dict[str, Any]) -> torch.nn.Module:
    """The PyTorch Turbo model with the export's settings (for the reference run)."""
    family = get_family(report["family"])
    options = family.options_type(ratio=report["r_schedule"], alpha=report["alpha"], min_tokens=report["min_tokens"],
                                  prop_attn=report["prop_attn"], batch=report["batch"], image_size=report["image_size"])
    from turbo_export.patch import copy_for_patching

    return family.make_turbo(copy_for_patching(loaded.model), options)


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
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Parity of an export folder's turbo.onnx against its baseline.onnx on ``source`` (see module doc).

    ``loaded`` / ``baseline_outputs`` let a sweep reuse the model and the unaccelerated outputs across folders;
    ``report``: the folder's report.json already read (and checked) by ``read_export``.
    """
    report = report if report is not None else read_export(folder, ("image-encoder",))
    family = get_family(report["family"])
    images = datasets.load_images(source, limit)
    if loaded is None:
        loaded = family.load(model or report["model"])
    image_size, batch = int(report["image_size"]), int(report["batch"])
    pixels = datasets.model_inputs(loaded, images, image_size)
    if pixels.shape[1:] != (loaded.num_channels, image_size, image_size):
        raise TurboExportError(f"data: images became {pixels.shape[1:]}, the export expects "
                               f"{(loaded.num_channels, image_size, image_size)}")

    runners = {name: make_runner(os.path.join(folder, report["files"][name]), backend)
               for name in ("baseline", "turbo")}
    base = baseline_outputs if baseline_outputs is not None else run_dataset(
        onnx_forward(runners["baseline"]), pixels, batch, "baseline.onnx", progress)
    turbo = run_dataset(onnx_forward(runners["turbo"]), pixels, batch, "turbo.onnx", progress)
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
    precision = report.get("precision", "fp32")
    result["precision"] = precision
    torch_turbo = None
    if torch_reference:
        module = family.graph_module(turbo_model(loaded, report), loaded, image_size)
        torch_turbo = run_dataset(torch_forward(module, family.output_names(loaded)), pixels, batch,
                                  "turbo (PyTorch)", progress)
        result["pytorch"] = parity(base, torch_turbo, images.labels)
        atol = float((report.get("parity") or {}).get("atol", 1e-4))
        result["onnx_vs_pytorch"] = torch_check(turbo, torch_turbo, atol if precision == "fp32" else float("inf"))
    fp32_file = (report.get("files_fp32") or {}).get("baseline")
    if precision != "fp32" and fp32_file:
        result["precision_vs_fp32"] = precision_parity(
            os.path.join(folder, fp32_file), pixels, batch, backend, progress, base, turbo, torch_turbo, images)
    result["_baseline_outputs"] = base
    return result


def precision_parity(fp32_path: str, pixels: np.ndarray, batch: int, backend: str, progress: bool,
                     base: dict[str, np.ndarray], turbo: dict[str, np.ndarray],
                     torch_turbo: dict[str, np.ndarray] | None, images: Any) -> dict[str, Any]:
    """An int8 (or fp16) export against the unaccelerated fp32 graph it came from: the cost of the precision alone,
    and of precision and Turbo together (the fp32 Turbo model is PyTorch's, when the reference run was made)."""
    fp32 = run_dataset(onnx_forward(make_runner(fp32_path, backend)), pixels, batch, os.path.basename(fp32_path),
                       progress)
    out = {"reference": f"{os.path.basename(fp32_path)} (the unaccelerated fp32 graph)",
           "unaccelerated": parity(fp32, base, images.labels), "turbo": parity(fp32, turbo, images.labels)}
    if torch_turbo is not None:
        out["turbo_fp32_pytorch"] = parity(fp32, torch_turbo, images.labels)
    return out


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the private arrays (what goes into JSON)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def top1_change(drop_points: float) -> str:
    """``top1_drop_points`` (baseline - turbo, in points) in words: "0.80 points lower than unaccelerated"."""
    if round(drop_points, 2) == 0:
        return "the same as unaccelerated"
    return f"{abs(drop_points):.2f} points {'lower' if drop_points > 0 else 'higher'} than unaccelerated"


def summary_lines(result: dict[str, Any]) -> list[str]:
    if "family" in result:  # vision-language and text-to-image results say their family
        return family_summary_lines(result)
    p = result["onnx"]
    head = (f"{result['model']}: r={result['ratio']} alpha={result['alpha']:g}, {result['images']} images of "
            f"{result['data']} ({result['backend']}, batch {result['batch']}, {result['flops_ratio']:.2f}x fewer FLOPs)")
    lines = [head]
    if p["kind"] == "classification":
        if "baseline_top1" in p:
            lines.append(f"top-1: baseline {p['baseline_top1']:.4f}, turbo {p['turbo_top1']:.4f} "
                         f"({top1_change(p['top1_drop_points'])})")
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
    if "precision_vs_fp32" in result:
        lines += precision_lines(result["precision"], result["precision_vs_fp32"])
    return lines


def precision_lines(precision: str, cmp: dict[str, Any]) -> list[str]:
    """Each model against the unaccelerated fp32 graph: top-1 (labelled data) or CLS cosine, and agreement."""
    rows = [(f"unaccelerated {precision}", cmp["unaccelerated"]), (f"turbo {precision}", cmp["turbo"])]
    if "turbo_fp32_pytorch" in cmp:
        rows.append(("turbo fp32 (PyTorch)", cmp["turbo_fp32_pytorch"]))
    lines = [f"against {cmp['reference']}:"]
    for label, p in rows:
        if p["kind"] == "classification":
            top1 = (f"top-1 {p['turbo_top1']:.4f} vs {p['baseline_top1']:.4f} ({p['top1_drop_points']:.2f} points "
                    "lower), " if "turbo_top1" in p else "")
            lines.append(f"  {label:22} {top1}agreement {p['agreement']:.4f}")
        else:
            lines.append(f"  {label:22} CLS cosine mean {p['cls_cosine']['mean']:.5f}, min {p['cls_cosine']['min']:.5f}")
    return lines


def validate_folder(folder: str, source: str | None = None, limit: int | None = None, *, model: str | None = None,
                    torch_reference: bool = True, backend: str = "onnxruntime", progress: bool = True,
                    texts: list[str] | None = None, question: str | None = None, prompts: list[str] | None = None,
                    steps: int = 10, seed: int = 0, guidance: float = 7.5, images_dir: str | None = None
                    ) -> dict[str, Any]:
    """Any export folder: dispatch on the kind of its family (and its task), never on the family's name."""
    from turbo_export.evaluate import validate_diffusion, validate_vl
    from turbo_export.files import check_writable_target
    from turbo_export.limits import MAX_IMAGES, check_optional
    from turbo_export.pipelines.sd import check_generation

    check_optional("limit", limit, 1, MAX_IMAGES)
    check_generation(steps, seed, guidance)
    if images_dir is not None:
        check_writable_target(images_dir, "images", folder=True)
    report, family = read_family_report(folder, VALIDATED_KINDS)  # a kind without a validator: one line
    task = task_of(family, report, folder)
    for option, given, fits in (("--texts", texts, "retrieval"), ("--question", question, "vqa"),
                                ("--prompts", prompts, "text-to-image"), ("--images", images_dir, "text-to-image")):
        if given and task != fits:
            kind_names = " / ".join(f.name for f in families() if f.kind == fits)  # a kind: its families' names
            raise TurboExportError(f"{option.lstrip('-')}: {option} is for {kind_names or fits} exports; '{folder}' "
                                   f"is a {task} export")
    if family.kind == "text-to-image" and source is not None:
        raise TurboExportError(f"data: a {family.name} export generates images from prompts; pass --prompts FILE "
                               "(or nothing, for the built-in prompts), not --data")
    if family.kind != "text-to-image" and source is None:
        raise TurboExportError(f"data: --data is required for a {family.name} export (a folder of images or "
                               "builtin:<name>)")
    check_export(folder, report, family)  # the options fit the export: now its fields and graphs, once
    if family.kind == "text-to-image":
        return validate_diffusion.validate_sd(folder, report, prompts, steps, seed, guidance, backend, images_dir,
                                              progress)
    if family.kind == "vision-language":
        return validate_vl.validate_blip(folder, report, source, limit, backend, texts, question, progress)
    if family.kind == "vision-language-llm":
        from turbo_export.evaluate import validate_vl_llm

        return validate_vl_llm.validate_blip2(folder, report, source, limit, backend, texts, progress)
    if family.kind == "image-text":
        from turbo_export.evaluate import validate_zero_shot

        return validate_zero_shot.validate_zero_shot(folder, report, source, limit, backend, progress)
    return validate_export(folder, source, limit, model=model, torch_reference=torch_reference, backend=backend,
                           progress=progress, report=report)




def family_summary_lines(result: dict[str, Any]) -> list[str]:
    """The printed summary of a vision-language, image-text or text-to-image result (image encoders:
    ``summary_lines``)."""
    from turbo_export.evaluate import validate_diffusion, validate_vl, validate_vl_llm, validate_zero_shot

    kind = get_family(result["family"]).kind
    module = {"text-to-image": validate_diffusion, "image-text": validate_zero_shot,
              "vision-language-llm": validate_vl_llm}.get(kind, validate_vl)
    lines = module.summary_lines(result)
    if "note" in result:
        lines.append(f"[{result['note']}]")
    return lines
