"""Text-to-image and image-to-image over a UNet Runner: PyTorch text encoder and VAE decoder, a diffusers scheduler, and the UNet
from an exported graph (or any Runner). Classifier-free guidance: the UNet is called once per step on
[B unconditional, B conditional] latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from turbo_export.backends.base import Runner
from turbo_export.errors import TurboExportError


@dataclass
class Generation:
    latents: np.ndarray  # [B, 4, h, w], final (before the VAE)
    images: np.ndarray  # [B, H, W, 3] uint8


def check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise TurboExportError("prompt: empty; pass --prompt TEXT")
    return prompt


def check_generation(steps: int, seed: int, guidance: float) -> None:
    """The numbers a user gives a generation (sd-generate, validate), before anything is loaded: steps, a 63-bit
    seed, a finite guidance scale. (The server checks its requests itself, in ``serve.handlers``.)"""
    from turbo_export.limits import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, check_range

    check_range("steps", steps, 1, MAX_STEPS)
    check_range("seed", seed, 0, MAX_SEED)
    check_range("guidance", guidance, 0.0, MAX_GUIDANCE, integer=False)


def check_strength(strength: float, steps: int) -> float:
    """Image-to-image strength in (0, 1]; at least one denoising step must run (int(steps * strength) >= 1)."""
    if not (isinstance(strength, (int, float)) and 0.0 < float(strength) <= 1.0):
        raise TurboExportError(f"strength: must be in (0, 1], got {strength}")
    if int(steps * strength) < 1:
        raise TurboExportError(f"strength: {strength:g} x {steps} steps leaves no denoising step "
                               "(int(steps * strength) must be >= 1)")
    return float(strength)


def load_init_image(path: str) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 RGB; a missing file or one that is not an image is a user error."""
    import os

    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise TurboExportError(f"image: '{path}' does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise TurboExportError(f"image: '{path}' is not an image ({str(exc).splitlines()[0]})") from None


def encode_image(components: Any, image: np.ndarray, batch: int, size: tuple[int, int],
                 generator: torch.Generator) -> torch.Tensor:
    """[H, W, 3] uint8 -> VAE latents [batch, 4, h, w] (resized to the graph's size, sampled from the posterior
    with the seeded generator and scaled by the VAE's scaling factor, as diffusers' img2img does)."""
    from PIL import Image

    height, width = size
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = torch.from_numpy(resized / 127.5 - 1.0).permute(2, 0, 1)[None].repeat(batch, 1, 1, 1)
    vae = components.vae
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def generate(unet: Runner, components: Any, prompt: str, steps: int = 25, seed: int = 0, guidance: float = 7.5,
             progress: bool = True, desc: str = "denoising", init_image: np.ndarray | None = None,
             strength: float = 1.0) -> Generation:
    """Seeded text-to-image (or image-to-image with ``init_image``) with classifier-free guidance; the UNet runs
    through ``unet``. The UNet's conditioning inputs (SD: text states; SDXL: also pooled text and time ids) come
    from ``components.conditioning``.

    Image-to-image follows diffusers' StableDiffusionImg2ImgPipeline: the init image's VAE latents are noised to
    the timestep ``int(steps * strength)`` steps from the end and only those last steps are denoised.
    """
    check_prompt(prompt)
    if steps < 1:
        raise TurboExportError(f"steps: must be >= 1, got {steps}")
    if init_image is not None:
        check_strength(strength, steps)
    shapes = {t.name: t.shape for t in unet.inputs}
    dims = shapes["sample"]
    channels, height, width = (int(d) for d in dims[1:])
    batch2 = int(dims[0]) if str(dims[0]).isdigit() else 2  # a dynamic batch axis: one image per call
    batch = batch2 // 2
    scale = components.vae_scale
    cond = {k: v.numpy().astype(np.float32) for k, v in components.conditioning(
        [""] * batch + [prompt] * batch, (height * scale, width * scale)).items()}

    scheduler = components.scheduler()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    generator = torch.Generator().manual_seed(seed)
    if init_image is None:
        latents = torch.randn((batch, channels, height, width), generator=generator) * scheduler.init_noise_sigma
    else:
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start * scheduler.order:]
        init = encode_image(components, init_image, batch, (height * scale, width * scale), generator)
        noise = torch.randn(init.shape, generator=generator)
        latents = scheduler.add_noise(init, noise, timesteps[:1])
    for t in tqdm(timesteps, desc=desc, disable=not progress, leave=False):
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        feed = {"sample": model_in.numpy().astype(np.float32),
                "timestep": np.full((batch2,), float(t), dtype=np.float32), **cond}
        noise = torch.from_numpy(unet.run(feed)["noise_pred"])
        uncond, cond_noise = noise[:batch], noise[batch:]
        noise = uncond + guidance * (cond_noise - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return Generation(latents.numpy(), decode(components, latents))


def decode(components: Any, latents: torch.Tensor) -> np.ndarray:
    vae = components.vae
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)
