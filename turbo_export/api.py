"""The Python API: ``apply_turbo`` / ``remove_turbo`` on a transformers model, with the family's defaults."""

from __future__ import annotations

import math

from torch import nn

from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.families import family_for_class
from turbo_export.families.encoders import check_schedule_fits
from turbo_export.patch import patch_model, unet
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
    architecture's; SigLIP has no CLS token and uses "mean-query"). A diffusers UNet merges a fraction of tokens:
    ``patch.unet.apply_turbo_unet``.

    With ``output_hidden_states=True`` / ``output_attentions=True`` the patched model returns what it computed, one
    entry per layer with sizes that shrink as tokens merge: hidden state l is [B, N_l, C] (N_l: tokens left after
    block l; entry 0 is the embeddings), attention l is [B, H, N_(l-1), N_(l-1)] (before block l merges).

    A ratio no block could apply is refused like the CLI refuses it (TurboExportError): r at most
    (tokens - protected) // 2, with tokens from the config's image size and patch size (a model run at another
    resolution: check against that one yourself).
    """
    if alpha is None:
        family = family_for_class(type(model).__name__)
        alpha = family.defaults_for(type(model).__name__).alpha if family is not None else 0.0
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise TurboExportError(f"alpha: must be a finite number, got {alpha!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise TurboExportError(f"min_tokens: must be an integer >= 0, got {min_tokens!r}")
    if merge_impl not in ("onnx", "plugin"):
        raise TurboExportError(f"merge_impl: must be 'onnx' or 'plugin', got {merge_impl!r}")
    _check_ratio_fits(model, ratio, merge_impl)
    return patch_model(model, ratio, alpha, min_tokens, prop_attn, merge_impl, semantic)


def _check_ratio_fits(model: nn.Module, ratio: merge.RSchedule, merge_impl: str) -> None:
    """The CLI's ratio checks (families.encoders.check_schedule_fits) against the model's own token count."""
    from turbo_export.patch import adapter_for

    if unet.is_unet(model):
        return  # patch_model says to use apply_turbo_unet
    adapter = adapter_for(model)
    backbone = adapter.backbone(model)
    config = getattr(backbone, "config", None) or getattr(model, "config", None)
    config = getattr(config, "vision_config", config)
    try:
        schedule = merge.r_schedule(ratio, len(adapter.blocks(backbone)))
    except (TypeError, ValueError) as exc:
        raise TurboExportError(f"ratio: {exc}") from None
    image_size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if not image_size or not patch:
        raise TurboExportError(f"{type(model).__name__}: its config has no image_size / patch_size to check the ratio "
                               "against")
    check_schedule_fits(schedule, (int(image_size) // int(patch)) ** 2 + adapter.protected, adapter.protected,
                        merge_impl)


def remove_turbo(model: nn.Module) -> nn.Module:
    """Undo ``apply_turbo`` (or ``apply_turbo_unet``): the model computes exactly what it computed before."""
    return _remove_turbo(model)
