"""Interleaved timing of runners on the same inputs: warm-up, alternating order, rotated creation order, medians and
ratios."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from tqdm.auto import tqdm

from turbo_export.backends.base import Runner, to_numpy


@dataclass
class Timing:
    name: str
    seconds: list[float]
    batch: int
    timer: str = "wall clock (time.perf_counter), inputs from host memory"
    block_medians_s: list[float] = field(default_factory=list)

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
    blocks: int | None = None,
) -> dict[str, Timing]:
    """Time each runner ``runs`` times, alternating the order every round so drift hits all equally.

    Runners that can ``reopen`` (ONNX Runtime sessions) are timed in ``blocks`` (default: one per such runner, at
    most ``runs``). Before each block they are all closed, then created anew in an order rotated by one per block
    (block 0: the given order), then warmed up. On the shared VMs this project is measured on, the session created
    last runs faster, by a different amount from run to run (Turbo's ViT-B int8 graph against the unaccelerated
    one: 1.70x created first, 1.88x created last; docs/precision.md, "Session order", and
    ``scripts/session_order.py``). Rotating hands that advantage to every runner in turn; the timings pool every
    block, and ``block_medians_s`` keeps each block's median.

    When every runner has ``timed_run`` (TensorRT), each run is timed on the device with CUDA events, inputs
    already in device memory; otherwise with the wall clock around ``run``.
    """
    names = list(runners)
    arrays = {n: {k: to_numpy(v) for k, v in feeds[n].items()} for n in names}
    device = all(callable(getattr(runners[n], "timed_run", None)) for n in names)
    movable = [n for n in names if callable(getattr(runners[n], "reopen", None))]
    blocks = max(1, min(runs, blocks if blocks is not None else max(1, len(movable))))
    sizes = [runs // blocks + (1 if b < runs % blocks else 0) for b in range(blocks)]
    if device:
        for n in names:
            runners[n].load(arrays[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    bar = tqdm(total=runs, desc=desc, disable=not progress, leave=False)
    round_index = 0
    for b, size in enumerate(sizes):
        if len(movable) > 1:
            for n in movable:  # all released first, so that no new session lands where its own old one was
                close = getattr(runners[n], "close", None)
                if callable(close):
                    close()
            gc.collect()
            shift = b % len(movable)
            for n in movable[shift:] + movable[:shift]:
                runners[n].reopen()
        for _ in range(warmup if b == 0 else min(warmup, 1)):
            for n in names:
                runners[n].timed_run() if device else runners[n].run(arrays[n])
        block: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(size):
            order = names if round_index % 2 == 0 else names[::-1]
            round_index += 1
            for n in order:
                if device:
                    block[n].append(runners[n].timed_run())
                    continue
                start = time.perf_counter()
                runners[n].run(arrays[n])
                block[n].append(time.perf_counter() - start)
            bar.update(1)
        for n in names:
            times[n] += block[n]
            medians[n].append(statistics.median(block[n]))
    bar.close()
    timer = "CUDA events around the engine execution, inputs in device memory" if device else Timing.timer
    return {n: Timing(n, times[n], batch, timer, medians[n]) for n in names}


def speedup(timings: Mapping[str, Timing], accelerated: str = "turbo", reference: str = "baseline") -> float:
    return timings[accelerated].items_per_s / timings[reference].items_per_s
