"""turbo-export: Turbo token merging baked into exported ONNX graphs and TensorRT engines.

The public API is imported lazily, so ``import turbo_export`` (and an ONNX Runtime runner) does not import torch.
"""

from __future__ import annotations

from typing import Any

from turbo_export.errors import ParityError, TurboExportError

__all__ = ["apply_turbo", "remove_turbo", "supported_classes", "TurboExportError", "ParityError"]
__version__ = "0.1.0"

_LAZY = {"apply_turbo", "remove_turbo", "supported_classes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from turbo_export import api, families

        return getattr(families if name == "supported_classes" else api, name)
    raise AttributeError(f"module 'turbo_export' has no attribute {name!r}")
