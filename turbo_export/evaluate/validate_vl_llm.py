"""Accuracy parity of a vision-language-llm export (BLIP-2: caption, retrieval) on real images, as ``validate_vl``
reports it for BLIP: Turbo's captions against the unaccelerated ones (BLEU-4, CIDEr-D, token agreement, exact
match), or retrieval's ITC recall agreement and rank correlation over the images and texts, plus the ITM match
probability of every image-text pair (top-1 agreement, rank correlation).

The family's ``processing`` gives the tokenizer and image processor without loading the weights (the graphs hold
them). Captions are compared without the image placeholder tokens ``generate`` puts before bos.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from turbo_export import metrics
from turbo_export.backends import make_runner
from turbo_export.evaluate.common import weights_note
from turbo_export.evaluate.validate_vl import (
    DEFAULT_TEXTS,
    generation_parity,
    itc_agreement,
    spearman,
    summary_lines,  # noqa: F401 (this kind's printed summary is BLIP's)
    tokenize,
)
from turbo_export.families import get_family
from turbo_export.models import datasets


def image_pixels(processing: Any, images: datasets.ImageSet, image_size: int) -> np.ndarray:
    """The checkpoint's image processor at the export's size, or [-1, 1] for a preset without one."""
    if processing.image_processor is None:
        return datasets.fallback_pixels(images, 3, image_size)
    arrays = [datasets.to_channels(image, 3) for image in images.images]
    size = {"size": {"height": image_size, "width": image_size}}
    return np.concatenate([np.asarray(processing.image_processor(images=arrays[s:s + 256], return_tensors="np",
                                                                 **size)["pixel_values"], np.float32)
                           for s in range(0, len(arrays), 256)])


def validate_blip2(folder: str, report: dict[str, Any], source: str, limit: int | None, backend: str,
                   texts: list[str] | None, progress: bool) -> dict[str, Any]:
    task = report["task"]
    family = get_family(report["family"])
    processing = family.processing(report["model"], task["name"])  # a missing tokenizer: one line, before images
    tokenizer = processing.tokenizer
    text_len = int(task.get("text_len", 32))
    if task["name"] == "retrieval":
        texts_source = "--texts" if texts else (
            f"built-in list of {len(DEFAULT_TEXTS)} generic texts; pass --texts FILE (one text per line) for your own")
        texts = list(texts or DEFAULT_TEXTS)
        ids, mask = tokenize(tokenizer, texts, text_len, "texts")  # a text too long: one line, before any graph runs
    images = datasets.load_images(source, limit)
    image_size, batch = int(report["image_size"]), int(report["batch"])
    pixels = image_pixels(processing, images, image_size)
    runners = {name: make_runner(os.path.join(folder, path), backend) for name, path in report["files"].items()}
    from turbo_export.pipelines.blip2 import blip2_pipelines

    pipelines = blip2_pipelines(runners, task["name"], processing.ids, processing.image_token)
    result: dict[str, Any] = {
        "family": report["family"], "task": task["name"], "export": os.path.abspath(folder), "model": report["model"],
        "data": source, "images": len(images), "ratio": report["ratio"], "alpha": report["alpha"],
        "min_tokens": report["min_tokens"], "batch": batch, "image_size": image_size, "backend": backend,
        "tokens_per_layer": report["tokens_per_layer"]["turbo"], "flops_ratio": report["flops"]["ratio"],
    }
    if task["name"] == "caption":
        from turbo_export.families.blip_tasks import generate_rows

        max_new_tokens = int(task.get("max_new_tokens", 20))
        tokens = {}
        for name in tqdm(("baseline", "turbo"), desc="caption pipelines", leave=False, disable=not progress,
                         file=sys.stderr):
            rows = generate_rows(lambda pixel_values, p=pipelines[name]: p.generate(pixel_values, max_new_tokens),
                                 batch, pixel_values=pixels)
            tokens[name] = [row[processing.queries:] for row in rows]  # the image placeholders dropped
        result.update(max_new_tokens=max_new_tokens, num_beams=1)
        result["onnx"] = generation_parity(tokens, processing.ids, tokenizer, images.names, "caption")
    else:
        result.update(texts_source=texts_source, texts=len(texts))
        result["onnx"] = retrieval_agreement(pipelines, pixels, ids, mask)
    result.update(weights_note(report["model"]))
    return result


def retrieval_agreement(pipelines: dict[str, Any], pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray
                        ) -> dict[str, Any]:
    """ITC (the best query's cosine) and ITM of every image with every text, Turbo against unaccelerated."""
    feats, itc, itm = {}, {}, {}
    for name, p in pipelines.items():
        feats[name] = p.encode_images(pixels)
        itc[name] = (feats[name]["image_feat"] @ p.encode_texts(ids, mask).T).max(axis=1)  # [images, texts]
        itm[name] = np.stack([p.itm(np.repeat(feats[name]["image_embeds"][i:i + 1], len(ids), 0),
                                    np.repeat(feats[name]["image_sizes"][i:i + 1], len(ids), 0), ids, mask)
                              for i in range(len(pixels))])
    out = itc_agreement(itc["turbo"], itc["baseline"])
    out["itm_top1_agreement"] = metrics.agreement(itm["turbo"], itm["baseline"])
    out["itm_rank_correlation"] = spearman(itm["turbo"], itm["baseline"])
    out["itm_max_abs_diff"] = float(np.abs(itm["turbo"] - itm["baseline"]).max())
    width = feats["baseline"]["image_feat"].shape[-1]
    out["image_feat_cosine"] = metrics.cosine_stats(feats["turbo"]["image_feat"].reshape(-1, width),
                                                    feats["baseline"]["image_feat"].reshape(-1, width))
    out["image_cls_cosine"] = metrics.cosine_stats(feats["turbo"]["image_embeds"][:, 0],
                                                   feats["baseline"]["image_embeds"][:, 0])
    return out
