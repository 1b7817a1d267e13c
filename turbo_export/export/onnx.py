"""torch -> ONNX (dynamo exporter) with static shapes (a symbolic batch on request), cleaned up, and onnx.checker."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Any

import torch

from turbo_export.errors import TurboExportError
from turbo_export.families.base import GraphSpec

TWO_GB = 2**31
MAX_DYNAMIC_BATCH = 4096


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and warnings for every export; keep the CLI output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _user_error_in(exc: BaseException) -> TurboExportError | None:
    """The TurboExportError that torch.export wrapped (in its own TorchExportError), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TurboExportError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def export_onnx(spec: GraphSpec, path: str, dynamic_batch: bool = False) -> str:
    """Export ``spec`` to ``path``; weights go to external data above 2 GB.

    Every shape is static but ``spec.symbolic_dims``, and with ``dynamic_batch`` the batch axis of each input in
    ``spec.batch_axes``: one symbolic dimension ``batch``. The merge itself keeps every other shape static, since r
    is fixed per block: the token count of each block is a number in the graph.
    """
    import onnx

    from turbo_export.core.plugin_ops import custom_translation_table

    module = spec.module.eval()
    inputs = spec.example_inputs
    axes: dict[str, dict[int, str]] = {n: dict(a) for n, a in spec.symbolic_dims.items()}
    if dynamic_batch and spec.batch_axes:
        inputs = at_least_two_rows(spec)  # torch.export specialises a dimension of size 1
        for name, axis in spec.batch_axes.items():
            axes.setdefault(name, {})[axis] = "batch"
    dims = {d: torch.export.Dim(d, min=1, max=MAX_DYNAMIC_BATCH if d == "batch" else spec.dim_ranges[d][2])
            for a in axes.values() for d in a.values()}
    dynamic_shapes = tuple({axis: dims[d] for axis, d in axes[n].items()} if n in axes else None
                           for n in inputs) if axes else None
    args = tuple(inputs.values())
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module, args, None, dynamo=True, input_names=list(inputs), output_names=spec.output_names,
                optimize=True, custom_translation_table=custom_translation_table(), dynamic_shapes=dynamic_shapes,
            )
        except Exception as exc:  # a user error raised while tracing (plugin_ops.check_plugin_sizes) stays one
            user_error = _user_error_in(exc)
            if user_error is None:
                raise
            raise user_error from None
        param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        program.save(path, external_data=param_bytes >= TWO_GB)
    model = clean_exported(path)
    onnx.checker.check_model(path if param_bytes >= TWO_GB else model, full_check=False)
    return path


def clean_exported(path: str) -> Any:
    """Run ``graph_cleanup.cleanup_graph`` on the saved graph, in place (weights in external data stay where they
    are); returns the cleaned ModelProto. Both sides of every comparison get it: the exporter leaves work that
    changes nothing, such as the Add of the all-zero attention mask that transformers builds for an unmasked image
    model (12 broadcast Adds of [batch, 1, N, N] in a ViT-B), which would slow the unaccelerated graph for nothing.
    With a symbolic batch, each intermediate tensor then gets its own batch name (``tensor_symbols``)."""
    import onnx

    from turbo_export.export.graph_cleanup import cleanup_graph
    from turbo_export.export.tensor_symbols import name_symbols_per_tensor

    model, notes = cleanup_graph(onnx.load(path, load_external_data=False))
    if name_symbols_per_tensor(model) or notes:
        onnx.save(model, path)
    return model


def at_least_two_rows(spec: GraphSpec) -> dict[str, torch.Tensor]:
    """The example inputs, rows repeated along their batch axes when the batch is 1."""
    rows = spec.rows()
    if rows >= 2:
        return spec.example_inputs
    return {n: torch.cat([v, v], dim=spec.batch_axes[n]) if n in spec.batch_axes else v
            for n, v in spec.example_inputs.items()}


def file_size(path: str) -> int:
    total = os.path.getsize(path)
    data = path + ".data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)
