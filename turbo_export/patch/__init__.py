"""Model adapters: patch a model's blocks by its class, one module per architecture (vit, blip, blip2, clip, unet).

The public ``apply_turbo`` (``turbo_export.api``) fills in the family's default alpha and calls ``patch_model``.
"""

from __future__ import annotations

from torch import nn

from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.patch import blip, blip2, blocks, clip, unet, vit

ADAPTERS: dict[str, blocks.FamilyAdapter] = {**vit.ADAPTERS, **blip.ADAPTERS, **blip2.ADAPTERS, **clip.ADAPTERS}


def supported_classes() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module) -> blocks.FamilyAdapter:
    adapter = blocks.find_adapter(model, ADAPTERS)
    if adapter is None:
        raise TurboExportError(
            f"model class {type(model).__name__} is not supported; supported classes: "
            + ", ".join(supported_classes())
        )
    return adapter


def patch_model(
    model: nn.Module,
    ratio: merge.RSchedule,
    alpha: float,
    min_tokens: int = 0,
    prop_attn: bool = True,
    merge_impl: str = "onnx",
    semantic: str | None = None,
) -> nn.Module:
    """Patch ``model`` in place so every block merges tokens with Turbo; returns the model.

    ratio: tokens merged per block (r): an int, a per-layer list, or ToMe's ``(r, inflection)``
    tuple (``(r, -0.5)`` is the decreasing schedule). alpha weighs the semantic value I directly
    (``alpha = 0`` is ToMe). Blocks whose input is shorter than ``min_tokens`` do not merge.
    Calling it again on a patched model replaces the settings. ``merge_impl="plugin"`` routes every merge
    through the ``turbo::merge`` custom op (same values; one TurboMerge node per block when exported).
    ``semantic``: the semantic value I, ``"cls"`` (Turbo's CLS row), or for models without a CLS token
    ``"mean-query"`` (the mean query's attention row) or ``"received"`` (the attention each token receives); None:
    the architecture's default (SigLIP: mean-query, else cls). core/merge.py says why.
    A diffusers UNet takes a fraction of tokens instead: use ``patch.unet.apply_turbo_unet``.
    """
    from turbo_export.core.plugin_ops import merge_fn

    if unet.is_unet(model):
        raise TurboExportError("a Stable Diffusion UNet merges a fraction of tokens: use "
                               "turbo_export.patch.unet.apply_turbo_unet(unet, ratio, alpha=, blocks=)")
    return blocks.patch(model, adapter_for(model), ratio, alpha, min_tokens, prop_attn,
                        semantic=semantic, merge_fn=merge_fn(merge_impl))


def remove_turbo(model: nn.Module) -> nn.Module:
    """Undo ``apply_turbo`` (or ``apply_turbo_unet``): the model computes exactly what it computed before."""
    if unet.is_unet(model):
        return unet.remove_turbo_unet(model)
    return blocks.unpatch(model, adapter_for(model))


def copy_for_patching(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to patch beside the original: its own modules, the original's parameters and buffers.
    The patch changes forwards and module attributes, never a weight, so the two can share them; a full deepcopy
    would double the memory (2 x 10 GB for SDXL's UNet in float32)."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def turbo_settings(model: nn.Module) -> "blocks.TurboSettings | None":
    return getattr(model, blocks.TURBO_ATTR, None)
