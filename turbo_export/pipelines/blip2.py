"""The BLIP-2 caption pipeline over runners: the image graph (ViT-g + Q-Former + language_projection), the language
model's prefill over the image prefix and bos, then one decoder step per token over the static KV cache (BLIP's
``KVDecoder`` and greedy loop). Retrieval is BLIP's ``RetrievalPipeline`` over BLIP-2's graphs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from turbo_export.backends.base import Runner
from turbo_export.pipelines.blip import KVDecoder, RetrievalPipeline, TokenIds, greedy_decode

FLAVOURS = ("baseline", "turbo")


class Blip2CaptionPipeline:
    """pixel_values -> caption token ids as ``Blip2ForConditionalGeneration.generate`` returns them: the image
    placeholder tokens, bos, then the greedy tokens (a row that reached eos padded)."""

    def __init__(self, vision: Runner, prefill: Runner, decoder: Runner, ids: TokenIds, image_token: int) -> None:
        self.vision, self.prefill, self.decoder = vision, prefill, KVDecoder(decoder)
        self.ids = ids
        self.image_token = image_token

    def generate(self, pixel_values: np.ndarray, max_new_tokens: int, stop_at_eos: bool = True) -> np.ndarray:
        prefix = self.vision.run({"pixel_values": pixel_values})["language_inputs"]
        rows, queries = prefix.shape[0], prefix.shape[1]
        if queries + max_new_tokens > self.decoder.cache_len:
            raise ValueError(f"{queries} image tokens + bos + {max_new_tokens} new tokens exceed the decoder's cache "
                             f"of {self.decoder.cache_len} positions; re-export with a larger --max-new-tokens")
        out = self.prefill.run({"language_inputs": prefix, "input_ids": np.full((rows, 1), self.ids.bos, np.int64)})
        tokens = [np.full(rows, self.image_token, np.int64)] * queries + [np.full(rows, self.ids.bos, np.int64)]
        return greedy_decode(self.decoder, self.ids, out["logits"], (out["present_keys"], out["present_values"]),
                             tokens, max_new_tokens, stop_at_eos)


def blip2_pipelines(runners: dict[str, Runner], task: str, ids: TokenIds | None, image_token: int | None,
                    flavours: tuple[str, ...] = FLAVOURS) -> dict[str, Any]:
    """The export's pipelines by flavour over its graphs' runners (keyed as report.json's files)."""
    if task == "retrieval":
        return {n: RetrievalPipeline(runners[f"{n}_vision"], runners["text_itc"], runners[f"{n}_itm"])
                for n in flavours}
    return {n: Blip2CaptionPipeline(runners[f"{n}_vision"], runners["lm_prefill"], runners["decoder"], ids,
                                    int(image_token)) for n in flavours}
