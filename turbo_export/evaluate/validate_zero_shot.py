"""Accuracy parity of an image-text export (``turbo-export clip``: CLIP / SigLIP zero-shot) on real images.

Every image through ``baseline.onnx`` and ``turbo.onnx``, the export's label prompts through ``text.onnx`` once, and
the cosine of each image to each prompt. Reported, with the unaccelerated model's answer taken as the right one:
zero-shot top-1 agreement (and top-5 recall agreement), text-to-image retrieval recall agreement at 1 and 5 (each
prompt ranking the images), and the cosine of the image embeddings.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from turbo_export import metrics
from turbo_export.backends import make_runner
from turbo_export.evaluate.common import weights_note
from turbo_export.evaluate.validate import onnx_forward, run_dataset
from turbo_export.families import get_family
from turbo_export.families.clip_zero_shot import zero_shot_scores
from turbo_export.models import datasets


def validate_zero_shot(folder: str, report: dict[str, Any], source: str, limit: int | None, backend: str = "onnxruntime",
                       progress: bool = True) -> dict[str, Any]:
    family = get_family(report["family"])
    zero_shot = report["zero_shot"]
    loaded = family.load(report["model"])
    images = datasets.load_images(source, limit)
    image_size, batch = int(report["image_size"]), int(report["batch"])
    pixels = datasets.model_inputs(loaded, images, image_size)
    runners = {name: make_runner(os.path.join(folder, report["files"][name]), backend)
               for name in ("baseline", "turbo", "text")}
    feed = {"input_ids": np.asarray(zero_shot["input_ids"], np.int64)}
    if "attention_mask" in zero_shot:
        feed["attention_mask"] = np.asarray(zero_shot["attention_mask"], np.int64)
    text = runners["text"].run(feed)["text_embeds"]
    output = zero_shot["image_output"]
    embeds = {side: run_dataset(onnx_forward(runners[side]), pixels, batch, f"{side}.onnx", progress)[output]
              for side in ("baseline", "turbo")}
    scores = {side: zero_shot_scores(embeds[side], text) for side in embeds}
    labels = len(zero_shot["labels"])
    k5 = min(5, labels)
    result = {
        "family": report["family"], "export": os.path.abspath(folder), "model": report["model"], "data": source,
        "images": len(images), "labels": zero_shot["labels"], "template": zero_shot["template"],
        "ratio": report["ratio"], "alpha": report["alpha"], "batch": batch, "image_size": image_size,
        "backend": backend, "flops_ratio": report["flops"]["ratio"],
        "zero_shot": {"top1_agreement": metrics.agreement(scores["turbo"], scores["baseline"]),
                      f"top{k5}_recall_agreement": metrics.recall_agreement(scores["turbo"], scores["baseline"], k5),
                      "baseline_label_counts": np.bincount(scores["baseline"].argmax(-1), minlength=labels).tolist()},
        "retrieval": {f"text_to_image_recall@{k}_agreement": metrics.recall_agreement(
            scores["turbo"].T, scores["baseline"].T, min(k, len(images))) for k in (1, 5)},
        "image_embeds_cosine": metrics.cosine_stats(embeds["turbo"], embeds["baseline"]),
        **weights_note(report["model"]),
    }
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    z, r = result["zero_shot"], result["retrieval"]
    top_k = next(k for k in z if k.endswith("_recall_agreement"))
    return [
        f"{result['model']}: r={result['ratio']} alpha={result['alpha']:g}, {result['images']} images of "
        f"{result['data']}, {len(result['labels'])} labels ('{result['template']}'; {result['backend']}, "
        f"{result['flops_ratio']:.2f}x fewer image-tower FLOPs)",
        f"zero-shot top-1 agreement turbo vs baseline: {z['top1_agreement']:.4f}; "
        f"{top_k.split('_')[0]} recall agreement {z[top_k]:.4f}",
        f"text->image retrieval recall agreement (unaccelerated top-1 as the answer): R@1 "
        f"{r['text_to_image_recall@1_agreement']:.3f}, R@5 {r['text_to_image_recall@5_agreement']:.3f}",
        f"image embedding cosine: mean {result['image_embeds_cosine']['mean']:.5f}, "
        f"min {result['image_embeds_cosine']['min']:.5f}",
    ]
