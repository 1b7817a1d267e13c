"""`turbo-export sd-unet` (export + benchmark the SD UNet) and `turbo-export sd-generate` (images from both UNets)."""

from __future__ import annotations

import os
from typing import Any

import click

from turbo_export.cli.common import (
    JobChoices,
    export_and_print,
    job_options,
    progress_enabled,
    quiet_option,
    user_errors,
)
from turbo_export.errors import TurboExportError


def parse_fraction(value: str) -> float:
    from turbo_export.patch.unet import MAX_RATIO

    try:
        ratio = float(value)
    except ValueError:
        raise TurboExportError(f"ratio: expected a fraction of tokens in (0, {MAX_RATIO}], got '{value}'") from None
    if not 0.0 < ratio <= MAX_RATIO:
        raise TurboExportError(f"ratio: must be a fraction of tokens in (0, {MAX_RATIO}], got {value}")
    return ratio


@click.command("sd-unet")
@click.option("--model", "model_source", required=True,
              help="random:sd-1.5 (SD 1.5 UNet config, seeded random weights), random:sdxl (SDXL base UNet config), "
                   "random:tiny, random:tiny-sdxl, or a local diffusers Stable Diffusion / SDXL folder (unet/, "
                   "text_encoder/, tokenizer/, vae/, scheduler/; SDXL adds text_encoder_2/, tokenizer_2/).")
@click.option("--ratio", required=True, help="Fraction of tokens merged in each chosen block, in (0, 0.75].")
@click.option("--alpha", type=float, default=None,
              help="Weight of the semantic value in the cross-attention merge (0 = ToMe for SD) [default: the "
                   "family's, 1].")
@click.option("--blocks", type=click.Choice(["default", "all"]), default="default", show_default=True,
              help="default: the highest-resolution level with transformer blocks (as ToMe for SD; on SDXL the "
                   "64x64 level at 1024 px); all: every transformer block.")
@click.option("--dst-seed", type=int, default=None,
              help="Seeded random destination inside each 2x2 cell (default: top-left), fixed in the graph.")
@click.option("--resolution", type=int, default=None, help="Image size in pixels (default: the model's).")
@click.option("--batch", type=int, default=1, show_default=True,
              help="Images per UNet call; the graph's batch is twice this (classifier-free guidance).")
@job_options(runs=5, out_help="engines/<name>-sd-r<ratio>/",
             merge_help="one turbo.TurboMerge node per merge and one turbo.TurboUnmerge node per restore")
@user_errors
def sd_unet(model_source: str, ratio: str, alpha: float | None, blocks: str, dst_seed: int | None,
            resolution: int | None, batch: int, job: JobChoices) -> None:
    """Export the Stable Diffusion UNet unaccelerated and with Turbo, check parity, compare UNet-call speed."""
    from turbo_export.families.sd import SDOptions

    options = SDOptions(ratio=parse_fraction(ratio), alpha=alpha, blocks=blocks, seed=dst_seed,
                        resolution=resolution, batch=batch, merge_impl=job.merge_impl)
    export_and_print("sd-unet", model_source, options, job)


def read_export_dir(path: str) -> dict[str, Any]:
    """The sd-unet export's report.json through the shared reader: its family, fields and graphs checked once,
    one line naming what is wrong (exit code 2)."""
    from turbo_export.evaluate.common import read_export

    return read_export(path, ("text-to-image",), command="sd-generate")


def concat_images(baseline, turbo):
    """[B, H, W, 3] x 2 -> one image: each row is baseline | turbo."""
    import numpy as np

    gap = np.full((baseline.shape[1], 8, 3), 255, dtype=np.uint8)
    return np.concatenate([np.concatenate([b, gap, t], axis=1) for b, t in zip(baseline, turbo)], axis=0)


@click.command("sd-generate")
@click.argument("export_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="The text prompt.")
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--out", "out_png", type=click.Path(dir_okay=False), default=None,
              help="Side-by-side PNG (baseline | Turbo); <stem>-baseline.png and <stem>-turbo.png beside it "
                   "[default: DIR/generated.png].")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@quiet_option
@click.option("--image", "init_path", default=None,
              help="Image-to-image: the init image (resized to the export's resolution), encoded by the VAE.")
@click.option("--strength", type=float, default=None,
              help="Image-to-image: how much noise is added to the init image, in (0, 1]; int(steps * strength) "
                   "steps are denoised [default with --image: 0.8].")
@user_errors
def sd_generate(export_dir: str, prompt: str, steps: int, seed: int, guidance: float, out_png: str | None,
                backend: str, init_path: str | None, strength: float | None) -> None:
    """Generate with the exported baseline and Turbo UNets (same seed) and compare latents and images
    (text-to-image, or image-to-image with --image and --strength)."""
    import numpy as np
    from PIL import Image

    from turbo_export.backends import make_runner
    from turbo_export.files import check_writable_target, write_json_atomic
    from turbo_export.metrics import psnr, ssim
    from turbo_export.models.sd_presets import load_sd
    from turbo_export.pipelines.sd import (
        check_generation,
        check_prompt,
        check_strength,
        generate_interleaved,
        load_init_image,
    )

    check_prompt(prompt)
    check_generation(steps, seed, guidance)
    init_image = None
    if init_path is None and strength is not None:
        raise TurboExportError("strength: only with --image (image-to-image)")
    if init_path is not None:
        strength = check_strength(0.8 if strength is None else strength, steps)
        init_image = load_init_image(init_path)
    out_png = os.path.join(export_dir, "generated.png") if out_png is None else out_png
    check_writable_target(out_png, "out")
    if not out_png.lower().endswith(".png"):
        raise TurboExportError(f"out: '{out_png}' must end in .png")
    for path in (out_png[:-4] + "-baseline.png", out_png[:-4] + "-turbo.png", out_png[:-4] + ".json"):
        check_writable_target(path, "out")
    report = read_export_dir(export_dir)
    click.echo(f"loading {report['model']} (text encoder, VAE) ...", err=True)
    components = load_sd(report["model"], with_unet=False)
    # both UNets step by step in alternating order, so their timings share the machine's drift (a --merge-impl
    # plugin Turbo UNet runs in ONNX Runtime through the Python nodes: slow, but the same values)
    runners = {name: make_runner(os.path.join(export_dir, report["files"][name]), backend)
               for name in ("baseline", "turbo")}
    results = generate_interleaved(runners, components, prompt, steps=steps, seed=seed, guidance=guidance,
                                   progress=progress_enabled(), init_image=init_image, strength=strength or 1.0)
    del runners
    base, tur = results["baseline"], results["turbo"]
    timing = unet_timing(base.unet_seconds, tur.unet_seconds, report)
    metrics: dict[str, Any] = {
        "prompt": prompt, "steps": steps, "seed": seed, "guidance": guidance,
        "mode": "text-to-image" if init_image is None else "image-to-image",
        "latents_psnr_db": psnr(base.latents, tur.latents),
        "images_psnr_db": psnr(base.images, tur.images, data_range=255.0),
        "images_ssim": float(np.mean([ssim(b, t, data_range=255.0) for b, t in zip(base.images, tur.images)])),
    }
    try:
        metrics["latents_ssim"] = float(np.mean([ssim(b.transpose(1, 2, 0), t.transpose(1, 2, 0))
                                                 for b, t in zip(base.latents, tur.latents)]))
    except ValueError:
        metrics["latents_ssim"] = None  # latents smaller than the SSIM window
    if init_image is not None:
        metrics.update(image=os.path.abspath(init_path), strength=strength,
                       denoised_steps=min(int(steps * strength), steps))
    metrics["unet_timing"] = timing
    if str(report["model"]).startswith("random:"):
        metrics["note"] = "random weights: agreement figures are weak evidence of quality"

    stem = out_png[:-4]
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    paths = {"baseline": stem + "-baseline.png", "turbo": stem + "-turbo.png", "side_by_side": out_png}
    images = {"baseline": np.concatenate(list(base.images), axis=1), "turbo": np.concatenate(list(tur.images), axis=1),
              "side_by_side": concat_images(base.images, tur.images)}
    for key, path in paths.items():
        tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}")
        Image.fromarray(images[key]).save(tmp, format="PNG")
        os.replace(tmp, path)
    write_json_atomic(stem + ".json", {**metrics, "files": paths})

    click.echo(f"prompt: {prompt}  ({steps} steps, seed {seed}, guidance {guidance:g})")
    if init_image is not None:
        click.echo(f"image-to-image from {init_path}: strength {strength:g}, {metrics['denoised_steps']} steps "
                   "denoised")
    latents_ssim = "n/a (latents smaller than the 11-px window)" if metrics["latents_ssim"] is None \
        else f"{metrics['latents_ssim']:.4f}"
    click.echo(f"turbo vs baseline, final latents: PSNR {metrics['latents_psnr_db']:.2f} dB, SSIM {latents_ssim}")
    click.echo(f"turbo vs baseline, images:        PSNR {metrics['images_psnr_db']:.2f} dB, "
               f"SSIM {metrics['images_ssim']:.4f}")
    click.echo(f"UNet per call, interleaved ({timing['calls']} calls each): baseline "
               f"{timing['baseline_median_ms']:.0f} ms, turbo {timing['turbo_median_ms']:.0f} ms, "
               f"speedup {timing['speedup']:.2f}x"
               + (f" (FLOPs ratio {timing['flops_ratio']:.3f}x)" if timing.get("flops_ratio") else ""))
    if "note" in metrics:
        click.echo(f"[{metrics['note']}]")
    click.echo(f"wrote {out_png} (baseline | turbo), {paths['baseline']}, {paths['turbo']}, {stem}.json")


def unet_timing(baseline: list[float], turbo: list[float], report: dict[str, Any]) -> dict[str, Any]:
    """Median UNet call of each side of an interleaved generation, their ratio, and the export's FLOPs ratio."""
    import statistics

    base_ms, turbo_ms = statistics.median(baseline) * 1e3, statistics.median(turbo) * 1e3
    flops = report.get("flops") or {}
    ratio = flops.get("baseline", 0) / flops["turbo"] if flops.get("turbo") else None
    return {"calls": len(baseline), "baseline_ms": [t * 1e3 for t in baseline], "turbo_ms": [t * 1e3 for t in turbo],
            "baseline_median_ms": base_ms, "turbo_median_ms": turbo_ms, "speedup": base_ms / turbo_ms,
            "flops_ratio": ratio}
