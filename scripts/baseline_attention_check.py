"""Is the unaccelerated baseline as fast as it can be? Compare its eager-attention export (what
turbo-export uses, like the Turbo graph) with an SDPA-attention export of the same model, interleaved.

    python scripts/baseline_attention_check.py --preset vit-base-patch16-224 --batch 8

If SDPA were faster, the honest baseline would be the SDPA export, and speedups would have to be
measured against it.
"""

from __future__ import annotations

import os
import tempfile

import click

from turbo_export.backends import bench, make_runner
from turbo_export.export.onnx import export_onnx
from turbo_export.export.parity import check_graph as validate
from turbo_export.export.parity import require_parity
from turbo_export.families import get_family
from turbo_export.families.vit import VitOptions as TurboOptions


@click.command()
@click.option("--preset", default="vit-base-patch16-224", show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--runs", default=20, show_default=True)
def main(preset: str, batch: int, runs: int) -> None:
    spec = get_family("vit")
    options = TurboOptions(ratio=0, batch=batch)
    runners, feeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for attention in ("eager", "sdpa"):
            loaded = get_family("vit").load(f"random:{preset}")
            loaded.model.config._attn_implementation = attention
            graph = spec.graph(attention, loaded.model, loaded, options)
            path = export_onnx(graph, os.path.join(tmp, f"{attention}.onnx"))
            runner = make_runner(path)
            report = validate(graph, path, runner)
            require_parity(report)
            click.echo(f"{attention}: ONNX vs PyTorch max abs diff {report.max_abs_diff:.2e}")
            runners[attention], feeds[attention] = runner, graph.example_inputs
        timings = bench.interleaved(runners, feeds, batch, runs=runs, desc="eager vs sdpa")
    for name, t in timings.items():
        click.echo(f"{name:6} median {t.median_s * 1e3:8.1f} ms  {t.items_per_s:7.2f} images/s")
    click.echo(f"sdpa / eager throughput: {timings['sdpa'].items_per_s / timings['eager'].items_per_s:.3f}")


if __name__ == "__main__":
    main()
