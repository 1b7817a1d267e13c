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
