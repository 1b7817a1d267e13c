"""Text-to-image over a UNet Runner: PyTorch text encoder and VAE decoder, a diffusers scheduler, and the UNet
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


def unet_batch(runner: Runner) -> int:
    """Images per call B (the graph's batch is 2B)."""
    shape = {t.name: t.shape for t in runner.inputs}["sample"]
    return int(shape[0]) // 2


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


def generate(unet: Runner, components: Any, prompt: str, steps: int = 25, seed: int = 0, guidance: float = 7.5,
             progress: bool = True, desc: str = "denoising") -> Generation:
    """Seeded text-to-image with classifier-free guidance; the UNet runs through ``unet``."""
    check_prompt(prompt)
    if steps < 1:
        raise TurboExportError(f"steps: must be >= 1, got {steps}")
    shapes = {t.name: t.shape for t in unet.inputs}
    batch2, channels, height, width = (int(d) for d in shapes["sample"])
    batch = batch2 // 2
    text = components.encode([""] * batch + [prompt] * batch).numpy().astype(np.float32)

    scheduler = components.scheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, channels, height, width), generator=generator) * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        feed = {"sample": model_in.numpy().astype(np.float32),
                "timestep": np.full((batch2,), float(t), dtype=np.float32),
                "encoder_hidden_states": text}
        noise = torch.from_numpy(unet.run(feed)["noise_pred"])
        uncond, cond = noise[:batch], noise[batch:]
        noise = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return Generation(latents.numpy(), decode(components, latents))


def decode(components: Any, latents: torch.Tensor) -> np.ndarray:
    vae = components.vae
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)
