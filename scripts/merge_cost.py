"""What Turbo's merge itself costs in an exported ViT graph, and the most its token schedule can give on this runtime.

Exports one model three ways with the same weights:

- unaccelerated;
- Turbo r (``apply_turbo``);
- free merge: the same blocks and token counts per block as Turbo, the merge replaced by keeping each block's
  first N - r tokens (no similarity, no sort, no gathers; proportional attention's bias stays). It is what a merge
  costing nothing would leave, so its speed over the unaccelerated graph is the ceiling of Turbo's token schedule
  here, whatever the merge's implementation.

Each graph is checked against PyTorch, quantized as ``--precision int8`` exports are (``quantize_graph``, dynamic)
unless ``--precision fp32``, and the three are timed in one rotated, interleaved run (``bench.interleaved``).
Prints the median ms of each, the speed of Turbo and of the free merge over the unaccelerated graph, and the
merge's cost: Turbo's median minus the free merge's.

    python scripts/merge_cost.py --model random:vit-base-patch16-224 --ratio 16 --batch 8 --runs 24
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from typing import Any

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_int8 import Logits, log  # noqa: E402

from turbo_export import apply_turbo  # noqa: E402
from turbo_export.backends import bench, make_runner  # noqa: E402
from turbo_export.export.onnx import export_onnx  # noqa: E402
from turbo_export.export.parity import check_graph, require_parity  # noqa: E402
from turbo_export.export.quantize import op_counts, quantize_graph  # noqa: E402
from turbo_export.families import get_family  # noqa: E402
from turbo_export.families.base import GraphSpec  # noqa: E402
from turbo_export.files import write_json_atomic  # noqa: E402
from turbo_export.patch import turbo_settings  # noqa: E402

GRAPHS = ("unaccelerated", "turbo", "free merge")


def keep_first(x: torch.Tensor, size: torch.Tensor, metric: Any, semantic: Any, r: int, alpha: float,
               protected: int = 1) -> tuple[torch.Tensor, torch.Tensor, None]:
    """A ``TurboSettings.merge_fn`` that costs nothing: the first N - r tokens and their sizes, no plan."""
    keep = x.shape[1] - r
    return x[:, :keep], size[:, :keep], None


@click.command()
@click.option("--model", "model_source", default="random:vit-base-patch16-224", show_default=True,
              help="An image classifier the vit family loads (random:<preset>, a folder or a hub id).")
@click.option("--ratio", default=16, show_default=True, type=click.IntRange(1, 512), help="Turbo's r per block.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--precision", default="int8", show_default=True, type=click.Choice(["int8", "fp32"]))
@click.option("--runs", default=24, show_default=True, type=click.IntRange(1, 10_000),
              help="Timed rounds, spread over the rotated blocks.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0, 100))
@click.option("--blocks", default=None, type=click.IntRange(1, 100), help="Rotated blocks [default: 3].")
@click.option("--work", default=None, help="Keep the ONNX files in this folder [default: a temporary one].")
@click.option("--json", "json_path", default=None, help="Write the medians and ratios here.")
def main(model_source: str, ratio: int, batch: int, precision: str, runs: int, warmup: int, blocks: int | None,
         work: str | None, json_path: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = work or tmp
        os.makedirs(folder, exist_ok=True)
        result = measure(model_source, ratio, batch, precision, runs, warmup, blocks, folder)
    medians = result["median_ms"]
    click.echo(f"{model_source}, r={ratio}, batch {batch}, {precision}; {runs} rounds in {result['blocks']} rotated "
               f"blocks; median ms (min-max)")
    for name in GRAPHS:
        low, high = result["range_ms"][name]
        speed = f"   {result['speedup'][name]:.2f}x vs unaccelerated" if name != "unaccelerated" else ""
        click.echo(f"  {name:14s} {medians[name]:8.1f} ({low:.0f}-{high:.0f}){speed}")
    click.echo(f"merge cost: {result['merge_cost_ms']:.1f} ms per call, {100 * result['merge_share']:.1f}% of "
               f"Turbo's time; the free merge's {result['speedup']['free merge']:.2f}x is the most this token "
               "schedule gives here")
    if json_path:
        write_json_atomic(json_path, result)


def measure(model_source: str, ratio: int, batch: int, precision: str, runs: int, warmup: int, blocks: int | None,
            folder: str) -> dict[str, Any]:
    loaded = get_family("vit").load(model_source)
    model = loaded.model.eval()
    turbo = apply_turbo(copy.deepcopy(model), ratio)
    free = apply_turbo(copy.deepcopy(model), ratio)
    turbo_settings(free).merge_fn = keep_first
    size = loaded.image_size
    pixels = {"pixel_values": torch.randn(batch, loaded.num_channels, size, size,
                                          generator=torch.Generator().manual_seed(0))}
    paths, nodes = {}, {}
    for name, module, merge_model in (("unaccelerated", model, None), ("turbo", turbo, turbo),
                                      ("free merge", free, None)):
        path = os.path.join(folder, f"{name.replace(' ', '_')}.onnx")
        graph = GraphSpec(name, Logits(module), pixels, ["logits"], merge_model=merge_model,
                          batch_axes={"pixel_values": 0})
        export_onnx(graph, path, dynamic_batch=True)  # as turbo-export exports by default
        require_parity(check_graph(graph, path, make_runner(path)))
        if precision == "int8":
            quantize_graph(path, path.replace(".onnx", "_int8.onnx"), "dynamic")
            path = path.replace(".onnx", "_int8.onnx")
        log(f"exported, checked{' and quantized' if precision == 'int8' else ''} {name}")
        paths[name], nodes[name] = path, sum(op_counts(path).values())
    runners = {name: make_runner(path) for name, path in paths.items()}
    feed = {"pixel_values": pixels["pixel_values"].numpy()}
    blocks = blocks or len(runners)
    timings = bench.interleaved(runners, {n: feed for n in runners}, batch, warmup=warmup, runs=runs,
                                progress=False, blocks=blocks)
    medians = {name: t.median_s * 1e3 for name, t in timings.items()}
    return {
        "model": model_source, "ratio": ratio, "batch": batch, "precision": precision, "runs": runs,
        "warmup": warmup, "blocks": blocks, "nodes": nodes, "median_ms": medians,
        "range_ms": {name: [min(t.seconds) * 1e3, max(t.seconds) * 1e3] for name, t in timings.items()},
        "block_medians_ms": {name: [s * 1e3 for s in t.block_medians_s] for name, t in timings.items()},
        "speedup": {name: medians["unaccelerated"] / medians[name] for name in GRAPHS[1:]},
        "merge_cost_ms": medians["turbo"] - medians["free merge"],
        "merge_share": (medians["turbo"] - medians["free merge"]) / medians["turbo"],
        "command": "python scripts/merge_cost.py " + " ".join(sys.argv[1:]),
    }


if __name__ == "__main__":
    main()
