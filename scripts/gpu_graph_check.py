"""Where Turbo's PyTorch merge pays off on a GPU: ViT-B/16 (random weights) in fp16, eager / SDPA / Turbo r=16,
each run plainly and replayed as a CUDA graph (no per-kernel launch cost), at batch 64 and 256; interleaved
rounds after warm-up, images/s medians with min / max. Writes one JSON ($OUT/gpu_graph_check.json).

The first GPU check found the eager Turbo model launch-bound (host time per batch = device time); a CUDA graph
replays the same kernels without the host, so the graph rows show what the merge costs on the device itself.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "plugins")]


def build(attn: str) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, num_labels=1000)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return ViTForImageClassification(config).eval()


def graphed(model: torch.nn.Module, x: torch.Tensor):
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            model(pixel_values=static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(pixel_values=static).logits
    return lambda: (graph.replay(), out)[1]


def main() -> None:
    from turbo_export import apply_turbo

    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
    base_eager = build("eager").cuda().half()
    base_sdpa = build("sdpa").cuda().half()
    turbo = apply_turbo(copy.deepcopy(build("eager")), 16).cuda().half()
    models = {"eager": base_eager, "sdpa": base_sdpa, "turbo_r16": turbo}
    for batch in (64, 256):
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half, generator=torch.Generator(
            "cuda").manual_seed(0))
        calls = {}
        for name, model in models.items():
            calls[f"{name}/plain"] = (lambda m=model: m(pixel_values=x).logits)
            try:
                calls[f"{name}/cuda_graph"] = graphed(model, x)
            except Exception as exc:  # a model that cannot be captured: say why, time the rest
                result["runs"][f"{batch}/{name}/cuda_graph"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        times: dict[str, list[float]] = {k: [] for k in calls}
        with torch.no_grad():
            for fn in calls.values():
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            for i in range(7):
                for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(10):
                        calls[name]()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) / 10)
        for name, ms in times.items():
            ips = [batch / (t / 1e3) for t in ms]
            result["runs"][f"{batch}/{name}"] = {"images_per_s": {"median": statistics.median(ips), "min": min(ips),
                                                                  "max": max(ips)},
                                                 "ms_per_batch_median": statistics.median(ms)}
        runs = result["runs"]
        for mode in ("plain", "cuda_graph"):
            t = runs.get(f"{batch}/turbo_r16/{mode}", {}).get("images_per_s", {}).get("median")
            for ref in ("eager", "sdpa"):
                r = runs.get(f"{batch}/{ref}/{mode}", {}).get("images_per_s", {}).get("median")
                if t and r:
                    result.setdefault("speedup", {})[f"batch{batch}/{mode}/turbo_vs_{ref}"] = t / r
    out = os.path.join(os.environ.get("OUT", "."), "gpu_graph_check.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result.get("speedup"), indent=1))


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"done in {time.time() - start:.0f} s")
