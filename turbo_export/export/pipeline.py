"""The one export job: build baseline + Turbo, export both, validate each against PyTorch, benchmark, report."""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from turbo_export import __version__
from turbo_export.backends import bench, make_runner, require_backend
from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.export.onnx import (
    DEFAULT_ATOL,
    GraphSpec,
    ParityReport,
    export_onnx,
    file_size,
    require_parity,
    validate,
)
from turbo_export.export.specs import TurboOptions, VitSpec
from turbo_export.files import staged_output, write_json_atomic
from turbo_export.models.presets import LoadedModel

Log = Callable[[str], None]
PRECISIONS = ("fp32", "fp16")
# fp16 graphs are checked against the fp32 PyTorch model: half-precision rounding (about 1e-3 relative) sets the
# tolerance, and can flip a merge decision whose fp32 margin is below FP16_TIE_TOLERANCE
FP16_ATOL = 5e-2
FP16_TIE_TOLERANCE = 1e-2
# TensorRT fp32 engines (TF32 off) pick their own kernels and accumulation orders: a looser floor than ONNX Runtime
TENSORRT_FP32_ATOL = 1e-3


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(kw_only=True)
class RunOptions:
    """How an export job runs, the same for every family; each family's options add what it exports."""

    out_dir: str
    backend: str = "onnxruntime"
    precision: str = "fp32"  # "fp16": the exported graphs (weights and float inputs) are half precision
    validate: bool = True
    bench: bool = True
    bench_runs: int = 20
    bench_warmup: int = 3
    atol: float = DEFAULT_ATOL
    progress: bool = True


@dataclass(kw_only=True)
class JobOptions(RunOptions):
    turbo: TurboOptions


@dataclass
class JobResult:
    report: dict[str, Any]
    parity: dict[str, ParityReport] = field(default_factory=dict)
    out_dir: str = ""


def check_ratio(schedule: list[int], num_tokens: int, protected: int, merge_impl: str = "onnx") -> None:
    """A ratio that no block could apply is a user mistake, not something to clamp silently; so is a plugin
    merge the kernel cannot build (said before any export starts, not after the baseline graph)."""
    maximum = (num_tokens - protected) // 2
    if any(r < 0 for r in schedule):
        raise TurboExportError(f"ratio: must be >= 0 (tokens merged per block), got {schedule}")
    if schedule and schedule[0] > maximum:
        raise TurboExportError(
            f"ratio: {schedule[0]} is above the maximum {maximum} for this model "
            f"({num_tokens} tokens, {protected} protected)"
        )
    if merge_impl == "plugin" and any(r > 0 for r in schedule):
        from turbo_export.core.plugin_ops import check_plugin_sizes

        check_plugin_sizes((num_tokens + 1) // 2, num_tokens // 2, (num_tokens,))  # alternate split, first merge


def run_export(spec: VitSpec, loaded: LoadedModel, options: JobOptions, log: Log = log_to_stderr) -> JobResult:
    turbo = options.turbo
    if turbo.alpha is None:
        from turbo_export.families.defaults import defaults_for

        turbo = options.turbo = dataclasses.replace(turbo, alpha=defaults_for(type(loaded.model).__name__).alpha)
    check_backend(options.backend, options.precision)
    if turbo.batch < 1:
        raise TurboExportError(f"batch: must be >= 1, got {turbo.batch}")
    if turbo.min_tokens < 0:
        raise TurboExportError(f"min-tokens: must be >= 0, got {turbo.min_tokens}")
    protected = spec.protected(loaded)
    image_size = spec.image_size(loaded, turbo)
    num_tokens = spec.num_tokens(loaded, image_size)
    try:
        schedule = merge.r_schedule(turbo.ratio, spec.num_layers(loaded))
    except (TypeError, ValueError) as exc:
        raise TurboExportError(f"ratio: {exc}") from None
    check_ratio(schedule, num_tokens, protected, turbo.merge_impl)

    baseline_model = loaded.model
    turbo_model = spec.make_turbo(copy.deepcopy(baseline_model), turbo)
    layers_turbo = merge.tokens_per_layer(num_tokens, schedule, protected, turbo.min_tokens)
    layers_base = [(num_tokens, 0)] * len(schedule)

    graphs = {
        "baseline": spec.graph("baseline", baseline_model, loaded, turbo),
        "turbo": spec.graph("turbo", turbo_model, loaded, turbo),
    }
    set_tolerances(graphs, options.atol, options.precision, options.backend)

    with staged_output(options.out_dir) as stage:
        runners, parity, timings = export_validate_bench(graphs, stage, options, turbo.merge_impl, turbo.batch, log)
        flops = {"baseline": spec.flops(loaded, image_size, layers_base),
                 "turbo": spec.flops(loaded, image_size, layers_turbo)}
        report = build_report(spec, loaded, options, schedule, image_size, layers_base, layers_turbo, flops,
                              parity, timings, runners)
        write_json_atomic(os.path.join(stage, "report.json"), report)
    return JobResult(report, parity, os.path.abspath(options.out_dir))


def check_backend(backend: str, precision: str = "fp32") -> None:
    """The one-line reason a backend / precision cannot run here, before any export work starts."""
    require_backend(backend)
    if precision not in PRECISIONS:
        raise TurboExportError(f"precision: unknown '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and backend != "tensorrt":
        raise TurboExportError("precision: fp16 needs --backend tensorrt (ONNX Runtime's CPU provider has no fp16 "
                               "ScatterElements(reduction='add') kernel, which Turbo's merge uses)")


def set_tolerances(graphs: dict[str, GraphSpec], atol: float, precision: str = "fp32", backend: str = "onnxruntime"
                   ) -> None:
    floor = FP16_ATOL if precision == "fp16" else TENSORRT_FP32_ATOL if backend == "tensorrt" else 0.0
    for g in graphs.values():
        g.atol = max(atol, floor)
        if precision == "fp16":
            g.tie_tolerance = max(g.tie_tolerance, FP16_TIE_TOLERANCE)


def half_graph(g: GraphSpec) -> GraphSpec:
    """The same graph in half precision: float weights and float inputs fp16, integer inputs unchanged."""
    module = copy.deepcopy(g.module).half()
    inputs = {k: v.half() if v.is_floating_point() else v for k, v in g.example_inputs.items()}
    return GraphSpec(name=g.name, module=module, example_inputs=inputs, output_names=g.output_names, atol=g.atol,
                     tie_tolerance=g.tie_tolerance)


def export_validate_bench(graphs: dict[str, GraphSpec], stage: str, options: RunOptions, merge_impl: str,
                          rows: int, log: Log) -> tuple[dict[str, Any], dict[str, ParityReport], Any]:
    """The shared middle of an export job: export every graph into ``stage`` and open runners, check each
    against PyTorch (``options.validate``), then time them interleaved (``options.bench``; ``rows`` per call)."""
    runners = export_graphs(graphs, stage, options.backend, log, out_dir=options.out_dir, precision=options.precision)
    parity = validate_graphs(graphs, runners, options.out_dir, log) if options.validate else {}
    timings = None
    if options.bench and plugin_graph_benchmarkable(merge_impl, options.backend, log):
        feeds = {name: g.example_inputs for name, g in graphs.items()}
        timings = bench.interleaved(runners, feeds, rows, warmup=options.bench_warmup, runs=options.bench_runs,
                                    progress=options.progress, desc=f"benchmark ({options.backend})")
    return runners, parity, timings


def parity_fields(parity: dict[str, ParityReport], options: RunOptions, model: str) -> dict[str, Any]:
    """report.json's ``parity`` / ``parity_baseline``: what was compared with what (runtime, precision) and the
    figures; nothing when the parity check was skipped."""
    if not parity:
        return {}
    runtime = "TensorRT engine of " if options.backend == "tensorrt" else ""
    runtime_end = "" if options.backend == "tensorrt" else " (ONNX Runtime)"
    precision = ", fp16 graph vs fp32 model" if options.precision == "fp16" else ""
    return {
        "parity": {"compared": f"{runtime}turbo.onnx{runtime_end} vs Turbo {model} (PyTorch){precision}",
                   **parity["turbo"].as_dict()},
        "parity_baseline": {"compared": f"{runtime}baseline.onnx{runtime_end} vs {model} (PyTorch){precision}",
                            **parity["baseline"].as_dict()},
    }


def plugin_graph_benchmarkable(merge_impl: str, backend: str, log: Log) -> bool:
    """A plugin-node graph runs in ONNX Runtime only through the Python reference nodes: timing it means nothing."""
    if merge_impl == "plugin" and backend == "onnxruntime":
        log("note: --merge-impl plugin graphs run in ONNX Runtime through Python reference nodes "
            "(onnxruntime-extensions), for validation only; benchmark skipped (use a TensorRT engine)")
        return False
    return True


def export_graphs(graphs: dict[str, GraphSpec], stage: str, backend: str, log: Log, out_dir: str | None = None,
                  precision: str = "fp32", engine_options: Any = None) -> dict[str, Any]:
    """Export every graph to ``stage/<name>.onnx`` and open a runner on each.

    With backend tensorrt each graph is linted for TensorRT's parser first, then built (or taken from the engine
    cache: ``stage/engines``, reusing valid engines from ``out_dir/engines``) into a serialized engine.
    Graphs with turbo.TurboMerge nodes (--merge-impl plugin) run in ONNX Runtime through the Python nodes and
    in TensorRT through the plugin (``make_runner`` sees the nodes).
    """
    paths = {}
    for i, (name, g) in enumerate(graphs.items(), 1):
        log(f"[{i}/{len(graphs)}] exporting {name}.onnx{' (fp16)' if precision == 'fp16' else ''} ...")
        start = time.perf_counter()
        paths[name] = export_onnx(half_graph(g) if precision == "fp16" else g, os.path.join(stage, f"{name}.onnx"))
        log(f"      done in {time.perf_counter() - start:.1f} s ({file_size(paths[name]) / 1e6:.1f} MB)")
    if backend != "tensorrt":
        return {name: make_runner(p, backend) for name, p in paths.items()}
    from turbo_export.backends.trt_build import BuildOptions
    from turbo_export.backends.trt_lint import lint_file

    engine_options = engine_options or BuildOptions(precision=precision)
    runners = {}
    for name, p in paths.items():
        lint = lint_file(p)
        if not lint.ok:
            raise TurboExportError(f"{name}.onnx: TensorRT's ONNX parser would reject it: {lint.rejected[0].line()} "
                                   f"(see 'turbo-export check-trt')")
        reuse = (os.path.join(out_dir, "engines"),) if out_dir else ()
        runners[name] = make_runner(p, "tensorrt", log=log, engine_options=engine_options,
                                    cache_dir=os.path.join(stage, "engines"), reuse_dirs=reuse)
    return runners


def validate_graphs(graphs: dict[str, GraphSpec], runners: dict[str, Any], out_dir: str, log: Log
                    ) -> dict[str, ParityReport]:
    """Check every graph against its PyTorch module; raises ParityError (after printing all) on a mismatch."""
    parity = {}
    for name, g in graphs.items():
        report = validate(g, os.path.join(out_dir, f"{name}.onnx"), runners[name])
        parity[name] = report
        for line in report.lines():
            log(line)
    for report in parity.values():
        require_parity(report)
    return parity


def build_report(spec, loaded, options, schedule, image_size, layers_base, layers_turbo, flops, parity, timings,
                 runners) -> dict[str, Any]:
    turbo = options.turbo
    report: dict[str, Any] = {
        "family": spec.family,
        "model": loaded.source,
        "model_class": type(loaded.model).__name__,
        "ratio": turbo.ratio if isinstance(turbo.ratio, int) else list(schedule),
        "r_schedule": schedule,
        "alpha": turbo.alpha,
        "min_tokens": turbo.min_tokens,
        "prop_attn": turbo.prop_attn,
        "merge_impl": turbo.merge_impl,
        "image_size": image_size,
        "batch": turbo.batch,
        "tokens_per_layer": {
            "baseline": [n for n, _ in layers_base],
            "turbo": [n for n, _ in layers_turbo],
        },
        "merged_per_layer": [r for _, r in layers_turbo],
        "flops": {"baseline": flops["baseline"], "turbo": flops["turbo"],
                  "ratio": flops["baseline"] / flops["turbo"]},
        "files": {"baseline": "baseline.onnx", "turbo": "turbo.onnx"},
        "precision": options.precision,
        "parity": None,
        "bench": None,
        "environment": environment(),
    }
    engines = engine_files(runners)
    if engines:
        report["engines"] = engines
    report.update(parity_fields(parity, options, "model"))
    if timings:
        ratio = bench.speedup(timings)
        report["bench"] = {
            "backend": options.backend,
            "providers": getattr(runners["turbo"], "providers", None),
            "timer": timings["turbo"].timer,
            "batch": turbo.batch,
            "runs": options.bench_runs,
            "warmup": options.bench_warmup,
            "baseline_ips": timings["baseline"].items_per_s,
            "turbo_ips": timings["turbo"].items_per_s,
            "baseline_median_ms": timings["baseline"].median_s * 1e3,
            "turbo_median_ms": timings["turbo"].median_s * 1e3,
            "speedup": ratio,
            "speedup_over_flops_ratio": ratio / report["flops"]["ratio"],
        }
    return report


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


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A readable side-by-side table of the report."""
    base, tur = report["tokens_per_layer"]["baseline"], report["tokens_per_layer"]["turbo"]
    rows = [
        ("model", report["model"], ""),
        ("tokens per layer", f"{base[0]} x {len(base)}", " ".join(str(n) for n in tur)),
        ("GFLOPs / image", f"{report['flops']['baseline'] / 1e9:.3f}", f"{report['flops']['turbo'] / 1e9:.3f}"),
    ]
    if report.get("parity"):
        p, pb = report["parity"], report["parity_baseline"]
        rows.append(("ONNX vs PyTorch max|diff|", f"{pb['max_abs_diff']:.2e}", f"{p['max_abs_diff']:.2e}"))
        rows.append(("ONNX vs PyTorch cosine", f"{pb['cosine']:.6f}", f"{p['cosine']:.6f}"))
    if report.get("bench"):
        b = report["bench"]
        rows.append((f"{b['backend']} images/s (batch {b['batch']})", f"{b['baseline_ips']:.1f}",
                     f"{b['turbo_ips']:.1f}"))
        rows.append(("median latency ms", f"{b['baseline_median_ms']:.1f}", f"{b['turbo_median_ms']:.1f}"))
    return side_by_side(rows, report, f"turbo (r={report['ratio']}, alpha={report['alpha']:g})")


def side_by_side(rows: list[tuple[str, str, str]], report: dict[str, Any], turbo_title: str) -> list[str]:
    """Rows of (what, baseline, turbo) as aligned columns, closed by the FLOPs ratio and the measured speedup."""
    width = max(len(r[0]) for r in rows)
    col = max(12, max(len(r[1]) for r in rows))
    lines = [f"{'':{width}}  {'baseline':>{col}}  {turbo_title}"]
    lines += [f"{a:{width}}  {b:>{col}}  {c}" for a, b, c in rows]
    lines.append(f"{'FLOPs ratio':{width}}  {report['flops']['ratio']:>{col}.2f}x")
    if report.get("bench"):
        b = report["bench"]
        lines.append(f"{'speedup':{width}}  {b['speedup']:>{col}.2f}x  "
                     f"({b['speedup_over_flops_ratio']:.2f} of the FLOPs ratio)")
    return lines
