"""Image-encoder speedup of Turbo over the unaccelerated encoder at several r, on ONNX Runtime.

Exports the unaccelerated encoder once and a Turbo encoder per r, checks every graph against PyTorch,
then times them interleaved (baseline and one Turbo graph alternating, after warm-up) and prints a
markdown table with the FLOPs ratio, the measured speedup and their quotient.

    python scripts/bench_encoders.py --model random:vit-base-patch16-224 --ratios 8,16 --batch 8
    python scripts/bench_encoders.py --model random:blip-base --ratios 16,30,40 --batch 4
    python scripts/bench_encoders.py --model random:blip-large --ratios 16,30 --batch 4
"""

from __future__ import annotations

import copy
import os
import tempfile

import click
import torch

from turbo_export import apply_turbo
from turbo_export.backends import bench, make_runner
from turbo_export.core import merge
from turbo_export.export.onnx import export_onnx
from turbo_export.export.parity import check_graph as validate
from turbo_export.export.parity import require_parity
from turbo_export.families import get_family
from turbo_export.families.base import GraphSpec
from turbo_export.families.blip import DEFAULT_MIN_TOKENS, PRESETS, build_random_blip, vision_flops
from turbo_export.families.blip_graphs import VisionGraph
from turbo_export.families.vit import VitOptions as TurboOptions
from turbo_export.files import write_json_atomic
from turbo_export.models.presets import RANDOM_PREFIX


def _encoders(model_source: str, family: str, ratios: list[int], alpha: float, batch: int, min_tokens: int | None):
    """Yield (name, GraphSpec, flops, tokens) for the baseline and every r."""
    name = model_source[len(RANDOM_PREFIX):] if model_source.startswith(RANDOM_PREFIX) else None
    if family == "blip":
        if name not in PRESETS:
            raise click.UsageError(f"--family blip takes a random: BLIP preset ({', '.join(PRESETS)})")
        loaded = build_random_blip(name, "caption")
        size = loaded.image_size
        min_tokens = DEFAULT_MIN_TOKENS["caption"] if min_tokens is None else min_tokens
        cfg = loaded.model.config.vision_config
        num_tokens = (size // cfg.patch_size) ** 2 + 1
        pixels = {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}
        for r in [0, *ratios]:
            model = loaded.model if r == 0 else apply_turbo(copy.deepcopy(loaded.model), r, alpha=alpha,
                                                            min_tokens=min_tokens)
            layers = merge.tokens_per_layer(num_tokens, [r] * cfg.num_hidden_layers, 1, min_tokens)
            graph = GraphSpec(f"r{r}", VisionGraph(model.vision_model), pixels, ["image_embeds", "image_sizes"],
                              merge_model=model if r else None)
            yield f"r{r}", graph, vision_flops(loaded, size, layers), [n for n, _ in layers]
        return
    spec = get_family("vit")
    loaded = spec.load(model_source)
    size = loaded.image_size
    num_tokens = spec.num_tokens(loaded, size)
    protected = spec.protected(loaded)
    for r in [0, *ratios]:
        options = TurboOptions(ratio=r, alpha=alpha, min_tokens=min_tokens or 0, batch=batch)
        model = loaded.model if r == 0 else spec.make_turbo(copy.deepcopy(loaded.model), options)
        layers = merge.tokens_per_layer(num_tokens, [r] * spec.num_layers(loaded), protected, options.min_tokens)
        yield f"r{r}", spec.graph(f"r{r}", model, loaded, options), spec.flops(loaded, size, layers), [n for n, _ in layers]


@click.command()
@click.option("--model", "model_source", required=True)
@click.option("--family", type=click.Choice(["vit", "blip"]), default=None,
              help="Default: blip for random:blip-* presets, else vit.")
@click.option("--ratios", default="8,16", show_default=True)
@click.option("--alpha", default=6.0, show_default=True)
@click.option("--min-tokens", type=int, default=None, help="Default: 0 for ViT, the caption default (40) for BLIP.")
@click.option("--batch", default=8, show_default=True)
@click.option("--runs", default=15, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the results here.")
def main(model_source: str, family: str | None, ratios: str, alpha: float, min_tokens: int | None, batch: int, runs: int,
         json_path: str | None) -> None:
    rs = [int(r) for r in ratios.split(",")]
    family = family or ("blip" if model_source.startswith(RANDOM_PREFIX + "blip") else "vit")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runners, feeds, flops, tokens = {}, {}, {}, {}
        for name, graph, graph_flops, graph_tokens in _encoders(model_source, family, rs, alpha, batch, min_tokens):
            path = export_onnx(graph, os.path.join(tmp, f"{name}.onnx"))
            runner = make_runner(path)
            report = validate(graph, path, runner)
            require_parity(report)
            click.echo(f"{name}: exported, ONNX vs PyTorch max abs diff {report.max_abs_diff:.2e}, "
                       f"cosine {report.cosine:.6f}", err=True)
            runners[name], feeds[name], flops[name], tokens[name] = runner, graph.example_inputs, graph_flops, graph_tokens
        for r in rs:
            pair = {"baseline": runners["r0"], "turbo": runners[f"r{r}"]}
            timings = bench.interleaved(pair, {"baseline": feeds["r0"], "turbo": feeds[f"r{r}"]}, batch, runs=runs,
                                        desc=f"r={r}")
            speed = bench.speedup(timings)
            flops_ratio = flops["r0"] / flops[f"r{r}"]
            rows.append({"r": r, "tokens": tokens[f"r{r}"], "flops_ratio": flops_ratio, "speedup": speed,
                         "speedup_over_flops_ratio": speed / flops_ratio,
                         "baseline_ips": timings["baseline"].items_per_s, "turbo_ips": timings["turbo"].items_per_s})
    click.echo(f"\n{model_source}, batch {batch}, alpha {alpha}, ONNX Runtime CPU, {runs} interleaved runs, medians\n")
    click.echo("| r | tokens (first -> last block) | baseline img/s | turbo img/s | FLOPs ratio | speedup | speedup / FLOPs ratio |")
    click.echo("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        click.echo(f"| {row['r']} | {row['tokens'][0]} -> {row['tokens'][-1]} | {row['baseline_ips']:.2f} | "
                   f"{row['turbo_ips']:.2f} | {row['flops_ratio']:.2f}x | {row['speedup']:.2f}x | "
                   f"{row['speedup_over_flops_ratio']:.2f} |")
    if json_path:
        write_json_atomic(json_path, {"model": model_source, "batch": batch, "alpha": alpha, "rows": rows})


if __name__ == "__main__":
    main()
