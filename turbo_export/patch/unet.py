"""Turbo for the diffusers Stable Diffusion UNet (``UNet2DConditionModel``: SD 1.x, 2.x and SDXL layouts).

In every ``BasicTransformerBlock`` of the chosen resolution levels, the block's tokens are merged before and
restored after each of self-attention, cross-attention and the feed-forward network (the paper's placement;
ToMe for SD merges the same way, by default around self-attention only):

    x = x + restore_v(attn1(merge_v(norm1(x))))
    x = x + restore_c(attn2(merge_c(norm2(x)), text))
    x = x + restore_v(ff(merge_v(norm3(x))))

Both plans come from one bipartite matching on the block's input hidden states (``merge.grid_matching``: same
redundancy R and destinations); they differ only in which A tokens are sources.

The semantic value (the paper says only: self-attention and FFN merges use the visual tokens, the
cross-attention merge uses visual and textual tokens together). Our design:

- self-attention and FFN (plan ``v``): visual tokens alone, E = R. An image-only saliency would need the
  full N x N self-attention that merging is there to avoid, and the latent grid has no CLS token whose
  attention row could stand in for it; so these merges are ToMe for SD's.
- cross-attention (plan ``c``): I = 1 - p(start token), where p is attn2's attention probability of each
  image token on the prompt, averaged over heads, computed for the unmerged queries at that point
  (norm2(x) after self-attention; N x 77 logits, one query projection of the full sequence). CLIP's start
  token is an attention sink that carries no prompt content; the mass an image token puts elsewhere is
  how much it reads the prompt's words (and the end/pad tokens, which in CLIP summarise the prompt). Tokens
  that read the prompt carry the text's semantics into the image, so a large I protects them from being
  merged. The choice is static: no prompt length or token mask enters the graph. I is in [0, 1] and R in
  [-1, 1]: ``alpha = 1`` weighs a full swing of text attention like a full swing of similarity.
- ``alpha = 0`` skips the semantic term: plan c == plan v, exactly ToMe for SD (fixed top-left
  destinations, no randomness), so the two compare directly.

``apply_turbo_unet`` is a sibling of ``apply_turbo`` (not one of its adapters): its ``ratio`` is a
fraction of tokens in (0, 0.75], not tokens per block; ``apply_turbo`` / ``remove_turbo`` dispatch here for a
UNet. Patching swaps each chosen block's class for a subclass and adds one forward pre-hook on the UNet
(records the latent height and width); ``remove_turbo_unet`` restores both exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turbo_export.core import merge
from turbo_export.errors import TurboExportError

SETTINGS_ATTR = "_turbo_sd"
HOOK_ATTR = "_turbo_sd_hook"
ORIGINAL_CLASS_ATTR = "_turbo_original_class"
LEVEL_ATTR = "_turbo_level"
MAX_RATIO = 0.75
SELECTIONS = ("default", "all")
PARTS = ("attn1", "attn2", "ff")


@dataclass
class SDTurboSettings:
    """How a UNet merges; shared by its patched blocks (read-only during forward except ``latent_hw``)."""

    ratio: float
    alpha: float
    max_downsample: int
    seed: int | None = None
    parts: tuple[str, ...] = PARTS
    merge_impl: str = "onnx"  # "plugin": each merge one turbo::merge op (TurboMerge node), each restore one unmerge
    latent_hw: tuple[int, int] | None = None


def check_fraction(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= MAX_RATIO):
        raise TurboExportError(f"ratio: must be a fraction of tokens in (0, {MAX_RATIO}], got {ratio}")
    return float(ratio)


def max_downsample_for(selection: str | int, num_levels: int) -> int:
    """'default' -> 1 (highest-resolution level only, as ToMe for SD); 'all' -> every level; an int as given."""
    if selection == "default":
        return 1
    if selection == "all":
        return 2 ** (num_levels - 1)
    if isinstance(selection, int) and selection >= 1:
        return selection
    raise TurboExportError(f"blocks: expected one of {', '.join(SELECTIONS)} or a downsampling factor >= 1, "
                           f"got {selection!r}")


def transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Every BasicTransformerBlock with its qualified name and resolution level (0 = full latent size)."""
    num_levels = len(unet.down_blocks)
    out = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in ("BasicTransformerBlock", "TurboBasicTransformerBlock"):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = num_levels - 1 - int(parts[1])
        else:  # mid_block
            level = num_levels - 1
        out.append((name, module, level))
    return out


def cross_attention_saliency(attn: nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """I = 1 - (attention probability on the start token, averaged over heads): [B, N]."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    batch, tokens, _ = hidden.shape
    q = attn.to_q(hidden)
    k = attn.to_k(context)
    head_dim = k.shape[-1] // attn.heads
    q = q.view(batch, tokens, attn.heads, head_dim).transpose(1, 2)
    k = k.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    probs = (torch.matmul(q, k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
    return 1.0 - probs[..., 0].mean(dim=1)


class TurboBasicTransformerBlock:
    """Forward for diffusers' BasicTransformerBlock with norm_type 'layer_norm' (mixed into a subclass)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        settings: SDTurboSettings = getattr(self, SETTINGS_ATTR)
        kwargs = dict(cross_attention_kwargs or {})
        x = x_in = hidden_states
        height, width = settings.latent_hw
        scale = 2 ** getattr(self, LEVEL_ATTR)
        split = merge.grid_split(math.ceil(height / scale), math.ceil(width / scale), settings.seed)
        if split.height * split.width != x.shape[1]:
            raise RuntimeError(f"block expects {split.height}x{split.width} tokens, got {x.shape[1]}")
        r = merge.grid_r(x.shape[1], settings.ratio, split)
        if settings.merge_impl == "plugin":
            site_v = _plugin_site(x_in, split, r)
        else:
            redundancy, dst = merge.grid_redundancy(x, split)
            site_v = _grid_site(merge.grid_plan(redundancy, dst, split, r), split)

        def around(part: str, site, fn, h: torch.Tensor) -> torch.Tensor:
            if part not in settings.parts or r == 0:
                return fn(h)
            merged, restore = site(h)
            return restore(fn(merged))

        h = self.norm1(x)
        context1 = encoder_hidden_states if self.only_cross_attention else None
        x = x + around("attn1", site_v,
                       lambda t: self.attn1(t, encoder_hidden_states=context1, attention_mask=attention_mask,
                                            **kwargs), h)
        if self.attn2 is not None:
            h = self.norm2(x)
            site_c = site_v
            if settings.alpha != 0.0 and r > 0 and "attn2" in settings.parts:
                semantic = cross_attention_saliency(self.attn2, h, encoder_hidden_states)
                if settings.merge_impl == "plugin":
                    site_c = _plugin_site(x_in, split, r, semantic, settings.alpha)
                else:
                    site_c = _grid_site(merge.grid_plan(redundancy, dst, split, r, semantic, settings.alpha), split)
            x = x + around("attn2", site_c,
                           lambda t: self.attn2(t, encoder_hidden_states=encoder_hidden_states,
                                                attention_mask=encoder_attention_mask, **kwargs), h)
        x = x + around("ff", site_v, self.ff, self.norm3(x))
        return x


def _grid_site(plan: merge.MergePlan, split: merge.GridSplit):
    """h -> (merged h, restore) with standard ops (plain-mean merge, one gather to restore)."""
    return lambda h: (merge.merge_mean(plan, split, h), lambda y: merge.unmerge_grid(plan, split, y))


def _plugin_site(metric: torch.Tensor, split: merge.GridSplit, r: int, semantic: torch.Tensor | None = None,
                 alpha: float = 0.0):
    """h -> (merged h, restore) as one TurboMerge and one TurboUnmerge node.

    Every merge recomputes the matching from the block input (the node's contract; the kernel recomputes it per
    channel block anyway). All-ones sizes make the node's size-weighted mean the plain mean, nothing is protected;
    the node lists unmerged A tokens in A order (not descending E), which its restore inverts.
    """
    from turbo_export.core import plugin_ops

    indices = (split.a_idx.to(torch.int32), split.b_idx.to(torch.int32))
    batch, tokens, _ = metric.shape

    def site(h: torch.Tensor):
        ones = h.new_ones(batch, tokens, 1)
        merged, _, plan = plugin_ops.plugin_merge(h, ones, metric, semantic, r, alpha, protected=0, split=indices)
        return merged, lambda y: plugin_ops.plugin_unmerge(plan, y, tokens, split=indices)

    return site


_SUBCLASSES: dict[type, type] = {}


def _subclass(original: type) -> type:
    if original not in _SUBCLASSES:
        _SUBCLASSES[original] = type(f"Turbo{original.__name__}", (TurboBasicTransformerBlock, original), {})
    return _SUBCLASSES[original]


def _record_latent_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # the settings are looked up on the UNet, not captured: a deepcopy of a patched UNet (fp16 export) copies the
    # hook function by reference, so a captured object would be the original's, not the copy's blocks' settings
    sample = args[0] if args else kwargs["sample"]
    getattr(module, SETTINGS_ATTR).latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))


UNET_CLASS = "UNet2DConditionModel"


def is_unet(model: nn.Module) -> bool:
    return any(c.__name__ == UNET_CLASS for c in type(model).__mro__)


def apply_turbo_unet(unet: nn.Module, ratio: float, alpha: float = 1.0, blocks: str | int = "default",
                     seed: int | None = None, parts: tuple[str, ...] = PARTS, merge_impl: str = "onnx"
                     ) -> nn.Module:
    """Patch ``unet`` in place: merge ``ratio`` of the tokens in the chosen blocks; returns the UNet.

    blocks: 'default' (the highest-resolution level with transformer blocks only: ToMe for SD's max_downsample
    = 1 on SD 1.x, 2 on SDXL, whose full-size level has no attention), 'all', or a
    maximum downsampling factor. seed: None = destination at each 2x2 cell's top-left, else a seeded pattern.
    merge_impl: "onnx" (standard ops) or "plugin" (each merge one TurboMerge node, each restore one TurboUnmerge
    node when exported; same tokens after restore, see ``_plugin_site``). Calling it again replaces the settings.
    """
    from turbo_export.core.plugin_ops import check_merge_impl

    if not is_unet(unet):
        raise TurboExportError(f"model class {type(unet).__name__} is not a diffusers UNet2DConditionModel")
    ratio = check_fraction(ratio)
    check_merge_impl(merge_impl)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise TurboExportError(f"parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    remove_turbo_unet(unet)
    max_downsample = max_downsample_for(blocks, len(unet.down_blocks))
    if blocks == "default":  # the finest level that has transformer blocks: SDXL has none at full latent size
        max_downsample = 2 ** min((level for _, _, level in transformer_blocks(unet)), default=0)
    settings = SDTurboSettings(ratio=ratio, alpha=float(alpha), max_downsample=max_downsample, seed=seed,
                               parts=tuple(parts), merge_impl=merge_impl)
    for name, block, level in transformer_blocks(unet):
        if 2 ** level > settings.max_downsample:
            continue
        if block.norm_type != "layer_norm" or block.pos_embed is not None:
            raise TurboExportError(f"{name}: norm_type {block.norm_type!r} / positional embedding not supported")
        original = type(block)
        block.__class__ = _subclass(original)
        setattr(block, ORIGINAL_CLASS_ATTR, original)
        setattr(block, SETTINGS_ATTR, settings)
        setattr(block, LEVEL_ATTR, level)
    setattr(unet, HOOK_ATTR, unet.register_forward_pre_hook(_record_latent_size, with_kwargs=True))
    setattr(unet, SETTINGS_ATTR, settings)
    return unet


def remove_turbo_unet(unet: nn.Module) -> nn.Module:
    """Undo ``apply_turbo_unet``: the UNet computes exactly what it computed before."""
    for _, block, _ in transformer_blocks(unet):
        original = block.__dict__.pop(ORIGINAL_CLASS_ATTR, None)
        if original is not None:
            block.__class__ = original
        for attr in (SETTINGS_ATTR, LEVEL_ATTR):
            block.__dict__.pop(attr, None)
    handle = unet.__dict__.pop(HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    unet.__dict__.pop(SETTINGS_ATTR, None)
    return unet


def merged_blocks(unet: nn.Module) -> list[str]:
    return [name for name, block, _ in transformer_blocks(unet) if SETTINGS_ATTR in block.__dict__]


def tokens_per_block(unet: nn.Module, latent_hw: tuple[int, int], ratio: float | None,
                     seed: int | None = None) -> list[dict[str, Any]]:
    """Per transformer block: name, tokens, tokens in the merged attention/FFN (= tokens where not merged)."""
    settings = getattr(unet, SETTINGS_ATTR, None)
    out = []
    for name, block, level in transformer_blocks(unet):
        h, w = (math.ceil(s / 2 ** level) for s in latent_hw)
        merged = settings is not None and SETTINGS_ATTR in block.__dict__
        r = merge.grid_r(h * w, ratio, merge.grid_split(h, w, seed)) if merged and ratio else 0
        out.append({"block": name, "height": h, "width": w, "tokens": h * w, "merged": r,
                    "tokens_after_merge": h * w - r})
    return out
