"""ONNX Runtime vs TensorRT on the same inputs, through polygraphy's Comparator.

Every graph of an export folder runs in (a) ONNX Runtime with graph optimisations disabled (the reference),
(b) ONNX Runtime with its default optimisations and (c) where TensorRT and a GPU exist, the TensorRT engine of the
graph (built or taken from ``<folder>/engines``). Our own runners are wrapped as polygraphy runners, so the engine
compared is the one the export cached and benchmarked. Inputs: seeded standard-normal floats, integer inputs 1
(token ids, masks and positions stay valid for every graph).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from turbo_export.backends import make_runner, tensorrt_unavailable_reason
from turbo_export.backends.base import Runner
from turbo_export.errors import TurboExportError

Log = Callable[[str], None]
REFERENCE = "onnxruntime-noopt"


@dataclass
class OutputError:
    graph: str
    runner: str  # compared against REFERENCE
    output: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class CompareResults:
    folder: str
    atol: float
    rtol: float
    runners: list[str]
    tensorrt: str  # "used", or why it was not
    errors: list[OutputError] = field(default_factory=list)
    polygraphy_passed: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(e.passed for e in self.errors) and all(self.polygraphy_passed.values())

    def as_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "atol": self.atol, "rtol": self.rtol, "reference": REFERENCE,
                "runners": self.runners, "tensorrt": self.tensorrt, "ok": self.ok,
                "polygraphy_passed": self.polygraphy_passed,
                "outputs": [e.__dict__ for e in self.errors]}

    def lines(self) -> list[str]:
        out = [f"compared in {self.folder} (polygraphy Comparator, atol {self.atol:g}, rtol {self.rtol:g}): "
               f"{', '.join(self.runners)} vs {REFERENCE}",
               f"TensorRT: {self.tensorrt}"]
        for e in self.errors:
            out.append(f"  -[{'✓' if e.passed else 'x'}] {e.graph} {e.runner} '{e.output}': max abs error "
                       f"{e.max_abs:.3g}, max rel error {e.max_rel:.3g}")
        return out


def _polygraphy_runner(runner: Runner, name: str) -> Any:
    """One of our runners as a polygraphy runner (so Comparator drives it)."""
    import time

    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class Adapter(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name)

        def activate_impl(self) -> None:
            pass

        def deactivate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for info in runner.inputs:
                meta.add(info.name, info.dtype, info.shape)
            return meta

        def infer_impl(self, feed_dict: Any) -> Any:
            start = time.perf_counter()
            outputs = runner.run(feed_dict)
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, np.array(v)) for k, v in outputs.items())

    return Adapter()


def seeded_inputs(runner: Runner, seed: int, iterations: int, batch: int = 1) -> list[OrderedDict]:
    """Seeded inputs of the graph's shapes; a symbolic ``batch`` dimension takes the export's batch."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(iterations):
        feed = OrderedDict()
        for info in runner.inputs:
            shape = tuple(batch if d == "batch" else d for d in info.shape)
            if any(not isinstance(d, int) for d in shape):
                raise TurboExportError(f"compare: input '{info.name}' has the symbolic shape {info.shape}; compare "
                                       "takes graphs whose only symbolic dimension is the batch")
            if np.issubdtype(info.dtype, np.floating):
                feed[info.name] = rng.standard_normal(shape).astype(info.dtype)
            else:
                feed[info.name] = np.ones(shape, dtype=info.dtype)
        feeds.append(feed)
    return feeds


def _report(folder: str) -> dict[str, Any]:
    """The folder's report.json, checked (structure, family fields, every graph a valid ONNX file inside the folder),
    or {} for a folder of bare ONNX files."""
    if not os.path.isfile(os.path.join(folder, "report.json")):
        return {}
    from turbo_export.evaluate.common import read_export

    return read_export(folder, command="compare", match_graphs=False)


def graphs_in(folder: str, report: dict[str, Any] | None = None) -> list[str]:
    report = _report(folder) if report is None else report
    names = list((report.get("files") or {}).values())
    if not names:
        from turbo_export.files import read_onnx

        names = sorted(n for n in os.listdir(folder) if n.endswith(".onnx"))
        for name in names:
            read_onnx(os.path.join(folder, name))
    if not names:
        raise TurboExportError(f"compare: no ONNX graphs in '{folder}' (expected an export folder with report.json)")
    return names


def _max_errors(actual: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    if actual.shape != reference.shape:
        return float("inf"), float("inf")
    a, r = actual.astype(np.float64), reference.astype(np.float64)
    diff = np.abs(a - r)
    if diff.size == 0:
        return 0.0, 0.0
    rel = diff / np.maximum(np.abs(r), 1e-12)
    return float(diff.max()), float(rel.max())


def compare_folder(folder: str, atol: float = 1e-3, rtol: float = 1e-3, seed: int = 0, iterations: int = 1,
                   log: Log = lambda m: None, engine_options: Any = None) -> CompareResults:
    from turbo_export.limits import MAX_RUNS, MAX_SEED, MAX_TOLERANCE, check_range

    check_range("atol", atol, 0.0, MAX_TOLERANCE, integer=False)
    check_range("rtol", rtol, 0.0, MAX_TOLERANCE, integer=False)
    check_range("seed", seed, 0, MAX_SEED)
    check_range("iterations", iterations, 1, MAX_RUNS)
    import onnxruntime as ort
    from polygraphy.logger import G_LOGGER

    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-iteration statistics would drown our summary
    try:
        return _compare(folder, atol, rtol, seed, iterations, log, engine_options, ort)
    finally:
        G_LOGGER.module_severity = severity


def _compare(folder: str, atol: float, rtol: float, seed: int, iterations: int, log: Log, engine_options: Any,
             ort: Any) -> CompareResults:
    from polygraphy.comparator import Comparator, CompareFunc

    report = _report(folder)
    names = graphs_in(folder, report)
    if engine_options is None:
        from turbo_export.backends.trt_build import BuildOptions

        # the engines the export built (and cached) for this folder: same precision, same key
        engine_options = BuildOptions(precision=report.get("precision") or "fp32")
    reason = tensorrt_unavailable_reason()
    results = CompareResults(os.path.abspath(folder), atol, rtol, [], "used" if reason is None else
                             f"not available here ({reason}); compared ONNX Runtime only")
    for file in names:
        path = os.path.join(folder, file)
        graph = os.path.splitext(file)[0]
        noopt = ort.SessionOptions()
        noopt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ours = {REFERENCE: make_runner(path, session_options=noopt), "onnxruntime": make_runner(path)}
        if reason is None:
            ours["tensorrt"] = make_runner(path, "tensorrt", log=log, engine_options=engine_options,
                                           cache_dir=os.path.join(folder, "engines"))
        results.runners = [n for n in ours if n != REFERENCE]
        log(f"comparing {file}: {', '.join(ours)} ...")
        run_results = Comparator.run([_polygraphy_runner(r, n) for n, r in ours.items()],
                                     data_loader=seeded_inputs(ours[REFERENCE], seed, iterations,
                                                                 int(report.get("batch") or 1)))
        verdict = Comparator.compare_accuracy(run_results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol),
                                              comparisons=[(0, i) for i in range(1, len(ours))])
        results.polygraphy_passed[graph] = bool(verdict)
        outputs = dict(run_results)
        for runner in results.runners:
            for iteration, reference in zip(outputs[runner], outputs[REFERENCE]):
                for out in reference.keys():
                    max_abs, max_rel = _max_errors(np.asarray(iteration[out]), np.asarray(reference[out]))
                    ref = np.asarray(reference[out], np.float64)
                    passed = bool(np.all(np.abs(np.asarray(iteration[out], np.float64) - ref)
                                         <= atol + rtol * np.abs(ref))) if max_abs != float("inf") else False
                    results.errors.append(OutputError(graph, runner, out, max_abs, max_rel, passed))
    return results
