"""Turbo merge as TensorRT plugins: Triton kernels, their numpy reference, ONNX Runtime and TensorRT bindings.

Importing the package imports nothing heavy; import the module you need:

- ``turbo_plugin.kernels``: the Triton kernels (GPU, or Triton's CPU interpreter) and torch launchers
- ``turbo_plugin.aot``: PTX compilation of the kernels (no GPU needed)
- ``turbo_plugin.reference``: the node semantics in numpy
- ``turbo_plugin.ort_ops``: the nodes for ONNX Runtime (onnxruntime-extensions)
- ``turbo_plugin.trt_plugin``: registers ``turbo::TurboMerge`` / ``turbo::TurboUnmerge`` with TensorRT
"""

PLUGIN_NAMESPACE = "turbo"


def attribute_conversion_problem(tensorrt_version: str, numpy_version: str) -> str | None:
    """Why TensorRT could not create TurboMerge here, or None. TensorRT 10's tensorrt.plugin turns each scalar
    attribute into its annotated type with ``int(field.data)`` on a one-element array (``_lib.create_plugin``;
    11 indexes ``field.data[0]``), which numpy 2.4 and later refuse ("only 0-dimensional arrays can be
    converted to Python scalars")."""
    trt_major = int(tensorrt_version.split(".")[0])
    numpy_major, numpy_minor = (int(p) for p in numpy_version.split(".")[:2])
    if trt_major == 10 and (numpy_major, numpy_minor) >= (2, 4):
        return (f"TensorRT {tensorrt_version}'s Python plugin layer cannot pass TurboMerge's r/alpha/protected "
                f"attributes under numpy {numpy_version} (it calls int() on a 1-element array, which numpy >= 2.4 "
                "refuses); install 'numpy<2.4' or TensorRT 11")
    return None


def register_tensorrt_plugins() -> None:
    """Register both plugins with TensorRT (imports tensorrt); call before parsing a --merge-impl plugin graph."""
    from . import trt_plugin  # noqa: F401
