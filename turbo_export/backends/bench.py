"""Interleaved timing of runners on the same inputs: warm-up, alternating order, medians and ratios."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Mapping

from tqdm.auto import tqdm

from turbo_export.backends.base import Runner, to_numpy


@dataclass
class Timing:
    name: str
    seconds: list[float]
    batch: int
    timer: str = "wall clock (time.perf_counter), inputs from host memory"

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def items_per_s(self) -> float:
        return self.batch / self.median_s


def interleaved(
    runners: Mapping[str, Runner],
    feeds: Mapping[str, Mapping[str, Any]],
    batch: int,
    warmup: int = 3,
    runs: int = 20,
    progress: bool = True,
    desc: str = "benchmark",
) -> dict[str, Timing]:
    """Time each runner ``runs`` times, alternating the order every round so drift hits all equally.

    When every runner has ``timed_run`` (TensorRT), each run is timed on the device with CUDA events, inputs
    already in device memory; otherwise with the wall clock around ``run``.
    """
    names = list(runners)
    arrays = {n: {k: to_numpy(v) for k, v in feeds[n].items()} for n in names}
    device = all(callable(getattr(runners[n], "timed_run", None)) for n in names)
    if device:
        for n in names:
            runners[n].load(arrays[n])
    for _ in range(warmup):
        for n in names:
            runners[n].timed_run() if device else runners[n].run(arrays[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in tqdm(range(runs), desc=desc, disable=not progress, leave=False):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            if device:
                times[n].append(runners[n].timed_run())
                continue
            start = time.perf_counter()
            runners[n].run(arrays[n])
            times[n].append(time.perf_counter() - start)
    timer = "CUDA events around the engine execution, inputs in device memory" if device else Timing.timer
    return {n: Timing(n, times[n], batch, timer) for n in names}


def speedup(timings: Mapping[str, Timing], accelerated: str = "turbo", reference: str = "baseline") -> float:
    return timings[accelerated].items_per_s / timings[reference].items_per_s
