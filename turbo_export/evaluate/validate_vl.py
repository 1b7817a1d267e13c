"""Accuracy parity of a vision-language export (BLIP: caption, VQA, retrieval) on real images: Turbo's captions and
answers against the unaccelerated ones (BLEU-4, CIDEr-D, token agreement), retrieval recall agreement."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from turbo_export import metrics
from turbo_export.backends import make_runner
from turbo_export.errors import TurboExportError
from turbo_export.evaluate.common import weights_note
from turbo_export.families import get_family
from turbo_export.models import datasets
from turbo_export.models.presets import LoadedModel

DEFAULT_TEXTS = (  # short (at most 5 words), so they fit a small exported --text-len
    "a photo of a person", "a dog on the grass", "a cat on a bed", "a red car", "a plate of food",
    "a city street", "a bird in the sky", "a boat on the water", "people in a field", "a white flower",
)
DEFAULT_QUESTION = "what is in the picture?"
EXAMPLES = 5  # caption / answer pairs kept in the JSON


def load_blip(report: dict[str, Any]) -> LoadedModel:
    """The export's checkpoint with its processor (image processor + tokenizer)."""
    family = get_family(report["family"])
    source = report["model"]
    loaded = family.load(source, family.options_type(task=report["task"]["name"], ratio=report["ratio"]))
    if getattr(loaded.image_processor, "tokenizer", None) is None:
        raise TurboExportError(f"model: '{source}' has no BLIP processor (image processor and tokenizer)")
    return loaded


def blip_pixels(loaded: LoadedModel, images: datasets.ImageSet, image_size: int) -> np.ndarray:
    processor = loaded.image_processor
    resize = {} if image_size == loaded.image_size else {"size": {"height": image_size, "width": image_size}}
    arrays = [datasets.to_channels(image, 3) for image in images.images]
    out = [np.asarray(processor(images=arrays[s:s + 256], return_tensors="np", **resize)["pixel_values"], np.float32)
           for s in range(0, len(arrays), 256)]
    pixels = np.concatenate(out)
    if pixels.shape[1:] != (3, image_size, image_size):
        raise TurboExportError(f"data: images became {pixels.shape[1:]}, the export expects "
                               f"{(3, image_size, image_size)}")
    return pixels


def tokenize(tokenizer: Any, texts: list[str], length: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    for text, ids in zip(texts, tokenizer(texts)["input_ids"]):
        if len(ids) > length:
            raise TurboExportError(f"{what}: '{text}' is {len(ids)} tokens, longer than the export's text length "
                                   f"{length} (re-export with a larger --text-len)")
    enc = tokenizer(texts, padding="max_length", max_length=length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def blip_pipelines(folder: str, report: dict[str, Any], loaded: LoadedModel, backend: str) -> tuple[dict, Any]:
    """The baseline and Turbo pipelines over the folder's graphs, as `turbo-export blip` built them."""
    from turbo_export.families.blip_tasks import TASKS
    from turbo_export.pipelines.blip import TokenIds

    task = report["task"]
    options = get_family(report["family"]).options_type(
        task=task["name"], ratio=report["ratio"], batch=int(report["batch"]),
        max_new_tokens=int(task.get("max_new_tokens", 20)), num_beams=int(task.get("num_beams", 1)),
        text_len=int(task.get("text_len", 32)), size_aware=bool(task.get("size_aware_cross_attention", False)))
    runners = {name: make_runner(os.path.join(folder, path), backend) for name, path in report["files"].items()}
    ids = TokenIds.from_text_config(loaded.model.config.text_config)
    return TASKS[options.task].pipelines(runners, ids, options), options


def generation_parity(tokens: dict[str, list[list[int]]], ids: Any, tokenizer: Any, names: list[str],
                      unit: str) -> dict[str, Any]:
    """Turbo's captions / answers against the unaccelerated ones as references."""
    from turbo_export.families.blip_tasks import sequence_agreement, token_agreement

    special = {ids.bos, ids.eos, ids.pad}
    turbo = [metrics.strip_special(t, special) for t in tokens["turbo"]]
    base = [metrics.strip_special(t, special) for t in tokens["baseline"]]
    texts = {n: [tokenizer.decode(r, skip_special_tokens=True) for r in tokens[n]] for n in ("baseline", "turbo")}
    out = {
        "kind": unit, "count": len(base),
        "bleu4": metrics.corpus_bleu(turbo, base),
        "cider_d": metrics.cider_d(turbo, [[b] for b in base]),
        "token_agreement": token_agreement([np.array(t) for t in tokens["turbo"]],
                                           [np.array(t) for t in tokens["baseline"]]),
        "exact_match": sequence_agreement(tokens["turbo"], tokens["baseline"], ids.pad),
        "examples": [{"image": names[i], "baseline": texts["baseline"][i], "turbo": texts["turbo"][i]}
                     for i in range(min(EXAMPLES, len(base)))],
        "references": f"the unaccelerated model's {unit}s (one reference per image)",
    }
    if len({tuple(b) for b in base}) < 2:
        out["cider_d_note"] = (f"every reference {unit} is the same, so every n-gram's idf is 0 and CIDEr-D is 0 "
                               "whatever Turbo says; it needs varied references (real weights, varied images)")
    return out


def validate_blip(folder: str, report: dict[str, Any], source: str, limit: int | None, backend: str,
                  texts: list[str] | None, question: str | None, progress: bool) -> dict[str, Any]:
    from turbo_export.families.blip_tasks import generate_rows

    task = report["task"]["name"]
    images = datasets.load_images(source, limit)
    loaded = load_blip(report)
    image_size, batch = int(report["image_size"]), int(report["batch"])
    pixels = blip_pixels(loaded, images, image_size)
    tokenizer = loaded.image_processor.tokenizer
    pipelines, options = blip_pipelines(folder, report, loaded, backend)
    result: dict[str, Any] = {
        "family": "blip", "task": task, "export": os.path.abspath(folder), "model": report["model"], "data": source,
        "images": len(images), "ratio": report["ratio"], "alpha": report["alpha"],
        "min_tokens": report["min_tokens"], "batch": batch, "image_size": image_size, "backend": backend,
        "tokens_per_layer": report["tokens_per_layer"]["turbo"], "flops_ratio": report["flops"]["ratio"],
    }
    if task in ("caption", "vqa"):
        extra: dict[str, np.ndarray] = {}
        if task == "vqa":
            question = question or DEFAULT_QUESTION
            q_ids, q_mask = tokenize(tokenizer, [question], options.text_len, "question")
            extra = {"input_ids": np.repeat(q_ids, len(pixels), 0), "attention_mask": np.repeat(q_mask, len(pixels), 0)}
            result["question"] = question
        tokens = {}
        for name in tqdm(("baseline", "turbo"), desc=f"{task} pipelines", leave=False, disable=not progress,
                         file=sys.stderr):
            p = pipelines[name]
            fn = (lambda pixel_values, p=p: p.generate(pixel_values, options.max_new_tokens, options.num_beams)) \
                if task == "caption" else (lambda pixel_values, input_ids, attention_mask, p=p: p.generate(
                    pixel_values, input_ids, attention_mask, options.max_new_tokens, options.num_beams))
            tokens[name] = generate_rows(fn, batch, pixel_values=pixels, **extra)
        result.update(max_new_tokens=options.max_new_tokens, num_beams=options.num_beams)
        result["onnx"] = generation_parity(tokens, pipelines["baseline"].ids, tokenizer, images.names,
                                           "caption" if task == "caption" else "answer")
    else:
        result["texts_source"] = "--texts" if texts else (
            f"built-in list of {len(DEFAULT_TEXTS)} generic texts; pass --texts FILE (one text per line) for your own")
        texts = list(texts or DEFAULT_TEXTS)
        result["texts"] = len(texts)
        result["onnx"] = retrieval_agreement(pipelines, pixels, *tokenize(tokenizer, texts, options.text_len, "texts"))
    result.update(weights_note(report["model"]))
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of all entries (1.0 when either side is constant)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        return np.asarray(x).ravel().argsort(kind="stable").argsort(kind="stable").astype(np.float64)

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 1.0


def itc_agreement(turbo: np.ndarray, base: np.ndarray) -> dict[str, Any]:
    """Recall agreement both ways and rank correlation of ITC similarities [images, texts], Turbo vs unaccelerated."""
    out: dict[str, Any] = {"kind": "retrieval", "images": int(base.shape[0]), "texts": int(base.shape[1])}
    for k in (1, 5):
        out[f"image_to_text_recall@{k}_agreement"] = metrics.recall_agreement(turbo, base, k)
        out[f"text_to_image_recall@{k}_agreement"] = metrics.recall_agreement(turbo.T, base.T, k)
    out["itc_rank_correlation"] = spearman(turbo, base)
    out["itc_max_abs_diff"] = float(np.abs(turbo - base).max())
    return out


def retrieval_agreement(pipelines: dict[str, Any], pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray
                     ) -> dict[str, Any]:
    """ITC similarity of every image with every text, Turbo against unaccelerated (whose top-1 is the answer)."""
    feats, itc = {}, {}
    for name, p in pipelines.items():
        feats[name] = p.encode_images(pixels)
        itc[name] = feats[name]["image_feat"] @ p.encode_texts(ids, mask).T  # [images, texts]
    out = itc_agreement(itc["turbo"], itc["baseline"])
    out["image_feat_cosine"] = metrics.cosine_stats(feats["turbo"]["image_feat"], feats["baseline"]["image_feat"])
    out["image_cls_cosine"] = metrics.cosine_stats(feats["turbo"]["image_embeds"][:, 0],
                                                   feats["baseline"]["image_embeds"][:, 0])
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    p = result["onnx"]
    lines = [f"{result['model']} ({result['task']}): r={result['ratio']} alpha={result['alpha']:g}, "
             f"{result['images']} images of {result['data']} ({result['backend']}, batch {result['batch']}, "
             f"{result['flops_ratio']:.2f}x fewer image-encoder FLOPs)"]
    if p["kind"] == "retrieval":
        lines.append(f"{p['texts']} texts: {result['texts_source']}")
        lines.append(f"ITC recall agreement (unaccelerated top-1 as the answer): image->text R@1 "
                     f"{p['image_to_text_recall@1_agreement']:.3f} "
                     f"R@5 {p['image_to_text_recall@5_agreement']:.3f}; "
                     f"text->image R@1 {p['text_to_image_recall@1_agreement']:.3f} "
                     f"R@5 {p['text_to_image_recall@5_agreement']:.3f}")
        lines.append(f"ITC rank correlation {p['itc_rank_correlation']:.4f}; image feature cosine mean "
                     f"{p['image_feat_cosine']['mean']:.5f}, min {p['image_feat_cosine']['min']:.5f}")
        if "itm_rank_correlation" in p:
            lines.append(f"ITM (match probability) image->text top-1 agreement {p['itm_top1_agreement']:.3f}, rank "
                         f"correlation {p['itm_rank_correlation']:.4f}, max abs diff {p['itm_max_abs_diff']:.3g}")
    else:
        if "question" in result:
            lines.append(f"question: {result['question']}")
        lines.append(f"{p['kind']}s, Turbo against the unaccelerated ones: BLEU-4 {p['bleu4']:.4f}, CIDEr-D "
                     f"{p['cider_d']:.4f}, token agreement {p['token_agreement']:.4f}, exact match "
                     f"{p['exact_match']:.4f}")
        if "cider_d_note" in p:
            lines.append(f"  (CIDEr-D: {p['cider_d_note']})")
        for e in p["examples"]:
            lines.append(f"  {e['image']}: baseline '{e['baseline']}' | turbo '{e['turbo']}'")
    return lines
