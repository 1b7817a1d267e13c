"""BLIP pipelines over runners (ONNX Runtime or anything with the Runner interface): captioning and VQA
(greedy and beam search over a static KV cache, shared by both) and image-text retrieval (ITC similarity,
ITM scores). Tokens follow transformers' `generate`: the output starts with the decoder's bos token, a
finished row is padded with the pad token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from turbo_export.backends.base import Runner
from turbo_export.backends.batching import run_in_batches, static_batch


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
    """Drives a `DecoderStep` graph: a fixed-size self-attention cache, one token per call. The graph's rows (batch
    x beams) may be static or symbolic; the cache length and the layer / head sizes are static."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        shapes = {t.name: t.shape for t in runner.inputs}
        layers, _, heads, cache_len, head_dim = shapes["past_keys"]  # [L, rows, H, T, D]
        self.layers, self.heads, self.head_dim = int(layers), int(heads), int(head_dim)
        self.cache_len = int(cache_len)

    def start(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, rows, self.heads, self.cache_len, self.head_dim)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step(self, tokens: np.ndarray, position: int, cache: tuple[np.ndarray, np.ndarray],
             cross: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
             ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """``cross`` None: a decoder-only step (a language model that reads its image prefix from the cache)."""
        feed = {"input_ids": tokens.reshape(-1, 1).astype(np.int64), "position": np.array([position], np.int64),
                "past_keys": cache[0], "past_values": cache[1]}
        if cross is not None:
            feed.update(cross_keys=cross[0], cross_values=cross[1], cross_bias=cross[2])
        out = self.runner.run(feed)
        return out["logits"], (out["present_keys"], out["present_values"])


def cross_bias(sizes: np.ndarray, size_aware: bool) -> np.ndarray:
    """Additive cross-attention bias [B, 1, 1, Ni]: zeros (transformers' BLIP) or log(token sizes)."""
    bias = np.log(sizes) if size_aware else np.zeros_like(sizes)
    return bias[:, None, None, :].astype(np.float32)


class TokenGenerator:
    """Greedy and beam decoding through a `KVDecoder`, given each row's cross-attention (keys, values, bias)."""

    def __init__(self, decoder: KVDecoder, ids: TokenIds) -> None:
        self.decoder = decoder
        self.ids = ids

    def generate(self, cross: tuple[np.ndarray, np.ndarray, np.ndarray], max_new_tokens: int, num_beams: int = 1,
                 prompt: Sequence[int] = (), stop_at_eos: bool = True) -> np.ndarray:
        """``cross`` is per input (batch axis 1 / 0); it is repeated for the beams here."""
        prompt_ids = [self.ids.bos, *prompt]
        if len(prompt_ids) + max_new_tokens > self.decoder.cache_len + 1:
            raise ValueError(f"prompt + max_new_tokens ({len(prompt_ids)} + {max_new_tokens}) exceed the decoder's "
                             f"cache of {self.decoder.cache_len} positions; re-export with a larger --max-new-tokens")
        if num_beams == 1:
            return self._greedy(cross, prompt_ids, max_new_tokens, stop_at_eos)
        return self._beam(repeat_for_beams(cross, num_beams), prompt_ids, max_new_tokens, num_beams)

    def _prefill(self, cross, prompt_ids: list[int], rows: int):
        cache = self.decoder.start(rows)
        logits = None
        for position, token in enumerate(prompt_ids):
            logits, cache = self.decoder.step(np.full(rows, token), position, cache, cross)
        return logits, cache

    def _greedy(self, cross, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool) -> np.ndarray:
        rows = cross[0].shape[1]  # cross keys [L, rows, H, N, D]
        logits, cache = self._prefill(cross, prompt_ids, rows)
        tokens = [np.full(rows, t, np.int64) for t in prompt_ids]
        return greedy_decode(self.decoder, self.ids, logits, cache, tokens, max_new_tokens, stop_at_eos, cross)

    def _beam(self, cross, prompt_ids: list[int], max_new_tokens: int, num_beams: int) -> np.ndarray:
        """Beam search with length penalty 1 (score / length), the graphs exported at batch images * beams."""
        rows = cross[0].shape[1]
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


def greedy_decode(decoder: KVDecoder, ids: TokenIds, logits: np.ndarray, cache: tuple[np.ndarray, np.ndarray],
                  tokens: list[np.ndarray], max_new_tokens: int, stop_at_eos: bool = True,
                  cross: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Greedy tokens after a prefill (``logits`` of the next token, ``cache`` holding ``tokens``' positions), as
    transformers' ``generate`` returns them: the prompt rows, then the new tokens; a finished row is padded."""
    rows = len(tokens[-1])
    done = np.zeros(rows, bool)
    for i in range(max_new_tokens):
        nxt = logits.argmax(axis=-1).astype(np.int64)
        if stop_at_eos:
            nxt = np.where(done, ids.pad, nxt)
            done |= nxt == ids.eos
        tokens.append(nxt)
        if (stop_at_eos and done.all()) or i == max_new_tokens - 1:
            break
        logits, cache = decoder.step(nxt, len(tokens) - 1, cache, cross)
    return np.stack(tokens, axis=1)


class CaptionPipeline:
    """pixel_values -> caption token ids, through vision, cross-KV and decoder-step graphs."""

    def __init__(self, vision: Runner, cross_kv: Runner, decoder: Runner, ids: TokenIds,
                 size_aware: bool = False) -> None:
        self.vision, self.cross_kv, self.decoder = vision, cross_kv, KVDecoder(decoder)
        self.ids = ids
        self.size_aware = size_aware
        self.generator = TokenGenerator(self.decoder, ids)

    def encode(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.vision.run({"pixel_values": pixel_values})
        kv = self.cross_kv.run({"encoder_hidden_states": out["image_embeds"]})
        return kv["cross_keys"], kv["cross_values"], cross_bias(out["image_sizes"], self.size_aware)

    def generate(self, pixel_values: np.ndarray, max_new_tokens: int, num_beams: int = 1,
                 prompt: Sequence[int] = (), stop_at_eos: bool = True) -> np.ndarray:
        return self.generator.generate(self.encode(pixel_values), max_new_tokens, num_beams, prompt, stop_at_eos)


class VqaPipeline:
    """image + question -> answer token ids: vision, question encoder (cross-attending to the image), then the
    answer decoder cross-attending to every question position, as transformers' VQA `generate` does."""

    def __init__(self, vision: Runner, question: Runner, cross_kv: Runner, decoder: Runner, ids: TokenIds,
                 size_aware: bool = False) -> None:
        self.vision, self.question, self.cross_kv = vision, question, cross_kv
        self.decoder = KVDecoder(decoder)
        self.ids = ids
        self.size_aware = size_aware
        self.generator = TokenGenerator(self.decoder, ids)

    def encode(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = self.vision.run({"pixel_values": pixel_values})
        question = self.question.run({
            "input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
            "encoder_hidden_states": image["image_embeds"],
            "cross_bias": cross_bias(image["image_sizes"], self.size_aware),
        })["question_embeds"]
        kv = self.cross_kv.run({"encoder_hidden_states": question})
        # transformers attends to all question positions, padding included (its question mask is all ones)
        bias = np.zeros((question.shape[0], 1, 1, question.shape[1]), np.float32)
        return kv["cross_keys"], kv["cross_values"], bias

    def generate(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
                 max_new_tokens: int, num_beams: int = 1, stop_at_eos: bool = True) -> np.ndarray:
        return self.generator.generate(self.encode(pixel_values, input_ids, attention_mask), max_new_tokens,
                                       num_beams, stop_at_eos=stop_at_eos)


@dataclass
class RetrievalScores:
    itc: np.ndarray  # [images, texts] cosine similarity of the projected features (BLIP-2: the best query's)
    itm: np.ndarray  # [images, texts] probability that the text matches the image


class RetrievalPipeline:
    """Image-text retrieval: ITC similarity (vision + text-only graphs) and ITM scores (vision + ITM graphs).

    Every method takes any number of rows; the graphs' static batch is handled by `backends.batching.run_in_batches`.
    """

    def __init__(self, vision: Runner, text_itc: Runner, itm: Runner, size_aware: bool = False) -> None:
        self.vision, self.text_itc, self.itm_graph = vision, text_itc, itm
        self.size_aware = size_aware

    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """image_embeds, image_sizes, image_feat."""
        return run_in_batches(self.vision.run, static_batch(self.vision), {"pixel_values": pixel_values})

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        return run_in_batches(self.text_itc.run, static_batch(self.text_itc), feed)["text_feat"]

    def itm(self, image_embeds: np.ndarray, image_sizes: np.ndarray, input_ids: np.ndarray,
            attention_mask: np.ndarray) -> np.ndarray:
        """ITM match probability of aligned rows (image i with text i)."""
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "encoder_hidden_states": image_embeds, "cross_bias": cross_bias(image_sizes, self.size_aware)}
        logits = run_in_batches(self.itm_graph.run, static_batch(self.itm_graph), feed)["itm_logits"]
        return softmax(logits)[:, 1].astype(np.float32)

    def score_pairs(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """ITM probability of aligned image-text pairs (the benchmark's unit of work)."""
        images = self.encode_images(pixel_values)
        return self.itm(images["image_embeds"], images["image_sizes"], input_ids, attention_mask)

    def scores(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> RetrievalScores:
        """Every image against every text."""
        images = self.encode_images(pixel_values)
        itc = images["image_feat"] @ self.encode_texts(input_ids, attention_mask).T
        if itc.ndim == 3:  # several features per image (BLIP-2: one per query token): the best-matching one
            itc = itc.max(axis=1)
        texts = len(input_ids)
        itm = np.stack([
            self.itm(np.repeat(images["image_embeds"][i:i + 1], texts, 0),
                     np.repeat(images["image_sizes"][i:i + 1], texts, 0), input_ids, attention_mask)
            for i in range(len(pixel_values))
        ])
        return RetrievalScores(itc=itc, itm=itm)


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def repeat_for_beams(cross: tuple[np.ndarray, np.ndarray, np.ndarray], num_beams: int):
    """Cross keys/values computed per image, repeated for each of its beams (batch axis 1 / 0)."""
    keys, values, bias = cross
    return np.repeat(keys, num_beams, axis=1), np.repeat(values, num_beams, axis=1), np.repeat(bias, num_beams, 0)
