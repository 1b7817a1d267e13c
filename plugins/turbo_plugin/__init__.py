"""Turbo merge as TensorRT plugins: Triton kernels, their numpy reference, ONNX Runtime and TensorRT bindings.

Importing the package imports nothing heavy; import the module you need:

- ``turbo_plugin.kernels``: the Triton kernels (GPU, or Triton's CPU interpreter) and torch launchers
- ``turbo_plugin.aot``: PTX compilation of the kernels (no GPU needed)
- ``turbo_plugin.reference``: the node semantics in numpy
- ``turbo_plugin.ort_ops``: the nodes for ONNX Runtime (onnxruntime-extensions)
- ``turbo_plugin.trt_plugin``: registers ``turbo::TurboMerge`` / ``turbo::TurboUnmerge`` with TensorRT
"""

PLUGIN_NAMESPACE = "turbo"


def register_tensorrt_plugins() -> None:
    """Register both plugins with TensorRT (imports tensorrt); call before parsing a --merge-impl plugin graph."""
    from . import trt_plugin  # noqa: F401
