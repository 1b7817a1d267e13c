"""The plugin node contract without torch: op names, domain, size limit, and how to find the plugin package.

What readers of a graph need (ONNX Runtime runners, the Triton repository writer, TensorRT) to recognise the
turbo.TurboMerge / TurboUnmerge nodes; ``plugin_ops`` builds them from torch.
"""

from __future__ import annotations

import os
import sys

DOMAIN = "turbo"  # ONNX domain of the nodes (ONNX Runtime matches it; TensorRT ignores it)
NAMESPACE = "turbo"  # TensorRT plugin namespace: plugins "turbo::TurboMerge", "turbo::TurboUnmerge"
PLUGIN_VERSION = "1"
MERGE_OP = "TurboMerge"
UNMERGE_OP = "TurboUnmerge"
MERGE_IMPLS = ("onnx", "plugin")
# The TurboMerge kernel keeps full-length vectors over A in one program's registers (|A| rounded up to a power of
# two) and loops over tiles for the 2-D work. Measured (plugins/README.md, "Size limit"): up to a 2048-row A vector
# it builds in ~5 s for sm_80 and sm_90 with 128 registers and no spills; a 4096-row vector also builds without
# spills but needs all 255 registers. So at most 2048 tokens per side (ViT-L/14 at 336 px: 289 / 288 fits; SD 1.5
# at 512 px, 3072 / 1024, does not).
PLUGIN_MAX_TOKENS_PER_SIDE = 2048


def has_turbo_nodes(onnx_path: str) -> bool:
    """Whether an ONNX file holds turbo.TurboMerge / TurboUnmerge nodes (a --merge-impl plugin export): its model
    declares the ``turbo`` op domain."""
    import onnx

    try:
        model = onnx.load(onnx_path, load_external_data=False)
    except Exception:  # unreadable: the runtime that opens it next says why
        return False
    return any(imp.domain == DOMAIN for imp in model.opset_import)


def plugins_dir() -> str:
    """The repository's ``plugins/`` folder (holds the ``turbo_plugin`` package)."""
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "plugins"))


def import_turbo_plugin():
    """``plugins/turbo_plugin`` (kernels, numpy reference, ORT ops, TensorRT plugin): installed or from the repo."""
    try:
        import turbo_plugin
    except ImportError:
        path = plugins_dir()
        if not os.path.isdir(os.path.join(path, "turbo_plugin")):
            from turbo_export.errors import TurboExportError

            raise TurboExportError("the turbo_plugin package is not installed and plugins/ is not next to "
                                   "turbo_export/; install turbo-export from a source checkout") from None
        sys.path.insert(0, path)
        import turbo_plugin
    return turbo_plugin
