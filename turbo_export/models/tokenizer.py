"""Offline tokenizers for `random:` presets (no tokenizer can be downloaded here): BLIP's processor, and CLIP /
SigLIP's hashed-word token ids (`offline_clip_tokens`).

The vocabulary is made in code with BERT/BLIP's special-token ids where BLIP's config expects them
([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, [DEC] = bos, [ENC] after it), a few hundred
common English words, and filler tokens up to the config's vocab size. Real checkpoints load their own
`BlipProcessor` from the folder instead.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

WORDS = (
    "a an the of in on at to and with is are was be this that there it its for from by as up down over under "
    "near next behind front top bottom left right inside outside while".split()
    + "man woman person people child boy girl baby player dog cat horse bird cow sheep elephant bear zebra "
    "giraffe car bus truck train plane boat bike motorcycle street road sidewalk building house room kitchen "
    "table chair bed couch desk window door wall floor grass field tree trees water beach ocean sky snow "
    "mountain hill park city sign light pizza cake food plate bowl cup bottle phone laptop computer book "
    "clock umbrella kite ball frisbee bat racket skateboard surfboard skis bench fence picture image photo".split()
    + "sitting standing walking running riding holding eating playing looking flying lying parked driving "
    "wearing carrying jumping watching smiling talking black white red blue green yellow brown orange pink "
    "gray purple large small big little young old tall two three four five several many some group "
    "what how many where who which color yes no one".split()
)
SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def offline_vocab(vocab_size: int, bos_token_id: int) -> list[str]:
    """Token strings by id: specials at BERT's ids, words after them, filler, then [DEC] and [ENC]."""
    if bos_token_id + 2 > vocab_size or bos_token_id < 104 + len(WORDS):
        raise ValueError(f"vocab_size {vocab_size} / bos_token_id {bos_token_id} leave no room for the offline vocab")
    vocab = [SPECIAL.get(i, f"[unused{i}]") for i in range(104)]
    vocab += list(WORDS)
    vocab += [f"[filler{i}]" for i in range(len(vocab), bos_token_id)]
    vocab += ["[DEC]", "[ENC]"]
    vocab += [f"[extra{i}]" for i in range(len(vocab), vocab_size)]
    return vocab


def offline_blip_processor(vocab_size: int, bos_token_id: int, image_size: int):
    """A `BlipProcessor` (image processor + BERT WordPiece tokenizer) built without any download."""
    from transformers import BertTokenizer, BlipProcessor
    from transformers import BlipImageProcessorPil as BlipImageProcessor  # the default needs torchvision

    vocab = offline_vocab(vocab_size, bos_token_id)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def offline_clip_tokens(prompts: list[str], cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """CLIP / SigLIP token ids for ``random:`` presets (no tokenizer can be downloaded): lower-cased words hashed into
    the vocabulary, BOS / EOS around them, padded to the text length (``cfg``: a text config's
    ``max_position_embeddings``, ``vocab_size``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id``). Random
    weights give them no meaning anyway. Kept free of torch: the serving handlers tokenize with it."""
    length = int(cfg.max_position_embeddings)
    ids = np.full((len(prompts), length), int(cfg.pad_token_id), np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, prompt in enumerate(prompts):
        tokens = offline_clip_token_list(prompt, cfg)[: length - 1] + [int(cfg.eos_token_id)]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


def offline_clip_token_list(prompt: str, cfg: Any) -> list[int]:
    """BOS (where the config has one) and the hashed words of ``prompt``, without EOS or padding."""
    vocab = int(cfg.vocab_size)
    words = [2 + zlib.crc32(w.encode()) % (vocab - 4) for w in prompt.lower().split()]
    return ([int(cfg.bos_token_id)] if cfg.bos_token_id is not None else []) + words


class OfflineTokenizer:
    """The tokenizer of a ``random:`` preset without a download, with the two calls validate and serve make of a
    transformers tokenizer: ``tok(texts, padding="max_length", max_length=n, return_tensors="np")`` (lower-cased
    words hashed into the vocabulary between ``first`` and ``last``, then ``end`` and padding) and ``decode(ids,
    skip_special_tokens=True)`` (each id a word of WORDS). Random weights give the words no meaning anyway. Plain
    fields (``to_json``), so the serving stub rebuilds it; torch-free."""

    def __init__(self, vocab_size: int, start: int | None, end: int | None, pad: int, special: list[int] = ()) -> None:
        self.vocab_size, self.start, self.end, self.pad = int(vocab_size), start, end, int(pad)
        self.special = sorted({int(s) for s in (*special, pad, *(t for t in (start, end) if t is not None))})
        self.first = 104 if self.vocab_size > 208 else 4  # above BERT's special ids where the vocabulary allows

    def to_json(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "start": self.start, "end": self.end, "pad": self.pad,
                "special": self.special}

    def encode(self, text: str) -> list[int]:
        words = [self.first + zlib.crc32(w.encode()) % (self.vocab_size - self.first) for w in text.lower().split()]
        return [t for t in (self.start, *words, self.end) if t is not None]

    def __call__(self, texts: list[str], padding: Any = False, max_length: int | None = None,
                 return_tensors: str | None = None, truncation: bool = False) -> dict[str, Any]:
        rows = [self.encode(t) for t in texts]
        if padding != "max_length":
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        length = int(max_length or max(len(r) for r in rows))
        ids = np.full((len(rows), length), self.pad, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, row in enumerate(rows):
            row = row[:length]
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        skip = set(self.special) if skip_special_tokens else set()
        return " ".join(WORDS[int(i) % len(WORDS)] for i in np.asarray(ids).reshape(-1) if int(i) not in skip)
