import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need TensorRT and a CUDA GPU: skipped with exactly what is missing, run where both exist."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import pytest

    from turbo_export.backends import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a CUDA GPU: {reason}"))
