"""Merge-aware transformer blocks shared by every understanding-model adapter (ViT family, BLIP vision).

An adapter swaps the backbone module's class for a subclass whose forward runs the blocks itself, so
token sizes flow between blocks as plain forward values (``torch.export`` snapshots module attributes
mutated during tracing, which would break state shared across layers). ``unpatch`` swaps the original
class back: the model is then bit-for-bit the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from turbo_export.core import merge
from turbo_export.errors import TurboExportError

TURBO_ATTR = "_turbo"
ORIGINAL_CLASS_ATTR = "_turbo_original_class"

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class TurboVisionOutput(BaseModelOutputWithPooling):
    """A patched vision backbone's output, plus ``token_sizes`` [B, N, 1]: how many patches each token stands for
    (size-weighted pooling, size-aware cross-attention)."""

    token_sizes: torch.Tensor | None = None


@dataclass
class TurboSettings:
    """How one model merges; stored on the patched backbone (read-only during forward)."""

    schedule: list[int]
    alpha: float
    min_tokens: int
    prop_attn: bool
    protected: int
    semantic: str = "cls"  # the semantic value I: "cls", "mean-query" or "received" (merge.semantic_value)
    merge_fn: Callable[..., Any] = field(default=merge.turbo_merge, repr=False)
    # Filled by the forward when `record_plans` is set (visualisation, debugging); never during export.
    record_plans: bool = False
    plans: list = field(default_factory=list, repr=False)
    margins: list = field(default_factory=list, repr=False)  # per block: decision_margin, [B]


def separate_qkv(attn: nn.Module, x: torch.Tensor) -> QKV:
    """q_proj / k_proj / v_proj (ViT, DeiT, DINOv2) -> [B, H, N, D] each."""
    shape = (x.shape[0], x.shape[1], attn.num_attention_heads, attn.head_dim)
    return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def fused_qkv(attn: nn.Module, x: torch.Tensor) -> QKV:
    """One qkv Linear (BLIP vision) -> [B, H, N, D] each."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


@dataclass(frozen=True)
class BlockLayout:
    """Where a block keeps its parts; the only thing that differs between families."""

    attention: str
    norm1: str
    norm2: str
    qkv: Callable[[nn.Module, torch.Tensor], QKV]
    out_proj: str
    scaling: str
    post_attn: tuple[str, ...] = ()  # modules applied to the attention output before the residual
    post_mlp: tuple[str, ...] = ()


def turbo_attention(
    attn: nn.Module, layout: BlockLayout, x: torch.Tensor, bias: torch.Tensor | None, semantic: str = "cls",
    size: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager self-attention with an additive key bias, also returning Turbo's two inputs.

    Returns (output [B, N, C], metric = keys averaged over heads [B, N, D], semantic value [B, N]: the CLS row of
    the attention probabilities averaged over heads, or a no-CLS value: ``"mean-query"`` (the mean query's row) or
    ``"received"`` (the attention each token receives), queries weighted by ``size``: ``merge.semantic_value``;
    probabilities [B, H, N, N]).
    """
    q, k, v = layout.qkv(attn, x)
    scale = getattr(attn, layout.scaling)
    logits = torch.matmul(q, k.transpose(2, 3)) * scale
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    semantic_value = merge.semantic_value(probs, semantic, size, q, k, scale, bias)
    return getattr(attn, layout.out_proj)(out), k.mean(dim=1), semantic_value, probs


def _apply_chain(block: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    for name in names:
        x = getattr(block, name)(x)
    return x


@dataclass
class BlockOutputs:
    """What a transformers caller asked for with ``output_hidden_states`` / ``output_attentions``: filled by
    ``run_blocks``. With Turbo the sizes differ per layer: hidden state l is [B, N_l, C] with N_l the tokens left
    after block l's merge (entry 0: the embeddings), attention l is [B, H, N_(l-1), N_(l-1)] (block l attends over
    its input tokens, before it merges)."""

    hidden_states: list[torch.Tensor] | None = None
    attentions: list[torch.Tensor] | None = None

    @classmethod
    def requested(cls, config: Any, kwargs: dict[str, Any]) -> BlockOutputs | None:
        """The outputs asked for in a forward's kwargs (else the config's defaults), or None when neither is."""
        def flag(name: str) -> bool:
            value = kwargs.get(name)
            return bool(getattr(config, name, False) if value is None else value)

        hidden, attentions = flag("output_hidden_states"), flag("output_attentions")
        if not (hidden or attentions):
            return None
        return cls([] if hidden else None, [] if attentions else None)

    def fields(self) -> dict[str, tuple[torch.Tensor, ...] | None]:
        """``hidden_states`` / ``attentions`` as transformers returns them (tuples, one entry per layer)."""
        return {"hidden_states": None if self.hidden_states is None else tuple(self.hidden_states),
                "attentions": None if self.attentions is None else tuple(self.attentions)}


def turbo_block(
    block: nn.Module,
    layout: BlockLayout,
    x: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    settings: TurboSettings,
    outputs: BlockOutputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One transformer block: attention, residual, merge (if r > 0), MLP, residual."""
    bias = merge.proportional_attention_bias(size) if (settings.prop_attn and size is not None) else None
    h, metric, semantic, probs = turbo_attention(getattr(block, layout.attention), layout,
                                                 getattr(block, layout.norm1)(x), bias, settings.semantic, size)
    if outputs is not None and outputs.attentions is not None:
        outputs.attentions.append(probs)
    x = x + _apply_chain(block, layout.post_attn, h)

    if r > 0:
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        x, size, plan = settings.merge_fn(x, size, metric, semantic, r, settings.alpha, settings.protected)
        if settings.record_plans:
            settings.plans.append(plan)
            settings.margins.append(merge.decision_margin(metric, r, semantic, settings.alpha, settings.protected))

    h = block.mlp(getattr(block, layout.norm2)(x))
    return x + _apply_chain(block, layout.post_mlp, h), size


def run_blocks(
    blocks: nn.ModuleList, layout: BlockLayout, x: torch.Tensor, settings: TurboSettings,
    outputs: BlockOutputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks; returns the final tokens and their sizes (ones where nothing merged). ``outputs``: also collect
    every block's output (merged length) and attention probabilities there."""
    size = None
    if settings.record_plans:
        settings.plans.clear()
        settings.margins.clear()
    if outputs is not None and outputs.hidden_states is not None:
        outputs.hidden_states.append(x)
    for block, r in zip(blocks, settings.schedule):
        r_l = merge.layer_r(r, x.shape[1], settings.protected, settings.min_tokens)
        x, size = turbo_block(block, layout, x, size, r_l, settings, outputs)
        if outputs is not None and outputs.hidden_states is not None:
            outputs.hidden_states.append(x)
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    return x, size


def encoder_layers(vision_model: nn.Module) -> nn.ModuleList:
    """The blocks of a vision tower that keeps them in ``encoder.layers`` (BLIP, BLIP-2, CLIP, SigLIP)."""
    return vision_model.encoder.layers


def finish(output: Any, kwargs: dict[str, Any]) -> Any:
    """A patched forward's ModelOutput, as a tuple when the caller passed ``return_dict=False``."""
    return output.to_tuple() if kwargs.get("return_dict") is False else output


@dataclass(frozen=True)
class FamilyAdapter:
    """What apply_turbo needs to know about one supported model class."""

    class_name: str
    backbone_attr: str | None  # dotted path to the module whose class is swapped; None: the model itself
    mixin: type
    protected: int
    blocks: Callable[[nn.Module], nn.ModuleList]
    semantic: str = "cls"  # the default semantic value: "cls" needs a CLS token at index 0 (protected >= 1)

    def backbone(self, model: nn.Module) -> nn.Module:
        module = model
        for name in (self.backbone_attr.split(".") if self.backbone_attr else []):
            module = getattr(module, name)
        return module


_SUBCLASS_CACHE: dict[type, type] = {}


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
    semantic: str | None = None,
    **extra: Any,
) -> nn.Module:
    """Patch ``model`` per ``adapter``; ``semantic`` (None: the adapter's) chooses the semantic value I."""
    semantic = semantic or adapter.semantic
    if semantic not in merge.SEMANTIC_VALUES:
        raise TurboExportError(f"semantic: unknown '{semantic}'; choose one of {', '.join(merge.SEMANTIC_VALUES)}")
    if semantic == "cls" and adapter.protected < 1:
        raise TurboExportError(f"semantic: {adapter.class_name} has no CLS token; use semantic='mean-query'")
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
        protected=adapter.protected, semantic=semantic,
    )
    for key, value in extra.items():
        setattr(settings, key, value)
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


def sample_margins(model: nn.Module, run: Callable[[], Any]) -> torch.Tensor | None:
    """Run ``run()`` with plan recording on and return each sample's smallest merge-decision margin."""
    settings: TurboSettings | None = getattr(model, TURBO_ATTR, None)
    if settings is None:
        return None
    settings.record_plans = True
    try:
        with torch.no_grad():
            run()
        margins = list(settings.margins)
    finally:
        settings.record_plans = False
        settings.plans.clear()
        settings.margins.clear()
    return torch.stack(margins).min(dim=0)[0] if margins else None


def find_adapter(model: nn.Module, adapters: dict[str, FamilyAdapter]) -> FamilyAdapter | None:
    for cls in type(model).__mro__:
        if cls.__name__ in adapters and cls.__module__.startswith("transformers."):
            return adapters[cls.__name__]
    return None
