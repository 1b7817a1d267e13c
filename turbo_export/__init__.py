"""turbo-export: Turbo token merging baked into exported ONNX graphs and TensorRT engines."""

from .errors import ParityError, TurboExportError
from .patch import apply_turbo, remove_turbo, supported_classes

__all__ = ["apply_turbo", "remove_turbo", "supported_classes", "TurboExportError", "ParityError"]
__version__ = "0.1.0"
