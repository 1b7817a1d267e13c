"""Turbo for CLIP and SigLIP vision towers (transformers ``CLIPVisionModel`` / ``SiglipVisionModel``, and the image
side of ``CLIPVisionModelWithProjection``, ``CLIPModel`` and ``SiglipModel``, whose ``vision_model`` is one of them).

Both towers are pre-norm ViTs with the same block (``layer_norm1``, ``self_attn`` with q/k/v/out_proj,
``layer_norm2``, ``mlp``); they differ around the blocks:

- CLIP: CLS token first (protected: never merged), ``pre_layrnorm`` before the encoder, ``last_hidden_state`` is the
  encoder output *without* a final norm, ``pooler_output = post_layernorm(CLS)``; the projection models apply
  ``visual_projection`` to the pooler outside this forward. Semantic value: Turbo's CLS row.
- SigLIP: no CLS token (nothing protected), ``post_layernorm`` over the sequence, then the attention-pooling head
  ``head`` (a learned probe attends over all tokens). Semantic value: there is no CLS row to read, so the attention
  row of the mean query (``core.merge.mean_query_attention``; why, and what else was measured: core/merge.py).

The pooling head and proportional attention. The head is one more softmax attention over the (merged) sequence.
Proportional attention adds log(size) to the logits of a merged key so that it gets the attention mass of the
``size`` patches it replaced (for identical tokens, exactly); the blocks do that, and the head must too, or the
pooled embedding would under-weight exactly the regions merged most (large uniform areas) relative to what the
unmerged model pooled. So with ``prop_attn`` (the default) the head gets the same log(size) key bias: for a
sequence of exact duplicates merged into one token, the pooled output is then the unmerged one exactly
(tests/test_clip.py checks it). When nothing was merged the head runs unchanged (no bias), so r = 0 is the
original model bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from turbo_export.patch.blocks import (
    QKV,
    TURBO_ATTR,
    BlockLayout,
    BlockOutputs,
    FamilyAdapter,
    TurboSettings,
    TurboVisionOutput,
    encoder_layers,
    finish,
    run_blocks,
)


def clip_qkv(attn: nn.Module, x: torch.Tensor) -> QKV:
    """CLIPAttention / SiglipAttention's q_proj / k_proj / v_proj -> [B, H, N, D] each."""
    shape = (x.shape[0], x.shape[1], attn.num_heads, attn.head_dim)
    return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


CLIP_BLOCK = BlockLayout(
    attention="self_attn", norm1="layer_norm1", norm2="layer_norm2", qkv=clip_qkv, out_proj="out_proj",
    scaling="scale",
)  # CLIPEncoderLayer and SiglipEncoderLayer alike


class TurboClipVisionModel:
    """Forward for CLIPVisionModel (mixed into a subclass of the original class)."""

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        settings: TurboSettings = getattr(self, TURBO_ATTR)
        x = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        x = self.pre_layrnorm(x)
        outputs = BlockOutputs.requested(self.config, kwargs)
        x, sizes = run_blocks(self.encoder.layers, CLIP_BLOCK, x, settings, outputs)
        pooled = self.post_layernorm(x[:, 0, :])
        return finish(TurboVisionOutput(last_hidden_state=x, pooler_output=pooled, token_sizes=sizes,
                                        **(outputs.fields() if outputs else {})), kwargs)


def attention_pool(head: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """SiglipMultiheadAttentionPoolingHead over ``x`` [B, N, C], with log(size) added to every key's logit.

    ``size`` None: the head itself, unchanged. Otherwise its forward, written out with the key bias (the float
    ``attn_mask`` of nn.MultiheadAttention is added to the logits, one [1, N] row per sample and head).
    """
    if size is None:
        return head(x)
    batch, tokens = x.shape[0], x.shape[1]
    heads = head.attention.num_heads
    bias = size.log().transpose(1, 2)  # [B, 1, N]
    bias = bias[:, None].expand(batch, heads, 1, tokens).reshape(batch * heads, 1, tokens)
    probe = head.probe.repeat(batch, 1, 1)
    h = head.attention(probe, x, x, attn_mask=bias, need_weights=False)[0]
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


class TurboSiglipVisionModel:
    """Forward for SiglipVisionModel (mixed into a subclass of the original class)."""

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        settings: TurboSettings = getattr(self, TURBO_ATTR)
        x = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        tokens_in = x.shape[1]
        outputs = BlockOutputs.requested(self.config, kwargs)
        x, sizes = run_blocks(self.encoder.layers, CLIP_BLOCK, x, settings, outputs)
        last = self.post_layernorm(x)
        pooled = None
        if self.use_head:
            merged = x.shape[1] < tokens_in  # static: the token count of every block is a number in the graph
            pooled = attention_pool(self.head, last, sizes if (settings.prop_attn and merged) else None)
        return finish(TurboVisionOutput(last_hidden_state=last, pooler_output=pooled, token_sizes=sizes,
                                        **(outputs.fields() if outputs else {})), kwargs)


ADAPTERS: dict[str, FamilyAdapter] = {
    a.class_name: a
    for a in (
        FamilyAdapter("CLIPVisionModel", None, TurboClipVisionModel, 1, encoder_layers),
        FamilyAdapter("CLIPVisionModelWithProjection", "vision_model", TurboClipVisionModel, 1, encoder_layers),
        FamilyAdapter("CLIPModel", "vision_model", TurboClipVisionModel, 1, encoder_layers),
        FamilyAdapter("SiglipVisionModel", None, TurboSiglipVisionModel, 0, encoder_layers, semantic="mean-query"),
        FamilyAdapter("SiglipModel", "vision_model", TurboSiglipVisionModel, 0, encoder_layers, semantic="mean-query"),
    )
}
