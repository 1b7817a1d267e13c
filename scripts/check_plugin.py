"""Measure the Turbo plugin pieces that run without a GPU; print one JSON object.

  python scripts/check_plugin.py kernels
      Triton kernels (Triton's CPU interpreter) vs the PyTorch merge (turbo_export.core.merge) on random inputs:
      max abs error of merged tokens / sizes / restored tokens, plan equality; fp32, and fp16 against the
      float32 merge of the same fp16-rounded inputs. Also a non-alternate A/B split and exact ties vs the
      numpy reference (also at 289 / 288 tokens, ties spanning the kernel's tiles). --large adds real widths
      (metric 64, r = 16): ViT-B/16 at 224 px (197 tokens, 768), DINOv2-S/14 (257, 384), ViT-L/14 at 336 px
      (577, 1024); ~10 minutes in the interpreter.
      "sd_cases": the Stable Diffusion UNet's use: 2x2-grid splits (merge.grid_split), all-ones sizes, nothing
      protected, metric = the tokens' own width; kernel vs the PyTorch turbo::merge op (merge.split_matching /
      merge_wavg_split / unmerge_split), fp32 and fp16.
  python scripts/check_plugin.py graph --model random:tiny --ratio 8
      A ViT exported with --merge-impl onnx and plugin: ONNX Runtime outputs of the plugin-node graph (Python
      reference nodes) vs the standard-op graph and vs PyTorch.
  python scripts/check_plugin.py sd-graph --model random:tiny --sd-ratio 0.5 --alpha 2 --blocks all
      The same for the Stable Diffusion UNet (sd-unet --merge-impl onnx / plugin).

Run from the repository root: PYTHONPATH=$PWD python scripts/check_plugin.py kernels
"""

from __future__ import annotations

import os
import sys

if len(sys.argv) > 1 and sys.argv[1] == "kernels":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import argparse  # noqa: E402
import json  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "plugins"))

KERNEL_CASES = [  # (batch, tokens, channels, metric width, r, alpha, protected)
    (2, 21, 24, 8, 6, 6.0, 1),
    (2, 20, 70, 5, 5, 0.0, 2),  # even length, two channel blocks with a ragged tail, ToMe (alpha 0)
    (3, 17, 16, 16, 8, 3.0, 0),  # nothing protected, the largest r
    (2, 257, 24, 6, 40, 6.0, 1),  # 129 / 128 (DINOv2-S/14 at 224 px): many score, rank and merge tiles
    (1, 577, 20, 4, 120, 0.0, 1),  # 289 / 288 (ViT-L/14 at 336 px), ToMe
]
LARGE_CASES = [  # real widths
    (2, 197, 768, 64, 16, 6.0, 1),  # ViT-B/16 at 224 px, first block
    (1, 257, 384, 64, 16, 6.0, 1),  # DINOv2-S/14 at 224 px
    (1, 577, 1024, 64, 16, 6.0, 1),  # ViT-L/14 at 336 px
]
SD_CASES = [  # (batch, grid height, width, destination seed, channels, ratio, alpha)
    (2, 8, 8, None, 40, 0.5, 0.0),  # ToMe for SD: top-left destinations, E = R
    (2, 6, 10, 3, 70, 0.5, 1.5),  # seeded destinations, the cross-attention merge (E = R - alpha I), ragged channels
    (1, 7, 9, 1, 16, 0.7, 0.7),  # odd grid: incomplete border cells are A tokens
]


def _inputs(case, seed):
    import torch

    batch, tokens, channels, dim, r, alpha, protected = case
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, channels, generator=g), torch.rand(batch, tokens, 1, generator=g) * 3 + 0.5,
            torch.randn(batch, tokens, dim, generator=g), torch.rand(batch, tokens, generator=g) * 0.05)


def kernel_errors(cases=KERNEL_CASES) -> dict:
    import numpy as np
    import torch
    from turbo_plugin import kernels, reference

    from turbo_export.core import merge

    out = {"cases": []}
    for i, case in enumerate(cases):
        _, tokens, _, _, r, alpha, protected = case
        a_idx, b_idx = (torch.from_numpy(v) for v in kernels.alternate_split(tokens))
        for dtype in (torch.float32, torch.float16):
            x, size, metric, sem = (t.to(dtype) for t in _inputs(case, seed=i))
            got = kernels.launch_merge(x, size, metric, sem, a_idx, b_idx, r, alpha, protected)
            ref_x, ref_s, plan = merge.turbo_merge(x.float(), size.float(), metric.float(), sem.float(), r, alpha,
                                                   protected)
            restored = kernels.launch_unmerge(got[0], *got[2:], a_idx, b_idx)
            ref_restored = merge.unmerge(plan, ref_x, tokens)
            out["cases"].append({
                "case": list(case), "dtype": str(dtype).replace("torch.", ""),
                "x_max_abs_err": float((got[0].float() - ref_x).abs().max()),
                "size_max_abs_err": float((got[1].float() - ref_s).abs().max()),
                "unmerge_max_abs_err": float((restored.float() - ref_restored).abs().max()),
                "plan_equal": bool(torch.equal(got[2].long(), plan.unm_idx) and torch.equal(got[3].long(), plan.src_idx)
                                   and torch.equal(got[4].long(), plan.dst_idx)),
            })
    # a UNet-like split: B = one fixed token per 2x2 cell of a 4x6 grid, A = the rest; vs the numpy reference
    x, size, metric, sem = _inputs((2, 24, 12, 6, 0, 0, 0), seed=9)
    grid = np.arange(24).reshape(4, 6)
    b_np = grid[::2, 1::2].ravel().astype(np.int32)
    a_np = np.setdiff1d(np.arange(24), b_np).astype(np.int32)
    got = kernels.launch_merge(x, size, metric, sem, torch.from_numpy(a_np), torch.from_numpy(b_np), 7, 0.0, 0)
    ref = reference.turbo_merge(x.numpy(), size.numpy(), metric.numpy(), sem.numpy(), a_np, b_np, 7, 0.0, 0)
    restored = kernels.launch_unmerge(got[0], *got[2:], torch.from_numpy(a_np), torch.from_numpy(b_np))
    ref_restored = reference.turbo_unmerge(ref[0], *ref[2:], a_np, b_np)
    out["custom_split"] = {
        "x_max_abs_err": float(np.abs(got[0].numpy() - ref[0]).max()),
        "plan_equal": all(np.array_equal(g.numpy(), e) for g, e in zip(got[2:], ref[2:])),
        "unmerge_max_abs_err": float(np.abs(restored.numpy() - ref_restored).max()),
    }
    # exact ties in E (duplicated tokens): kernel and reference both take the lower A index first
    x, size, metric, sem = _inputs((1, 13, 8, 4, 0, 0, 0), seed=3)
    metric[:, 2::4] = metric[:, 0:1]
    sem.zero_()
    a_idx, b_idx = kernels.alternate_split(13)
    got = kernels.launch_merge(x, size, metric, sem, torch.from_numpy(a_idx), torch.from_numpy(b_idx), 3, 0.0, 1)
    ref = reference.turbo_merge(x.numpy(), size.numpy(), metric.numpy(), sem.numpy(), a_idx, b_idx, 3, 0.0, 1)
    out["ties"] = {"plan_equal": all(np.array_equal(g.numpy(), e) for g, e in zip(got[2:], ref[2:])),
                   "src": got[3].tolist()}
    # the same at 289 / 288 tokens: ten distinct metric rows repeated, so equal scores span the kernel's B tiles
    # and equal E its rank tiles
    x, size, metric, sem = _inputs((1, 577, 8, 4, 0, 0, 0), seed=4)
    metric[:] = metric[:, torch.arange(577) % 10]
    sem.zero_()
    a_idx, b_idx = kernels.alternate_split(577)
    got = kernels.launch_merge(x, size, metric, sem, torch.from_numpy(a_idx), torch.from_numpy(b_idx), 100, 0.0, 1)
    ref = reference.turbo_merge(x.numpy(), size.numpy(), metric.numpy(), sem.numpy(), a_idx, b_idx, 100, 0.0, 1)
    out["ties_289"] = {"plan_equal": all(np.array_equal(g.numpy(), e) for g, e in zip(got[2:], ref[2:])),
                       "x_max_abs_err": float(np.abs(got[0].numpy() - ref[0]).max()),
                       "distinct_dst": len(set(got[4].flatten().tolist()))}
    out["sd_cases"] = sd_kernel_errors()
    fp32 = [c for c in out["cases"] if c["dtype"] == "float32"]
    fp16 = [c for c in out["cases"] if c["dtype"] == "float16"]
    assert fp32 and fp16
    out["summary"] = {
        "fp32_x_max_abs_err": max(c["x_max_abs_err"] for c in fp32),
        "fp16_x_max_abs_err": max(c["x_max_abs_err"] for c in fp16),
        "fp32_unmerge_max_abs_err": max(c["unmerge_max_abs_err"] for c in fp32),
        "fp16_unmerge_max_abs_err": max(c["unmerge_max_abs_err"] for c in fp16),
        "all_plans_equal": all(c["plan_equal"] for c in out["cases"]),
        "sd_fp32_x_max_abs_err": max(c["x_max_abs_err"] for c in out["sd_cases"] if c["dtype"] == "float32"),
        "sd_fp16_x_max_abs_err": max(c["x_max_abs_err"] for c in out["sd_cases"] if c["dtype"] == "float16"),
        "sd_all_plans_equal": all(c["plan_equal"] for c in out["sd_cases"]),
    }
    return out


def sd_kernel_errors(cases=SD_CASES) -> list:
    """Kernels vs the PyTorch op on the UNet's grid splits (sizes all ones, protected 0, metric = the tokens)."""
    import torch
    from turbo_plugin import kernels

    from turbo_export.core import merge, plugin_ops

    out = []
    for i, (batch, height, width, seed, channels, ratio, alpha) in enumerate(cases):
        split = merge.grid_split(height, width, seed)
        tokens = height * width
        r = merge.grid_r(tokens, ratio, split)
        a_idx, b_idx = split.a_idx.int(), split.b_idx.int()
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(batch, tokens, channels, generator=g)
        metric = torch.randn(batch, tokens, channels, generator=g)
        sem = torch.rand(batch, tokens, generator=g)
        for dtype in (torch.float32, torch.float16):
            xs, ms, ss = (t.to(dtype) for t in (x, metric, sem))
            ones = torch.ones(batch, tokens, 1, dtype=dtype)
            got = kernels.launch_merge(xs, ones, ms, ss, a_idx, b_idx, r, alpha, 0)
            ref = plugin_ops.merge_op(xs.float(), ones.float(), ms.float(), ss.float(), a_idx, b_idx, r, alpha, 0)
            restored = kernels.launch_unmerge(got[0], *got[2:], a_idx, b_idx)
            ref_restored = plugin_ops.unmerge_op(ref[0], *ref[2:], a_idx, b_idx)
            out.append({
                "case": [batch, height, width, seed, channels, ratio, alpha], "r": r,
                "dtype": str(dtype).replace("torch.", ""),
                "x_max_abs_err": float((got[0].float() - ref[0]).abs().max()),
                "size_max_abs_err": float((got[1].float() - ref[1]).abs().max()),
                "unmerge_max_abs_err": float((restored.float() - ref_restored).abs().max()),
                "plan_equal": all(torch.equal(a.long(), b.long()) for a, b in zip(got[2:], ref[2:])),
            })
    return out


def graph_errors(model_source: str, ratio: int, batch: int, out_dir: str, alpha: float = 6.0, seed: int = 7) -> dict:
    import copy

    import numpy as np
    import onnx
    import torch

    from turbo_export.backends import make_runner
    from turbo_export.export.onnx import export_onnx, torch_outputs
    from turbo_export.families import get_family
    from turbo_export.families.vit import VitOptions as TurboOptions

    spec = get_family("vit")
    loaded = spec.load(model_source)
    os.makedirs(out_dir, exist_ok=True)
    outputs, reference, nodes = {}, None, {}
    for impl in ("onnx", "plugin"):
        options = TurboOptions(ratio=ratio, alpha=alpha, batch=batch, merge_impl=impl)
        graph = spec.graph(impl, spec.make_turbo(copy.deepcopy(loaded.model), options), loaded, options)
        g = torch.Generator().manual_seed(seed)
        inputs = {k: torch.randn(v.shape, generator=g) for k, v in graph.example_inputs.items()}
        path = export_onnx(graph, os.path.join(out_dir, f"turbo-{impl}.onnx"))
        runner = make_runner(path, "onnxruntime")
        result = runner.run({k: v.numpy() for k, v in inputs.items()})
        outputs[impl] = [result[n] for n in graph.output_names]
        torch_out = torch_outputs(graph, inputs)
        reference = torch_out if reference is None else reference
        outputs[f"{impl}_torch"] = torch_out
        proto = onnx.load(path, load_external_data=False)
        nodes[impl] = sum(n.op_type == "TurboMerge" for n in proto.graph.node)

    def diff(a, b):
        return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for x, y in zip(a, b))

    return {"model": model_source, "ratio": ratio, "alpha": alpha, "batch": batch,
            "turbo_merge_nodes": nodes,
            "plugin_vs_onnx_max_abs_diff": diff(outputs["plugin"], outputs["onnx"]),
            "plugin_vs_pytorch_max_abs_diff": diff(outputs["plugin"], outputs["plugin_torch"]),
            "onnx_vs_pytorch_max_abs_diff": diff(outputs["onnx"], outputs["onnx_torch"]),
            "pytorch_plugin_vs_onnx_path_max_abs_diff": diff(outputs["plugin_torch"], outputs["onnx_torch"])}


def sd_graph_errors(model_source: str, ratio: float, alpha: float, blocks: str, out_dir: str) -> dict:
    import collections
    import copy

    import numpy as np
    import onnx

    from turbo_export.backends import make_runner
    from turbo_export.export.onnx import export_onnx
    from turbo_export.export.parity import torch_outputs
    from turbo_export.families.base import GraphSpec
    from turbo_export.families.sd import OUTPUT_NAMES, SDOptions, UNetGraph, example_inputs, make_turbo
    from turbo_export.models.sd_presets import load_sd

    components = load_sd(model_source)
    latent = components.resolution // components.vae_scale
    inputs = example_inputs(components, (latent, latent), 1)
    feed = {k: v.numpy() for k, v in inputs.items()}
    os.makedirs(out_dir, exist_ok=True)
    outputs, nodes = {}, {}
    for impl in ("onnx", "plugin"):
        options = SDOptions(ratio=ratio, alpha=alpha, blocks=blocks, merge_impl=impl)
        graph = GraphSpec(impl, UNetGraph(make_turbo(copy.deepcopy(components.unet), options)), inputs, OUTPUT_NAMES)
        path = export_onnx(graph, os.path.join(out_dir, f"sd-turbo-{impl}.onnx"))
        runner = make_runner(path, "onnxruntime")
        outputs[impl] = runner.run(feed)["noise_pred"]
        outputs[f"{impl}_torch"] = torch_outputs(graph, inputs)[0]
        count = collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
        nodes[impl] = {op: count[op] for op in ("TurboMerge", "TurboUnmerge", "TopK", "ScatterElements")}

    def diff(a, b):
        return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())

    return {"model": model_source, "ratio": ratio, "alpha": alpha, "blocks": blocks, "nodes": nodes,
            "plugin_vs_onnx_max_abs_diff": diff(outputs["plugin"], outputs["onnx"]),
            "plugin_vs_pytorch_max_abs_diff": diff(outputs["plugin"], outputs["plugin_torch"]),
            "onnx_vs_pytorch_max_abs_diff": diff(outputs["onnx"], outputs["onnx_torch"]),
            "pytorch_plugin_vs_onnx_path_max_abs_diff": diff(outputs["plugin_torch"], outputs["onnx_torch"]),
            "noise_pred_max_abs": float(np.abs(outputs["onnx_torch"]).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kernels", "graph", "sd-graph"])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--ratio", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=6.0)
    parser.add_argument("--large", action="store_true", help="kernels: also ViT-B/16, DINOv2-S/14, ViT-L/14-336 sizes")
    parser.add_argument("--sd-ratio", type=float, default=0.5, help="sd-graph: fraction of tokens merged")
    parser.add_argument("--blocks", default="all", help="sd-graph: default or all")
    parser.add_argument("--out", default=os.path.join("/tmp", "turbo-check-plugin"))
    args = parser.parse_args()
    if args.what == "kernels":
        result = kernel_errors(KERNEL_CASES + (LARGE_CASES if args.large else []))
    elif args.what == "sd-graph":
        result = sd_graph_errors(args.model, args.sd_ratio, args.alpha, args.blocks, args.out)
    else:
        result = graph_errors(args.model, args.ratio, args.batch, args.out, args.alpha)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
