"""The Python API: ``apply_turbo`` / ``remove_turbo`` on a transformers model, with the family's defaults."""

from __future__ import annotations

from torch import nn

from turbo_export.core import merge
from turbo_export.families import family_for_class
from turbo_export.patch import patch_model
from turbo_export.patch import remove_turbo as _remove_turbo


def apply_turbo(
    model: nn.Module,
    ratio: merge.RSchedule,
    alpha: float | None = None,
    min_tokens: int = 0,
    prop_attn: bool = True,
    merge_impl: str = "onnx",
    semantic: str | None = None,
) -> nn.Module:
    """Patch ``model`` in place so every block merges tokens with Turbo; returns the model.

    ratio: tokens merged per block (r): an int, a per-layer list, or ToMe's ``(r, inflection)`` tuple
    (``(r, -0.5)`` is the decreasing schedule). alpha weighs the semantic value I directly (``alpha = 0`` is ToMe;
    None: the family's default for the model's class, e.g. 150 for ViT classifiers, 6 for backbones and BLIP).
    Blocks whose input is shorter than ``min_tokens`` do not merge. Calling it again replaces the settings.
    ``merge_impl="plugin"`` routes every merge through the ``turbo::merge`` custom op (one TurboMerge node per
    block when exported). ``semantic``: the semantic value I, "cls", "mean-query" or "received" (None: the
    architecture's; SigLIP has no CLS token and uses "mean-query"). A diffusers UNet merges a fraction of tokens: ``patch.unet.apply_turbo_unet``.
    """
    if alpha is None:
        family = family_for_class(type(model).__name__)
        alpha = family.defaults_for(type(model).__name__).alpha if family is not None else 0.0
    return patch_model(model, ratio, alpha, min_tokens, prop_attn, merge_impl, semantic)


def remove_turbo(model: nn.Module) -> nn.Module:
    """Undo ``apply_turbo`` (or ``apply_turbo_unet``): the model computes exactly what it computed before."""
    return _remove_turbo(model)
