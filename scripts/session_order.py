"""Does the order in which ONNX Runtime sessions are created change their speed? Times the given graphs three ways:

- one block, the sessions created in the given order;
- one block, created in the reverse order;
- rotated: one block per graph (or ``--blocks``), each re-creating every session in an order rotated by one
  (what ``bench.interleaved`` does for every benchmark).

Each way prints the median ms of every graph and its speed relative to the first graph. Pass one file several
times to time copies of the same graph. Inputs are seeded random floats (integer inputs zero), symbolic dimensions
set to ``--batch`` unless another of the graphs fixes them.

    python scripts/session_order.py vitb/baseline.onnx vitb/turbo.onnx --runs 8
    python scripts/session_order.py vitb/baseline.onnx vitb/baseline.onnx vitb/baseline.onnx --runs 8
"""

from __future__ import annotations

import os
import sys

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from turbo_export.backends import bench, make_runner  # noqa: E402
from turbo_export.files import write_json_atomic  # noqa: E402


def random_feed(runners: list, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One feed for graphs with the same inputs: a dimension is the first fixed size any graph gives it, else
    ``batch``."""
    rng = np.random.default_rng(seed)
    feed = {}
    for info in runners[0].inputs:
        shapes = [i.shape for r in runners for i in r.inputs if i.name == info.name and len(i.shape) == len(info.shape)]
        shape = tuple(next((s[k] for s in shapes if isinstance(s[k], int)), batch) for k in range(len(info.shape)))
        floating = np.issubdtype(info.dtype, np.floating)
        feed[info.name] = rng.standard_normal(shape).astype(info.dtype) if floating else np.zeros(shape, info.dtype)
    return feed


def time_order(paths: list[str], order: list[int], batch: int, runs: int, warmup: int, blocks: int
               ) -> dict[str, float]:
    """Median ms per graph (labelled by its position in ``paths``), sessions first created in ``order``."""
    labels = [f"{i}:{os.path.basename(p)}" for i, p in enumerate(paths)]
    runners = {labels[i]: make_runner(paths[i]) for i in order}
    feed = random_feed([runners[label] for label in labels], batch)
    timings = bench.interleaved(runners, {n: feed for n in runners}, batch, warmup=warmup, runs=runs,
                                progress=False, blocks=blocks)
    return {label: timings[label].median_s * 1e3 for label in labels}


@click.command()
@click.argument("graphs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", default=8, show_default=True, help="Value of every symbolic dimension of the inputs.")
@click.option("--runs", default=8, show_default=True, help="Timed rounds per way.")
@click.option("--warmup", default=2, show_default=True)
@click.option("--blocks", default=None, type=int, help="Blocks of the rotated way [default: one per graph].")
@click.option("--json", "json_path", default=None, help="Write the medians here.")
def main(graphs: tuple[str, ...], batch: int, runs: int, warmup: int, blocks: int | None, json_path: str | None
         ) -> None:
    if len(graphs) < 2:
        raise click.BadParameter("give at least two graphs (the same file twice is fine)", param_hint="GRAPHS")
    paths = list(graphs)
    forward = list(range(len(paths)))
    ways = {"given order, one block": (forward, 1), "reverse order, one block": (forward[::-1], 1),
            "rotated blocks": (forward, blocks or len(paths))}
    results = {}
    for way, (order, count) in ways.items():
        medians = time_order(paths, order, batch, runs, warmup, count)
        results[way] = medians
        first = next(iter(medians.values()))
        click.echo(f"{way} ({count} block{'s' if count > 1 else ''}, {runs} rounds):")
        for label, ms in medians.items():
            click.echo(f"  {label:40s} {ms:9.2f} ms   first / this {first / ms:5.3f}x")
    if json_path:
        write_json_atomic(json_path, {"graphs": paths, "batch": batch, "runs": runs, "warmup": warmup,
                                      "median_ms": results})


if __name__ == "__main__":
    main()
