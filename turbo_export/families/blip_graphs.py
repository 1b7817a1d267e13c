"""Static, export-ready graphs for BLIP's tasks, computed with the checkpoint's own modules and weights.

BLIP's text side (a BERT with optional cross-attention) is written out here once, with explicit masks
and additive biases instead of transformers' cache objects, so every text graph has static shapes:

- ``VisionGraph``: pixel_values -> image_embeds, image_sizes (patches per token; ones without Turbo)
  [, image_feat for retrieval].
- ``CrossKV``: encoder states -> every layer's cross-attention keys and values (once per image).
- ``DecoderStep``: one token through the decoder over a fixed-size self-attention KV cache; the pipeline
  calls it for the prompt (prefill, one token at a time) and then for every new token.
- ``TextEncoder``: a whole text (bidirectional), optionally cross-attending to encoder states.

``cross_bias`` is an additive bias over the cross-attention keys [B, 1, 1, Ni]: zeros reproduce
transformers exactly; ``log(image_sizes)`` is the size-aware variant (proportional attention on the text
side, an option measured against the default).
"""

from __future__ import annotations

import torch
from torch import nn


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    if bias is not None:
        scores = scores + bias
    ctx = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2)
    return ctx.reshape(ctx.shape[0], ctx.shape[1], -1)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] of 1 (keep) / 0 (drop) -> additive [B, 1, 1, S] like transformers' masks."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def text_layer(
    layer: nn.Module,
    x: torch.Tensor,
    self_k: torch.Tensor,
    self_v: torch.Tensor,
    self_bias: torch.Tensor | None,
    cross_k: torch.Tensor | None = None,
    cross_v: torch.Tensor | None = None,
    cross_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One BlipTextLayer: self-attention over (self_k, self_v), optional cross-attention, feed-forward."""
    attn = layer.attention
    heads = attn.self.num_attention_heads
    x = attn.output(_attend(_heads(attn.self.query(x), heads), self_k, self_v, self_bias), x)
    if cross_k is not None:
        cross = layer.crossattention
        x = cross.output(_attend(_heads(cross.self.query(x), heads), cross_k, cross_v, cross_bias), x)
    return layer.output(layer.intermediate(x), x)


def self_kv(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.attention.self
    return _heads(attn.key(x), attn.num_attention_heads), _heads(attn.value(x), attn.num_attention_heads)


class VisionGraph(nn.Module):
    """pixel_values -> image_embeds [B, Ni, C], image_sizes [B, Ni] (+ normalised ITC image_feat)."""

    def __init__(self, vision_model: nn.Module, vision_proj: nn.Module | None = None,
                 interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.vision_proj = vision_proj
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)
        embeds = out.last_hidden_state
        sizes = getattr(out, "token_sizes", None)
        sizes = sizes[..., 0] if sizes is not None else torch.ones_like(embeds[..., 0])
        if self.vision_proj is None:
            return embeds, sizes
        feat = nn.functional.normalize(self.vision_proj(embeds[:, 0, :]), dim=-1)
        return embeds, sizes, feat


class CrossKV(nn.Module):
    """encoder_hidden_states [B, Ni, Ce] -> cross_keys, cross_values [L, B, H, Ni, D]."""

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.layers = text_model.encoder.layer

    def forward(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for layer in self.layers:
            attn = layer.crossattention.self
            keys.append(_heads(attn.key(encoder_hidden_states), attn.num_attention_heads))
            values.append(_heads(attn.value(encoder_hidden_states), attn.num_attention_heads))
        return torch.stack(keys), torch.stack(values)


class DecoderStep(nn.Module):
    """One decoder token over a static KV cache of ``cache_len`` positions.

    Inputs: input_ids [B, 1], position [1] (the token's index), past_keys / past_values [L, B, H, T, D],
    cross_keys / cross_values [L, B, H, Ni, D], cross_bias [B, 1, 1, Ni].
    Outputs: logits [B, V], present_keys / present_values (the cache with this position written).
    """

    def __init__(self, lm_model: nn.Module, cache_len: int) -> None:
        super().__init__()
        self.bert = lm_model.bert
        self.cls = lm_model.cls
        self.cache_len = cache_len

    def forward(self, input_ids, position, past_keys, past_values, cross_keys, cross_values, cross_bias):
        x = self.bert.embeddings(input_ids=input_ids, position_ids=position.view(1, 1))
        slots = torch.arange(self.cache_len, device=input_ids.device)
        write = (slots == position).view(1, 1, self.cache_len, 1)
        visible = (slots <= position).view(1, 1, 1, self.cache_len)
        self_bias = torch.where(visible, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        present_k, present_v = [], []
        for i, layer in enumerate(self.bert.encoder.layer):
            k_new, v_new = self_kv(layer, x)
            k_all = torch.where(write, k_new, past_keys[i])
            v_all = torch.where(write, v_new, past_values[i])
            present_k.append(k_all)
            present_v.append(v_all)
            x = text_layer(layer, x, k_all, v_all, self_bias, cross_keys[i], cross_values[i], cross_bias)
        logits = self.cls(x)[:, 0, :]
        return logits, torch.stack(present_k), torch.stack(present_v)


class TextEncoder(nn.Module):
    """A whole text through BLIP's text model (bidirectional), optionally cross-attending to encoder states.

    Inputs: input_ids [B, S], attention_mask [B, S] (+ encoder_hidden_states [B, Ni, Ce], cross_bias
    [B, 1, 1, Ni]). Output: last_hidden_state [B, S, C], and with ``text_proj`` the normalised ITC text
    feature of the first token; with ``itm_head`` the ITM logits [B, 2].
    """

    def __init__(self, text_model: nn.Module, cross: bool, text_proj: nn.Module | None = None,
                 itm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.text_model = text_model
        self.cross = cross
        self.text_proj = text_proj
        self.itm_head = itm_head

    def forward(self, input_ids, attention_mask, encoder_hidden_states=None, cross_bias=None):
        x = self.text_model.embeddings(input_ids=input_ids)
        bias = mask_to_bias(attention_mask, x.dtype)
        for layer in self.text_model.encoder.layer:
            k, v = self_kv(layer, x)
            if self.cross:
                attn = layer.crossattention.self
                ck = _heads(attn.key(encoder_hidden_states), attn.num_attention_heads)
                cv = _heads(attn.value(encoder_hidden_states), attn.num_attention_heads)
                x = text_layer(layer, x, k, v, bias, ck, cv, cross_bias)
            else:
                x = text_layer(layer, x, k, v, bias)
        if self.itm_head is not None:
            return (self.itm_head(x[:, 0, :]),)
        if self.text_proj is not None:
            return (nn.functional.normalize(self.text_proj(x[:, 0, :]), dim=-1),)
        return (x,)
