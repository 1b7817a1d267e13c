"""Stable Diffusion models by name: ``random:<preset>`` (seeded random weights, offline) or a local SD folder.

``random:sd-1.5`` is the real SD 1.5 UNet config (860 M parameters) with a small CLIP text encoder (768-d
states, as the UNet's cross-attention expects) and a small 8x AutoencoderKL; ``random:tiny`` is for tests.
Random presets use an offline word-hash tokenizer (start / end tokens, padded with the end token to 77, as
SD 1.x's CLIP tokenizer does). A local folder in the diffusers layout (unet/, text_encoder/, tokenizer/,
vae/, scheduler/) loads its own components.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from turbo_export.errors import TurboExportError
from turbo_export.models.presets import check_weight_files, first_line, load_checked, quiet_loaders

RANDOM_PREFIX = "random:"
SEED = 0
TEXT_LEN = 77
VAE_SCALE = 8

# SD 1.x's scheduler (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5), used with DDIM.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclass(frozen=True)
class SDPreset:
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    resolution: int
    description: str


SD_PRESETS: dict[str, SDPreset] = {
    # UNet2DConditionModel's defaults are SD 1.x's; spelled out so the preset does not depend on them.
    "sd-1.5": SDPreset(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        text_encoder=dict(vocab_size=4096, hidden_size=768, intermediate_size=1536, num_hidden_layers=2,
                          num_attention_heads=12, max_position_embeddings=TEXT_LEN, bos_token_id=4094,
                          eos_token_id=4095, pad_token_id=4095, projection_dim=768),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                 block_out_channels=(32, 64, 64, 64), sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        resolution=512,
        description="SD 1.5 UNet config (860 M parameters), small CLIP text encoder (768-d), small 8x VAE",
    ),
    "tiny": SDPreset(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        text_encoder=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=TEXT_LEN, bos_token_id=510,
                          eos_token_id=511, pad_token_id=511, projection_dim=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                 block_out_channels=(32, 32, 32, 32), sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        resolution=64,
        description="tiny SD for tests: 64 px, 8x8 latents, 2 UNet levels",
    ),
}


class HashTokenizer:
    """Offline tokenizer for random presets: lower-cased words -> ids by CRC32, [start] words [end] [end]..."""

    def __init__(self, vocab_size: int, bos_token_id: int, eos_token_id: int, model_max_length: int = TEXT_LEN):
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.model_max_length = model_max_length

    def length(self, text: str) -> int:
        """Tokens of ``text`` with start and end, before truncation to model_max_length."""
        return len(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())) + 2

    def ids(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
        body = [zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words][: self.model_max_length - 2]
        ids = [self.bos_token_id] + body + [self.eos_token_id]
        return ids + [self.eos_token_id] * (self.model_max_length - len(ids))


@dataclass
class SDComponents:
    """What export and generation need; ``unet`` is the model that is exported."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    vae: nn.Module
    scheduler_config: dict[str, Any]
    source: str
    name: str
    resolution: int
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text encoder states [len(prompts), 77, D] (PyTorch)."""
        if isinstance(self.tokenizer, HashTokenizer):
            ids = torch.tensor([self.tokenizer.ids(p) for p in prompts])
        else:
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def conditioning(self, prompts: list[str], image_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs for ``prompts`` (graph input name -> tensor); SD: the text states."""
        return {"encoder_hidden_states": self.encode(prompts)}

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` with start and end, untruncated (``encode`` cuts at the text encoder's length)."""
        if isinstance(self.tokenizer, HashTokenizer):
            return self.tokenizer.length(prompt)
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_downsample(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)


def all_presets() -> dict[str, SDPreset]:
    """SD 1.x presets and the SDXL ones (``models/sdxl_presets.py``)."""
    from turbo_export.models.sdxl_presets import SDXL_PRESETS

    return {**SD_PRESETS, **SDXL_PRESETS}


def build_random_sd(preset_name: str, seed: int = SEED, with_unet: bool = True) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from turbo_export.models.sdxl_presets import SDXL_PRESETS, build_random_sdxl

    if preset_name in SDXL_PRESETS:
        return build_random_sdxl(preset_name, seed, with_unet)
    if preset_name not in SD_PRESETS:
        raise TurboExportError(f"model: unknown preset 'random:{preset_name}'; SD presets: "
                               + ", ".join(f"random:{n}" for n in all_presets()))
    preset = SD_PRESETS[preset_name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**preset.unet).eval() if with_unet else None
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder)).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**preset.vae).eval()
    cfg = preset.text_encoder
    tokenizer = HashTokenizer(cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
    return SDComponents(unet, text_encoder, tokenizer, vae, dict(SD_SCHEDULER), RANDOM_PREFIX + preset_name,
                        preset_name, preset.resolution)


def load_sd_folder(path: str, with_unet: bool = True) -> SDComponents:
    """A local diffusers-layout Stable Diffusion folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not os.path.isdir(path):
        raise TurboExportError(f"model: '{path}' is neither a random:<preset> ({', '.join(SD_PRESETS)}) nor a folder")
    missing = [d for d in ("unet", "text_encoder", "tokenizer", "vae") if not os.path.isdir(os.path.join(path, d))]
    if missing:
        raise TurboExportError(f"model: '{path}' has no {', '.join(m + '/' for m in missing)} folder; expected a "
                               "diffusers Stable Diffusion folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    components = {}
    for name, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel), ("vae", AutoencoderKL)):
        if name == "unet" and not with_unet:
            components[name] = None
            continue
        folder = os.path.join(path, name)
        check_weight_files(folder)
        components[name] = load_checked(cls, folder, folder).eval()
    unet, text_encoder, vae = components["unet"], components["text_encoder"], components["vae"]
    try:
        with quiet_loaders():
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    except Exception as exc:  # noqa: BLE001  (missing vocabulary, bad JSON, ...)
        raise TurboExportError(f"model: cannot load the tokenizer of '{path}': {first_line(exc)}") from None
    scheduler_config = dict(SD_SCHEDULER)
    config_file = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(config_file):
        import json

        try:
            with open(config_file, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, ValueError, RecursionError) as exc:
            raise TurboExportError(f"model: '{config_file}' is unreadable: {first_line(exc)}") from None
        if not isinstance(loaded, dict):
            raise TurboExportError(f"model: '{config_file}' must hold a JSON object, got {type(loaded).__name__}")
        scheduler_config.update({k: v for k, v in loaded.items() if not k.startswith("_") and k != "skip_prk_steps"})
    sample = int((unet.config.sample_size if unet is not None else 64))
    components = SDComponents(unet, text_encoder, tokenizer, vae, scheduler_config, os.path.abspath(path),
                              os.path.basename(os.path.normpath(path)), sample * VAE_SCALE)
    from turbo_export.models.sdxl_presets import is_sdxl_folder, load_sdxl_folder

    return load_sdxl_folder(path, components) if is_sdxl_folder(path) else components


def load_sd(source: str, with_unet: bool = True) -> SDComponents:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise TurboExportError("Stable Diffusion needs diffusers (a dependency of turbo-export): pip install 'diffusers>=0.30'") from None
    if source.startswith(RANDOM_PREFIX):
        return build_random_sd(source[len(RANDOM_PREFIX):], with_unet=with_unet)
    return load_sd_folder(source, with_unet=with_unet)
