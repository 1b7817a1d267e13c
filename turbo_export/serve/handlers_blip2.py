"""The served BLIP-2 pipelines (kind "vision-language-llm"); run inside Triton's Python-backend stub.

``caption``: image bytes -> the greedy caption (``pipelines.blip2.Blip2CaptionPipeline``: image graph, language-model
prefill, one decoder step per token), decoded without the image placeholder tokens. ``retrieval``: image bytes + a
text -> the ITM match probability and the ITC score (the best query's cosine), as ``RetrievalPipeline.scores`` gives
them for that pair. Texts are tokenized as validate does (the checkpoint's tokenizer, or a ``random:`` preset's
offline one) and padded to the export's text length; a longer text is refused with 400, not cut. Requests are
concatenated and run as one batch (a dynamic-batch export: no padding rows) or in chunks of the static batch.
Imported by ``handlers.make_handler`` when a model of this kind is built: numpy, onnxruntime and, for a
checkpoint's tokenizer, transformers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from turbo_export.backends.batching import run_in_batches, static_batch
from turbo_export.serve.handlers import (
    HANDLERS,
    Feed,
    ImagePipelineHandler,
    RequestError,
    image_channels,
    open_runner,
    split_rows,
)


def load_tokenizer(spec: dict[str, Any]) -> Any:
    if "offline" in spec:
        from turbo_export.models.tokenizer import OfflineTokenizer

        return OfflineTokenizer(**spec["offline"])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec["dir"])


class Blip2Handler(ImagePipelineHandler):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        from turbo_export.pipelines.blip import TokenIds
        from turbo_export.pipelines.blip2 import blip2_pipelines

        self.task, flavour = spec["task"], spec["flavour"]
        names = [f"{flavour}_vision", *(["lm_prefill", "decoder"] if self.task == "caption"
                                        else ["text_itc", f"{flavour}_itm"])]
        runners = {n: open_runner(os.path.join(spec["export_dir"], spec["files"][n]), spec["backend"],
                                  spec.get("threads", 0)) for n in names}
        self.pipeline = blip2_pipelines(runners, self.task, TokenIds(**spec["token_ids"]), spec["image_token"],
                                        (flavour,))[flavour]
        self.tokenizer = load_tokenizer(spec["tokenizer"])
        self.batch = static_batch(self.pipeline.vision)
        self.channels = image_channels(self.pipeline.vision)
        self.text_len, self.queries = int(spec["text_len"]), int(spec["queries"])

    def prepare(self, feed: Feed) -> Feed:
        out = {"pixel_values": self.decode_images(feed)}
        if self.task == "retrieval":
            texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
                     for t in feed["text"].reshape(len(feed["text"]), -1)[:, 0]]
            if any(not t.strip() for t in texts):
                raise RequestError("input 'text': empty text")
            too_long = [len(ids) for ids in self.tokenizer(texts)["input_ids"] if len(ids) > self.text_len]
            if too_long:
                raise RequestError(f"input 'text': {too_long[0]} tokens, longer than the exported text length "
                                   f"{self.text_len}")
            enc = self.tokenizer(texts, padding="max_length", max_length=self.text_len, return_tensors="np")
            out["input_ids"] = np.asarray(enc["input_ids"], np.int64)
            out["attention_mask"] = np.asarray(enc["attention_mask"], np.int64)
        return out

    def run(self, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
        counts = [len(f["pixel_values"]) for f in feeds]
        merged = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        if self.task == "caption":
            rows = run_in_batches(lambda chunk: self.pipeline.generate(chunk["pixel_values"],
                                                                       int(self.spec["max_new_tokens"])),
                                  self.batch, merged)
            texts = [self.tokenizer.decode(np.asarray(r)[self.queries:], skip_special_tokens=True).encode()
                     for r in rows]
            return split_rows({"text": np.array(texts, dtype=np.object_).reshape(-1, 1)}, counts)
        p = self.pipeline
        images = p.encode_images(merged["pixel_values"])
        text = p.encode_texts(merged["input_ids"], merged["attention_mask"])
        itc = np.einsum("bqd,bd->bq", images["image_feat"], text).max(axis=1)  # each row's own image and text
        itm = p.itm(images["image_embeds"], images["image_sizes"], merged["input_ids"], merged["attention_mask"])
        return split_rows({"itm_score": itm.astype(np.float32).reshape(-1, 1),
                           "itc_score": itc.astype(np.float32).reshape(-1, 1)}, counts)


HANDLERS["blip2"] = Blip2Handler
