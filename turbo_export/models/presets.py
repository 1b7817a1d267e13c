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
from turbo_export.logs import quieted

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
    except Exception as exc:  # noqa: BLE001  (OSError, ValueError, or a TypeError from a config.json of bad types)
        first = first_line(exc)
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
    config, path, local = read_config(source)
    architectures = list(getattr(config, "architectures", None) or [])
    chosen = next((a for a in architectures if a in supported), None)
    if chosen is None:
        raise TurboExportError(
            f"model: '{source}' is a {', '.join(architectures) or config.model_type} checkpoint; supported classes: "
            + ", ".join(supported)
        )
    config._attn_implementation = "eager"
    if local:
        check_weight_files(path)
    model = load_checked(_transformers_attr(chosen), path, source, config=config)
    model.eval()

    processor = None
    try:
        from transformers import AutoImageProcessor, AutoProcessor

        with quiet_loaders():
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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_weight_files(folder: str) -> None:
    """Every safetensors file of a checkpoint folder has a header that parses and covers the file (read before
    loading, so a corrupt file is named in one line rather than failing deep inside the loader)."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith((".bin", ".pt", ".pth")) and os.path.isfile(path):
            with open(path, "rb") as f:
                head = f.read(4)
            if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a pickle
                raise TurboExportError(f"model: weights file '{path}' is corrupt or not a PyTorch weights file "
                                       f"({'empty' if not head else 'neither a zip archive nor a pickle'})")
        if not name.endswith(".safetensors") or not os.path.isfile(path):
            continue
        try:
            from safetensors import safe_open

            with safe_open(path, "np"):
                pass
        except Exception as exc:  # noqa: BLE001  (SafetensorError and friends: not a safetensors file)
            raise TurboExportError(f"model: weights file '{path}' is corrupt or not a safetensors file "
                                   f"({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (with the next one when it ends in ':'), at most 200 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text[:200] + ("..." if len(text) > 200 else "")


def _weights_files(folder: str) -> str:
    names = sorted(n for n in os.listdir(folder) if n.endswith(WEIGHT_SUFFIXES)) if os.path.isdir(folder) else []
    return ", ".join(os.path.join(folder, n) for n in names[:3]) or folder


def load_checked(cls: Any, path: str, source: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` (transformers or diffusers) with its load report silenced; weights that
    do not fit the config (missing, unexpected or of another shape) and unreadable weight files are one-line
    TurboExportErrors naming the first few keys or the file."""
    try:
        with quiet_loaders():
            model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except TurboExportError:
        raise
    except Exception as exc:  # noqa: BLE001  (SafetensorError, UnpicklingError, EOFError, OSError, ...)
        raise TurboExportError(f"model: cannot load the weights of '{source}' ({_weights_files(path)}): "
                               f"{first_line(exc)}") from None
    problems = []
    for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "not in the model"),
                      ("mismatched_keys", "of another shape")):
        keys = sorted(info.get(key) or [], key=str)
        if keys:
            shown = [f"{k[0]} (weights {list(k[1])}, config {list(k[2])})" if isinstance(k, tuple) else str(k)
                     for k in keys[:3]]
            problems.append(f"{len(keys)} {what}: {', '.join(shown)}{', ...' if len(keys) > 3 else ''}")
    if info.get("error_msgs"):
        problems.append(first_line(RuntimeError(info["error_msgs"][0])))
    if problems:
        raise TurboExportError(f"model: the weights of '{source}' do not match its config ({'; '.join(problems)}); "
                               "the config and the weights come from different models")
    return model


@contextlib.contextmanager
def quiet_loaders():
    """transformers' / diffusers' load reports and progress bars off: a mismatch is our one-line error instead."""
    from transformers.utils import logging as hf_logging

    saved = [(hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())]
    try:
        from diffusers.utils import logging as df_logging

        saved.append((df_logging, df_logging.get_verbosity(), df_logging.is_progress_bar_enabled()))
    except ImportError:
        pass
    for module, _, _ in saved:
        module.set_verbosity_error()
        module.disable_progress_bar()
    try:
        with _quiet_hub():
            yield
    finally:
        for module, level, bar in saved:
            module.set_verbosity(level)
            if bar:
                module.enable_progress_bar()


def _quiet_hub():
    """huggingface_hub logs every retry of an unreachable hub; one error line is enough."""
    return quieted("huggingface_hub", level=logging.CRITICAL)


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
