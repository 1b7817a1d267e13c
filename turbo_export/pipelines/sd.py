"""Text-to-image and image-to-image over a UNet Runner: PyTorch text encoder and VAE decoder, a diffusers
scheduler, and the UNet from an exported graph (or any Runner). Classifier-free guidance: the UNet is called once
per step on [B unconditional, B conditional] latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    unet_seconds: list[float] = field(default_factory=list)  # each UNet call, in order


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


class Denoising:
    """One seeded generation advanced one UNet call at a time, so that two UNets can run interleaved step by step
    (``generate_interleaved``). Classifier-free guidance; the UNet's conditioning inputs (SD: text states; SDXL:
    also pooled text and time ids) come from ``components.conditioning``.

    Image-to-image follows diffusers' StableDiffusionImg2ImgPipeline: the init image's VAE latents are noised to
    the timestep ``int(steps * strength)`` steps from the end and only those last steps are denoised.
    """

    def __init__(self, unet: Runner, components: Any, prompt: str, steps: int = 25, seed: int = 0,
                 guidance: float = 7.5, init_image: np.ndarray | None = None, strength: float = 1.0) -> None:
        check_prompt(prompt)
        if steps < 1:
            raise TurboExportError(f"steps: must be >= 1, got {steps}")
        if init_image is not None:
            check_strength(strength, steps)
        dims = {t.name: t.shape for t in unet.inputs}["sample"]
        channels, height, width = (int(d) for d in dims[1:])
        self.batch2 = int(dims[0]) if str(dims[0]).isdigit() else 2  # a dynamic batch axis: one image per call
        self.batch = self.batch2 // 2
        self.unet, self.components, self.guidance = unet, components, guidance
        scale = components.vae_scale
        self.cond = {k: v.numpy().astype(np.float32) for k, v in components.conditioning(
            [""] * self.batch + [prompt] * self.batch, (height * scale, width * scale)).items()}
        self.scheduler = components.scheduler()
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps
        generator = torch.Generator().manual_seed(seed)
        if init_image is None:
            self.latents = torch.randn((self.batch, channels, height, width), generator=generator) \
                * self.scheduler.init_noise_sigma
        else:
            start = steps - min(int(steps * strength), steps)
            self.timesteps = self.timesteps[start * self.scheduler.order:]
            init = encode_image(components, init_image, self.batch, (height * scale, width * scale), generator)
            noise = torch.randn(init.shape, generator=generator)
            self.latents = self.scheduler.add_noise(init, noise, self.timesteps[:1])
        self.done = 0
        self.unet_seconds: list[float] = []

    def step(self) -> None:
        """One denoising step (one UNet call, timed into ``unet_seconds``)."""
        import time

        t = self.timesteps[self.done]
        model_in = self.scheduler.scale_model_input(torch.cat([self.latents, self.latents]), t)
        feed = {"sample": model_in.numpy().astype(np.float32),
                "timestep": np.full((self.batch2,), float(t), dtype=np.float32), **self.cond}
        start = time.perf_counter()
        noise = torch.from_numpy(self.unet.run(feed)["noise_pred"])
        self.unet_seconds.append(time.perf_counter() - start)
        uncond, cond_noise = noise[:self.batch], noise[self.batch:]
        noise = uncond + self.guidance * (cond_noise - uncond)
        self.latents = self.scheduler.step(noise, t, self.latents).prev_sample
        self.done += 1

    def finish(self) -> Generation:
        return Generation(self.latents.numpy(), decode(self.components, self.latents), self.unet_seconds)


def generate(unet: Runner, components: Any, prompt: str, steps: int = 25, seed: int = 0, guidance: float = 7.5,
             progress: bool = True, desc: str = "denoising", init_image: np.ndarray | None = None,
             strength: float = 1.0) -> Generation:
    """Seeded text-to-image (or image-to-image with ``init_image``) through ``unet``; see ``Denoising``."""
    return generate_interleaved({desc: unet}, components, prompt, steps, seed, guidance, progress, init_image,
                                strength, desc=desc)[desc]


def generate_interleaved(unets: dict[str, Runner], components: Any, prompt: str, steps: int = 25, seed: int = 0,
                         guidance: float = 7.5, progress: bool = True, init_image: np.ndarray | None = None,
                         strength: float = 1.0, desc: str = "denoising (interleaved)") -> dict[str, Generation]:
    """The same seeded generation through each UNet, step by step in alternating order, so that drift on a shared
    machine hits every UNet alike; each Generation's ``unet_seconds`` times its UNet calls."""
    runs = {name: Denoising(u, components, prompt, steps, seed, guidance, init_image, strength)
            for name, u in unets.items()}
    names = list(runs)
    for i in tqdm(range(len(runs[names[0]].timesteps)), desc=desc, disable=not progress, leave=False):
        for name in (names if i % 2 == 0 else names[::-1]):
            runs[name].step()
    return {name: run.finish() for name, run in runs.items()}


def decode(components: Any, latents: torch.Tensor) -> np.ndarray:
    vae = components.vae
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)
