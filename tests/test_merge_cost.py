"""scripts/merge_cost.py: Turbo against the same token schedule with a merge that costs nothing."""

import json
import os
import sys

import onnx
from click.testing import CliRunner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import merge_cost  # noqa: E402


def _ops(path):
    return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


def test_free_merge_keeps_the_schedule_without_the_merge(tmp_path):
    out, work = tmp_path / "cost.json", tmp_path / "work"
    result = CliRunner().invoke(merge_cost.main, ["--model", "random:tiny", "--ratio", "8", "--batch", "2",
                                                  "--runs", "3", "--warmup", "0", "--work", str(work),
                                                  "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    medians = report["median_ms"]
    assert sorted(medians) == sorted(merge_cost.GRAPHS) and all(ms > 0 for ms in medians.values())
    assert report["speedup"]["free merge"] == medians["unaccelerated"] / medians["free merge"]
    assert report["merge_cost_ms"] == medians["turbo"] - medians["free merge"]
    assert "merge cost:" in result.output and "most this token schedule gives" in result.output
    # int8 graphs; Turbo's merge decides (TopK) and moves rows, the free merge only slices
    turbo, free = _ops(work / "turbo_int8.onnx"), _ops(work / "free_merge_int8.onnx")
    assert "DynamicQuantizeLinear" in turbo and "DynamicQuantizeLinear" in free
    assert {"TopK", "ArgMax", "GatherElements"} <= turbo and not {"TopK", "ArgMax", "GatherElements"} & free
    assert report["nodes"]["free merge"] < report["nodes"]["turbo"]


def test_free_merge_has_turbo_token_counts():
    import torch

    from turbo_export import apply_turbo
    from turbo_export.families import get_family
    from turbo_export.patch import turbo_settings

    model = get_family("vit").load("random:tiny").model.eval()
    turbo, free = apply_turbo(model, 8), apply_turbo(__import__("copy").deepcopy(model), 8)
    turbo_settings(free).merge_fn = merge_cost.keep_first
    pixels = torch.randn(2, 3, 32, 32)
    hidden = [m(pixel_values=pixels, output_hidden_states=True).hidden_states for m in (turbo, free)]
    assert [h.shape for h in hidden[0]] == [h.shape for h in hidden[1]]
    assert hidden[0][-1].shape[1] < hidden[0][0].shape[1]


def test_bad_precision_is_one_line_exit_2():
    result = CliRunner().invoke(merge_cost.main, ["--precision", "fp8"])
    assert result.exit_code == 2 and "--precision" in result.output
