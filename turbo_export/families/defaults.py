"""Default Turbo settings per model family: the one place they are defined.

Settled by the measurements in the README ("Accuracy parity on real weights"); ``evidence`` says which.
``alpha`` multiplies the semantic value I directly (E = R - alpha * I); the reference code's
``30 * alpha`` with alpha = 5 is 150 on this scale.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyDefaults:
    alpha: float
    min_tokens: int
    evidence: str


DEFAULTS: dict[str, FamilyDefaults] = {
    "vit-classifier": FamilyDefaults(150.0, 0, "vit-mnist, 5,000 digits: top-1 agreement with the unaccelerated "
                                               "model >= ToMe's at r = 2, 4, 6, 8 only for alpha 30 and 150 (150 "
                                               "highest at every r); top-1 drop 0.16 point at r = 4"),
    "vit-backbone": FamilyDefaults(6.0, 0, "dinov2-small-imgfocus, 224 px: on scikit-image photos alpha 6 gives the "
                                           "highest CLS cosine at r = 8, 16, 20 (150 is worst); on lfw_subset's "
                                           "upscaled 25x25 faces ToMe is best, alpha 6 second"),
    "blip": FamilyDefaults(6.0, 0, "not measured on real weights (none available offline); the paper's alpha; "
                                   "min-tokens per task stays in export/blip.py (40 caption/VQA, 100 retrieval)"),
}


def family_key(model_class: str) -> str:
    """'vit-classifier' for *ForImageClassification*, 'blip' for Blip*, else 'vit-backbone'."""
    if model_class.startswith("Blip"):
        return "blip"
    return "vit-classifier" if "ForImageClassification" in model_class else "vit-backbone"


def defaults_for(model_class: str) -> FamilyDefaults:
    return DEFAULTS[family_key(model_class)]
