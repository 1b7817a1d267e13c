"""Where the time goes in ONNX graphs that take images: ONNX Runtime's profiler, per op type, merge region apart.

    python scripts/profile_graphs.py vitb/baseline.onnx vitb/turbo.onnx [--batch 8] [--runs 5] [--threads 2]

Each graph runs ``--runs`` times after two warm-up runs on seeded random images of its own input shape (any
symbolic dimension but the batch must be fixed in the graph). Printed per graph: the median wall time, the kernel
time per op type (ms per call) and how much of it is Turbo's merge region (``graph_cleanup.merge_nodes``, the nodes
the int8 quantizer keeps float), then per op group (attention, weight MatMuls, element-wise) the ratio of the
first graph's time to each other graph's.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = {
    "attention (QK^T, softmax, PV)": {"FusedMatMul", "MatMul", "Softmax"},
    "weight MatMuls (int8 or float)": {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear",
                                       "MatMulInteger", "Gemm", "FusedGemm"},
    "element-wise and norms": {"Gelu", "LayerNormalization", "SkipLayerNormalization", "Add", "Transpose"},
}


def profile(path: str, batch: int, runs: int, threads: int) -> tuple[float, dict[str, float], dict[str, float]]:
    import onnx
    import onnxruntime as ort

    from turbo_export.export.graph_cleanup import merge_nodes

    region = set(merge_nodes(onnx.load(path, load_external_data=False)).names)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:  # the profile's JSON file goes here, not into the working folder
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        median = _run(session, batch, runs)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    by_op: dict[str, float] = collections.Counter()
    in_region: dict[str, float] = collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op, ms = event["args"]["op_name"], event["dur"] / 1000 / (runs + 2)
        by_op[op] += ms
        if event["name"][: -len("_kernel_time")] in region:
            in_region[op] += ms
    return median, dict(by_op), dict(in_region)


def _run(session: Any, batch: int, runs: int) -> float:
    """Two warm-up runs, then ``runs`` timed ones on seeded images; the median in ms."""
    image = session.get_inputs()[0]
    shape = [batch] + [int(d) for d in image.shape[1:]]
    feed = {image.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(2):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@click.command()
@click.argument("graphs", nargs=-1, required=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--runs", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--top", default=20, show_default=True, help="Op types listed per graph.")
def main(graphs: tuple[str, ...], batch: int, runs: int, threads: int, top: int) -> None:
    results = {path: profile(path, batch, runs, threads) for path in graphs}
    for path, (median, by_op, in_region) in results.items():
        click.echo(f"{path}: median {median:.1f} ms; kernels {sum(by_op.values()):.1f} ms, merge region "
                   f"{sum(in_region.values()):.1f} ms")
        for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
            click.echo(f"  {op:26s} {ms:8.2f}  merge region {in_region.get(op, 0.0):7.2f}")
    first = results[graphs[0]][1]
    for path in graphs[1:]:
        other = results[path][1]
        click.echo(f"{graphs[0]} vs {path}:")
        for group, ops in GROUPS.items():
            a, b = sum(first.get(o, 0.0) for o in ops), sum(other.get(o, 0.0) for o in ops)
            if a and b:
                click.echo(f"  {group:32s} {a:8.1f} -> {b:8.1f} ms  {a / b:5.2f}x")


if __name__ == "__main__":
    main()
