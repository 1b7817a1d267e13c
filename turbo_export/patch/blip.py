"""Turbo for BLIP: merging in the ViT image encoder of captioning, retrieval and VQA models.

The text side needs no patch: it cross-attends to whatever image sequence it is given, so it consumes the
shortened sequence as is. The patched vision model also returns ``token_sizes`` (how many patches each
output token stands for) so exported text graphs can offer size-aware cross-attention.
"""

from __future__ import annotations

from turbo_export.patch.blocks import (
    TURBO_ATTR,
    BlockLayout,
    BlockOutputs,
    FamilyAdapter,
    TurboSettings,
    TurboVisionOutput,
    encoder_layers,
    finish,
    fused_qkv,
    run_blocks,
)

BLIP_VISION_BLOCK = BlockLayout(
    attention="self_attn", norm1="layer_norm1", norm2="layer_norm2", qkv=fused_qkv, out_proj="projection",
    scaling="scale",
)


class TurboBlipVisionModel:
    """Forward for BlipVisionModel (mixed into a subclass of the original class)."""

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        settings: TurboSettings = getattr(self, TURBO_ATTR)
        x = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        outputs = BlockOutputs.requested(self.config, kwargs)
        x, sizes = run_blocks(self.encoder.layers, BLIP_VISION_BLOCK, x, settings, outputs)
        last = self.post_layernorm(x)
        pooled = self.post_layernorm(last[:, 0, :])
        return finish(TurboVisionOutput(last_hidden_state=last, pooler_output=pooled, token_sizes=sizes,
                                        **(outputs.fields() if outputs else {})), kwargs)


ADAPTERS: dict[str, FamilyAdapter] = {
    a.class_name: a
    for a in (
        FamilyAdapter("BlipVisionModel", None, TurboBlipVisionModel, 1, encoder_layers),
        FamilyAdapter("BlipForConditionalGeneration", "vision_model", TurboBlipVisionModel, 1, encoder_layers),
        FamilyAdapter("BlipForImageTextRetrieval", "vision_model", TurboBlipVisionModel, 1, encoder_layers),
        FamilyAdapter("BlipForQuestionAnswering", "vision_model", TurboBlipVisionModel, 1, encoder_layers),
    )
}
