"""Export specs: per model family, which graphs to export, their inputs and outputs, and their FLOPs.

A new family adds one spec class here (and one adapter in ``patch/``); the pipeline stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.export.onnx import GraphSpec
from turbo_export.models.presets import LoadedModel
from turbo_export.patch import adapter_for, apply_turbo
from turbo_export.patch import vit as vit_patch


def check_image_size(image_size: int, patch_size: int) -> int:
    if image_size <= 0 or image_size % patch_size:
        raise TurboExportError(f"image-size: {image_size} must be a positive multiple of the patch size {patch_size}")
    return image_size


class ImageModelGraph(nn.Module):
    """pixel_values -> the named outputs of a transformers image model, as a tuple."""

    def __init__(self, model: nn.Module, output_names: list[str], forward_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names
        self.forward_kwargs = forward_kwargs

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values, **self.forward_kwargs)
        return tuple(out[name] for name in self.output_names)


@dataclass
class TurboOptions:
    ratio: merge.RSchedule
    alpha: float | None = None  # None: the family's default (defaults.py), filled in by run_export
    min_tokens: int = 0
    prop_attn: bool = True
    batch: int = 1
    image_size: int | None = None
    merge_impl: str = "onnx"  # "plugin": one turbo.TurboMerge node per block (TensorRT plugin)


class VitSpec:
    """ViT, DeiT and DINOv2: one image graph, unaccelerated and Turbo."""

    family = "vit"

    def supported(self) -> list[str]:
        return sorted(vit_patch.ADAPTERS)

    def protected(self, loaded: LoadedModel) -> int:
        return adapter_for(loaded.model).protected

    def num_layers(self, loaded: LoadedModel) -> int:
        return int(loaded.model.config.num_hidden_layers)

    def image_size(self, loaded: LoadedModel, options: TurboOptions) -> int:
        return check_image_size(options.image_size or loaded.image_size, int(loaded.model.config.patch_size))

    def num_tokens(self, loaded: LoadedModel, image_size: int) -> int:
        patch = int(loaded.model.config.patch_size)
        return (image_size // patch) ** 2 + self.protected(loaded)

    def output_names(self, loaded: LoadedModel) -> list[str]:
        if "ForImageClassification" in type(loaded.model).__name__:
            return ["logits"]
        return ["last_hidden_state", "pooler_output"]

    def forward_kwargs(self, loaded: LoadedModel, image_size: int) -> dict[str, Any]:
        if loaded.model.config.model_type == "dinov2":
            return {}  # DINOv2 always interpolates its position grid
        return {"interpolate_pos_encoding": image_size != int(loaded.model.config.image_size)}

    def example_inputs(self, loaded: LoadedModel, batch: int, image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, loaded.num_channels, image_size, image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def graph(self, name: str, model: nn.Module, loaded: LoadedModel, options: TurboOptions) -> GraphSpec:
        size = self.image_size(loaded, options)
        module = ImageModelGraph(model, self.output_names(loaded), self.forward_kwargs(loaded, size))
        merge_model = model if getattr(model, "_turbo", None) is not None else None
        return GraphSpec(name, module, self.example_inputs(loaded, options.batch, size), self.output_names(loaded),
                         merge_model=merge_model)

    def make_turbo(self, model: nn.Module, options: TurboOptions) -> nn.Module:
        return apply_turbo(model, options.ratio, alpha=options.alpha, min_tokens=options.min_tokens,
                           prop_attn=options.prop_attn, merge_impl=options.merge_impl)

    def flops(self, loaded: LoadedModel, image_size: int, layers: list[tuple[int, int]]) -> int:
        """Analytic FLOPs (2 per multiply-add) of one image through the model, merge cost included."""
        cfg = loaded.model.config
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        mlp = int(getattr(cfg, "intermediate_size", 0) or cfg.hidden_size * getattr(cfg, "mlp_ratio", 4))
        is_classifier = "ForImageClassification" in type(loaded.model).__name__
        head = int(cfg.hidden_size) * int(getattr(cfg, "num_labels", 0)) * 2 if is_classifier else 0
        return vision_encoder_flops(int(cfg.hidden_size), heads, head_dim, mlp, int(cfg.patch_size),
                                    loaded.num_channels, image_size, layers) + head


def vision_encoder_flops(width: int, heads: int, head_dim: int, mlp: int, patch: int, channels: int,
                         image_size: int, layers: list[tuple[int, int]]) -> int:
    """FLOPs of a patch embedding + pre-norm transformer blocks; ``layers`` = (tokens in, tokens merged)."""
    inner = heads * head_dim
    patches = (image_size // patch) ** 2
    total = 2 * patches * width * channels * patch * patch
    for tokens, r in layers:
        total += 2 * tokens * width * inner * 3 + 2 * 2 * tokens * tokens * inner + 2 * tokens * inner * width
        if r:
            total += 2 * ((tokens + 1) // 2) * (tokens // 2) * head_dim  # the matching's similarity matrix
        total += 2 * 2 * (tokens - r) * width * mlp
    return total


SPECS = {"vit": VitSpec()}
