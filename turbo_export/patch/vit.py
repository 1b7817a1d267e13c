"""Turbo for the transformers ViT family: ViT, DeiT (distillation token protected) and DINOv2 (layer scale)."""

from __future__ import annotations

from torch import nn

from turbo_export.patch.blocks import (
    TURBO_ATTR,
    BlockLayout,
    BlockOutputs,
    FamilyAdapter,
    TurboSettings,
    TurboVisionOutput,
    finish,
    run_blocks,
    separate_qkv,
)

VIT_BLOCK = BlockLayout(
    attention="attention", norm1="layernorm_before", norm2="layernorm_after", qkv=separate_qkv, out_proj="o_proj",
    scaling="scaling", post_attn=("dropout",), post_mlp=("dropout",),
)
DINOV2_BLOCK = BlockLayout(
    attention="attention", norm1="norm1", norm2="norm2", qkv=separate_qkv, out_proj="o_proj", scaling="scaling",
    post_attn=("layer_scale1", "drop_path"), post_mlp=("layer_scale2", "drop_path"),
)


class TurboViTBackbone:
    """Forward for ViTModel / DeiTModel (mixed into a subclass of the original class)."""

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None, **kwargs):
        settings: TurboSettings = getattr(self, TURBO_ATTR)
        x = self.embeddings(
            pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype),
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
        )
        outputs = BlockOutputs.requested(self.config, kwargs)
        x, sizes = run_blocks(self.layers, VIT_BLOCK, x, settings, outputs)
        sequence_output = self.layernorm(x)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        return finish(TurboVisionOutput(last_hidden_state=sequence_output, pooler_output=pooled, token_sizes=sizes,
                                        **(outputs.fields() if outputs else {})), kwargs)


class TurboDinov2Backbone:
    """Forward for Dinov2Model (mixed into a subclass of the original class)."""

    def forward(self, pixel_values=None, bool_masked_pos=None, **kwargs):
        settings: TurboSettings = getattr(self, TURBO_ATTR)
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        outputs = BlockOutputs.requested(self.config, kwargs)
        x, sizes = run_blocks(self.encoder.layer, DINOV2_BLOCK, x, settings, outputs)
        sequence_output = self.layernorm(x)
        return finish(TurboVisionOutput(last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0, :],
                                        token_sizes=sizes, **(outputs.fields() if outputs else {})), kwargs)


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
