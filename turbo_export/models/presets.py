"""Models by name: ``random:<preset>`` (seeded random weights, offline), a local folder, or a hub id."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from turbo_export.errors import TurboExportError

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


BLIP_TASK_CLASSES = {
    "caption": "BlipForConditionalGeneration",
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
}

# BLIP base: ViT-B/16 at 384 px (577 tokens) + the BERT-base text side; large: ViT-L/16 (24 layers).
BLIP_PRESETS: dict[str, dict[str, Any]] = {
    "blip-base": dict(vision_config={}, text_config={}),
    "blip-large": dict(
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text_config=dict(encoder_hidden_size=1024),
    ),
    "tiny": dict(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=4),
        text_config=dict(vocab_size=512, bos_token_id=510, hidden_size=32, encoder_hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64),
        image_text_hidden_size=32, projection_dim=32,
    ),
}
BLIP_PRESET_NOTES = {
    "blip-base": "BLIP base: ViT-B/16 at 384 px (577 tokens), BERT-base text side",
    "blip-large": "BLIP large captioning: ViT-L/16 at 384 px, 24 layers",
    "tiny": "tiny BLIP for tests: 32 px, 65 image tokens, 2+2 layers",
}


def presets_for(family: str) -> dict[str, Preset]:
    return {name: p for name, p in VIT_PRESETS.items() if p.family == family}


def build_random_blip(preset_name: str, task: str, seed: int = SEED) -> LoadedModel:
    """A BLIP model of the task's class from a preset config with seeded random weights, plus an offline processor."""
    from transformers import BlipConfig

    from turbo_export.models.tokenizer import offline_blip_processor

    if preset_name not in BLIP_PRESETS:
        raise TurboExportError(
            f"model: unknown preset 'random:{preset_name}'; available: "
            + ", ".join(f"random:{n}" for n in BLIP_PRESETS)
        )
    if task not in BLIP_TASK_CLASSES:
        raise TurboExportError(f"task: unknown '{task}'; choose one of {', '.join(BLIP_TASK_CLASSES)}")
    settings = copy.deepcopy(BLIP_PRESETS[preset_name])
    # BlipVisionConfig's default initializer_range is 1e-10, which makes every random image token alike
    settings["vision_config"].setdefault("initializer_range", 0.02)
    config = BlipConfig(**settings)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _transformers_attr(BLIP_TASK_CLASSES[task])(config)
    model.eval()
    vision = config.vision_config
    processor = offline_blip_processor(config.text_config.vocab_size, config.text_config.bos_token_id,
                                       int(vision.image_size))
    return LoadedModel(model, f"{preset_name}-{task}", RANDOM_PREFIX + preset_name, int(vision.image_size), 3,
                       processor)


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


def load_pretrained(source: str, supported: list[str], with_processor: str = "image") -> LoadedModel:
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
        from transformers import AutoImageProcessor, AutoProcessor

        with _quiet_hub():
            if with_processor == "blip":
                processor = AutoProcessor.from_pretrained(path)
            else:
                processor = AutoImageProcessor.from_pretrained(path)
    except Exception:  # a checkpoint without an image processor still exports
        processor = None
    image_size = _default_image_size(getattr(config, "vision_config", config),
                                     getattr(processor, "image_processor", processor))
    name = os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else source.replace("/", "--")
    channels = int(getattr(getattr(config, "vision_config", config), "num_channels", 3))
    return LoadedModel(model, name, source, image_size, channels, processor)


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
    def field(value: Any, key: str) -> Any:  # processors hold plain dicts or transformers' SizeDict
        return value.get(key) if isinstance(value, dict) else getattr(value, key, None)

    if processor is not None:
        crop = getattr(processor, "crop_size", None)
        if crop is not None and getattr(processor, "do_center_crop", False) and field(crop, "height"):
            return int(field(crop, "height"))
        size = getattr(processor, "size", None)
        if size is not None and field(size, "height"):
            return int(field(size, "height"))
        if size is not None and field(size, "shortest_edge") and not getattr(processor, "do_center_crop", False):
            return int(field(size, "shortest_edge"))
    size = config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def load_model(source: str, family: str, supported: list[str]) -> LoadedModel:
    if source.startswith(RANDOM_PREFIX):
        return build_random(source[len(RANDOM_PREFIX):], family)
    return load_pretrained(source, supported)
