"""Does the no-CLS semantic value ("received": the attention each token receives) work as well as Turbo's CLS row?

Checked where both exist, on real weights: the DINOv2-small checkpoint in shared/weights (a ``Dinov2Model`` with a
CLS token), at 224 px (257 tokens). For each image, the output of Turbo with each semantic value is compared with
the unaccelerated model's:

- CLS: cosine of ``pooler_output`` (the CLS token after the final norm);
- mean patch: cosine of the mean patch feature (unaccelerated: the mean over the 256 patch tokens; Turbo: the
  size-weighted mean over the merged patch tokens, each standing for ``size`` patches).

Rows: ToMe (alpha 0, the floor that uses no semantic value), the CLS row at alpha 6 (the backbone default), and
the no-CLS candidates at alpha 6: the mean query's attention row ("mean-query", SigLIP's default), the attention
each token receives ("received"; also without the diagonal, and at alpha 30). Images: scikit-image's ten photos,
each as the full photo, its four corner crops (60 % of the side) and its mirror image (60 views), and optionally
lfw_subset faces.

    PYTHONPATH=.:plugins python scripts/semantic_no_cls_check.py --lfw 40 [--only mean-query,ToMe] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from turbo_export import apply_turbo  # noqa: E402
from turbo_export.core import merge  # noqa: E402
from turbo_export.families import get_family  # noqa: E402
from turbo_export.models import datasets  # noqa: E402

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "weights",
                             "dinov2-small-imgfocus")
# (label, semantic value, alpha); "received-noself" is defined here only (the column mean without the diagonal)
VARIANTS = (("ToMe", "cls", 0.0), ("CLS row", "cls", 6.0), ("mean-query", "mean-query", 6.0),
            ("received", "received", 6.0), ("recv-noself", "received-noself", 6.0), ("received", "received", 30.0))


def _add_received_without_self() -> None:
    """A variant tried and rejected: the attention each token receives from the *other* tokens."""
    original = merge.semantic_value

    def semantic_value(probs, kind, size=None, q=None, k=None, scale=1.0, bias=None):
        if kind == "received-noself":
            eye = torch.eye(probs.shape[-1], dtype=probs.dtype)
            return (probs * (1 - eye)).mean(dim=1).mean(dim=1)
        return original(probs, kind, size, q, k, scale, bias)

    merge.semantic_value = semantic_value
    merge.SEMANTIC_VALUES = (*merge.SEMANTIC_VALUES, "received-noself")


def photo_views(images: datasets.ImageSet) -> datasets.ImageSet:
    """Each photo, its four corner crops (60 % of the side) and its mirror image."""
    out, names = [], []
    for image, name in zip(images.images, images.names):
        h, w = image.shape[:2]
        ch, cw = int(h * 0.6), int(w * 0.6)
        crops = {"full": image, "tl": image[:ch, :cw], "tr": image[:ch, w - cw:], "bl": image[h - ch:, :cw],
                 "br": image[h - ch:, w - cw:], "mirror": image[:, ::-1]}
        for view, array in crops.items():
            out.append(np.ascontiguousarray(array))
            names.append(f"{name}:{view}")
    return datasets.ImageSet(images.source + " (6 views each)", out, names)


def features(model: torch.nn.Module, pixels: torch.Tensor, batch: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(CLS after the final norm, size-weighted mean patch feature) for every image."""
    cls, mean = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            out = model(pixel_values=pixels[start:start + batch])
            tokens = out.last_hidden_state
            sizes = getattr(out, "token_sizes", None)
            if sizes is None:
                sizes = tokens.new_ones(tokens.shape[0], tokens.shape[1], 1)
            patches, weight = tokens[:, 1:], sizes[:, 1:]
            cls.append(out.pooler_output.numpy())
            mean.append(((patches * weight).sum(1) / weight.sum(1)).numpy())
    return np.concatenate(cls), np.concatenate(mean)


def stats(c: np.ndarray, m: np.ndarray) -> dict:
    return {"cls_cosine_mean": float(c.mean()), "cls_cosine_min": float(c.min()),
            "mean_patch_cosine_mean": float(m.mean()), "mean_patch_cosine_min": float(m.min())}


def line(s: dict) -> str:
    return (f"CLS cos mean {s['cls_cosine_mean']:.5f} min {s['cls_cosine_min']:.5f}  mean-patch cos mean "
            f"{s['mean_patch_cosine_mean']:.5f} min {s['mean_patch_cosine_min']:.5f}")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run(model_dir: str, lfw: int, ratios: list[int], photos: bool = True, only: list[str] | None = None) -> dict:
    _add_received_without_self()
    loaded = get_family("vit").load(os.path.abspath(model_dir))
    sets = [photo_views(datasets.load_images("builtin:skimage"))] if photos else []
    if lfw:
        sets.append(datasets.load_images("builtin:lfw", lfw))
    results = {"model": os.path.basename(os.path.normpath(model_dir)), "image_size": 224, "sets": []}
    for images in sets:
        # the processor as the checkpoint ships it (resize to 256, center crop 224), as `turbo-export sweep` feeds it
        pixels = torch.from_numpy(datasets.pixel_values(images, loaded.image_processor, 3))
        base_cls, base_mean = features(loaded.model, pixels)
        rows = []
        for r in ratios:
            for label, semantic, alpha in VARIANTS:
                if only and label not in only:
                    continue
                model = apply_turbo(copy.deepcopy(loaded.model), r, alpha=alpha, semantic=semantic)
                start = time.perf_counter()
                cls, mean = features(model, pixels)
                c, m = cosine(cls, base_cls), cosine(mean, base_mean)
                row = {"r": r, "semantic": label, "alpha": alpha, **stats(c, m),
                       "seconds": time.perf_counter() - start,
                       "per_image": {"names": images.names, "cls_cosine": c.tolist(), "mean_patch_cosine": m.tolist()}}
                full = np.array([n.endswith(":full") for n in images.names])
                if full.any() and not full.all():
                    row["full_photos_only"] = stats(c[full], m[full])
                rows.append(row)
                print(f"{images.source:28} r={r:2} {label:11} alpha={alpha:5g}  " + line(row), flush=True)
                if "full_photos_only" in row:
                    print(f"{'  (the 10 full photos)':28} r={r:2} {label:11} alpha={alpha:5g}  "
                          + line(row["full_photos_only"]), flush=True)
        results["sets"].append({"source": images.source, "images": len(images), "rows": rows})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--lfw", type=int, default=0, help="also this many lfw_subset images (0: none)")
    parser.add_argument("--ratios", default="8,16")
    parser.add_argument("--no-photos", action="store_true", help="skip the scikit-image photo views")
    parser.add_argument("--only", default=None, help="comma-separated labels of VARIANTS to run (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = run(args.model, args.lfw, [int(r) for r in args.ratios.split(",")], not args.no_photos,
                  args.only.split(",") if args.only else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
