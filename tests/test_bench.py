"""The interleaved benchmark: alternating order, and blocks whose sessions are created anew in a rotated order."""

from __future__ import annotations

import numpy as np
import pytest

from turbo_export.backends import bench, make_runner


class _Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []


class _Reopenable:
    def __init__(self, name: str, events: _Events) -> None:
        self.name, self.events = name, events

    def close(self) -> None:
        self.events.log.append(("close", self.name))

    def reopen(self) -> None:
        self.events.log.append(("open", self.name))

    def run(self, feed):
        self.events.log.append(("run", self.name))
        return {}


class _Fixed:
    """A runner that cannot be re-created (a PyTorch module, a pipeline)."""

    def __init__(self, name: str, events: _Events) -> None:
        self.name, self.events = name, events

    def run(self, feed):
        self.events.log.append(("run", self.name))
        return {}


def _blocks(log: list[tuple[str, str]]) -> list[list[str]]:
    """The creation order of each reopening, split where a run follows an open."""
    blocks: list[list[str]] = []
    previous = "run"
    for kind, name in log:
        if kind == "open":
            if previous != "open":
                blocks.append([])
            blocks[-1].append(name)
        previous = kind
    return blocks


def test_every_reopenable_runner_is_created_last_once():
    events = _Events()
    runners = {n: _Reopenable(n, events) for n in ("a", "b", "c")}
    runners["torch"] = _Fixed("torch", events)
    timings = bench.interleaved(runners, {n: {} for n in runners}, batch=2, warmup=3, runs=7, progress=False)
    reopened = _blocks(events.log)
    # every session is released before any is created again
    kinds = "".join(kind[0] for kind, _ in events.log)
    assert "ccco" in kinds and "ro" not in kinds and "oc" not in kinds
    # before every block all are re-created, rotated by one each block: each is created last once
    assert reopened == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {order[-1] for order in reopened} == {"a", "b", "c"}
    runs = [name for kind, name in events.log if kind == "run"]
    # warm-up: 3 rounds before block 0, one round after each re-creation; then 7 timed rounds split 3 + 2 + 2
    assert runs.count("a") == 3 + 1 + 1 + 7 and runs.count("torch") == 3 + 1 + 1 + 7
    for t in timings.values():
        assert len(t.seconds) == 7 and len(t.block_medians_s) == 3
        assert t.median_s > 0 and t.items_per_s == pytest.approx(2 / t.median_s)


def test_blocks_never_exceed_runs_and_fixed_runners_get_one_block():
    events = _Events()
    runners = {n: _Reopenable(n, events) for n in ("a", "b", "c")}
    timings = bench.interleaved(runners, {n: {} for n in runners}, batch=1, warmup=0, runs=2, progress=False)
    assert len(_blocks(events.log)) == 2 and all(len(t.block_medians_s) == 2 for t in timings.values())
    fixed = {n: _Fixed(n, _Events()) for n in ("x", "y")}
    timings = bench.interleaved(fixed, {n: {} for n in fixed}, batch=1, warmup=1, runs=4, progress=False)
    assert all(len(t.block_medians_s) == 1 and len(t.seconds) == 4 for t in timings.values())


def test_the_order_alternates_within_and_across_blocks():
    events = _Events()
    runners = {n: _Reopenable(n, events) for n in ("a", "b")}
    bench.interleaved(runners, {n: {} for n in runners}, batch=1, warmup=0, runs=4, progress=False)
    timed = [name for kind, name in events.log if kind == "run"]
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_onnx_runtime_runner_reopens_a_new_session_with_the_same_outputs(tmp_path):
    runner = make_runner(_linear_graph(tmp_path))
    feed = {"x": np.ones((2, 4), np.float32)}
    first, session = runner.run(feed)["y"], runner.session
    runner.reopen()
    assert runner.session is not session
    np.testing.assert_array_equal(runner.run(feed)["y"], first)


def _linear_graph(tmp_path) -> str:
    import torch

    path = str(tmp_path / "linear.onnx")
    torch.onnx.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return path


def test_session_order_script_times_each_way(tmp_path):
    import json
    import os
    import sys

    from click.testing import CliRunner

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import session_order

    path = _linear_graph(tmp_path)
    out = tmp_path / "order.json"
    result = CliRunner().invoke(session_order.main, [path, path, "--runs", "2", "--warmup", "0", "--batch", "3",
                                                     "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["median_ms"]) == ["given order, one block", "reverse order, one block", "rotated blocks"]
    for medians in report["median_ms"].values():
        assert list(medians) == ["0:linear.onnx", "1:linear.onnx"] and all(ms > 0 for ms in medians.values())
    assert "rotated blocks (2 blocks, 2 rounds)" in result.output
    single = CliRunner().invoke(session_order.main, [path])
    assert single.exit_code == 2 and "at least two graphs" in single.output
