"""Time the full-size random:sdxl UNet call in PyTorch (CPU), unaccelerated vs Turbo, in the same process.

Turbo is applied and removed in place on one UNet (remove_turbo is exact), so only one copy of the 2.6 B fp32
weights (10.4 GB) is held. Runs are interleaved (baseline, turbo per --blocks selection, baseline, ...) after one warm-up call each.
Peak resident memory: resource.getrusage(RUSAGE_SELF).ru_maxrss.

    python scripts/time_sdxl_unet.py --resolution 1024 --runs 3 --ratio 0.5 --blocks default,all --out sdxl_time.json
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
    parser.add_argument("--model", default="random:sdxl", help="an SD / SDXL model (random:tiny-sdxl to try the script)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1, help="graph batch (2 = one CFG pair)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first")
    parser.add_argument("--blocks", default="default", help="comma-separated block selections (default, all), each "
                                                             "timed as its own Turbo side in the same interleaved run")
    parser.add_argument("--out", default=None, help="JSON, rewritten after every timed run (partial results kept)")
    args = parser.parse_args()

    from turbo_export.families.sd import UNetGraph, count_flops, example_inputs
    from turbo_export.models.sd_presets import load_sd
    from turbo_export.patch.unet import apply_turbo_unet, remove_turbo_unet, tokens_per_block

    t0 = time.perf_counter()
    components = load_sd(args.model)
    unet = components.unet
    params = sum(p.numel() for p in unet.parameters())
    load_s = time.perf_counter() - t0
    print(f"loaded {params / 1e9:.3f} B params in {load_s:.0f} s, peak RSS {rss_gb():.1f} GB", flush=True)
    latent = args.resolution // 8
    inputs = example_inputs(components, (latent, latent), 1)
    inputs = {k: v[-args.batch:] for k, v in inputs.items()}  # the conditional row(s)
    graph = UNetGraph(unet)
    selections = args.blocks.split(",")
    sides = ["baseline"] + [f"turbo-{b}" for b in selections]
    times: dict[str, list[float]] = {name: [] for name in sides}

    def call(name: str) -> float:
        remove_turbo_unet(unet)
        if name != "baseline":
            apply_turbo_unet(unet, args.ratio, blocks=name.removeprefix("turbo-"))
        start = time.perf_counter()
        with torch.no_grad():
            graph(*inputs.values())
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for name in sides:
            print(f"warm-up {name}: {call(name):.1f} s, peak RSS {rss_gb():.1f} GB", flush=True)
    merged, flops = {}, {"baseline": count_flops(remove_turbo_unet(unet), inputs)}
    for b in selections:
        remove_turbo_unet(unet)
        apply_turbo_unet(unet, args.ratio, blocks=b)
        merged[b] = [x for x in tokens_per_block(unet, (latent, latent), args.ratio) if x["merged"]]
        flops[f"turbo-{b}"] = count_flops(unet, inputs)
    print("GFLOPs per call: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in flops.items()), flush=True)
    result: dict = {}
    for i in range(args.runs):
        for name in (sides if i % 2 == 0 else sides[::-1]):
            times[name].append(call(name))
            print(f"run {i + 1} {name}: {times[name][-1]:.1f} s, peak RSS {rss_gb():.1f} GB", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "model": args.model, "params": params, "resolution": args.resolution, "latent": [latent, latent],
            "graph_batch": args.batch, "ratio": args.ratio, "blocks": selections,
            "merged_blocks": {b: len(m) for b, m in merged.items()},
            "merged_tokens": {b: sorted({x["tokens"] for x in m}) for b, m in merged.items()},
            "threads": torch.get_num_threads(), "warmup": args.warmup, "seconds": times, "median_s": med,
            "speedup": {b: med["baseline"] / med[f"turbo-{b}"] for b in selections}, "flops": flops,
            "flops_ratio": {b: flops["baseline"] / flops[f"turbo-{b}"] for b in selections},
            "peak_rss_gb": rss_gb(), "load_s": load_s,
        }
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
