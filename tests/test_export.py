"""ONNX export of every supported class: the Turbo graph reproduces Turbo in PyTorch in ONNX Runtime."""

import collections
import copy

import numpy as np
import onnx
import pytest
import torch
from test_patch import _models

from turbo_export.backends import make_runner
from turbo_export.errors import ParityError
from turbo_export.export.onnx import export_onnx
from turbo_export.export.parity import check_graph as validate
from turbo_export.export.parity import require_parity
from turbo_export.families import get_family
from turbo_export.families.vit import VitOptions as TurboOptions
from turbo_export.models.presets import LoadedModel

SPEC = get_family("vit")


def _loaded(model):
    return LoadedModel(model, type(model).__name__, "test", int(model.config.image_size), 3)


@pytest.mark.parametrize("model", _models(), ids=lambda m: type(m).__name__)
def test_turbo_onnx_matches_pytorch(model, tmp_path):
    loaded = _loaded(model)
    options = TurboOptions(ratio=8, alpha=6.0, batch=2)
    turbo = SPEC.make_turbo(copy.deepcopy(model), options)
    graph = SPEC.graph("turbo", turbo, loaded, options)
    path = export_onnx(graph, str(tmp_path / "turbo.onnx"))
    onnx.checker.check_model(path)
    proto = onnx.load(path)
    # static shapes: every input and output dimension is a number
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name
    runner = make_runner(path)
    fresh = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))}
    for inputs in (graph.example_inputs, fresh):
        report = validate(graph, path, runner, inputs)
        require_parity(report)
        assert report.cosine > 0.99999
    # the merge really happened inside the exported graph, moving whole token rows with Gathers (no ScatterElements
    # over tokens), TopK's K a constant and the protected CLS token masked by a Where, not a ScatterND + shape nodes
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["TopK"] and ops["Gather"] and ops["Where"] and not ops["ScatterElements"] + ops["ScatterND"]
    assert not ops["GatherND"] + ops["Range"] + ops["Shape"]


def test_validation_fails_loudly_on_a_wrong_graph(tmp_path):
    loaded = get_family("vit").load("random:tiny")
    options = TurboOptions(ratio=8, batch=1)
    baseline = SPEC.graph("baseline", loaded.model, loaded, options)
    path = export_onnx(baseline, str(tmp_path / "baseline.onnx"))
    turbo = SPEC.graph("turbo", SPEC.make_turbo(copy.deepcopy(loaded.model), options), loaded, options)
    report = validate(turbo, path, make_runner(path))  # the unmerged graph is not the Turbo model
    assert not report.ok
    with pytest.raises(ParityError, match="max abs diff"):
        require_parity(report)
    assert any("[x]" in line for line in report.lines())


def test_flops_and_tokens():
    from turbo_export.core import merge

    tiny = get_family("vit").load("random:tiny")
    base = SPEC.flops(tiny, 32, [(65, 0)] * 4)
    layers = merge.tokens_per_layer(65, [8] * 4)
    turbo = SPEC.flops(tiny, 32, layers)
    assert 1.2 < base / turbo < 2.0
    # hand count for one block of the tiny model (width 32, MLP 64, 65 tokens, no merge)
    w, m, n = 32, 64, 65
    block = 2 * n * w * w * 3 + 2 * 2 * n * n * w + 2 * n * w * w + 2 * 2 * n * w * m
    patch_embed = 2 * 64 * w * 3 * 4 * 4
    assert base == patch_embed + 4 * block + 2 * w * 10
    assert np.isclose(SPEC.num_tokens(tiny, 32), 65)


class _PerturbedRunner:
    """Returns the ONNX outputs with one sample shifted, as a flipped merge decision would."""

    def __init__(self, runner, sample):
        self.runner, self.sample = runner, sample

    def run(self, feed):
        out = self.runner.run(feed)
        return {k: np.where(np.arange(v.shape[0]).reshape(-1, *[1] * (v.ndim - 1)) == self.sample, v + 1.0, v)
                for k, v in out.items()}


@pytest.mark.parametrize("margin, tolerated", [(1e-8, True), (1e-2, False)])
def test_validation_tolerates_only_near_tie_samples(tmp_path, monkeypatch, margin, tolerated):
    import turbo_export.patch.blocks as blocks

    loaded = get_family("vit").load("random:tiny")
    options = TurboOptions(ratio=8, batch=3)
    turbo = SPEC.graph("turbo", SPEC.make_turbo(copy.deepcopy(loaded.model), options), loaded, options)
    assert turbo.merge_model is not None
    path = export_onnx(turbo, str(tmp_path / "turbo.onnx"))
    monkeypatch.setattr(blocks, "sample_margins", lambda model, run: torch.tensor([0.5, margin, 0.5]))
    report = validate(turbo, path, _PerturbedRunner(make_runner(path), sample=1))
    assert report.ok is tolerated
    assert (list(report.tie_samples) == [1]) is tolerated
    if tolerated:
        assert report.max_abs_diff < 1e-4 and any("sample 1 of 3" in line for line in report.lines())


def test_sample_margins_come_from_the_patched_model():
    from turbo_export.patch.blocks import sample_margins

    loaded = get_family("vit").load("random:tiny")
    model = SPEC.make_turbo(copy.deepcopy(loaded.model), TurboOptions(ratio=8))
    pixels = torch.randn(2, 3, 32, 32)
    margins = sample_margins(model, lambda: model(pixel_values=pixels))
    assert margins.shape == (2,) and (margins >= 0).all()
    assert model._turbo.record_plans is False and not model._turbo.margins
