"""BLIP pipelines over runners (ONNX Runtime or anything with the Runner interface): captioning with greedy
and beam search over a static KV cache. Tokens follow transformers' `generate`: the output starts with
the decoder's bos token, a finished row is padded with the pad token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .base import Runner


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int  # BLIP stops captions at [SEP]
    pad: int

    @classmethod
    def from_text_config(cls, cfg: Any) -> "TokenIds":
        return cls(bos=int(cfg.bos_token_id), eos=int(cfg.sep_token_id), pad=int(cfg.pad_token_id))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class KVDecoder:
    """Drives a `DecoderStep` graph: a fixed-size self-attention cache, one token per call."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        shapes = {t.name: t.shape for t in runner.inputs}
        self.cache_shape = tuple(int(d) for d in shapes["past_keys"])  # [L, B, H, T, D]
        self.batch = self.cache_shape[1]
        self.cache_len = self.cache_shape[3]

    def start(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.cache_shape, np.float32), np.zeros(self.cache_shape, np.float32)

    def step(self, tokens: np.ndarray, position: int, cache: tuple[np.ndarray, np.ndarray],
             cross: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        out = self.runner.run({
            "input_ids": tokens.reshape(self.batch, 1).astype(np.int64),
            "position": np.array([position], np.int64),
            "past_keys": cache[0], "past_values": cache[1],
            "cross_keys": cross[0], "cross_values": cross[1], "cross_bias": cross[2],
        })
        return out["logits"], (out["present_keys"], out["present_values"])


def cross_bias(sizes: np.ndarray, size_aware: bool) -> np.ndarray:
    """Additive cross-attention bias [B, 1, 1, Ni]: zeros (transformers' BLIP) or log(token sizes)."""
    bias = np.log(sizes) if size_aware else np.zeros_like(sizes)
    return bias[:, None, None, :].astype(np.float32)


class CaptionPipeline:
    """pixel_values -> caption token ids, through vision, cross-KV and decoder-step graphs."""

    def __init__(self, vision: Runner, cross_kv: Runner, decoder: Runner, ids: TokenIds,
                 size_aware: bool = False) -> None:
        self.vision, self.cross_kv, self.decoder = vision, cross_kv, KVDecoder(decoder)
        self.ids = ids
        self.size_aware = size_aware

    def encode(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.vision.run({"pixel_values": pixel_values})
        kv = self.cross_kv.run({"encoder_hidden_states": out["image_embeds"]})
        return kv["cross_keys"], kv["cross_values"], cross_bias(out["image_sizes"], self.size_aware)

    def generate(self, pixel_values: np.ndarray, max_new_tokens: int, num_beams: int = 1,
                 prompt: Sequence[int] = (), stop_at_eos: bool = True) -> np.ndarray:
        prompt_ids = [self.ids.bos, *prompt]
        if len(prompt_ids) + max_new_tokens > self.decoder.cache_len + 1:
            raise ValueError(f"prompt + max_new_tokens ({len(prompt_ids)} + {max_new_tokens}) exceed the decoder's "
                             f"cache of {self.decoder.cache_len} positions; re-export with a larger --max-new-tokens")
        cross = self.encode(pixel_values)
        if num_beams > 1:
            cross = repeat_for_beams(cross, num_beams)
        if num_beams == 1:
            return self._greedy(cross, prompt_ids, max_new_tokens, stop_at_eos)
        return self._beam(cross, prompt_ids, max_new_tokens, num_beams)

    def _prefill(self, cross, prompt_ids: list[int], rows: int):
        cache = self.decoder.start()
        logits = None
        for position, token in enumerate(prompt_ids):
            logits, cache = self.decoder.step(np.full(rows, token), position, cache, cross)
        return logits, cache

    def _greedy(self, cross, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool) -> np.ndarray:
        rows = self.decoder.batch
        logits, cache = self._prefill(cross, prompt_ids, rows)
        tokens = [np.full(rows, t, np.int64) for t in prompt_ids]
        done = np.zeros(rows, bool)
        for i in range(max_new_tokens):
            nxt = logits.argmax(axis=-1).astype(np.int64)
            if stop_at_eos:
                nxt = np.where(done, self.ids.pad, nxt)
                done |= nxt == self.ids.eos
            tokens.append(nxt)
            if (stop_at_eos and done.all()) or i == max_new_tokens - 1:
                break
            logits, cache = self.decoder.step(nxt, len(tokens) - 1, cache, cross)
        return np.stack(tokens, axis=1)

    def _beam(self, cross, prompt_ids: list[int], max_new_tokens: int, num_beams: int) -> np.ndarray:
        """Beam search with length penalty 1 (score / length), the graphs exported at batch images * beams."""
        rows = self.decoder.batch
        images = rows // num_beams
        logits, cache = self._prefill(cross, prompt_ids, rows)
        seqs = np.tile(np.array(prompt_ids, np.int64), (rows, 1))
        scores = np.full((images, num_beams), -np.inf)
        scores[:, 0] = 0.0  # identical beams at the start: expand only the first
        finished: list[list[tuple[float, np.ndarray]]] = [[] for _ in range(images)]
        for i in range(max_new_tokens):
            logp = log_softmax(logits).reshape(images, num_beams, -1)
            vocab = logp.shape[-1]
            cand = (scores[:, :, None] + logp).reshape(images, -1)
            top = np.argsort(-cand, axis=-1, kind="stable")[:, : 2 * num_beams]
            new_scores = np.full((images, num_beams), -np.inf)
            origin = np.zeros((images, num_beams), np.int64)
            chosen = np.full((images, num_beams), self.ids.pad, np.int64)
            for n in range(images):
                kept = 0
                for flat in top[n]:
                    beam, token = divmod(int(flat), vocab)
                    score = cand[n, flat]
                    if token == self.ids.eos:
                        hyp = np.append(seqs[n * num_beams + beam], token)
                        finished[n].append((score / (hyp.size - len(prompt_ids) + 1), hyp))
                        continue
                    new_scores[n, kept], origin[n, kept], chosen[n, kept] = score, beam, token
                    kept += 1
                    if kept == num_beams:
                        break
            index = (origin + np.arange(images)[:, None] * num_beams).reshape(-1)
            seqs = np.concatenate([seqs[index], chosen.reshape(-1, 1)], axis=1)
            cache = (cache[0][:, index], cache[1][:, index])
            scores = new_scores
            if i == max_new_tokens - 1:
                break
            logits, cache = self.decoder.step(chosen.reshape(-1), seqs.shape[1] - 1, cache, cross)
        best = []
        for n in range(images):
            for b in range(num_beams):
                hyp = seqs[n * num_beams + b]
                finished[n].append((scores[n, b] / (hyp.size - len(prompt_ids) + 1), hyp))
            best.append(max(finished[n], key=lambda item: item[0])[1])
        width = max(h.size for h in best)
        return np.stack([np.pad(h, (0, width - h.size), constant_values=self.ids.pad) for h in best])


def repeat_for_beams(cross: tuple[np.ndarray, np.ndarray, np.ndarray], num_beams: int):
    """Cross keys/values computed per image, repeated for each of its beams (batch axis 1 / 0)."""
    keys, values, bias = cross
    return np.repeat(keys, num_beams, axis=1), np.repeat(values, num_beams, axis=1), np.repeat(bias, num_beams, 0)
