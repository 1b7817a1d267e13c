"""Static, export-ready graphs for BLIP-2, computed with the checkpoint's own modules and weights.

The Q-Former and the OPT language model are written out here with explicit additive biases instead of
transformers' mask builders and cache objects (a mask builder may drop an all-ones mask while tracing, which would
bake the example's padding into the graph), in transformers' order of operations, so every graph has static shapes:

- ``ImageGraph``: pixel_values -> image_embeds (the ViT-g output: Turbo's shorter sequence), image_sizes, and the
  learned queries read out through the Q-Former's cross-attention: ``language_inputs`` (caption: the
  language_projection, the language model's image prefix) or ``image_feat`` (retrieval: the normalised ITC
  feature of every query).
- ``TextFeatures``: a text through the Q-Former alone -> the normalised ITC text feature.
- ``ItmGraph``: the queries and a text through the Q-Former, cross-attending to the image -> ITM logits.
- ``LmPrefill``: the image prefix and the prompt (bos) through the language model at once -> the next token's
  logits and the static KV cache with those positions written.
- ``LmStep``: one token through the language model over the static KV cache (``KVDecoder`` drives it).
"""

from __future__ import annotations

import torch
from torch import nn

from turbo_export.families.blip_graphs import mask_to_bias


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _mix(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    ctx = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2)
    return ctx.reshape(ctx.shape[0], ctx.shape[1], -1)


def qformer_attention(block: nn.Module, x: torch.Tensor, states: torch.Tensor, bias: torch.Tensor | None
                      ) -> torch.Tensor:
    """One Blip2QFormerAttention (self- or cross-attention, then its output dense + LayerNorm)."""
    attn = block.attention
    heads = attn.num_attention_heads
    q, k, v = (_heads(attn.query(x), heads), _heads(attn.key(states), heads), _heads(attn.value(states), heads))
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
    if bias is not None:
        scores = scores + bias
    return block.output(_mix(scores, v), x)


def qformer_forward(qformer: nn.Module, embeds: torch.Tensor, query_length: int, self_bias: torch.Tensor | None,
                    image_embeds: torch.Tensor | None, cross_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Blip2QFormerModel's forward: the first ``query_length`` tokens are queries (cross-attending to
    ``image_embeds`` in every cross-attention layer, their own feed-forward), the rest text."""
    x = qformer.layernorm(embeds)
    for layer in qformer.encoder.layer:
        x = qformer_attention(layer.attention, x, x, self_bias)
        if query_length == 0:
            x = layer.output(layer.intermediate(x), x)
            continue
        queries = x[:, :query_length]
        if layer.has_cross_attention:
            queries = qformer_attention(layer.crossattention, queries, image_embeds, cross_bias)
        out = layer.output_query(layer.intermediate_query(queries), queries)
        if x.shape[1] > query_length:
            text = x[:, query_length:]
            out = torch.cat([out, layer.output(layer.intermediate(text), text)], dim=1)
        x = out
    return x


class ImageGraph(nn.Module):
    """pixel_values -> image_embeds [B, Ni, Cv], image_sizes [B, Ni], and ``language_inputs`` [B, Q, E] (caption)
    or ``image_feat`` [B, Q, D] (retrieval)."""

    def __init__(self, model: nn.Module, retrieval: bool) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.head = model.vision_projection if retrieval else model.language_projection
        self.retrieval = retrieval

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.vision_model(pixel_values=pixel_values)
        embeds = out.last_hidden_state
        sizes = getattr(out, "token_sizes", None)
        sizes = sizes[..., 0] if sizes is not None else torch.ones_like(embeds[..., 0])
        queries = self.query_tokens.expand(embeds.shape[0], -1, -1)
        feat = self.head(qformer_forward(self.qformer, queries, queries.shape[1], None, embeds))
        if self.retrieval:
            feat = nn.functional.normalize(feat, dim=-1)
        return embeds, sizes, feat


class TextFeatures(nn.Module):
    """input_ids, attention_mask [B, S] -> text_feat [B, D]: the normalised ITC feature of the first token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.qformer, self.text_projection = model.embeddings, model.qformer, model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.embeddings(input_ids=input_ids)
        x = qformer_forward(self.qformer, x, 0, mask_to_bias(attention_mask, x.dtype), None)
        return (nn.functional.normalize(self.text_projection(x[:, 0, :]), dim=-1),)


class ItmGraph(nn.Module):
    """input_ids, attention_mask [B, S], encoder_hidden_states [B, Ni, Cv], cross_bias [B, 1, 1, Ni] -> itm_logits
    [B, 2]: the ITM head over the queries, averaged (as Blip2ForImageTextRetrieval does)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.qformer, self.itm_head = model.embeddings, model.qformer, model.itm_head
        self.query_tokens = model.query_tokens

    def forward(self, input_ids, attention_mask, encoder_hidden_states, cross_bias) -> tuple[torch.Tensor]:
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        x = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones_like(attention_mask[:, :1]).expand(-1, queries.shape[1]), attention_mask], 1)
        x = qformer_forward(self.qformer, x, queries.shape[1], mask_to_bias(mask, x.dtype), encoder_hidden_states,
                            cross_bias)
        return (self.itm_head(x[:, : queries.shape[1], :]).mean(dim=1),)


def opt_layer(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
              = None, write: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OPTDecoderLayer over keys/values that are this input's (prefill) or the cache with this position
    written (``past``, ``write``); returns the output and the keys/values attended over."""
    attn = layer.self_attn
    heads = attn.num_heads
    pre = layer.do_layer_norm_before
    h = layer.self_attn_layer_norm(x) if pre else x
    q = _heads(attn.q_proj(h) * attn.scaling, heads)  # OPT scales the query before the product
    k, v = _heads(attn.k_proj(h), heads), _heads(attn.v_proj(h), heads)
    if past is not None:
        k, v = torch.where(write, k, past[0]), torch.where(write, v, past[1])
    x = x + attn.out_proj(_mix(torch.matmul(q, k.transpose(-1, -2)) + bias, v))
    if not pre:
        x = layer.self_attn_layer_norm(x)
    h = layer.final_layer_norm(x) if pre else x
    x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
    if not pre:
        x = layer.final_layer_norm(x)
    return x, k, v


def _lm_logits(decoder: nn.Module, lm_head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if decoder.final_layer_norm is not None:
        x = decoder.final_layer_norm(x)
    if decoder.project_out is not None:
        x = decoder.project_out(x)
    return lm_head(x[:, -1, :])


def _embed(decoder: nn.Module, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if decoder.project_in is not None:
        embeds = decoder.project_in(embeds)
    return embeds + decoder.embed_positions(None, 0, position_ids=positions)


class LmPrefill(nn.Module):
    """language_inputs [B, Q, E] (the image prefix), input_ids [B, P] (bos and the prompt) -> logits [B, V] of the
    next token, present_keys / present_values [L, B, H, T, D] (positions 0 .. Q + P - 1 written, the rest zeros)."""

    def __init__(self, language_model: nn.Module, cache_len: int) -> None:
        super().__init__()
        self.decoder = language_model.model.decoder
        self.lm_head = language_model.lm_head
        self.cache_len = cache_len

    def forward(self, language_inputs: torch.Tensor, input_ids: torch.Tensor):
        embeds = torch.cat([language_inputs, self.decoder.embed_tokens(input_ids)], dim=1)
        tokens = embeds.shape[1]
        slots = torch.arange(tokens, device=embeds.device)
        x = _embed(self.decoder, embeds, slots.view(1, -1))
        causal = (slots[None, :] <= slots[:, None]).view(1, 1, tokens, tokens)
        bias = torch.where(causal, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        keys, values = [], []
        pad = (0, 0, 0, self.cache_len - tokens)
        for layer in self.decoder.layers:
            x, k, v = opt_layer(layer, x, bias)
            keys.append(nn.functional.pad(k, pad))
            values.append(nn.functional.pad(v, pad))
        return _lm_logits(self.decoder, self.lm_head, x), torch.stack(keys), torch.stack(values)


class LmStep(nn.Module):
    """input_ids [B, 1], position [1], past_keys / past_values [L, B, H, T, D] -> logits [B, V], present_keys /
    present_values (the cache with this position written)."""

    def __init__(self, language_model: nn.Module, cache_len: int) -> None:
        super().__init__()
        self.decoder = language_model.model.decoder
        self.lm_head = language_model.lm_head
        self.cache_len = cache_len

    def forward(self, input_ids, position, past_keys, past_values):
        x = _embed(self.decoder, self.decoder.embed_tokens(input_ids), position.view(1, 1))
        slots = torch.arange(self.cache_len, device=input_ids.device)
        write = (slots == position).view(1, 1, self.cache_len, 1)
        visible = (slots <= position).view(1, 1, 1, self.cache_len)
        bias = torch.where(visible, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        keys, values = [], []
        for i, layer in enumerate(self.decoder.layers):
            x, k, v = opt_layer(layer, x, bias, (past_keys[i], past_values[i]), write)
            keys.append(k)
            values.append(v)
        return _lm_logits(self.decoder, self.lm_head, x), torch.stack(keys), torch.stack(values)
