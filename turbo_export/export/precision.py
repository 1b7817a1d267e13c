"""The precision of an export: which precisions run where (checked up front), int8 graphs from the checked fp32
ones (``export.quantize``: the merge stays float), and the int8 graphs' closeness to the fp32 PyTorch model.

fp32 graphs are exported and checked against PyTorch first, strictly; int8 graphs are made from them, the
unaccelerated and the Turbo graph the same way, and checked against the same PyTorch model with a cosine floor
(``INT8_MIN_COSINE``): int8 rounding moves every output a little, and may flip a near-tied merge decision.
"""

from __future__ import annotations

import os
from typing import Any

from turbo_export.errors import TurboExportError
from turbo_export.export.parity import check_graph_as_sets
from turbo_export.families.base import ExportPlan, Log

PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("dynamic", "static")
# int8 graph vs the fp32 PyTorch model, every output, on the export's example inputs (random-weight presets gave
# 0.998 and above for the tiny and base ViTs; docs/measurements.md has the real-weight accuracies)
INT8_MIN_COSINE = 0.98
FP32_SUFFIX = ".fp32.onnx"


def check_precision(backend: str, precision: str, int8_mode: str = "dynamic", calib_data: str | None = None,
                    source: str = "") -> None:
    """The one-line reason a precision cannot be exported as asked, before any work starts."""
    if precision not in PRECISIONS:
        raise TurboExportError(f"precision: unknown '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and backend == "onnxruntime":
        from turbo_export.export.quantize import check_fp16_onnxruntime

        reason = check_fp16_onnxruntime()
        if reason:
            raise TurboExportError(f"precision: fp16 needs --backend tensorrt, or ONNX Runtime with its CUDA execution "
                                   f"provider: {reason} (on a CPU, --precision int8 is the fast path)")
    if int8_mode not in INT8_MODES:
        raise TurboExportError(f"int8-mode: unknown '{int8_mode}'; choose one of {', '.join(INT8_MODES)}")
    if precision != "int8":
        if calib_data is not None:
            raise TurboExportError("calib-data: only with --precision int8 --int8-mode static")
        return
    if backend == "tensorrt" and int8_mode != "static":
        raise TurboExportError("int8-mode: TensorRT builds int8 engines from the QDQ graph (explicit quantization): "
                               "use --int8-mode static (with --calib-data for a real checkpoint)")
    if int8_mode == "dynamic" and calib_data is not None:
        raise TurboExportError("calib-data: dynamic int8 quantizes activations at run time and needs no calibration; "
                               "use --int8-mode static to calibrate")
    if int8_mode == "static" and calib_data is None and source and not source.startswith("random:"):
        raise TurboExportError("calib-data: --int8-mode static on a real checkpoint needs --calib-data SOURCE (a "
                               "folder of images or builtin:<name>, as for validate): scales from random inputs "
                               "do not fit real activations")


def load_calibration(calib_data: str | None, limit: int) -> Any:
    """The calibration images (``models.datasets`` sources), read before any export work; None when not asked."""
    if calib_data is None:
        return None
    from turbo_export.models import datasets

    return datasets.load_images(calib_data, limit)


def image_calibration(plan: ExportPlan, name: str, loaded: Any, images: Any) -> Any:
    """Feeds for a graph whose one input is pixel_values, from the calibration images; None for other graphs
    (they calibrate on seeded inputs, which the report says)."""
    import numpy as np

    from turbo_export.models import datasets

    g = plan.graphs[name]
    if images is None or list(g.example_inputs) != ["pixel_values"]:
        return None
    size = int(g.example_inputs["pixel_values"].shape[-1])
    pixels = datasets.model_inputs(loaded, images, size).astype(np.float32)
    rows = max(1, g.rows())
    feeds = [{"pixel_values": pixels[i:i + rows]} for i in range(0, len(pixels) - rows + 1, rows)] or [
        {"pixel_values": pixels[:rows]}]

    class Feeds(list):
        description = f"{len(images)} images of {images.source}, preprocessed as for validate"

    return Feeds(feeds)


def fp32_copy(stage: str, graph: str) -> str:
    return os.path.join(stage, graph + FP32_SUFFIX)


def quantize_exports(plan: ExportPlan, stage: str, run: Any, loaded: Any, images: Any, log: Log
                     ) -> dict[str, Any]:
    """Every exported fp32 graph -> int8 in place (``<name>.onnx``); the fp32 file of the benchmark's baseline graph
    stays as ``<name>.fp32.onnx`` (timed beside the int8 graphs), the other fp32 files go."""
    from turbo_export.export.quantize import quantize_graph

    reports = {}
    keep = plan.bench.graphs["baseline"]
    for i, name in enumerate(plan.graphs, 1):
        path = os.path.join(stage, f"{name}.onnx")
        fp32 = fp32_copy(stage, name)
        os.replace(path, fp32)
        _move_external_data(fp32, path + ".data")  # the int8 graph's weights over 2 GB will go to <name>.onnx.data
        log(f"[{i}/{len(plan.graphs)}] int8 ({run.int8_mode}) {name}.onnx ...")
        calibration = image_calibration(plan, name, loaded, images) if run.int8_mode == "static" else None
        reports[name] = quantize_graph(fp32, path, run.int8_mode, calibration,
                                       symmetric_activations=run.backend == "tensorrt")
        for line in reports[name].lines()[1:]:
            log(f"      {line.strip()}")
        if name != keep:
            os.remove(fp32)
            if os.path.exists(fp32 + ".data"):
                os.remove(fp32 + ".data")
    return reports


def _move_external_data(graph: str, data: str) -> None:
    """Weights over 2 GB sit in ``data`` beside ``graph``: move them to ``<graph>.data`` and point the graph there, so
    that the int8 graph written as ``<name>.onnx`` gets its own ``<name>.onnx.data`` instead of overwriting them."""
    import onnx

    if not os.path.exists(data):
        return
    model = onnx.load(graph, load_external_data=False)
    moved = os.path.basename(graph) + ".data"
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location" and entry.value == os.path.basename(data):
                    entry.value = moved
    os.replace(data, os.path.join(os.path.dirname(graph), moved))
    onnx.save_model(model, graph)


def int8_fields(reports: dict[str, Any], run: Any) -> dict[str, Any]:
    first = next(iter(reports.values()))
    return {"int8": {
        "mode": run.int8_mode,
        "calibration": {name: r.calibration for name, r in reports.items()} if run.int8_mode == "static" else None,
        "kept_float": first.excluded.reason,
        "graphs": {name: {"excluded": r.excluded.summary(), "counts_fp32": r.counts_src,
                          "counts_cleaned": r.counts_cleaned, "counts_int8": r.counts_dst, "cleanup": r.cleanup,
                          "bytes": r.dst_bytes} for name, r in reports.items()},
    }}


def check_int8(plan: ExportPlan, runners: dict[str, Any], stage: str, loaded: Any, images: Any, log: Log
               ) -> dict[str, Any]:
    """Each int8 graph against the fp32 PyTorch model: on the calibration images where the graph takes them (the
    data its scales were fitted to), else on the example inputs; ParityError below the cosine floor."""
    import torch

    results = {}
    for name, g in plan.graphs.items():
        feeds = image_calibration(plan, name, loaded, images)
        inputs = {k: torch.from_numpy(v) for k, v in feeds[0].items()} if feeds else None
        report = check_graph_as_sets(_loose(g), os.path.join(stage, f"{name}.onnx"), runners[name], inputs)
        ok = report.cosine >= INT8_MIN_COSINE
        log(f"  -[{'✓' if ok else 'x'}] {name}.onnx (int8) vs PyTorch fp32: cosine {report.cosine:.5f} "
            f"(floor {INT8_MIN_COSINE}), max abs diff {report.max_abs_diff:.3g}")
        results[name] = {"cosine": report.cosine, "max_abs_diff": report.max_abs_diff,
                         "min_cosine": INT8_MIN_COSINE, "ok": ok}
    bad = [n for n, r in results.items() if not r["ok"]]
    if bad:
        from turbo_export.errors import ParityError

        raise ParityError(f"int8 graph {bad[0]}.onnx: cosine {results[bad[0]]['cosine']:.4f} to the fp32 model, below "
                          f"{INT8_MIN_COSINE}; try --int8-mode static with --calib-data, or fp32")
    data = "the calibration images where a graph takes images, else its example inputs" if images is not None else \
        "the example inputs"
    sets = sorted({o for g in plan.graphs.values() for o in g.token_sets})
    as_sets = (f"; merged token outputs ({', '.join(sets)}) as sets (size-weighted mean and first token), since int8 "
               "rounding may change which tokens merge and their cross-attention consumer ignores the order"
               if sets else "")
    return {"parity_int8": {"compared": f"each int8 graph vs the fp32 PyTorch model on {data}{as_sets}", **results}}


def _loose(g: Any) -> Any:
    import dataclasses

    return dataclasses.replace(g, atol=float("inf"), merge_model=None)

