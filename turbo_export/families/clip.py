"""The CLIP / SigLIP image-encoder family: the vision towers LLaVA-style VLMs and zero-shot classifiers deploy.

transformers ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, and the image side of
``CLIPModel`` / ``SiglipModel`` (their ``vision_model`` and, for CLIP, ``visual_projection``; the text tower is not
exported here). Exported through ``turbo-export vit`` (one image graph, unaccelerated and with Turbo) and read by
the image-encoder validator, like the ViT family, whose declaration this one extends: only the configs, the
outputs, the FLOPs of the projection / pooling head and the presets differ.

- CLIP: the CLS token is protected (never merged) and gives Turbo's semantic value (its attention row); outputs
  ``last_hidden_state`` (the merged sequence, CLS first, before any final norm, as transformers returns it),
  ``pooler_output`` (post_layernorm(CLS)) and, with a projection, ``image_embeds``.
- SigLIP: no CLS token, nothing protected; the semantic value is the mean query's attention row
  (``core.merge.mean_query_attention``); outputs ``last_hidden_state`` (post_layernorm of the merged sequence) and
  ``pooler_output`` (the attention-pooling head over it, with the log(size) key bias: ``patch/clip.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from turbo_export.families.base import Defaults, ExportPlan, GraphSignature, Log, kind_graph_signatures, register
from turbo_export.families.encoders import config_flops
from turbo_export.families.vit import VitFamily

if TYPE_CHECKING:
    from turbo_export.models.presets import LoadedModel

DEFAULTS = Defaults(6.0, 0, evidence="not measured on CLIP or SigLIP (no real weights on this machine; random weights "
                                     "cannot settle alpha): the backbone default, set on dinov2-small-imgfocus (CLS "
                                     "cosine on scikit-image photos, alpha 6 best at r = 8, 16, 20); SigLIP's "
                                     "mean-query semantic value was checked against the CLS row at alpha 6 on that "
                                     "DINOv2 (scripts/semantic_no_cls_check.py, docs/clip-siglip.md)")

_QUICK_GELU = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)  # OpenAI CLIP's activation
# (model class, config class, config, description); sizes are the public checkpoints' vision configs
PRESETS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "clip-vit-base-patch16": (
        "CLIPVisionModelWithProjection", "CLIPVisionConfig",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
             patch_size=16, projection_dim=512, **_QUICK_GELU),
        "CLIP ViT-B/16 image tower + projection (openai/clip-vit-base-patch16), 224 px, 197 tokens, 12 layers"),
    "clip-vit-large-patch14-336": (
        "CLIPVisionModel", "CLIPVisionConfig",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=336,
             patch_size=14, projection_dim=768, **_QUICK_GELU),
        "CLIP ViT-L/14 at 336 px (LLaVA's vision tower), 577 tokens, 24 layers"),
    "siglip-base-patch16-224": (
        "SiglipVisionModel", "SiglipVisionConfig",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
             patch_size=16),
        "SigLIP B/16 image tower (google/siglip-base-patch16-224), 224 px, 196 tokens (no CLS), pooling head"),
    "tiny-clip": (
        "CLIPVisionModelWithProjection", "CLIPVisionConfig",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=4, projection_dim=16),
        "tiny CLIP image tower + projection for tests: 32 px, 65 tokens, 4 layers, width 32"),
    "tiny-siglip": (
        "SiglipVisionModel", "SiglipVisionConfig",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=4),
        "tiny SigLIP image tower for tests: 32 px, 64 tokens (no CLS), 4 layers, width 32, pooling head"),
}


def has_projection(model: nn.Module) -> bool:
    return hasattr(model, "visual_projection")


def vision_tower(model: nn.Module) -> nn.Module:
    """The CLIPVisionModel / SiglipVisionModel inside (or being) ``model``."""
    return getattr(model, "vision_model", model)


class ImageTowerGraph(nn.Module):
    """pixel_values -> (last_hidden_state, pooler_output[, image_embeds]) of a CLIP / SigLIP image tower."""

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.forward_kwargs = forward_kwargs

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = vision_tower(self.model)(pixel_values=pixel_values, **self.forward_kwargs)
        outputs = (out.last_hidden_state,) if out.pooler_output is None else (out.last_hidden_state, out.pooler_output)
        if has_projection(self.model):
            outputs += (self.model.visual_projection(out.pooler_output),)
        return outputs


@register
class ClipFamily(VitFamily):
    name = "clip"
    command = "turbo-export vit"
    kind = "image-encoder"
    model_classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "SiglipVisionModel",
                     "SiglipModel")
    defaults = DEFAULTS
    preset_table = PRESETS

    def defaults_for(self, model_class: str) -> Defaults:
        return self.defaults

    def vision_config(self, loaded: LoadedModel) -> Any:
        return getattr(loaded.model.config, "vision_config", loaded.model.config)

    def output_names(self, loaded: LoadedModel) -> list[str]:
        names = ["last_hidden_state"]
        if getattr(vision_tower(loaded.model), "use_head", True):  # SigLIP without its head has no pooler
            names.append("pooler_output")
        return names + (["image_embeds"] if has_projection(loaded.model) else [])

    def plan(self, loaded: LoadedModel, options: Any, run: Any, log: Log) -> ExportPlan:
        plan = super().plan(loaded, options, run, log)
        plan.report["outputs"] = self.output_names(loaded)  # what the image graphs give (readers check it)
        return plan

    def graph_signatures(self, report: dict[str, Any]) -> dict[str, GraphSignature]:
        """The image-encoder kind's signatures, with the outputs report.json lists (``image_embeds`` with a
        projection; no ``pooler_output`` for a SigLIP without its head)."""
        signatures = kind_graph_signatures("image-encoder", report)
        names = report.get("outputs")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return signatures
        batch = None if report.get("batch_dim") == "symbolic" else report.get("batch")
        return {key: GraphSignature(sig.inputs, {n: (sig.outputs or {}).get(n, (batch, None)) for n in names})
                for key, sig in signatures.items()}

    def graph_module(self, model: nn.Module, loaded: LoadedModel, image_size: int) -> nn.Module:
        return ImageTowerGraph(model, self.forward_kwargs(loaded, image_size))

    def flops(self, loaded: LoadedModel, image_size: int, layers: list[tuple[int, int]]) -> int:
        """The tower's blocks (``config_flops``), plus the projection (CLIP) or the attention-pooling head over
        the final tokens (SigLIP: the probe's query, keys and values of every final token, one attention row,
        the output projection and the head's MLP)."""
        cfg = self.vision_config(loaded)
        width, mlp = int(cfg.hidden_size), int(cfg.intermediate_size)
        total = config_flops(cfg, loaded.num_channels, image_size, layers)
        if has_projection(loaded.model):
            total += 2 * width * int(loaded.model.visual_projection.out_features)
        if getattr(vision_tower(loaded.model), "use_head", False):
            final = layers[-1][0] - layers[-1][1]
            total += 2 * width * width * 2 + 2 * 2 * final * width * width + 2 * 2 * final * width
            total += 2 * 2 * width * mlp
        return total
