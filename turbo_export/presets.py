"""Models by name: ``random:<preset>`` (seeded random weights, offline), a local folder, or a hub id."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import TurboExportError

RANDOM_PREFIX = "random:"
SEED = 0


@dataclass(frozen=True)
class Preset:
    family: str
    model_class: str  # a transformers class name
    config_class: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""


# The ViT-B/L configs are google/vit-{base,large}-patch16-224's (ImageNet-1k heads).
VIT_PRESETS: dict[str, Preset] = {
    "vit-base-patch16-224": Preset(
        "vit", "ViTForImageClassification", "ViTConfig",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             image_size=224, patch_size=16, num_labels=1000),
        "ViT-B/16, 224 px, 197 tokens, 12 layers",
    ),
    "vit-large-patch16-224": Preset(
        "vit", "ViTForImageClassification", "ViTConfig",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             image_size=224, patch_size=16, num_labels=1000),
        "ViT-L/16, 224 px, 197 tokens, 24 layers",
    ),
    "deit-small-distilled-patch16-224": Preset(
        "vit", "DeiTForImageClassificationWithTeacher", "DeiTConfig",
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             image_size=224, patch_size=16, num_labels=1000),
        "DeiT-S/16 distilled, 224 px, 198 tokens (CLS + distillation), 12 layers",
    ),
    "dinov2-small": Preset(
        "vit", "Dinov2Model", "Dinov2Config",
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
             image_size=224, patch_size=14),
        "DINOv2 ViT-S/14 backbone at 224 px, 257 tokens, 12 layers",
    ),
    "tiny": Preset(
        "vit", "ViTForImageClassification", "ViTConfig",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=4, num_labels=10),
        "tiny ViT for tests: 32 px, 65 tokens, 4 layers, width 32",
    ),
    "tiny-deit": Preset(
        "vit", "DeiTForImageClassificationWithTeacher", "DeiTConfig",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=4, num_labels=10),
        "tiny DeiT for tests: 66 tokens (CLS + distillation)",
    ),
    "tiny-dinov2": Preset(
        "vit", "Dinov2Model", "Dinov2Config",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
             image_size=32, patch_size=4, layerscale_value=0.5),
        "tiny DINOv2 for tests: 65 tokens, layer scale",
    ),
}


def presets_for(family: str) -> dict[str, Preset]:
    return {name: p for name, p in VIT_PRESETS.items() if p.family == family}


@dataclass
class LoadedModel:
    model: nn.Module
    name: str  # short name for folders and reports
    source: str  # what the user passed
    image_size: int
    num_channels: int
    image_processor: Callable | None = None


def _transformers_attr(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def build_random(preset_name: str, family: str, seed: int = SEED) -> LoadedModel:
    presets = presets_for(family)
    if preset_name not in presets:
        raise TurboExportError(
            f"model: unknown preset 'random:{preset_name}'; available: "
            + ", ".join(f"random:{n}" for n in presets)
        )
    preset = presets[preset_name]
    config = _transformers_attr(preset.config_class)(**preset.config)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _transformers_attr(preset.model_class)(config)
    model.eval()
    return LoadedModel(model, preset_name, RANDOM_PREFIX + preset_name, int(config.image_size),
                       int(config.num_channels))


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith("/")


def load_pretrained(source: str, supported: list[str]) -> LoadedModel:
    """Load a checkpoint from a local folder or hub id, choosing the class from its config."""
    from transformers import AutoConfig

    path = os.path.expanduser(source)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise TurboExportError(f"model: '{source}' is a file; expected a Hugging Face model folder")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise TurboExportError(f"model: folder '{source}' has no config.json; is it a Hugging Face model folder?")
    elif _looks_like_path(source):
        raise TurboExportError(f"model: folder '{source}' does not exist")
    local = os.path.isdir(path)
    try:
        with _quiet_hub():
            config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise TurboExportError(f"model: folder '{source}' has an unreadable config.json: {first}") from None
        raise TurboExportError(
            f"model: cannot load '{source}': not a local folder, and the hub did not give it ({first})"
        ) from None

    architectures = list(getattr(config, "architectures", None) or [])
    chosen = next((a for a in architectures if a in supported), None)
    if chosen is None:
        raise TurboExportError(
            f"model: '{source}' is a {', '.join(architectures) or config.model_type} checkpoint; supported classes: "
            + ", ".join(supported)
        )
    config._attn_implementation = "eager"
    try:
        model = _transformers_attr(chosen).from_pretrained(path, config=config)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TurboExportError(f"model: cannot load the weights of '{source}': {str(exc).splitlines()[0]}") from None
    model.eval()

    processor = None
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
    except Exception:  # a checkpoint without an image processor still exports
        processor = None
    image_size = _default_image_size(config, processor)
    name = os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else source.replace("/", "--")
    return LoadedModel(model, name, source, image_size, int(getattr(config, "num_channels", 3)), processor)


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry of an unreachable hub; one error line is enough."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _default_image_size(config: Any, processor: Any) -> int:
    """The size the checkpoint's processor feeds the model (crop size, else resize size, else config)."""
    for attr in ("crop_size", "size"):
        value = getattr(processor, attr, None) if processor is not None else None
        if isinstance(value, dict):
            if "height" in value:
                return int(value["height"])
            if attr == "size" and "shortest_edge" in value and not getattr(processor, "do_center_crop", False):
                return int(value["shortest_edge"])
    size = config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def load_model(source: str, family: str, supported: list[str]) -> LoadedModel:
    if source.startswith(RANDOM_PREFIX):
        return build_random(source[len(RANDOM_PREFIX):], family)
    return load_pretrained(source, supported)
