"""Measure the Turbo SD UNet on ONNX Runtime CPU: speedup vs FLOPs ratio per (block selection, ratio).

For random:sd-1.5 at 512 px (64x64 latents), batch 2 (one classifier-free-guidance pair), 77 text tokens:
exports the baseline UNet once, then for each (selection, ratio) the Turbo UNet; validates each graph against
PyTorch; times baseline vs Turbo interleaved (holding --lock, if given, only while timing); reports the
FLOPs ratio (FlopCounterMode) and how close each Turbo output is to the baseline output on the same input.
At most the baseline and one Turbo session are open at a time; each Turbo graph is deleted after use.

    python scripts/bench_sd_unet.py --out engines/bench-sd/results.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import gc
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

from turbo_export.backends import bench, make_runner
from turbo_export.export.onnx import export_onnx
from turbo_export.export.parity import torch_outputs
from turbo_export.export.report import environment
from turbo_export.families.base import GraphSpec
from turbo_export.families.sd import OUTPUT_NAMES, UNetGraph, count_flops, example_inputs
from turbo_export.metrics import compare_outputs
from turbo_export.models.sd_presets import build_random_sd
from turbo_export.patch.unet import apply_turbo_unet, merged_blocks


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sd-1.5")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--ratios", default="0.5,0.3,0.6")
    ap.add_argument("--selections", default="default,all")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--work", default="engines/bench-sd")
    ap.add_argument("--out", default="engines/bench-sd/results.json")
    ap.add_argument("--lock", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the configs already in --out and an existing baseline.onnx in --work")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    # Memory (24 GB shared): the PyTorch UNet (3.4 GB), its Turbo copy and the exporter live only while a graph is
    # exported; the two ONNX Runtime sessions only while it is validated and timed. The UNet is rebuilt (same seed)
    # for each configuration.
    comp = build_random_sd(args.preset)
    latent = args.resolution // 8
    inputs = example_inputs(comp, (latent, latent), batch=1)
    feed = {k: v.numpy() for k, v in inputs.items()}
    os.makedirs(args.work, exist_ok=True)
    results = {"preset": args.preset, "resolution": args.resolution, "graph_batch": 2, "alpha": args.alpha,
               "runs": args.runs, "warmup": args.warmup, "environment": environment(), "configs": []}
    done = set()
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        results["configs"] = previous["configs"]
        results["baseline_export_s"] = previous.get("baseline_export_s")
        done = {(c["selection"], c["ratio"]) for c in results["configs"]}

    base_spec = GraphSpec("baseline", UNetGraph(comp.unet), inputs, OUTPUT_NAMES)
    log("PyTorch baseline output ...")
    base_ref = torch_outputs(base_spec, inputs)[0]
    base_flops = count_flops(comp.unet, inputs)
    base_path = os.path.join(args.work, "baseline.onnx")
    if not (args.resume and os.path.exists(base_path + ".data")):
        log("exporting baseline ...")
        t0 = time.perf_counter()
        export_onnx(base_spec, base_path)
        results["baseline_export_s"] = time.perf_counter() - t0
    del base_spec
    base_out = None

    for ratio in [float(r) for r in args.ratios.split(",")]:
        for selection in args.selections.split(","):
            if (selection, ratio) in done:
                continue
            log(f"--- {selection} blocks, ratio {ratio}")
            if comp.unet is None:
                comp = build_random_sd(args.preset)
            turbo = apply_turbo_unet(copy.deepcopy(comp.unet), ratio, alpha=args.alpha, blocks=selection)
            spec = GraphSpec("turbo", UNetGraph(turbo), inputs, OUTPUT_NAMES)
            ref = torch_outputs(spec, inputs)[0]
            flops = count_flops(turbo, inputs)
            blocks = merged_blocks(turbo)
            path = os.path.join(args.work, f"turbo-{selection}-{ratio}.onnx")
            export_s = None
            if not (args.resume and os.path.exists(path + ".data")):
                log("exporting ...")
                t0 = time.perf_counter()
                export_onnx(spec, path)
                export_s = time.perf_counter() - t0
            del spec, turbo
            comp.unet = None
            gc.collect()
            base_runner = make_runner(base_path)
            runner = make_runner(path)
            if base_out is None:
                base_out = base_runner.run(feed)["noise_pred"]
                check = compare_outputs(["noise_pred"], [base_out], [base_ref], 1e-3)[0]
                results["baseline"] = {"flops": base_flops, "onnx_vs_pytorch_max_abs_diff": check.max_abs_diff,
                                       "onnx_vs_pytorch_cosine": check.cosine}
                log(f"baseline: {base_flops / 1e9:.1f} GFLOPs, ONNX vs PyTorch max|diff| {check.max_abs_diff:.2e}")
            out = runner.run(feed)["noise_pred"]
            parity = compare_outputs(["noise_pred"], [out], [ref], 1e-3)[0]
            closeness = compare_outputs(["noise_pred"], [out], [base_out], float("inf"))[0]
            log(f"parity max|diff| {parity.max_abs_diff:.2e}; vs baseline cosine {closeness.cosine:.5f}; "
                f"FLOPs ratio {base_flops / flops:.3f}; waiting for the bench lock ...")
            with contextlib.ExitStack() as stack:
                if args.lock:  # serialise timing with other benchmarks on a shared machine
                    lock = stack.enter_context(open(args.lock, "a"))
                    fcntl.flock(lock, fcntl.LOCK_EX)
                log("timing ...")
                timings = bench.interleaved({"baseline": base_runner, "turbo": runner},
                                            {"baseline": feed, "turbo": feed}, 2, warmup=args.warmup,
                                            runs=args.runs, progress=False)
            speed = bench.speedup(timings)
            entry = {
                "selection": selection, "ratio": ratio, "blocks_merged": len(blocks),
                "flops": flops, "flops_ratio": base_flops / flops,
                "baseline_median_ms": timings["baseline"].median_s * 1e3,
                "turbo_median_ms": timings["turbo"].median_s * 1e3,
                "baseline_ms": [t * 1e3 for t in timings["baseline"].seconds],
                "turbo_ms": [t * 1e3 for t in timings["turbo"].seconds],
                "speedup": speed, "speedup_over_flops_ratio": speed / (base_flops / flops),
                "onnx_vs_pytorch_max_abs_diff": parity.max_abs_diff, "onnx_vs_pytorch_cosine": parity.cosine,
                "turbo_vs_baseline_cosine": closeness.cosine,
                "turbo_vs_baseline_max_abs_diff": closeness.max_abs_diff,
                "turbo_vs_baseline_rel_l2": float(np.linalg.norm(out - base_out) / np.linalg.norm(base_out)),
                "export_s": export_s,
            }
            results["configs"].append(entry)
            log(json.dumps({k: v for k, v in entry.items() if not k.endswith("_ms")}))
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
            del runner, base_runner
            gc.collect()
            os.remove(path)
            if os.path.exists(path + ".data"):
                os.remove(path + ".data")
    shutil.rmtree(args.work, ignore_errors=True)
    log("done")


if __name__ == "__main__":
    main()
