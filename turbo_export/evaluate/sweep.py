"""Sweep Turbo over (ratio, alpha): throughput and accuracy parity of every combination, a table and a plot.

For one checkpoint and one data set: the unaccelerated graph is exported once; each (r, alpha) with r > 0 is
exported, checked against its PyTorch module (seeded random inputs and the first real batch; see
``export.onnx.validate``), run on the whole data set in ONNX Runtime, and timed interleaved with the
unaccelerated graph (``bench.interleaved``, warm-up, medians) on a real batch. ``alpha = 0`` is ToMe.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from turbo_export.backends import bench, make_runner
from turbo_export.backends.batching import pad_rows
from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.evaluate.common import load_image_encoder
from turbo_export.evaluate.validate import INPUT, onnx_forward, parity, run_dataset
from turbo_export.export.onnx import export_onnx
from turbo_export.export.parity import check_graph, require_parity
from turbo_export.families import family_for_class
from turbo_export.families.encoders import check_schedule_fits
from turbo_export.files import check_writable_target, write_json_atomic
from turbo_export.limits import (
    MAX_ALPHA,
    MAX_BATCH,
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MAX_MIN_TOKENS,
    MAX_RATIO,
    MAX_RUNS,
    check_optional,
    check_range,
)
from turbo_export.models import datasets
from turbo_export.models.datasets import model_inputs
from turbo_export.models.presets import LoadedModel


@contextlib.contextmanager
def bench_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (shared by everyone who benchmarks on this machine), or nothing."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def accuracy_of(row: dict[str, Any]) -> tuple[float, str]:
    """The figure a sweep plots against throughput, and its name."""
    p = row["parity"]
    if p["kind"] == "classification":
        return (p["turbo_top1"], "top-1") if "turbo_top1" in p else (p["agreement"], "top-1 agreement")
    return p["cls_cosine"]["mean"], "CLS cosine to the unaccelerated model (mean)"


def token_budget(loaded: LoadedModel, options: Any) -> tuple[list[int], int, float]:
    """(tokens entering each block, tokens leaving the last, FLOPs ratio unaccelerated / Turbo)."""
    spec = family_for_class(type(loaded.model).__name__)
    size = spec.image_size(loaded, options)
    tokens = spec.num_tokens(loaded, size)
    layers = merge.tokens_per_layer(tokens, merge.r_schedule(options.ratio, spec.num_layers(loaded)),
                                    spec.protected(loaded), options.min_tokens)
    unmerged = [(tokens, 0)] * len(layers)
    return [n for n, _ in layers], layers[-1][0] - layers[-1][1], spec.flops(loaded, size, unmerged) / spec.flops(loaded, size, layers)


def check_sweep_options(ratios: Sequence[int], alphas: Sequence[float], limit: int | None, batch: int,
                        image_size: int | None, min_tokens: int, runs: int, warmup: int) -> None:
    """Every number of a sweep in its range, before the model is loaded (the ratios are checked against the
    model's tokens after)."""
    if not alphas:
        raise TurboExportError("alphas: give at least one alpha")
    if not ratios:
        raise TurboExportError("ratios: give at least one ratio")
    for r in ratios:
        check_range("ratios", r, 0, MAX_RATIO)
    for alpha in alphas:
        check_range("alphas", alpha, 0.0, MAX_ALPHA, integer=False)
    check_optional("limit", limit, 1, MAX_IMAGES)
    check_range("batch", batch, 1, MAX_BATCH)
    check_optional("image-size", image_size, 1, MAX_IMAGE_SIZE)
    check_range("min-tokens", min_tokens, 0, MAX_MIN_TOKENS)
    check_range("runs", runs, 1, MAX_RUNS)
    check_range("warmup", warmup, 0, MAX_RUNS)


def run_sweep(
    model_source: str,
    ratios: Sequence[int],
    alphas: Sequence[float],
    source: str | Sequence[str],
    limit: int | None = None,
    batch: int = 32,
    image_size: int | None = None,
    min_tokens: int = 0,
    runs: int = 20,
    warmup: int = 3,
    lock: str | None = None,
    timed: bool = True,
    work_dir: str | None = None,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    partial_json: str | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Every (r, alpha) with r > 0 (alpha-major: all ratios of the first alpha come first), plus the
    unaccelerated row. ``partial_json``: rewrite this file after every configuration ("complete": false).
    ``precision="int8"``: every graph is also quantized (dynamic int8, the merge float) after its fp32 parity check;
    accuracies are then against the unaccelerated fp32 graph, with an extra unaccelerated int8 row, and the timing
    compares the int8 graphs."""
    if precision not in ("fp32", "int8"):
        raise TurboExportError(f"precision: sweep takes fp32 or int8, got '{precision}'")
    check_sweep_options(ratios, alphas, limit, batch, image_size, min_tokens, runs, warmup)
    for path, what in ((partial_json, "json"), (work_dir, "work-dir")):
        if path is not None:
            check_writable_target(path, what, folder=what == "work-dir")
    if loaded is None:
        spec, loaded = load_image_encoder(model_source)
    else:
        spec = family_for_class(type(loaded.model).__name__)
    size = spec.image_size(loaded, spec.options_type(ratio=0, image_size=image_size))
    tokens = spec.num_tokens(loaded, size)
    for r in ratios:
        check_schedule_fits([r], tokens, spec.protected(loaded))
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise TurboExportError("data: give at least one data source")
    sets = {src: datasets.load_images(src, limit) for src in sources}
    inputs = {src: model_inputs(loaded, images, size) for src, images in sets.items()}
    images, pixels = sets[sources[0]], inputs[sources[0]]
    real_batch = {INPUT: torch.from_numpy(pad_rows(pixels[:batch], batch))}

    own_dir = work_dir is None
    work = work_dir or tempfile.mkdtemp(prefix="turbo-sweep-")
    os.makedirs(work, exist_ok=True)
    rows: list[dict[str, Any]] = []
    base_runner = None

    def finish(rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        return _summary(model_source, sources, sets, images, batch, size, min_tokens, base_runner, ratios, alphas,
                        rows, complete)

    try:
        base_options = spec.options_type(ratio=0, batch=batch, image_size=size)
        base_graph = spec.graph("baseline", loaded.model, loaded, base_options)
        base_path = export_onnx(base_graph, os.path.join(work, "baseline.onnx"))
        base_runner = make_runner(base_path)
        require_parity(check_graph(base_graph, base_path, base_runner))
        base_out = {src: run_dataset(onnx_forward(base_runner), x, batch, f"baseline.onnx {src}", progress)
                    for src, x in inputs.items()}
        base_row = {"r": 0, "alpha": None, "tokens_per_layer": [tokens] * spec.num_layers(loaded),
                    "final_tokens": tokens, "flops_ratio": 1.0, "bench": None, "precision": "fp32",
                    "parity_by_data": {src: parity(base_out[src], base_out[src], sets[src].labels) for src in sources}}
        rows.append(base_row)
        timed_base = base_runner
        if precision == "int8":
            timed_base = make_runner(_int8(base_path))
            rows.append({**base_row, "precision": "int8", "alpha": None, "parity_by_data": {
                src: parity(base_out[src], run_dataset(onnx_forward(timed_base), x, batch, f"baseline int8 {src}",
                                                       progress), sets[src].labels) for src, x in inputs.items()}})

        combos = [(r, a) for a in alphas for r in ratios if r > 0]
        from turbo_export.patch import copy_for_patching

        for r, alpha in tqdm(combos, desc="sweep", unit="config", disable=not progress, file=sys.stderr):
            options = spec.options_type(ratio=r, alpha=alpha, min_tokens=min_tokens, batch=batch, image_size=size)
            model = spec.make_turbo(copy_for_patching(loaded.model), options)
            graph = spec.graph(f"turbo r={r} alpha={alpha:g}", model, loaded, options)
            path = export_onnx(graph, os.path.join(work, f"turbo-r{r}-a{alpha:g}.onnx"))
            runner = make_runner(path)
            checks = {"random_inputs": check_graph(graph, path, runner), "real_batch": check_graph(graph, path, runner,
                                                                                               real_batch)}
            for report in checks.values():
                require_parity(report)
            if precision == "int8":
                del runner
                runner = make_runner(_int8(path))
            by_data = {src: parity(base_out[src], run_dataset(onnx_forward(runner), x, batch,
                                                                f"r={r} alpha={alpha:g} {src}", progress),
                                   sets[src].labels) for src, x in inputs.items()}
            timings = None
            if timed:
                with bench_lock(lock):
                    feed = {INPUT: real_batch[INPUT]}
                    timings = bench.interleaved({"baseline": timed_base, "turbo": runner},
                                                {"baseline": feed, "turbo": feed}, batch, warmup=warmup, runs=runs,
                                                progress=False)
            layers, final, flops_ratio = token_budget(loaded, options)
            rows.append({
                "r": r, "alpha": alpha, "precision": precision, "tokens_per_layer": layers, "final_tokens": final, "flops_ratio": flops_ratio,
                "export_parity": {k: {"max_abs_diff": v.max_abs_diff, "tie_samples": len(v.tie_samples),
                                      "samples": v.samples} for k, v in checks.items()},
                "parity_by_data": by_data,
                "bench": None if timings is None else {
                    "baseline_ips": timings["baseline"].items_per_s, "turbo_ips": timings["turbo"].items_per_s,
                    "speedup": bench.speedup(timings), "runs": runs, "warmup": warmup},
            })
            del runner
            for leftover in (path, path[:-len(".onnx")] + ".int8.onnx"):
                if os.path.exists(leftover):
                    os.remove(leftover)
            if partial_json:
                write_json_atomic(partial_json, no_arrays(finish(rows, False)))
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    result = finish(rows, True)
    result["precision"] = precision
    return result


def _int8(path: str) -> str:
    """The dynamic int8 graph of an exported fp32 graph, beside it (the merge kept float)."""
    from turbo_export.export.quantize import quantize_graph

    dst = path[:-len(".onnx")] + ".int8.onnx"
    quantize_graph(path, dst, "dynamic")
    return dst


def _summary(model_source, sources, sets, images, batch, size, min_tokens, base_runner, ratios, alphas, rows,
             complete) -> dict[str, Any]:
    rows = sorted(rows, key=lambda row: (row["r"], -1 if row["alpha"] is None else row["alpha"],
                                         row.get("precision") == "int8"))
    for row in rows:
        row["parity"] = row["parity_by_data"][sources[0]]  # the first source is the one plotted
        row["accuracy"], metric = accuracy_of(row)
    return {"complete": complete, "model": model_source, "data": sources[0], "images": len(images), "labelled": images.labels is not None,
            "datasets": [{"data": src, "images": len(sets[src]), "labelled": sets[src].labels is not None}
                         for src in sources],
            "batch": batch, "image_size": size, "min_tokens": min_tokens, "backend": "onnxruntime",
            "providers": getattr(base_runner, "providers", None), "metric": metric, "ratios": list(ratios),
            "alphas": list(alphas), "rows": rows}


def _fmt_alpha(alpha: float | None) -> str:
    return "–" if alpha is None else f"{alpha:g}"


def tables(result: dict[str, Any]) -> str:
    """One markdown table per data source."""
    parts = []
    for entry in result.get("datasets") or [{"data": result["data"], "images": result["images"],
                                             "labelled": result["labelled"]}]:
        parts.append(f"{entry['data']} ({entry['images']} images):\n\n" + table(result, entry["data"]))
    return "\n\n".join(parts)


def table(result: dict[str, Any], source: str | None = None) -> str:
    """A markdown table: one row per configuration (parity on ``source``, default the first data source)."""
    def parity_of(row: dict[str, Any]) -> dict[str, Any]:
        return row["parity_by_data"][source] if source and "parity_by_data" in row else row["parity"]

    first = parity_of(result["rows"][0])
    classification = first["kind"] == "classification"
    labelled = "turbo_top1" in first
    header = ["r", "alpha", "precision", "tokens out", "FLOPs ratio", "speedup (ORT)"]
    if classification:
        header += ["top-1", "agreement"] if labelled else ["agreement"]
    else:
        header += ["CLS cos mean", "CLS cos min"]
        if "linear_probe" in first:
            header += ["probe acc (base feats)", "probe acc (turbo feats)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in result["rows"]:
        p = parity_of(row)
        speed = "–" if row["bench"] is None else f"{row['bench']['speedup']:.2f}x"
        cells = [str(row["r"]), _fmt_alpha(row["alpha"]), row.get("precision", "fp32"), str(row["final_tokens"]),
                 f"{row['flops_ratio']:.2f}x", speed]
        if classification:
            if labelled:
                cells.append(f"{100 * p['turbo_top1']:.2f}%")
            cells.append(f"{100 * p['agreement']:.2f}%")
        else:
            cells += [f"{p['cls_cosine']['mean']:.4f}", f"{p['cls_cosine']['min']:.4f}"]
            if "linear_probe" in p:
                lp = p["linear_probe"]
                cells += [f"{100 * lp['baseline_accuracy']:.2f}%", f"{100 * lp['turbo_accuracy']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str, title: str | None = None) -> str:
    """Throughput (speedup over the unaccelerated graph) against accuracy: one curve per alpha (cf. Figure 4)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TurboExportError("plot: needs matplotlib; pip install matplotlib (or pip install "
                               "'turbo-export[viz]')") from None
    base = result["rows"][0]
    timed = all(row["bench"] is not None for row in result["rows"][1:])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for alpha in result["alphas"]:
        rows = [row for row in result["rows"] if row["alpha"] == alpha]
        xs = [1.0] + [row["bench"]["speedup"] if timed else row["flops_ratio"] for row in rows]
        ys = [base["accuracy"]] + [row["accuracy"] for row in rows]
        label = "ToMe (alpha = 0)" if alpha == 0 else f"Turbo alpha = {alpha:g}"
        style = dict(color="black", linestyle="--", marker="s") if alpha == 0 else dict(marker="o")
        ax.plot(xs, ys, label=label, **style)
        for row, x, y in zip(rows, xs[1:], ys[1:]):
            ax.annotate(f"r{row['r']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.scatter([1.0], [base["accuracy"]], color="red", zorder=5, label="unaccelerated")
    ax.set_xlabel("speedup over the unaccelerated graph (ONNX Runtime CPU, interleaved)" if timed
                  else "FLOPs ratio (unaccelerated / Turbo); not timed")
    ax.set_ylabel(result["metric"])
    ax.set_title(title or f"{os.path.basename(str(result['model']).rstrip('/'))} on {result['data']} "
                          f"({result['images']} images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def no_arrays(result: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (numpy scalars to floats)."""
    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value
    return convert(result)
