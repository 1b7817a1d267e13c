"""The served CLIP / SigLIP zero-shot models (kind "image-text"); run inside Triton's Python-backend stub.

One handler, three modes: ``classify`` (image bytes, optional ``candidate_labels`` -> top-k labels, probabilities, label ids),
``image`` (image bytes -> the image tower's embedding) and ``text`` (texts -> text embeddings). The export's labels
are scored with the token ids report.json holds (the export's own); texts and request labels are tokenized as the
export tokenized its prompts (the checkpoint's tokenizer padded to the text length, or a ``random:`` preset's
offline hashed words), a text longer than the text tower takes refused with 400 rather than cut. Probabilities:
CLIP's softmax over the labels of ``logit_scale`` * cosine; SigLIP's sigmoid of ``logit_scale`` * cosine +
``logit_bias``, one per label (SigLIP scores each label on its own). Imported by ``handlers.make_handler`` when
a model of this kind is built: numpy, onnxruntime and, for a checkpoint's tokenizer, transformers.
"""

from __future__ import annotations

from types import SimpleNamespace
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


def _texts(feed: Feed, name: str) -> list[list[str]]:
    """A BYTES input as rows of strings."""
    value = feed[name]
    rows = value.reshape(len(value), -1) if value.ndim else value.reshape(1, 1)
    return [[v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row] for row in rows]


class ZeroShotHandler(ImagePipelineHandler):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.mode = spec["mode"]
        threads = spec.get("threads", 0)
        self.text = open_runner(spec["text_onnx"], spec["backend"], threads)
        self.text_batch = static_batch(self.text)
        self.length, self.with_mask = int(spec["length"]), bool(spec["mask"])
        tokenizer = spec["tokenizer"]
        if "offline" in tokenizer:
            self.offline, self.tokenizer = SimpleNamespace(**tokenizer["offline"]), None
        else:
            from transformers import AutoTokenizer

            self.offline, self.tokenizer = None, AutoTokenizer.from_pretrained(tokenizer["dir"])
        if self.mode == "text":
            return
        self.image = open_runner(spec["onnx"], spec["backend"], threads)
        self.batch = static_batch(self.image)
        self.channels = image_channels(self.image)
        if self.mode == "classify":
            self.labels = list(spec["labels"])
            ids = np.asarray(spec["input_ids"], np.int64)
            mask = spec.get("attention_mask")
            self.label_embeds = self.embed_texts(ids, None if mask is None else np.asarray(mask, np.int64))
            self.scale, self.bias = float(spec["logit_scale"]), spec.get("logit_bias")

    # ---- text ------------------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], what: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask [len(texts), length]; RequestError for an empty text or one over the text length."""
        if any(not t.strip() for t in texts):
            raise RequestError(f"input '{what}': empty text")
        if self.offline is not None:
            from turbo_export.models.tokenizer import offline_clip_token_list, offline_clip_tokens

            counts = [len(offline_clip_token_list(t, self.offline)) + 1 for t in texts]  # + EOS
        else:
            counts = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        too_long = [n for n in counts if n > self.length]
        if too_long:
            raise RequestError(f"input '{what}': {too_long[0]} tokens, longer than the exported text tower's "
                               f"{self.length}")
        if self.offline is not None:
            return offline_clip_tokens(texts, self.offline)
        enc = self.tokenizer(texts, padding="max_length", max_length=self.length, truncation=True, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        return ids, np.asarray(enc.get("attention_mask", np.ones_like(ids)), np.int64)

    def embed_texts(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        feed = {"input_ids": ids}
        if self.with_mask:
            feed["attention_mask"] = mask if mask is not None else np.ones_like(ids)
        return run_in_batches(self.text.run, self.text_batch, feed)["text_embeds"].astype(np.float32)

    # ---- requests --------------------------------------------------------------------------------------------

    def prepare(self, feed: Feed) -> Feed:
        if self.mode == "text":
            ids, mask = self.tokenize([row[0] for row in _texts(feed, "text")], "text")
            return {"input_ids": ids, "attention_mask": mask}
        out = {"pixel_values": self.decode_images(feed)}
        if self.mode == "classify" and feed.get("candidate_labels") is not None:
            rows = [[label.strip() for label in row] for row in _texts(feed, "candidate_labels")]
            for row in rows:
                if len(set(row)) != len(row):
                    raise RequestError(f"input 'candidate_labels': repeated label in {row}")
            prompts = [self.spec["template"].replace("{}", label) for row in rows for label in row]
            if any(not label for row in rows for label in row):
                raise RequestError("input 'candidate_labels': empty label")
            ids, mask = self.tokenize(prompts, "candidate_labels")
            out.update(label_ids=ids.reshape(len(rows), -1, self.length),
                       label_mask=mask.reshape(len(rows), -1, self.length),
                       label_names=np.array(rows, dtype=np.object_))
        return out

    def run(self, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
        if self.mode == "text":
            counts = [len(f["input_ids"]) for f in feeds]
            embeds = self.embed_texts(np.concatenate([f["input_ids"] for f in feeds]),
                                      np.concatenate([f["attention_mask"] for f in feeds]))
            return split_rows({"text_embeds": embeds}, counts)
        counts = [len(f["pixel_values"]) for f in feeds]
        output = self.spec["image_output"]
        pixels = {"pixel_values": np.concatenate([f["pixel_values"] for f in feeds])}
        embeds = run_in_batches(self.image.run, self.batch, pixels)[output].astype(np.float32)
        if self.mode == "image":
            return split_rows({output: embeds}, counts)
        results, start = [], 0
        for feed, n in zip(feeds, counts):
            results.append(self.classify(embeds[start:start + n], feed))
            start += n
        return results

    def classify(self, embeds: np.ndarray, feed: Feed) -> dict[str, np.ndarray]:
        """One request's rows: each against the export's labels, or against its own ``candidate_labels`` row."""
        if "label_ids" in feed:
            ids, mask = feed["label_ids"], feed["label_mask"]
            rows, count = ids.shape[:2]
            text = self.embed_texts(ids.reshape(-1, self.length), mask.reshape(-1, self.length))
            text = text.reshape(rows, count, -1)
            names = feed["label_names"]
        else:
            text = np.broadcast_to(self.label_embeds, (len(embeds), *self.label_embeds.shape))
            names = np.array([self.labels] * len(embeds), dtype=np.object_)
        image = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)
        text = text / np.linalg.norm(text, axis=-1, keepdims=True)
        logits = self.scale * np.einsum("rd,rld->rl", image.astype(np.float64), text.astype(np.float64))
        if self.bias is None:  # CLIP: a softmax over the labels
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        else:  # SigLIP: each label's own sigmoid
            probs = 1.0 / (1.0 + np.exp(-(logits + float(self.bias))))
        k = min(int(self.spec["top_k"]), probs.shape[-1])
        ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        labels = np.array([[str(names[r][j]).encode() for j in row] for r, row in enumerate(ids)], dtype=np.object_)
        return {"labels": labels, "scores": np.take_along_axis(probs, ids, -1).astype(np.float32),
                "class_ids": ids.astype(np.int64)}


HANDLERS["zero-shot"] = ZeroShotHandler
