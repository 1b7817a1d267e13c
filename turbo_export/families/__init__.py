"""One declaration per model family, in one registry (see ``base``). Importing this package registers them all.

A new family is one module here (its declaration, ``@register``) plus one patch module: docs/architecture.md.
"""

from turbo_export.families import blip, blip2, clip, clip_zero_shot, sd, vit  # noqa: F401  (each registers its declaration)
from turbo_export.families.base import (
    REGISTRY,
    Family,
    families,
    family_for_class,
    get_family,
    register,
    supported_classes,
)

__all__ = ["REGISTRY", "Family", "families", "family_for_class", "get_family", "register", "supported_classes"]
