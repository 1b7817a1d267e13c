"""SDXL by name: ``random:sdxl`` (the SDXL base UNet config, 2.6 B parameters) and ``random:tiny-sdxl`` (tests),
with seeded random weights and two small CLIP text encoders, or a local SDXL folder in the diffusers layout
(adds text_encoder_2/ and tokenizer_2/).

SDXL's UNet reads (diffusers' StableDiffusionXLPipeline):
- encoder_hidden_states [2B, 77, D1 + D2]: the penultimate hidden states of both text encoders, concatenated;
- text_embeds [2B, P]: the second encoder's pooled, projected text embedding;
- time_ids [2B, 6]: original size (h, w), crop top-left (0, 0), target size (h, w), all the image size here.
The unconditional half is all zeros (``force_zeros_for_empty_prompt``, SDXL base's setting).
The random presets' text encoders have SDXL's hidden sizes (768 and 1280, projection 1280) but 2 layers each
(the real ones have 12 and 32) and a 4096-word hash vocabulary: the UNet, which is what is exported, is full size.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from turbo_export.errors import TurboExportError
from turbo_export.models.sd_presets import (
    RANDOM_PREFIX,
    SD_SCHEDULER,
    SEED,
    TEXT_LEN,
    VAE_SCALE,
    HashTokenizer,
    SDComponents,
    SDPreset,
)

SDXL_VAE_SCALING = 0.13025  # SDXL's VAE scaling factor


def _text(hidden: int, layers: int, heads: int, projection: int, vocab: int = 4096) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=TEXT_LEN, bos_token_id=vocab - 2,
                eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=projection, hidden_act="gelu")


def _vae(widths: tuple[int, ...], size: int) -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                block_out_channels=widths, sample_size=size, scaling_factor=SDXL_VAE_SCALING,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


SDXL_PRESETS: dict[str, SDPreset] = {
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (attention_head_dim is SDXL's heads per level)
    "sdxl": SDPreset(
        unet=dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                  layers_per_block=2, attention_head_dim=(5, 10, 20), cross_attention_dim=2048, norm_num_groups=32,
                  transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        text_encoder=dict(first=_text(768, 2, 12, 768), second=_text(1280, 2, 20, 1280)),
        vae=_vae((32, 64, 64, 64), 1024),
        resolution=1024,
        description="SDXL base UNet config (2.6 B parameters), two small CLIP text encoders (768-d and 1280-d, 2 "
                    "layers each), small 8x VAE",
    ),
    "tiny-sdxl": SDPreset(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=32,
                  transformer_layers_per_block=(1, 2), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        text_encoder=dict(first=_text(32, 1, 2, 32, 512), second=_text(32, 1, 2, 32, 512)),
        vae=_vae((32, 32, 32, 32), 64),
        resolution=64,
        description="tiny SDXL layout for tests: 64 px, 8x8 latents, 2 UNet levels (as SDXL: no attention at the "
                    "finest, 2 transformer layers per block at the coarser one), text_time added conditioning, two text encoders (32 + 32 = 64-d)",
    ),
}


class SDXLComponents(SDComponents):
    """SDComponents with SDXL's second text encoder and added conditioning."""

    @property
    def text_encoder_2(self) -> torch.nn.Module:
        return self.extra["text_encoder_2"]

    def _ids(self, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
        if isinstance(tokenizer, HashTokenizer):
            return torch.tensor([tokenizer.ids(p) for p in prompts])
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    def conditioning(self, prompts: list[str], image_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            first = self.text_encoder(self._ids(self.tokenizer, prompts), output_hidden_states=True)
            second = self.text_encoder_2(self._ids(self.extra["tokenizer_2"], prompts), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        empty = torch.tensor([not p for p in prompts])[:, None]
        states = torch.where(empty[:, :, None], torch.zeros_like(states), states)
        pooled = torch.where(empty, torch.zeros_like(pooled), pooled)
        height, width = image_hw
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(prompts), 1)
        return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": time_ids}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.conditioning(prompts, (self.resolution, self.resolution))["encoder_hidden_states"]


def build_random_sdxl(preset_name: str, seed: int = SEED, with_unet: bool = True) -> SDXLComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = SDXL_PRESETS[preset_name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**preset.unet).eval() if with_unet else None
    first, second = preset.text_encoder["first"], preset.text_encoder["second"]
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**first)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**second)).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**preset.vae).eval()
    tokenizers = [HashTokenizer(c["vocab_size"], c["bos_token_id"], c["eos_token_id"]) for c in (first, second)]
    return SDXLComponents(unet, text_encoder, tokenizers[0], vae, dict(SD_SCHEDULER), RANDOM_PREFIX + preset_name,
                          preset_name, preset.resolution,
                          extra={"text_encoder_2": text_encoder_2, "tokenizer_2": tokenizers[1]})


def is_sdxl_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "text_encoder_2"))


def load_sdxl_folder(path: str, base: SDComponents) -> SDXLComponents:
    """Adds text_encoder_2/ and tokenizer_2/ to the components ``load_sd_folder`` loaded."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    try:
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").eval()
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    except (OSError, ValueError) as exc:
        raise TurboExportError(f"model: cannot load '{path}' (SDXL): {str(exc).splitlines()[0]}") from None
    fields = {k: getattr(base, k) for k in ("unet", "text_encoder", "tokenizer", "vae", "scheduler_config", "source",
                                            "name", "resolution")}
    return SDXLComponents(**fields, extra={"text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2})


__all__ = ["SDXL_PRESETS", "SDXLComponents", "build_random_sdxl", "is_sdxl_folder", "load_sdxl_folder", "VAE_SCALE"]
