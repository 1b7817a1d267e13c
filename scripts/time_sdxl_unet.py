"""Time the full-size random:sdxl UNet call in PyTorch (CPU), unaccelerated vs Turbo, in the same process.

Turbo is applied and removed in place on one UNet (remove_turbo is exact), so only one copy of the 2.6 B fp32
weights (10.4 GB) is held. Runs are interleaved (baseline, turbo, baseline, ...) after one warm-up call each.
Peak resident memory: resource.getrusage(RUSAGE_SELF).ru_maxrss.

    python scripts/time_sdxl_unet.py --resolution 1024 --runs 3 --ratio 0.5 --batch 1 --out sdxl_time.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1, help="graph batch (2 = one CFG pair)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first")
    parser.add_argument("--out", default=None, help="JSON, rewritten after every timed run (partial results kept)")
    args = parser.parse_args()

    from turbo_export.families.sd import UNetGraph, example_inputs
    from turbo_export.models.sd_presets import load_sd
    from turbo_export.patch.unet import apply_turbo_unet, remove_turbo_unet, tokens_per_block

    t0 = time.perf_counter()
    components = load_sd("random:sdxl")
    unet = components.unet
    params = sum(p.numel() for p in unet.parameters())
    load_s = time.perf_counter() - t0
    print(f"loaded {params / 1e9:.3f} B params in {load_s:.0f} s, peak RSS {rss_gb():.1f} GB", flush=True)
    latent = args.resolution // 8
    inputs = example_inputs(components, (latent, latent), 1)
    inputs = {k: v[-args.batch:] for k, v in inputs.items()}  # the conditional row(s)
    graph = UNetGraph(unet)
    times: dict[str, list[float]] = {"baseline": [], "turbo": []}

    def call(name: str) -> float:
        if name == "turbo":
            apply_turbo_unet(unet, args.ratio)
        else:
            remove_turbo_unet(unet)
        start = time.perf_counter()
        with torch.no_grad():
            graph(*inputs.values())
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for name in ("baseline", "turbo"):
            print(f"warm-up {name}: {call(name):.1f} s, peak RSS {rss_gb():.1f} GB", flush=True)
    apply_turbo_unet(unet, args.ratio)
    merged = [b for b in tokens_per_block(unet, (latent, latent), args.ratio) if b["merged"]]
    result: dict = {}
    for i in range(args.runs):
        for name in ("baseline", "turbo"):
            times[name].append(call(name))
            print(f"run {i + 1} {name}: {times[name][-1]:.1f} s, peak RSS {rss_gb():.1f} GB", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "model": "random:sdxl", "params": params, "resolution": args.resolution, "latent": [latent, latent],
            "graph_batch": args.batch, "ratio": args.ratio, "blocks": "default", "merged_blocks": len(merged),
            "merged_tokens": merged[0]["tokens"] if merged else 0, "threads": torch.get_num_threads(),
            "warmup": args.warmup, "seconds": times, "median_s": med, "speedup": med["baseline"] / med["turbo"],
            "peak_rss_gb": rss_gb(), "load_s": load_s,
        }
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
