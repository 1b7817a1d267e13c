"""Turbo for BLIP-2: merging in the ViT-g image encoder of ``Blip2ForConditionalGeneration`` and
``Blip2ForImageTextRetrieval``.

BLIP-2's vision tower is BLIP's (a CLS token first, one fused qkv Linear with q/v biases, ``projection``, a final
``post_layernorm``), so BLIP's merge-aware forward serves it unchanged: the CLS token is protected and is Turbo's
semantic row. The Q-Former needs no patch: its cross-attention builds keys and values from whatever image sequence
it is given (its image mask is ``ones`` of that sequence's length), so it reads the shorter sequence as is.
"""

from __future__ import annotations

from turbo_export.patch.blip import TurboBlipVisionModel
from turbo_export.patch.blocks import FamilyAdapter, encoder_layers

ADAPTERS: dict[str, FamilyAdapter] = {
    a.class_name: a
    for a in (
        FamilyAdapter("Blip2VisionModel", None, TurboBlipVisionModel, 1, encoder_layers),
        FamilyAdapter("Blip2ForConditionalGeneration", "vision_model", TurboBlipVisionModel, 1, encoder_layers),
        FamilyAdapter("Blip2ForImageTextRetrieval", "vision_model", TurboBlipVisionModel, 1, encoder_layers),
    )
}
