"""Accuracy parity of a text-to-image export (the SD UNet): both UNets through the same pipeline at the same seeds,
PSNR / SSIM of the latents and the images."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from turbo_export import metrics
from turbo_export.backends import make_runner
from turbo_export.errors import TurboExportError
from turbo_export.evaluate.common import weights_note
from turbo_export.families import get_family

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse", "a red bicycle leaning against a brick wall",
    "a bowl of fruit on a wooden table", "a lighthouse on a cliff at sunset",
)

def validate_sd(folder: str, report: dict[str, Any], prompts: list[str] | None, steps: int, seed: int,
                guidance: float, backend: str, images_dir: str | None, progress: bool) -> dict[str, Any]:
    """Both UNets through the same text-to-image pipeline at the same seeds: PSNR/SSIM of latents and images."""
    from turbo_export.pipelines.sd import generate

    if steps < 1:
        raise TurboExportError(f"steps: must be >= 1, got {steps}")
    components = get_family(report["family"]).load(report["model"], with_unet=False)
    runners = {name: make_runner(os.path.join(folder, report["files"][name]), backend)
               for name in ("baseline", "turbo")}
    rows, saved = [], []
    for i, prompt in enumerate(prompts or DEFAULT_PROMPTS):
        gens = {name: generate(runner, components, prompt, steps=steps, seed=seed + i, guidance=guidance,
                               progress=progress, desc=f"{name} UNet, prompt {i + 1}")
                for name, runner in runners.items()}
        base, turbo = gens["baseline"], gens["turbo"]
        row: dict[str, Any] = {"prompt": prompt, "seed": seed + i,
                               "latents_psnr_db": metrics.psnr(base.latents, turbo.latents),
                               "images_psnr_db": metrics.psnr(base.images, turbo.images, data_range=255.0),
                               "images_ssim": float(np.mean([metrics.ssim(b, t, data_range=255.0)
                                                             for b, t in zip(base.images, turbo.images)]))}
        try:
            row["latents_ssim"] = float(np.mean([metrics.ssim(b.transpose(1, 2, 0), t.transpose(1, 2, 0))
                                                 for b, t in zip(base.latents, turbo.latents)]))
        except ValueError:
            row["latents_ssim"] = None  # latents smaller than the SSIM window
        rows.append(row)
        if images_dir:
            saved += save_pngs(images_dir, i, base.images, turbo.images)
    mean = {key: (float(np.mean([r[key] for r in rows])) if all(r[key] is not None for r in rows) else None)
            for key in ("latents_psnr_db", "latents_ssim", "images_psnr_db", "images_ssim")}
    result: dict[str, Any] = {
        "family": report["family"], "layout": report.get("layout", "sd"), "export": os.path.abspath(folder),
        "model": report["model"], "ratio": report["ratio"],
        "alpha": report["alpha"], "blocks": report.get("blocks"), "resolution": report.get("resolution"),
        "batch": report["batch"], "backend": backend, "flops_ratio": report["flops"]["ratio"], "steps": steps,
        "seed": seed, "guidance": guidance, "prompts": len(rows),
        "prompts_source": "--prompts" if prompts else f"built-in list of {len(DEFAULT_PROMPTS)} prompts",
        "onnx": {"kind": "generation", "per_prompt": rows, "mean": mean,
                 "compared": "Turbo UNet vs unaccelerated UNet, same prompt, seed, scheduler and steps"},
    }
    if saved:
        result["images_written"] = saved
    result.update(weights_note(report["model"]))
    return result


def save_pngs(folder: str, index: int, baseline: np.ndarray, turbo: np.ndarray) -> list[str]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, images in (("baseline", baseline), ("turbo", turbo)):
        path = os.path.join(folder, f"prompt{index:02d}-{name}.png")
        tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}")
        Image.fromarray(np.concatenate(list(images), axis=1)).save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
    return paths



def summary_lines(result: dict[str, Any]) -> list[str]:
    p = result["onnx"]
    m = p["mean"]
    lines = [f"{result['model']}: ratio {result['ratio']:g}, alpha {result['alpha']:g}, {result['prompts']} "
             f"prompts ({result['prompts_source']}), {result['steps']} steps, seeds {result['seed']}.."
             f"{result['seed'] + result['prompts'] - 1}, guidance {result['guidance']:g} ({result['backend']})"]
    for r in p["per_prompt"]:
        lat = "n/a" if r["latents_ssim"] is None else f"{r['latents_ssim']:.4f}"
        lines.append(f"  '{r['prompt']}': latents PSNR {r['latents_psnr_db']:.2f} dB SSIM {lat}; images PSNR "
                     f"{r['images_psnr_db']:.2f} dB SSIM {r['images_ssim']:.4f}")
    lat = "n/a" if m["latents_ssim"] is None else f"{m['latents_ssim']:.4f}"
    lines.append(f"mean turbo vs baseline: latents PSNR {m['latents_psnr_db']:.2f} dB SSIM {lat}; images PSNR "
                 f"{m['images_psnr_db']:.2f} dB SSIM {m['images_ssim']:.4f}")
    return lines
