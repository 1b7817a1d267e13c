"""The Stable Diffusion UNet family (diffusers ``UNet2DConditionModel``): Turbo merges a fraction of the tokens in
the chosen transformer blocks and restores them after (generation models merge, then unmerge).

Graph inputs (static): sample [2B, 4, H/8, W/8] (classifier-free guidance: B unconditional + B conditional),
timestep float32 [2B], encoder_hidden_states float32 [2B, 77, D]; output noise_pred [2B, 4, H/8, W/8].
One declaration for both UNet layouts: an SDXL UNet (``addition_embed_type="text_time"``, presets and folders in
``models/sdxl_presets.py``) also takes text_embeds [2B, P] and time_ids [2B, 6]. The components say which
conditioning inputs their UNet reads (``conditioning``), so the graph, its example inputs, the FLOPs count and the
generation pipeline follow the layout without a second family (report.json: ``layout``, ``graph_inputs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turbo_export.core.plugin_ops import check_merge_impl
from turbo_export.errors import TurboExportError
from turbo_export.families.base import (
    BenchPlan,
    Defaults,
    ExportPlan,
    Family,
    GraphSpec,
    Log,
    PresetInfo,
    batch_first,
    register,
)
from turbo_export.families.summary import comparison_table
from turbo_export.metrics import compare_outputs
from turbo_export.models.sd_presets import TEXT_LEN, SDComponents, all_presets, load_sd
from turbo_export.patch import copy_for_patching
from turbo_export.patch import unet as unet_patch

INPUT_NAMES = ["sample", "timestep", "encoder_hidden_states"]
OUTPUT_NAMES = ["noise_pred"]
EXAMPLE_PROMPT = "a photograph of an astronaut riding a horse"
EXAMPLE_TIMESTEP = 500.0


class UNetGraph(nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> (noise_pred,): the UNet call the
    pipeline makes per step. SDXL's layout (``addition_embed_type="text_time"``) also takes the pooled text
    embedding and the time ids (its added conditioning); SD 1.x's graph has the first three inputs only."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return (self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0],)


def layout(unet: nn.Module) -> str:
    """"sdxl" for a UNet with SDXL's added conditioning (text_embeds + time_ids), else "sd"."""
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd"


@dataclass
class SDOptions:
    ratio: float
    alpha: float | None = None  # None: the family's default
    blocks: str = "default"
    seed: int | None = None
    resolution: int | None = None
    batch: int = 1
    merge_impl: str = "onnx"  # "plugin": one turbo.TurboMerge / TurboUnmerge node per merge / restore


def check_resolution(resolution: int, components: SDComponents) -> tuple[int, int]:
    """The latent (height, width) for a square ``resolution``; must divide by the VAE's and the UNet's downsampling."""
    factor = components.vae_scale * components.unet_downsample
    if resolution <= 0 or resolution % factor:
        raise TurboExportError(
            f"resolution: {resolution} must be a positive multiple of {factor} (VAE {components.vae_scale}x times "
            f"UNet downsampling {components.unet_downsample}x)"
        )
    latent = resolution // components.vae_scale
    return latent, latent


def largest_sort(turbo_unet: nn.Module, latent_hw: tuple[int, int]) -> int:
    """The largest K of the sorts over A (ONNX TopK) in the merged blocks; 0 when nothing merges."""
    return max((b["tokens"] - (b["height"] // 2) * (b["width"] // 2)
                for b in unet_patch.tokens_per_block(turbo_unet, latent_hw, 1.0) if b["merged"]), default=0)


def check_plugin_grid(turbo_unet: nn.Module, latent_hw: tuple[int, int]) -> None:
    """Before any export: the finest merged level must fit the plugin kernel (one B token per 2x2 cell)."""
    from turbo_export.core.plugin_ops import check_plugin_sizes

    b = max((b for b in unet_patch.tokens_per_block(turbo_unet, latent_hw, 1.0) if b["merged"]),
            key=lambda b: b["tokens"], default=None)
    if b is not None:
        cells = (b["height"] // 2) * (b["width"] // 2)
        check_plugin_sizes(b["tokens"] - cells, cells, (b["tokens"],))


def check_backend_sort_limit(turbo_unet: nn.Module, latent_hw: tuple[int, int], backend: str) -> None:
    """TensorRT's TopK needs K < 3840: the sort over A in the finest merged level must fit."""
    from turbo_export.core.merge import TENSORRT_TOPK_LIMIT

    k = largest_sort(turbo_unet, latent_hw)
    if backend == "tensorrt" and k >= TENSORRT_TOPK_LIMIT:
        raise TurboExportError(f"resolution: the merge sorts {k} tokens, above TensorRT's TopK limit "
                               f"(K < {TENSORRT_TOPK_LIMIT}); use a smaller resolution (SD 1.x: up to 512 px) or merge "
                               "coarser blocks")


def example_inputs(components: SDComponents, latent_hw: tuple[int, int], batch: int, seed: int = 0,
                   prompt: str = EXAMPLE_PROMPT) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    channels = int(components.unet.config.in_channels)
    image_hw = tuple(s * components.vae_scale for s in latent_hw)
    return {
        "sample": torch.randn((2 * batch, channels, *latent_hw), generator=generator),
        "timestep": torch.full((2 * batch,), EXAMPLE_TIMESTEP),
        **components.conditioning([""] * batch + [prompt] * batch, image_hw),
    }


def count_flops(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one UNet call by torch's FlopCounterMode, on fake tensors (shapes only, nothing is computed).

    The attention processors are swapped for diffusers' matmul ``AttnProcessor`` while counting (the counter
    does not count SDPA kernels on CPU) and put back after; the Turbo merge's similarity matmul is counted too.
    """
    from diffusers.models.attention_processor import AttnProcessor
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
            UNetGraph(unet)(*inputs.values())
        return int(counter.get_total_flops())
    finally:
        unet.set_attn_processor(saved)


def make_turbo(unet: nn.Module, options: SDOptions) -> nn.Module:
    alpha = SdUnetFamily.defaults.alpha if options.alpha is None else options.alpha
    return unet_patch.apply_turbo_unet(unet, options.ratio, alpha=alpha, blocks=options.blocks,
                                       seed=options.seed, merge_impl=options.merge_impl)



def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def sd_summary_lines(report: dict[str, Any]) -> list[str]:
    rows = [
        ("model", report["model"], ""),
        ("resolution / latents", f"{report['resolution']} px / {report['latent_size'][0]}x{report['latent_size'][1]}",
         ""),
        ("blocks merged", "-", f"{len(report['blocks_merged'])} of {len(report['tokens_per_block'])}"),
        ("GFLOPs / UNet call", f"{report['flops']['baseline'] / 1e9:.1f}", f"{report['flops']['turbo'] / 1e9:.1f}"),
    ]
    if report.get("parity"):
        p, pb = report["parity"], report["parity_baseline"]
        rows.append(("ONNX vs PyTorch max|diff|", f"{pb['max_abs_diff']:.2e}", f"{p['max_abs_diff']:.2e}"))
    if report.get("bench"):
        b = report["bench"]
        rows.append((f"median ms / call (batch {b['batch']})", f"{b['baseline_median_ms']:.1f}",
                     f"{b['turbo_median_ms']:.1f}"))
    tv = report["turbo_vs_baseline"]
    rows.append(("turbo vs baseline output", "", f"cosine {tv['cosine']:.4f}, max|diff| {tv['max_abs_diff']:.3g}"))
    return comparison_table(rows, report, f"turbo (ratio={report['ratio']:g}, alpha={report['alpha']:g}, "
                                      f"blocks={report['blocks']})")


@register
class SdUnetFamily(Family):
    name = "sd-unet"
    command = "turbo-export sd-unet"
    kind = "text-to-image"
    model_classes = ("UNet2DConditionModel",)
    defaults = Defaults(1.0, 0, evidence="alpha 1: ToMe for SD's merge with the semantic value of the cross-attention "
                                         "(measured in docs/stable-diffusion.md)")
    options_type = SDOptions
    bench_warmup = 1

    def presets(self) -> list[PresetInfo]:
        return [PresetInfo(name, "UNet2DConditionModel (sd-unet)", p.description) for name, p in all_presets().items()]

    def preset_config(self, name: str) -> Any:
        if name not in all_presets():
            return super().preset_config(name)
        return all_presets()[name]

    def load(self, source: str, options: Any = None, with_unet: bool = True) -> SDComponents:
        return load_sd(source, with_unet=with_unet)

    def default_out_dir(self, loaded: SDComponents, options: SDOptions) -> str:
        return f"engines/{loaded.name}-sd-r{options.ratio:g}"

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        return sd_summary_lines(report)

    def plan(self, components: SDComponents, options: SDOptions, run: Any, log: Log) -> ExportPlan:
        if options.alpha is None:
            options.alpha = self.defaults.alpha
        check_merge_impl(options.merge_impl)
        unet_patch.check_fraction(options.ratio)
        resolution = options.resolution or components.resolution
        latent_hw = check_resolution(resolution, components)
        baseline = components.unet
        turbo = make_turbo(copy_for_patching(baseline), options)
        if options.merge_impl == "onnx":  # the plugin's kernel ranks by counting: no TopK
            check_backend_sort_limit(turbo, latent_hw, run.backend)
        else:
            check_plugin_grid(turbo, latent_hw)
        inputs = example_inputs(components, latent_hw, options.batch)
        graphs = {name: GraphSpec(name, UNetGraph(model), inputs, OUTPUT_NAMES, atol=run.atol,
                                  batch_axes=batch_first(inputs))
                  for name, model in (("baseline", baseline), ("turbo", turbo))}
        counted = turbo if options.merge_impl == "onnx" else make_turbo(
            copy_for_patching(baseline), dataclasses.replace(options, merge_impl="onnx"))  # same tokens per block
        flops = {"baseline": count_flops(baseline, inputs), "turbo": count_flops(counted, inputs),
                 "counted_by": "torch.utils.flop_counter.FlopCounterMode on the PyTorch UNet (fake tensors), one "
                               "call (batch 2B), matmul attention, merge matching included"
                               + ("" if options.merge_impl == "onnx" else " once per block (counted on the "
                                  "--merge-impl onnx UNet; each TurboMerge node recomputes it)")}

        def after_export(runners: dict[str, Any], log: Log) -> dict[str, Any]:
            outputs = {name: runners[name].run({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
                       for name in graphs}
            closeness = compare_outputs(["noise_pred"], [outputs["turbo"]], [outputs["baseline"]], float("inf"))[0]
            return {"turbo_vs_baseline": {
                "compared": "turbo.onnx vs baseline.onnx noise_pred on the same example input",
                "max_abs_diff": closeness.max_abs_diff, "cosine": closeness.cosine}}

        blocks = unet_patch.tokens_per_block(turbo, latent_hw, options.ratio, options.seed)
        report = {
            "layout": layout(baseline), "graph_inputs": list(inputs),
            "ratio": options.ratio, "alpha": options.alpha, "blocks": options.blocks,
            "destination_seed": options.seed, "merge_impl": options.merge_impl, "resolution": resolution,
            "latent_size": list(latent_hw), "batch": options.batch, "graph_batch": 2 * options.batch,
            "text_len": TEXT_LEN, "blocks_merged": [b["block"] for b in blocks if b["merged"]],
            "sort": {"formulation": "argsort of E over A (ONNX TopK with K = |A|), no re-sort of unmerged tokens"
                     if options.merge_impl == "onnx" else "inside turbo.TurboMerge (rank by counting; unmerged "
                                                          "tokens in A order)",
                     "largest_k": largest_sort(turbo, latent_hw), "tensorrt_topk_limit": "K < 3840"},
            "tokens_per_block": blocks,
        }
        bench = BenchPlan({"baseline": "baseline", "turbo": "turbo"}, {n: inputs for n in graphs}, 2 * options.batch,
                          {"what": "one UNet call (batch 2B: classifier-free guidance pairs)"})
        return ExportPlan(components.source, type(baseline).__name__, graphs, report, flops, bench,
                          parity_what="UNet", merge_impl=options.merge_impl, after_export=after_export,
                          environment={"diffusers": _diffusers_version()})
