"""The merge as ONE custom node per block (``--merge-impl plugin``): what TensorRT replaces with its plugin.

``plugin_merge`` is a drop-in ``TurboSettings.merge_fn``: eager it computes exactly ``merge.turbo_merge``
(through the ``turbo::merge`` torch custom op; with ``split=`` any other A/B split, e.g. the UNet's 2x2 grid,
by ``merge.split_matching`` / ``merge_wavg_split`` / ``unmerge_split``); exported with
``custom_translation_table()`` it becomes one ``turbo.TurboMerge`` ONNX node. TensorRT's ONNX parser turns a
node into a plugin when its op_type is the plugin's name; it reads ``plugin_namespace`` / ``plugin_version`` and
``aot`` (use the ahead-of-time kernel) and hands the other attributes to the plugin. The graph runs in ONNX
Runtime only with the Python node implementations of ``plugins/turbo_plugin/ort_ops.py`` registered
(onnxruntime-extensions); ``runtime.ort.OnnxRuntimeRunner`` detects the nodes (``has_turbo_nodes``) and does so.

Node contract (plugins/README.md has the full statement):
  TurboMerge(x [B,N,C], size [B,N,1], metric [B,N,D], semantic [B,N], a_idx int32 [Na], b_idx int32 [Nb];
             r, alpha, protected) -> x [B,N-r,C], size [B,N-r,1], unm int32 [B,Na-r], src int32 [B,r],
             dst int32 [B,r]
  TurboUnmerge(x [B,N-r,C], unm, src, dst, a_idx, b_idx) -> x [B,N,C]
"""

from __future__ import annotations

from typing import Any

import torch

from turbo_export.core import merge
from turbo_export.core.plugin_contract import (
    DOMAIN,
    MERGE_IMPLS,
    MERGE_OP,
    NAMESPACE,
    PLUGIN_MAX_TOKENS_PER_SIDE,
    PLUGIN_VERSION,
    UNMERGE_OP,
    has_turbo_nodes,
    import_turbo_plugin,
)


def alternate_split(n_tokens: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The understanding models' split as index tensors: A = rows 0, 2, 4, ..., B = rows 1, 3, 5, ..."""
    return (torch.arange(0, n_tokens, 2, dtype=torch.int32, device=device),
            torch.arange(1, n_tokens, 2, dtype=torch.int32, device=device))


def _is_alternate(n_tokens: int, a_idx: torch.Tensor, b_idx: torch.Tensor) -> bool:
    a_ref, b_ref = alternate_split(n_tokens, a_idx.device)
    return torch.equal(a_idx.to(torch.int32), a_ref) and torch.equal(b_idx.to(torch.int32), b_ref)


@torch.library.custom_op("turbo::merge", mutates_args=())
def merge_op(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, semantic: torch.Tensor,
             a_idx: torch.Tensor, b_idx: torch.Tensor, r: int, alpha: float, protected: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _is_alternate(x.shape[1], a_idx, b_idx):  # ViT / BLIP: exactly merge.turbo_merge
        plan = merge.bipartite_soft_matching(metric, r, semantic, alpha, protected)
        out, out_size = merge.merge_wavg(plan, x, size)
    else:  # any other split (the UNet's 2x2 grid)
        plan = merge.split_matching(metric, a_idx, b_idx, r, semantic, alpha, protected)
        out, out_size = merge.merge_wavg_split(plan, a_idx, b_idx, x, size)
    return out, out_size, plan.unm_idx.int(), plan.src_idx.int(), plan.dst_idx.int()


@merge_op.register_fake
def _merge_fake(x, size, metric, semantic, a_idx, b_idx, r, alpha, protected):
    batch, n_tokens, channels = x.shape
    num_a = a_idx.shape[0]
    index = dict(dtype=torch.int32, device=x.device)
    return (x.new_empty(batch, n_tokens - r, channels), size.new_empty(batch, n_tokens - r, 1),
            torch.empty(batch, num_a - r, **index), torch.empty(batch, r, **index), torch.empty(batch, r, **index))


@torch.library.custom_op("turbo::unmerge", mutates_args=())
def unmerge_op(x: torch.Tensor, unm: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, a_idx: torch.Tensor,
               b_idx: torch.Tensor) -> torch.Tensor:
    n_tokens = a_idx.shape[0] + b_idx.shape[0]
    plan = merge.MergePlan(unm.long(), src.long(), dst.long())
    if _is_alternate(n_tokens, a_idx, b_idx):
        return merge.unmerge(plan, x, n_tokens)
    return merge.unmerge_split(plan, a_idx, b_idx, x)


@unmerge_op.register_fake
def _unmerge_fake(x, unm, src, dst, a_idx, b_idx):
    return x.new_empty(x.shape[0], a_idx.shape[0] + b_idx.shape[0], x.shape[2])


Split = tuple[torch.Tensor, torch.Tensor]


def plugin_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, semantic: torch.Tensor | None,
                 r: int, alpha: float, protected: int = 1, split: Split | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, merge.MergePlan]:
    """``merge.turbo_merge`` through the custom op: same values, one ``TurboMerge`` node when exported.

    split: (a_idx, b_idx) token rows of A and B; None = the alternate split. Any other split follows the node
    contract (``merge.split_matching`` / ``merge_wavg_split``: unmerged A rows in A order).
    """
    if semantic is None:
        semantic = x.new_zeros(x.shape[0], x.shape[1])
    a_idx, b_idx = _split_or_alternate(split, x.shape[1], x.device)
    check_plugin_sizes(a_idx.shape[0], b_idx.shape[0], tuple(x.shape))
    out, out_size, unm, src, dst = merge_op(x, size, metric, semantic, a_idx, b_idx, int(r), float(alpha),
                                            int(protected))
    return out, out_size, merge.MergePlan(unm.long(), src.long(), dst.long())


def check_plugin_sizes(num_a: int, num_b: int, x_shape: tuple[int, ...] = ()) -> None:
    """Refuse a merge the TurboMerge kernel cannot run: more than ``PLUGIN_MAX_TOKENS_PER_SIDE`` A or B tokens.

    Called for every ``plugin_merge``, so each family's ``--merge-impl plugin`` export (ViT, BLIP, the UNet) stops
    with one line before a graph is written. Refused whatever the backend: a plugin graph exists for TensorRT (in
    ONNX Runtime its nodes are Python validation code), and one its kernel cannot build is of no use.
    """
    if max(int(num_a), int(num_b)) > PLUGIN_MAX_TOKENS_PER_SIDE:
        from turbo_export.errors import TurboExportError

        where = f" of tokens {list(x_shape)}" if x_shape else ""
        raise TurboExportError(
            f"merge-impl plugin: a merge{where} splits into {num_a} A / {num_b} B tokens, over the TensorRT plugin "
            f"kernel's limit of {PLUGIN_MAX_TOKENS_PER_SIDE} per side; use --merge-impl onnx for this model "
            "(or a smaller image size)")


def plugin_unmerge(plan: merge.MergePlan, x: torch.Tensor, num_tokens: int, split: Split | None = None
                   ) -> torch.Tensor:
    """``merge.unmerge`` (or ``merge.unmerge_split``) through the custom op (one ``TurboUnmerge`` node)."""
    a_idx, b_idx = _split_or_alternate(split, num_tokens, x.device)
    return unmerge_op(x, plan.unm_idx.int(), plan.src_idx.int(), plan.dst_idx.int(), a_idx, b_idx)


def _split_or_alternate(split: Split | None, n_tokens: int, device: torch.device) -> Split:
    if split is None:
        return alternate_split(n_tokens, device)
    return split[0].to(device=device, dtype=torch.int32), split[1].to(device=device, dtype=torch.int32)


def check_merge_impl(merge_impl: str) -> str:
    if merge_impl not in MERGE_IMPLS:
        from turbo_export.errors import TurboExportError

        raise TurboExportError(f"merge-impl: unknown '{merge_impl}'; choose one of {', '.join(MERGE_IMPLS)}")
    return merge_impl


def merge_fn(merge_impl: str):
    """The ``TurboSettings.merge_fn`` for ``--merge-impl``."""
    if merge_impl == "onnx":
        return merge.turbo_merge
    if merge_impl == "plugin":
        return plugin_merge
    check_merge_impl(merge_impl)


def register_schemas() -> None:
    """ONNX schemas of the two nodes (onnxscript needs them to build the nodes; idempotent)."""
    from onnx import defs

    A = defs.OpSchema.AttrType
    Param = defs.OpSchema.FormalParameter
    trt_attrs = [defs.OpSchema.Attribute("plugin_namespace", A.STRING, "TensorRT plugin namespace", required=False),
                 defs.OpSchema.Attribute("plugin_version", A.STRING, "TensorRT plugin version", required=False),
                 defs.OpSchema.Attribute("aot", A.INT, "1: TensorRT uses the ahead-of-time kernel", required=False)]
    float_types = ["tensor(float)", "tensor(float16)"]
    tf = [("T", float_types, "token dtype")]
    index = ["a_idx", "b_idx"]
    nodes = {
        MERGE_OP: ([Param(n, "T") for n in ("x", "size", "metric", "semantic")] + [Param(n, "tensor(int32)")
                                                                                    for n in index],
                   [Param("merged_x", "T"), Param("merged_size", "T")] + [Param(n, "tensor(int32)")
                                                                          for n in ("unm", "src", "dst")],
                   [defs.OpSchema.Attribute("r", A.INT, "tokens merged"),
                    defs.OpSchema.Attribute("alpha", A.FLOAT, "weight of the semantic value"),
                    defs.OpSchema.Attribute("protected", A.INT, "leading tokens never merged")]),
        UNMERGE_OP: ([Param("x", "T")] + [Param(n, "tensor(int32)") for n in ("unm", "src", "dst", *index)],
                     [Param("restored_x", "T")], []),
    }
    for name, (inputs, outputs, attrs) in nodes.items():
        if not defs.has(name, DOMAIN):
            defs.register_schema(defs.OpSchema(name, DOMAIN, 1, inputs=inputs, outputs=outputs,
                                               type_constraints=tf, attributes=attrs + trt_attrs))


def custom_translation_table() -> dict[Any, Any]:
    """torch.onnx (dynamo) translations of the custom ops into the ``turbo`` domain nodes."""
    import onnxscript

    register_schemas()

    turbo = onnxscript.values.Opset(DOMAIN, 1)

    def merge_onnx(x, size, metric, semantic, a_idx, b_idx, r: int, alpha: float, protected: int):
        return turbo.TurboMerge(x, size, metric, semantic, a_idx, b_idx, r=r, alpha=alpha, protected=protected,
                                plugin_namespace=NAMESPACE, plugin_version=PLUGIN_VERSION, aot=1, _num_outputs=5)

    def unmerge_onnx(x, unm, src, dst, a_idx, b_idx):
        return turbo.TurboUnmerge(x, unm, src, dst, a_idx, b_idx, plugin_namespace=NAMESPACE,
                                  plugin_version=PLUGIN_VERSION, aot=1)

    return {torch.ops.turbo.merge.default: merge_onnx, torch.ops.turbo.unmerge.default: unmerge_onnx}


def tensorrt_plugin_modules(onnx_path: str) -> tuple[str, ...]:
    """The Python modules that register the TensorRT plugins a graph needs (imported before TensorRT parses it)."""
    if not has_turbo_nodes(onnx_path):
        return ()
    import_turbo_plugin()  # puts plugins/ on the path in a source checkout
    return ("turbo_plugin.trt_plugin",)


