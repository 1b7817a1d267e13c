"""How much ONNX Runtime's buffer reuse across blocks costs a graph: each graph is timed three ways in one rotated,
interleaved run (``bench.interleaved``):

- as exported: each intermediate tensor has a batch name of its own (``export/tensor_symbols.py``);
- shared name: a copy in which every intermediate tensor carries the graph input's one batch name again, as exports
  had before, so ONNX Runtime's allocation planner may hand one block's buffers to the next;
- reuse off: as exported, with ONNX Runtime's memory reuse switched off (``SessionOptions.enable_mem_reuse``), as
  ``OnnxRuntimeRunner`` opens graphs under 1 GB unless given session options.

The first two run with ONNX Runtime's default session options.

Prints the median ms of each and its speed relative to the shared-name copy of the same graph. A graph with no
per-tensor names (a ``--static-batch`` export: its dimensions are numbers) is timed as exported and with reuse off.

    python scripts/buffer_reuse.py b15/baseline_int8.onnx b15/turbo_int8.onnx --batch 8 --runs 12
    python scripts/buffer_reuse.py vitb-static/baseline.onnx vitb-static/turbo.onnx --runs 12
"""

from __future__ import annotations

import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from session_order import random_feed  # noqa: E402

from turbo_export.backends import bench, make_runner  # noqa: E402
from turbo_export.export.tensor_symbols import share_symbols  # noqa: E402
from turbo_export.files import write_json_atomic  # noqa: E402


@click.command()
@click.argument("graphs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", default=8, show_default=True, help="Value of every symbolic dimension of the inputs.")
@click.option("--runs", default=12, show_default=True, help="Timed rounds, spread over the rotated blocks.")
@click.option("--warmup", default=2, show_default=True)
@click.option("--blocks", default=None, type=int, help="Rotated blocks [default: one per session].")
@click.option("--json", "json_path", default=None, help="Write the medians here.")
def main(graphs: tuple[str, ...], batch: int, runs: int, warmup: int, blocks: int | None, json_path: str | None
         ) -> None:
    import onnx
    import onnxruntime as ort

    copies, runners, renamed = [], {}, {}
    try:
        for path in graphs:
            model = onnx.load(path, load_external_data=False)
            renamed[path] = share_symbols(model)
            no_reuse = ort.SessionOptions()
            no_reuse.enable_mem_reuse = False
            base = os.path.basename(path)
            # ONNX Runtime's defaults (the runner would switch reuse off without options of the caller's)
            if renamed[path]:  # a static batch (or an older export) has no names to share: it is its own "before"
                folder, name = os.path.split(os.path.abspath(path))
                copy = os.path.join(folder, f".shared-{os.getpid()}-{name}")  # beside it: external weights resolve
                copies.append(copy)
                onnx.save(model, copy)
                runners[f"{base} shared name"] = make_runner(copy, session_options=ort.SessionOptions())
            runners[f"{base} as exported"] = make_runner(path, session_options=ort.SessionOptions())
            runners[f"{base} reuse off"] = make_runner(path, session_options=no_reuse)
        feed = random_feed(list(runners.values()), batch)
        timings = bench.interleaved(runners, {n: feed for n in runners}, batch, warmup=warmup, runs=runs,
                                    progress=False, blocks=blocks)
    finally:
        for copy in copies:
            if os.path.exists(copy):
                os.remove(copy)
    medians = {label: t.median_s * 1e3 for label, t in timings.items()}
    click.echo(f"batch {batch}, {runs} rounds in {blocks or len(runners)} rotated blocks; median ms (min-max)")
    for path in graphs:
        base = os.path.basename(path)
        ways = [w for w in ("shared name", "as exported", "reuse off") if f"{base} {w}" in timings]
        before = medians[f"{base} {ways[0]}"]
        for way in ways:
            t = timings[f"{base} {way}"]
            click.echo(f"  {base:28s} {way:12s} {t.median_s * 1e3:8.1f} ({min(t.seconds) * 1e3:.0f}-"
                       f"{max(t.seconds) * 1e3:.0f})   {ways[0]} / this {before / medians[f'{base} {way}']:5.3f}x")
    if json_path:
        write_json_atomic(json_path, {"graphs": list(graphs), "batch": batch, "runs": runs, "warmup": warmup,
                                      "renamed_dims": renamed, "median_ms": medians})


if __name__ == "__main__":
    main()
