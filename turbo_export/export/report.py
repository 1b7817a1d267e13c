"""report.json: one builder for every family (common fields, then the family's), and the environment it ran in."""

from __future__ import annotations

import os
import platform
from typing import Any

from turbo_export import __version__
from turbo_export.backends import bench
from turbo_export.export.parity import ParityReport
from turbo_export.families.base import ExportPlan


def build_report(family: str, plan: ExportPlan, run: Any, parity: dict[str, ParityReport], timings: Any,
                 pipeline: dict[str, Any] | None, runners: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
    flops = {**plan.flops, "ratio": plan.flops["baseline"] / plan.flops["turbo"]}
    report: dict[str, Any] = {
        "family": family,
        "model": plan.source,
        "model_class": plan.model_class,
        **plan.report,
        "flops": flops,
        "files": {name: f"{name}.onnx" for name in plan.graphs},
        "precision": run.precision,
        "batch_dim": "static" if run.static_batch else "symbolic",
        "parity": None,
        "bench": None,
        **extras,
        "environment": {**environment(), **plan.environment},
    }
    engines = engine_files(runners)
    if engines:
        report["engines"] = engines
    report.update(parity_fields(parity, run, plan))
    if timings:
        report["bench"] = bench_fields(timings, run, plan, flops["ratio"], runners)
        if pipeline:
            report["bench"]["pipeline"] = pipeline_fields(pipeline)
    return report


def parity_fields(parity: dict[str, ParityReport], run: Any, plan: ExportPlan) -> dict[str, Any]:
    """report.json's ``parity`` / ``parity_baseline``: what was compared with what (runtime, precision) and the
    figures (every graph's under ``parity.graphs`` when there are more than two); nothing when skipped."""
    if not parity:
        return {}
    base, turbo = plan.parity_pair
    runtime = "TensorRT engine of " if run.backend == "tensorrt" else ""
    runtime_end = "" if run.backend == "tensorrt" else " (ONNX Runtime)"
    precision = ", fp16 graph vs fp32 model" if run.precision == "fp16" else ""
    fields = {
        "parity": {"compared": f"{runtime}{turbo}.onnx{runtime_end} vs Turbo {plan.parity_what} (PyTorch){precision}",
                   **parity[turbo].as_dict()},
        "parity_baseline": {"compared": f"{runtime}{base}.onnx{runtime_end} vs {plan.parity_what} (PyTorch)"
                                        f"{precision}", **parity[base].as_dict()},
    }
    if len(parity) > 2:
        fields["parity"]["graphs"] = {name: p.as_dict() for name, p in parity.items()}
    return fields


def bench_fields(timings: dict[str, bench.Timing], run: Any, plan: ExportPlan, flops_ratio: float,
                 runners: dict[str, Any]) -> dict[str, Any]:
    ratio = bench.speedup(timings)
    turbo_runner = runners[plan.bench.graphs["turbo"]]
    return {
        **plan.bench.fields,
        "backend": run.backend,
        "providers": getattr(turbo_runner, "providers", None),
        "timer": timings["turbo"].timer,
        "batch": plan.bench.rows,
        "runs": run.bench_runs,
        "warmup": run.bench_warmup,
        "blocks": len(timings["turbo"].block_medians_s),
        "block_medians_ms": {key: [m * 1e3 for m in t.block_medians_s] for key, t in timings.items()},
        "baseline_ips": timings["baseline"].items_per_s,
        "turbo_ips": timings["turbo"].items_per_s,
        "baseline_median_ms": timings["baseline"].median_s * 1e3,
        "turbo_median_ms": timings["turbo"].median_s * 1e3,
        "baseline_ms": [t * 1e3 for t in timings["baseline"].seconds],
        "turbo_ms": [t * 1e3 for t in timings["turbo"].seconds],
        "speedup": ratio,
        "speedup_over_flops_ratio": ratio / flops_ratio,
        "speedup_vs_fp32": timings["turbo"].items_per_s / timings.get("baseline_fp32",
                                                                       timings["baseline"]).items_per_s,
        "peers": peer_rows(timings, run, plan),
    }


def peer_rows(timings: dict[str, bench.Timing], run: Any, plan: ExportPlan) -> list[dict[str, Any]]:
    """Every model of the interleaved run: the exported graphs on the chosen runtime and precision, the
    unaccelerated fp32 graph (int8 exports), and the PyTorch eager models a user could run instead."""
    alpha = plan.report.get("alpha")
    turbo_torch = "pytorch eager, ToMe (alpha 0)" if alpha == 0 else "pytorch eager, Turbo"
    names = {"baseline": ("unaccelerated", run.backend, run.precision), "turbo": ("turbo", run.backend, run.precision),
             "baseline_fp32": ("unaccelerated", run.backend, "fp32"),
             "pytorch_baseline": ("pytorch eager, unaccelerated", "pytorch", "fp32"),
             "pytorch_turbo": (turbo_torch, "pytorch", "fp32")}
    return [{"name": names.get(key, (key,))[0], "runtime": names.get(key, (key, run.backend))[1],
             "precision": names.get(key, (key, run.backend, run.precision))[2], "items_per_s": t.items_per_s,
             "median_ms": t.median_s * 1e3, "min_ms": min(t.seconds) * 1e3, "max_ms": max(t.seconds) * 1e3}
            for key, t in timings.items()]


def pipeline_fields(pipeline: dict[str, Any]) -> dict[str, Any]:
    timings = pipeline["timings"]
    speed = bench.speedup(timings)
    fields = {"what": pipeline["what"], "baseline_per_s": timings["baseline"].items_per_s,
              "turbo_per_s": timings["turbo"].items_per_s, "speedup": speed}
    flops = pipeline.get("flops")
    if flops:
        fields.update(flops={**flops, "ratio": flops["baseline"] / flops["turbo"]},
                      speedup_over_flops_ratio=speed * flops["turbo"] / flops["baseline"])
    return fields


def engine_files(runners: dict[str, Any]) -> dict[str, str]:
    """Engine plan files (relative to the output folder) of TensorRT runners."""
    return {name: os.path.join("engines", os.path.basename(r.path)) for name, r in runners.items()
            if getattr(r, "backend", None) == "tensorrt"}


def environment() -> dict[str, Any]:
    import onnxruntime
    import torch
    import transformers

    return {
        "turbo_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
    }
