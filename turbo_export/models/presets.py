"""Loading models: ``random:<preset>`` (seeded random weights, offline; the presets are the families'), a local
Hugging Face folder, or a hub id."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from turbo_export.errors import TurboExportError

RANDOM_PREFIX = "random:"
SEED = 0


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


def build_seeded(class_name: str, config: Any, seed: int = SEED) -> nn.Module:
    """A transformers model of ``class_name`` with seeded random weights (eager attention, eval mode)."""
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _transformers_attr(class_name)(config)
    return model.eval()


def build_random(preset_name: str, presets: dict[str, tuple[str, str, dict[str, Any], str]], seed: int = SEED
                 ) -> LoadedModel:
    """``random:<preset_name>`` from a family's presets: (model class, config class, config, description)."""
    if preset_name not in presets:
        raise TurboExportError(
            f"model: unknown preset 'random:{preset_name}'; available: "
            + ", ".join(f"random:{n}" for n in presets)
        )
    model_class, config_class, settings, _ = presets[preset_name]
    config = _transformers_attr(config_class)(**settings)
    model = build_seeded(model_class, config, seed)
    return LoadedModel(model, preset_name, RANDOM_PREFIX + preset_name, int(config.image_size),
                       int(config.num_channels))


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith("/")


def read_config(source: str) -> tuple[Any, str, bool]:
    """(config, path, is a local folder) of a checkpoint folder or hub id, or a one-line TurboExportError."""
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
    return config, path, local


def checkpoint_classes(source: str) -> list[str]:
    """The model classes a checkpoint's config.json names (``architectures``), else its model type."""
    config, _, _ = read_config(source)
    return list(getattr(config, "architectures", None) or []) or [str(config.model_type)]


def load_pretrained(source: str, supported: list[str], text_and_image: bool = False) -> LoadedModel:
    """Load a checkpoint from a local folder or hub id, choosing the class from its config."""
    config, path, _ = read_config(source)
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
            if text_and_image:  # AutoProcessor: image processor + tokenizer
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


def load_model(source: str, presets: dict[str, tuple[str, str, dict[str, Any], str]], supported: list[str]
               ) -> LoadedModel:
    """``random:<preset>`` from ``presets``, else a checkpoint folder or hub id of one of the ``supported`` classes."""
    if source.startswith(RANDOM_PREFIX):
        return build_random(source[len(RANDOM_PREFIX):], presets)
    return load_pretrained(source, supported)
