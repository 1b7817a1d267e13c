"""Turbo for the transformers ViT family: ViT, DeiT (distillation token protected) and DINOv2 (layer scale).

The backbone module's class is swapped for a subclass whose forward runs the blocks itself, so the
token sizes flow between blocks as plain forward values (``torch.export`` snapshots module attributes
mutated during tracing, which would break state shared across layers). ``remove_turbo`` swaps the
original class back: the model is then bit-for-bit the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .. import merge
from ..errors import TurboExportError

TURBO_ATTR = "_turbo"
ORIGINAL_CLASS_ATTR = "_turbo_original_class"


@dataclass
class TurboSettings:
    """How one model merges; stored on the patched backbone (read-only during forward)."""

    schedule: list[int]
    alpha: float
    min_tokens: int
    prop_attn: bool
    protected: int
    merge_fn: Callable[..., Any] = field(default=merge.turbo_merge, repr=False)
    # Filled by the forward when `record_plans` is set (visualisation, debugging); never during export.
    record_plans: bool = False
    plans: list = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class BlockLayout:
    """Where a block keeps its parts; the one place where ViT/DeiT and DINOv2 differ."""

    norm1: str
    norm2: str
    post_attn: tuple[str, ...]  # modules applied to the attention output before the residual
    post_mlp: tuple[str, ...]


VIT_BLOCK = BlockLayout("layernorm_before", "layernorm_after", ("dropout",), ("dropout",))
DINOV2_BLOCK = BlockLayout("norm1", "norm2", ("layer_scale1", "drop_path"), ("layer_scale2", "drop_path"))


def turbo_attention(
    attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager self-attention with an additive key bias, also returning Turbo's two inputs.

    Returns (output [B, N, C], metric = keys averaged over heads [B, N, D],
    semantic value = CLS row of the attention probabilities averaged over heads [B, N]).
    """
    batch, tokens, _ = x.shape
    shape = (batch, tokens, attn.num_attention_heads, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, tokens, -1)
    return attn.o_proj(out), k.mean(dim=1), probs[:, :, 0, :].mean(dim=1)


def _apply_chain(block: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    for name in names:
        x = getattr(block, name)(x)
    return x


def turbo_block(
    block: nn.Module,
    layout: BlockLayout,
    x: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    settings: TurboSettings,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One transformer block: attention, residual, merge (if r > 0), MLP, residual."""
    bias = merge.proportional_attention_bias(size) if (settings.prop_attn and size is not None) else None
    h, metric, semantic = turbo_attention(block.attention, getattr(block, layout.norm1)(x), bias)
    x = x + _apply_chain(block, layout.post_attn, h)

    if r > 0:
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        x, size, plan = settings.merge_fn(x, size, metric, semantic, r, settings.alpha, settings.protected)
        if settings.record_plans:
            settings.plans.append(plan)

    h = block.mlp(getattr(block, layout.norm2)(x))
    return x + _apply_chain(block, layout.post_mlp, h), size


def run_blocks(
    blocks: nn.ModuleList, layout: BlockLayout, x: torch.Tensor, settings: TurboSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    size = None
    if settings.record_plans:
        settings.plans.clear()
    for block, r in zip(blocks, settings.schedule):
        r_l = merge.layer_r(r, x.shape[1], settings.protected, settings.min_tokens)
        x, size = turbo_block(block, layout, x, size, r_l, settings)
    return x, size


class TurboViTBackbone:
    """Forward for ViTModel / DeiTModel (mixed into a subclass of the original class)."""

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        settings: TurboSettings = getattr(self, TURBO_ATTR)
        x = self.embeddings(
            pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype),
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
        )
        x, _ = run_blocks(self.layers, VIT_BLOCK, x, settings)
        sequence_output = self.layernorm(x)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled)


class TurboDinov2Backbone:
    """Forward for Dinov2Model (mixed into a subclass of the original class)."""

    def forward(self, pixel_values=None, bool_masked_pos=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        settings: TurboSettings = getattr(self, TURBO_ATTR)
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        x, _ = run_blocks(self.encoder.layer, DINOV2_BLOCK, x, settings)
        sequence_output = self.layernorm(x)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0, :])


@dataclass(frozen=True)
class FamilyAdapter:
    """What apply_turbo needs to know about one supported model class."""

    class_name: str
    backbone_attr: str | None  # None: the model is the backbone
    mixin: type
    protected: int
    blocks: Callable[[nn.Module], nn.ModuleList]

    def backbone(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.backbone_attr) if self.backbone_attr else model


def _vit_blocks(backbone: nn.Module) -> nn.ModuleList:
    return backbone.layers


def _dinov2_blocks(backbone: nn.Module) -> nn.ModuleList:
    return backbone.encoder.layer


ADAPTERS: dict[str, FamilyAdapter] = {
    a.class_name: a
    for a in (
        FamilyAdapter("ViTModel", None, TurboViTBackbone, 1, _vit_blocks),
        FamilyAdapter("ViTForImageClassification", "vit", TurboViTBackbone, 1, _vit_blocks),
        FamilyAdapter("DeiTModel", None, TurboViTBackbone, 2, _vit_blocks),
        FamilyAdapter("DeiTForImageClassification", "deit", TurboViTBackbone, 2, _vit_blocks),
        FamilyAdapter("DeiTForImageClassificationWithTeacher", "deit", TurboViTBackbone, 2, _vit_blocks),
        FamilyAdapter("Dinov2Model", None, TurboDinov2Backbone, 1, _dinov2_blocks),
    )
}

_SUBCLASS_CACHE: dict[type, type] = {}


def adapter_for(model: nn.Module) -> FamilyAdapter | None:
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS and cls.__module__.startswith("transformers."):
            return ADAPTERS[cls.__name__]
    return None


def _turbo_subclass(original: type, mixin: type) -> type:
    if original not in _SUBCLASS_CACHE:
        _SUBCLASS_CACHE[original] = type(f"Turbo{original.__name__}", (mixin, original), {})
    return _SUBCLASS_CACHE[original]


def patch(
    model: nn.Module,
    adapter: FamilyAdapter,
    ratio: merge.RSchedule,
    alpha: float,
    min_tokens: int,
    prop_attn: bool,
) -> nn.Module:
    backbone = adapter.backbone(model)
    blocks = adapter.blocks(backbone)
    try:
        schedule = merge.r_schedule(ratio, len(blocks))
    except (TypeError, ValueError) as exc:
        raise TurboExportError(f"ratio: {exc}") from None
    if any(r < 0 for r in schedule):
        raise TurboExportError(f"ratio must be >= 0 in every layer, got {schedule}")
    settings = TurboSettings(
        schedule=schedule, alpha=float(alpha), min_tokens=int(min_tokens), prop_attn=bool(prop_attn),
        protected=adapter.protected,
    )
    if not hasattr(backbone, ORIGINAL_CLASS_ATTR):
        original = type(backbone)
        backbone.__class__ = _turbo_subclass(original, adapter.mixin)
        setattr(backbone, ORIGINAL_CLASS_ATTR, original)
    setattr(backbone, TURBO_ATTR, settings)
    setattr(model, TURBO_ATTR, settings)
    return model


def unpatch(model: nn.Module, adapter: FamilyAdapter) -> nn.Module:
    backbone = adapter.backbone(model)
    original = getattr(backbone, ORIGINAL_CLASS_ATTR, None)
    if original is not None:
        backbone.__class__ = original
        delattr(backbone, ORIGINAL_CLASS_ATTR)
    for module in (backbone, model):
        if TURBO_ATTR in module.__dict__:
            delattr(module, TURBO_ATTR)
    return model
