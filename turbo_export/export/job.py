"""The one export job, for every family: check -> graphs -> ONNX -> parity -> (engines) -> benchmark -> report.

A family's declaration says what differs (``Family.plan``); everything here is the same for all of them, and every
check runs once, before any export work: the backend and precision here, the family's options in its ``plan``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from turbo_export.backends import bench, make_runner, require_backend
from turbo_export.errors import TurboExportError
from turbo_export.export.onnx import export_onnx, file_size
from turbo_export.export.parity import ParityReport, check_graph, require_parity
from turbo_export.export.precision import (
    check_int8,
    check_precision,
    fp32_copy,
    int8_fields,
    load_calibration,
    quantize_exports,
)
from turbo_export.export.report import build_report
from turbo_export.families.base import DEFAULT_ATOL, ExportPlan, Family, GraphSpec, Log
from turbo_export.files import check_writable_target, staged_output, write_json_atomic
from turbo_export.limits import (
    MAX_ALPHA,
    MAX_ATTENTION_SCORES,
    MAX_BATCH,
    MAX_BATCH_PIXELS,
    MAX_BEAMS,
    MAX_IMAGE_SIZE,
    MAX_MIN_TOKENS,
    MAX_NEW_TOKENS,
    MAX_RUNS,
    MAX_SEED,
    MAX_TEXT_LEN,
    MAX_TOLERANCE,
    check_optional,
    check_range,
)

# fp16 graphs are checked against the fp32 PyTorch model: half-precision rounding (about 1e-3 relative) sets the
# tolerance, and can flip a merge decision whose fp32 margin is below FP16_TIE_TOLERANCE
FP16_ATOL = 5e-2
FP16_TIE_TOLERANCE = 1e-2
# TensorRT fp32 engines (TF32 off) pick their own kernels and accumulation orders: a looser floor than ONNX Runtime
TENSORRT_FP32_ATOL = 1e-3
DEFAULT_MAX_BATCH = 64  # a dynamic-batch TensorRT profile's largest batch unless --max-batch says otherwise


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(kw_only=True)
class RunOptions:
    """How an export job runs, the same for every family (the family's own options say what it exports)."""

    out_dir: str = ""  # "": the family's default folder for the model (``Family.default_out_dir``)
    backend: str = "onnxruntime"
    precision: str = "fp32"  # "fp16": half-precision graphs; "int8": quantized from the checked fp32 graphs
    int8_mode: str = "dynamic"  # "static": QDQ with calibration (TensorRT builds int8 engines from it)
    calib_data: str | None = None  # static int8: images to calibrate on (a folder or builtin:<name>)
    calib_limit: int = 64
    validate: bool = True
    bench: bool = True
    bench_runs: int = 20
    bench_warmup: int | None = None  # None: the family's
    atol: float = DEFAULT_ATOL
    progress: bool = True
    peers: bool = True  # also time the PyTorch eager models (unaccelerated and Turbo) in the same interleaved run
    static_batch: bool = False  # True: every graph has the static batch of the family's options (as before 0.2)
    max_batch: int = 0  # dynamic batch: the largest batch a TensorRT profile takes (0: 64, or the batch if larger)
    overwrite: bool = False  # replace an export with other settings in out_dir (else refused, saying what differs)


@dataclass
class JobResult:
    report: dict[str, Any]
    parity: dict[str, ParityReport] = field(default_factory=dict)
    out_dir: str = ""


def check_run_options(run: RunOptions, source: str = "") -> None:
    """The one-line reason the job cannot run as asked here (backend, precision, ranges, output folder), before any
    export work."""
    require_backend(run.backend)
    check_precision(run.backend, run.precision, run.int8_mode, run.calib_data, source)
    check_range("runs", run.bench_runs, 1, MAX_RUNS)
    check_optional("warmup", run.bench_warmup, 0, MAX_RUNS)
    check_range("atol", run.atol, 0, MAX_TOLERANCE, integer=False)
    check_range("max-batch", run.max_batch, 0, MAX_BATCH)  # 0: the default profile
    if run.out_dir:
        check_writable_target(run.out_dir, "out", folder=True)


# The options every family may have: (field, option, lowest, highest, whole numbers only); None means "default".
FAMILY_RANGES = (
    ("batch", "batch", 1, MAX_BATCH, True),
    ("min_tokens", "min-tokens", 0, MAX_MIN_TOKENS, True),
    ("alpha", "alpha", 0.0, MAX_ALPHA, False),
    ("image_size", "image-size", 1, MAX_IMAGE_SIZE, True),
    ("resolution", "resolution", 1, MAX_IMAGE_SIZE, True),
    ("seed", "dst-seed", 0, MAX_SEED, True),
    ("max_new_tokens", "max-new-tokens", 1, MAX_NEW_TOKENS, True),
    ("num_beams", "num-beams", 1, MAX_BEAMS, True),
    ("text_len", "text-len", 2, MAX_TEXT_LEN, True),
)


def check_family_options(options: Any) -> None:
    """The options every family shares, checked the same way for all (present fields only)."""
    for name, option, low, high, integer in FAMILY_RANGES:
        check_optional(option, getattr(options, name, None), low, high, integer=integer)
    size = getattr(options, "image_size", None) or getattr(options, "resolution", None)
    batch = getattr(options, "batch", 1)
    if size is not None and batch * size * size > MAX_BATCH_PIXELS:
        raise TurboExportError(f"batch: {batch} images of {size}x{size} px are {batch * size * size:,} pixels per "
                               f"call, above {MAX_BATCH_PIXELS:,}; use a smaller --batch or image size")
    from turbo_export.core.plugin_ops import check_merge_impl

    check_merge_impl(getattr(options, "merge_impl", "onnx"))


def check_plan(plan: ExportPlan) -> None:
    """After the family's plan, before any graph is exported: the attention fits in memory, and Turbo merges
    something (a Turbo graph that merges nothing is the unaccelerated one, not a "speedup")."""
    report = plan.report
    tokens = (report.get("tokens_per_layer") or {}).get("baseline") or [
        b.get("tokens", 0) for b in report.get("tokens_per_block") or []]
    longest = max(tokens, default=0)
    scores = plan.bench.rows * longest * longest
    if scores > MAX_ATTENTION_SCORES:
        option = "resolution" if "resolution" in report else "image-size"
        raise TurboExportError(f"{option}: {longest} tokens at batch {plan.bench.rows} need {scores:.3g} attention "
                               f"scores per head, above {MAX_ATTENTION_SCORES:.3g} ({MAX_ATTENTION_SCORES * 4 >> 30} "
                               f"GiB of float32); use a smaller --{option} or --batch")
    merged, schedule = report.get("merged_per_layer"), report.get("r_schedule")
    if merged is not None and any(merged) or merged is None and plan.flops["turbo"] < plan.flops["baseline"]:
        return
    if schedule is not None and not any(schedule):
        raise TurboExportError(f"ratio: {report.get('ratio')} merges no token in any block, so the Turbo graph "
                               "would be the unaccelerated one; give a ratio above 0")
    if merged is not None:
        raise TurboExportError(f"min-tokens: Turbo merges nothing: {longest} tokens enter each block, fewer than "
                               f"--min-tokens {report.get('min_tokens')}; pass --min-tokens {longest} or less "
                               "(0: merge in every block)")
    raise TurboExportError("ratio: Turbo merges nothing with these settings (its FLOPs equal the unaccelerated "
                           "model's); merge in more blocks or a larger ratio")


def check_replace(out_dir: str, overwrite: bool, settings: dict[str, Any]) -> None:
    """An existing export in ``out_dir`` is replaced only by the same export again (same settings: the engines in it
    are reused) or with ``overwrite``; a folder of other files never is."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    path = os.path.join(out_dir, "report.json")
    if not os.path.lexists(path):
        raise TurboExportError(f"out: '{out_dir}' holds files but no report.json (it is not an export folder); "
                               "choose a new or empty folder with --out")
    if overwrite:
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise TurboExportError(f"out: '{out_dir}' holds an export whose report.json is unreadable; pass --overwrite "
                               "to replace it, or --out another folder")
    old = {**old, "backend": (old.get("bench") or {}).get("backend") or ("tensorrt" if old.get("engines")
                                                                          else "onnxruntime")}
    changed = [f"{k} {old[k]} -> {v}" for k, v in settings.items()
               if k in old and old[k] != v and (k == "ratio" or not isinstance(v, (dict, list)))]
    if changed:
        raise TurboExportError(f"out: '{out_dir}' already holds an export with other settings "
                               f"({', '.join(changed[:4])}); pass --overwrite to replace it, or --out another folder")


def export_model(family: Family, source: str, options: Any, run: RunOptions, log: Log = log_to_stderr) -> JobResult:
    """Check the options, load ``source`` (``random:<preset>``, a folder or a hub id) and run the export job."""
    check_run_options(run, source)
    check_family_options(options)
    images = load_calibration(run.calib_data, run.calib_limit)
    log(f"loading {source} ...")
    loaded = family.load(source, options)
    return _run_checked(family, loaded, options, run, log, images)


def run_export(family: Family, loaded: Any, options: Any, run: RunOptions, log: Log = log_to_stderr) -> JobResult:
    """Export ``loaded`` unaccelerated and with Turbo as ``family`` declares, check, time, write ``run.out_dir``."""
    check_run_options(run, getattr(loaded, "source", ""))
    check_family_options(options)
    return _run_checked(family, loaded, options, run, log, load_calibration(run.calib_data, run.calib_limit))


def _run_checked(family: Family, loaded: Any, options: Any, run: RunOptions, log: Log, images: Any = None
                 ) -> JobResult:
    if not run.out_dir:
        run = dataclasses.replace(run, out_dir=family.default_out_dir(loaded, options))
        check_writable_target(run.out_dir, "out", folder=True)
    run = dataclasses.replace(run, bench_warmup=family.bench_warmup if run.bench_warmup is None else run.bench_warmup)
    plan = family.plan(loaded, options, run, log)
    check_plan(plan)
    check_replace(run.out_dir, run.overwrite, {"family": family.name, "model": plan.source, **plan.report,
                                               "precision": run.precision, "backend": run.backend,
                                               "batch_dim": "static" if run.static_batch else "symbolic"})
    set_tolerances(plan.graphs, run.atol, run.precision, run.backend)
    int8 = run.precision == "int8"
    dynamic = not run.static_batch
    with staged_output(run.out_dir) as stage:
        # int8 graphs are made from fp32 graphs that passed the strict parity check (in ONNX Runtime)
        graph_backend, graph_precision = ("onnxruntime", "fp32") if int8 else (run.backend, run.precision)
        paths = export_graphs(plan.graphs, stage, log, precision=graph_precision, dynamic_batch=dynamic)
        runners = open_runners(plan.graphs, paths, graph_backend, stage, log, run.out_dir, graph_precision, dynamic,
                               run.max_batch)
        parity = validate_graphs(plan.graphs, runners, run.out_dir, log, both_batches=dynamic) if run.validate else {}
        extras = plan.after_export(runners, log) if plan.after_export else {}
        if int8:
            # the fp32 sessions go first: quantizing a large graph needs that memory (SD 1.5: 2 x 3.4 GB)
            runners = None
            gc.collect()
            reports = quantize_exports(plan, stage, run, loaded, images, log)
            runners = open_runners(plan.graphs, paths, run.backend, stage, log, run.out_dir, "int8", dynamic,
                                   run.max_batch)
            extras.update(int8_fields(reports, run))
            extras.update(check_int8(plan, runners, stage, loaded, images, log))
        fp32_baseline = fp32_baseline_runner(plan, stage, run, log) if run.bench and run.precision != "fp32" else None
        if os.path.exists(fp32_copy(stage, plan.bench.graphs["baseline"])):
            extras["files_fp32"] = {plan.bench.graphs["baseline"]: os.path.basename(
                fp32_copy(stage, plan.bench.graphs["baseline"]))}
        timings, pipeline = benchmark(plan, runners, run, log, fp32_baseline)
        report = build_report(family.name, plan, run, parity, timings, pipeline, runners, extras)
        write_json_atomic(os.path.join(stage, "report.json"), report)
        del runners
    return JobResult(report, parity, os.path.abspath(run.out_dir))


def fp32_baseline_runner(plan: ExportPlan, stage: str, run: RunOptions, log: Log) -> Any:
    """The unaccelerated graph at fp32, timed beside a lower-precision export (``bench.speedup_vs_fp32``)."""
    graph = plan.bench.graphs["baseline"]
    path = fp32_copy(stage, graph)
    if not os.path.exists(path):  # fp16: the fp32 graph was not exported yet
        log(f"exporting {os.path.basename(path)} (the fp32 reference of the benchmark) ...")
        export_onnx(plan.graphs[graph], path, dynamic_batch=not run.static_batch)
    return open_runners({graph: plan.graphs[graph]}, {graph: path}, run.backend, stage, log, run.out_dir, "fp32",
                        not run.static_batch, run.max_batch)[graph]


def benchmark(plan: ExportPlan, runners: dict[str, Any], run: RunOptions, log: Log, fp32_baseline: Any = None
              ) -> tuple[Any, Any]:
    """The graphs interleaved with their peers (and the whole pipeline after, where the family has one)."""
    if not run.bench or not plugin_graph_benchmarkable(plan.merge_impl, run.backend, log):
        return None, None
    timed = {side: runners[graph] for side, graph in plan.bench.graphs.items()}
    feeds = dict(plan.bench.feeds)
    if fp32_baseline is not None:
        timed["baseline_fp32"] = fp32_baseline
        feeds["baseline_fp32"] = plan.bench.feeds["baseline"]
    if run.peers:
        timed.update(pytorch_peers(plan))
        feeds.update({f"pytorch_{side}": plan.bench.feeds[side] for side in plan.bench.graphs})
    timings = bench.interleaved(timed, feeds, plan.bench.rows, warmup=run.bench_warmup,
                                runs=run.bench_runs, progress=run.progress,
                                desc=plan.bench.fields.get("scope", f"benchmark ({run.backend})"))
    pipeline = None
    if plan.pipeline_bench is not None:
        spec = plan.pipeline_bench(runners)
        calls = {side: _CallAsRunner(spec[side]) for side in ("baseline", "turbo")}
        pipeline = {**spec, "timings": bench.interleaved(
            calls, {side: spec["feed"] for side in calls}, plan.bench.rows, warmup=1,
            runs=max(3, run.bench_runs // 2), progress=run.progress, desc=spec["desc"])}
    return timings, pipeline


def pytorch_peers(plan: ExportPlan) -> dict[str, Any]:
    """What a user would run instead of exporting: the same modules in PyTorch eager, unaccelerated and with Turbo
    (ToMe when alpha is 0), timed beside the graphs."""
    from turbo_export.backends.torch_runner import TorchRunner

    peers = {}
    for side, graph in plan.bench.graphs.items():
        g = plan.graphs[graph]
        peers[f"pytorch_{side}"] = TorchRunner(g.module, g.example_inputs, g.output_names, f"pytorch_{side}")
    return peers


class _CallAsRunner:
    """A whole pipeline (a function of the feed) timed like a runner."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def run(self, feed: dict[str, Any]) -> Any:
        return self.fn(feed)


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


def plugin_graph_benchmarkable(merge_impl: str, backend: str, log: Log) -> bool:
    """A plugin-node graph runs in ONNX Runtime only through the Python reference nodes: timing it means nothing."""
    if merge_impl == "plugin" and backend == "onnxruntime":
        log("note: --merge-impl plugin graphs run in ONNX Runtime through Python reference nodes "
            "(onnxruntime-extensions), for validation only; benchmark skipped (use a TensorRT engine)")
        return False
    return True


def export_graphs(graphs: dict[str, GraphSpec], stage: str, log: Log, precision: str = "fp32",
                  dynamic_batch: bool = False) -> dict[str, str]:
    """Export every graph to ``stage/<name>.onnx`` (``dynamic_batch``: a symbolic batch); returns the paths."""
    paths = {}
    for i, (name, g) in enumerate(graphs.items(), 1):
        log(f"[{i}/{len(graphs)}] exporting {name}.onnx{' (fp16)' if precision == 'fp16' else ''} ...")
        start = time.perf_counter()
        paths[name] = export_onnx(half_graph(g) if precision == "fp16" else g, os.path.join(stage, f"{name}.onnx"),
                                  dynamic_batch=dynamic_batch)
        log(f"      done in {time.perf_counter() - start:.1f} s ({file_size(paths[name]) / 1e6:.1f} MB)")
    return paths


def open_runners(graphs: dict[str, GraphSpec], paths: dict[str, str], backend: str, stage: str, log: Log,
                 out_dir: str | None = None, precision: str = "fp32", dynamic_batch: bool = False,
                 max_batch: int = 0, engine_options: Any = None) -> dict[str, Any]:
    """A runner on each exported graph.

    With backend tensorrt each graph is linted for TensorRT's parser first, then built (or taken from the engine
    cache: ``stage/engines``, reusing valid engines from ``out_dir/engines``) into a serialized engine, with an
    optimization profile over its symbolic dimensions. Graphs with turbo.TurboMerge nodes (--merge-impl plugin) run
    in ONNX Runtime through the Python nodes and in TensorRT through the plugin (``make_runner`` sees the nodes).
    """
    if backend != "tensorrt":
        return {name: make_runner(p, backend) for name, p in paths.items()}
    from turbo_export.backends.trt_build import BuildOptions
    from turbo_export.backends.trt_lint import lint_file

    engine_options = engine_options or BuildOptions(precision=precision)
    runners = {}
    for name, p in paths.items():
        profile = tensorrt_profile(graphs[name], dynamic_batch, max_batch)
        lint = lint_file(p, static=not profile)
        if not lint.ok:
            raise TurboExportError(f"{name}.onnx: TensorRT's ONNX parser would reject it: {lint.rejected[0].line()} "
                                   f"(see 'turbo-export check-trt')")
        reuse = (os.path.join(out_dir, "engines"),) if out_dir else ()
        runners[name] = make_runner(p, "tensorrt", log=log,
                                    engine_options=dataclasses.replace(engine_options, profile=profile),
                                    cache_dir=os.path.join(stage, "engines"), reuse_dirs=reuse)
    return runners


def tensorrt_profile(g: GraphSpec, dynamic_batch: bool, max_batch: int = 0) -> tuple:
    """TensorRT's optimization profile for the graph's symbolic dimensions: the batch from 1 to ``max_batch``
    (optimal at the export's batch), each other symbolic dimension over its declared (min, opt, max)."""
    ranges = {name: r for name, r in g.dim_ranges.items()}
    if dynamic_batch and g.batch_axes:
        rows = g.rows()
        ranges["batch"] = (1, rows, max(rows, max_batch or DEFAULT_MAX_BATCH))
    axes = {n: {**({g.batch_axes[n]: "batch"} if dynamic_batch and n in g.batch_axes else {}),
                **g.symbolic_dims.get(n, {})} for n in g.example_inputs}
    profile = []
    for name, value in g.example_inputs.items():
        if not axes[name]:
            continue
        shapes = [list(value.shape) for _ in range(3)]
        for axis, dim in axes[name].items():
            for i in range(3):
                shapes[i][axis] = ranges[dim][i]
        profile.append((name, *(tuple(s) for s in shapes)))
    return tuple(profile)


def validate_graphs(graphs: dict[str, GraphSpec], runners: dict[str, Any], out_dir: str, log: Log,
                    both_batches: bool = False) -> dict[str, ParityReport]:
    """Check every graph against its PyTorch module; raises ParityError (after printing all) on a mismatch.

    ``both_batches`` (a dynamic-batch export): at the export's batch and at batch 1; both must pass, and the report
    of the export's batch carries the max abs diff at each.
    """
    parity, checked = {}, []
    for name, g in graphs.items():
        path = os.path.join(out_dir, f"{name}.onnx")
        reports = [check_graph(g, path, runners[name])]
        if both_batches and g.batch_axes and g.rows() > 1:
            reports.append(check_graph(g, path, runners[name], g.first_rows(1)))
        for report in reports:
            for line in report.lines():
                log(line)
        parity[name] = reports[0]  # at the export's batch (its output shapes are the report's)
        parity[name].batches = [r.samples for r in reports]
        parity[name].max_abs_diff_by_batch = {r.samples: r.max_abs_diff for r in reports}
        checked += reports
    for report in checked:
        require_parity(report)
    return parity
