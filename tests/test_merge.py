import math

import pytest
import torch
from reference import reference_merge, tome_bipartite_matching, tome_merge_wavg

from turbo_export.core import merge


def _inputs(batch=3, tokens=17, channels=8, dim=5, seed=0, uneven_sizes=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g)
    metric = torch.randn(batch, tokens, dim, generator=g)
    semantic = torch.rand(batch, tokens, generator=g).softmax(-1)
    size = (torch.randint(1, 4, (batch, tokens, 1), generator=g).float() if uneven_sizes
            else torch.ones(batch, tokens, 1))
    return x, size, metric, semantic


@pytest.mark.parametrize("tokens", [17, 16])
@pytest.mark.parametrize("alpha", [0.0, 6.0, 150.0])
@pytest.mark.parametrize("protected", [1, 2])
def test_merge_matches_plain_loop_reference(tokens, alpha, protected):
    x, size, metric, semantic = _inputs(tokens=tokens)
    r = 5
    got_x, got_s, plan = merge.turbo_merge(x, size, metric, semantic, r, alpha, protected)
    ref_x, ref_s, choices = reference_merge(x, size, metric, semantic, r, alpha, protected)
    assert got_x.shape == (3, tokens - r, 8)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_s, ref_s)
    for n, (sources, dests) in enumerate(choices):
        # plan indices are into A / B: token index = 2 * i (A) and 2 * j + 1 (B)
        got_sources = (2 * plan.src_idx[n]).tolist()
        got_dests = (2 * plan.dst_idx[n] + 1).tolist()
        assert sorted(zip(got_sources, got_dests)) == sorted(zip(sources, dests))
        assert all(s >= protected for s in got_sources), "a protected token was merged away"
        assert all(d >= protected for d in got_dests), "something merged into a protected token"


def test_cls_stays_first_and_order_is_kept():
    _, _, metric, semantic = _inputs(tokens=21)
    x = torch.arange(21, dtype=torch.float32).view(1, 21, 1).expand(3, 21, 1).contiguous()
    out, _, plan = merge.turbo_merge(x, torch.ones(3, 21, 1), metric, semantic, 6, 6.0, 1)
    assert out.shape == (3, 21 - 6, 1)
    for n in range(3):
        unmerged_a = out[n, : 11 - 6, 0]
        assert unmerged_a[0] == 0  # CLS first, untouched
        assert torch.all(unmerged_a[1:] > unmerged_a[:-1])  # remaining A tokens in original order
        assert torch.all(unmerged_a.remainder(2) == 0)  # and they are A tokens
        assert (plan.unm_idx[n].diff() > 0).all()


def test_sizes_add_up_and_weighted_average():
    x, size, metric, semantic = _inputs(tokens=15)
    out, new_size, _ = merge.turbo_merge(x, size, metric, semantic, 4, 6.0, 1)
    torch.testing.assert_close(new_size.sum(dim=1), size.sum(dim=1))
    torch.testing.assert_close((out * new_size).sum(dim=1), (x * size).sum(dim=1), rtol=1e-5, atol=1e-5)


def test_alpha_zero_equals_tome():
    x, size, metric, semantic = _inputs(tokens=197, channels=16, dim=12, batch=2)
    for r in (1, 16, 98):
        got_x, got_s, plan = merge.turbo_merge(x, size, metric, semantic, r, 0.0, 1)
        tome = tome_bipartite_matching(metric, r, class_token=True)
        ref_x, ref_s = tome_merge_wavg(tome, x, size)
        _assert_same_merge(x, plan, got_x, got_s, ref_x, ref_s)


def test_alpha_zero_equals_tome_with_distillation_token():
    x, size, metric, semantic = _inputs(tokens=198, channels=16, dim=12, batch=2)
    got_x, got_s, plan = merge.turbo_merge(x, size, metric, semantic, 16, 0.0, 2)
    tome = tome_bipartite_matching(metric, 16, class_token=True, distill_token=True)
    ref_x, ref_s = tome_merge_wavg(tome, x, size)
    _assert_same_merge(x, plan, got_x, got_s, ref_x, ref_s)


def _assert_same_merge(x, plan, got_x, got_s, ref_x, ref_s):
    """The same tokens and sizes as ToMe's merge. A row that received no source is an exact copy of its token
    (ToMe's x * size / size may round it); a merged row agrees to rounding (another order of operations)."""
    assert torch.equal(got_s, ref_s)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-6, atol=1e-6)
    batch, num_unm = plan.unm_idx.shape
    kept = torch.cat([2 * plan.unm_idx, torch.arange(1, x.shape[1], 2).expand(batch, -1)], dim=1)
    receiving = torch.zeros(kept.shape, dtype=torch.bool).scatter(1, plan.dst_idx + num_unm, True)
    copies = x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
    assert torch.equal(got_x[~receiving], copies[~receiving])


def test_semantic_value_changes_sources_not_destinations():
    x, size, metric, semantic = _inputs(tokens=33)
    plan0 = merge.bipartite_soft_matching(metric, 8, semantic, 0.0)
    plan1 = merge.bipartite_soft_matching(metric, 8, semantic, 1000.0)
    assert not torch.equal(plan0.src_idx.sort(-1)[0], plan1.src_idx.sort(-1)[0])
    _, dst = merge.information_degree(metric, None, 0.0)
    for plan in (plan0, plan1):
        assert torch.equal(plan.dst_idx, dst.gather(-1, plan.src_idx))
    # with a huge alpha the sources are the A tokens the CLS token attends to least
    a_sem = semantic[:, ::2].clone()
    a_sem[:, 0] = math.inf
    expected = a_sem.argsort(dim=-1)[:, :8].sort(-1)[0]
    assert torch.equal(plan1.src_idx.sort(-1)[0], expected)


@pytest.mark.parametrize("tokens", [16, 17])
def test_unmerge_restores_positions(tokens):
    x, _, metric, semantic = _inputs(tokens=tokens)
    plan = merge.bipartite_soft_matching(metric, 5, semantic, 6.0)
    merged, _ = merge.merge_wavg(plan, x, torch.ones(*x.shape[:2], 1))  # any per-token values work for the round trip
    restored = merge.unmerge(plan, merged, tokens)
    assert restored.shape == x.shape
    for n in range(x.shape[0]):
        sources = (2 * plan.src_idx[n]).tolist()
        dests = (2 * plan.dst_idx[n] + 1).tolist()
        for t in range(tokens):
            if t in sources:  # a source receives its destination's merged value
                d = dests[sources.index(t)]
                assert torch.equal(restored[n, t], restored[n, d])
            elif t % 2 == 0:  # unmerged A tokens keep their values
                assert torch.equal(restored[n, t], x[n, t])
        # B tokens hold the merged value: the mean of their own and what merged into them
        for j, t in enumerate(range(1, tokens, 2)):
            members = [x[n, t]] + [x[n, s] for s, d in zip(sources, dests) if d == t]
            torch.testing.assert_close(restored[n, t], torch.stack(members).mean(dim=0))


def test_proportional_attention_bias():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = merge.proportional_attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.log(torch.tensor([1.0, 2.0, 4.0])))


def test_r_schedules():
    assert merge.r_schedule(16, 4) == [16, 16, 16, 16]
    assert merge.r_schedule([8, 4], 4) == [8, 4, 0, 0]
    decreasing = merge.r_schedule((16, -0.5), 12)
    assert decreasing[0] == 24 and decreasing[-1] == 8
    assert all(a >= b for a, b in zip(decreasing, decreasing[1:]))
    with pytest.raises(ValueError):
        merge.r_schedule([1] * 5, 4)


def test_layer_r_cap_and_min_tokens():
    assert merge.layer_r(16, 197) == 16
    assert merge.layer_r(200, 197) == 98
    assert merge.layer_r(200, 198, protected=2) == 98
    assert merge.layer_r(16, 39, min_tokens=40) == 0
    assert merge.layer_r(16, 40, min_tokens=40) == 16
    layers = merge.tokens_per_layer(197, [16] * 12)
    assert [n for n, _ in layers][:3] == [197, 181, 165]
    assert layers[-1] == (21, 10)  # capped by (N - 1) // 2
    with_threshold = merge.tokens_per_layer(197, [16] * 12, min_tokens=100)
    assert [n for n, _ in with_threshold][-1] == 85 and with_threshold[-1][1] == 0


def test_static_shapes_independent_of_data():
    shapes = set()
    for seed in range(5):
        x, size, metric, semantic = _inputs(seed=seed)
        out, s, _ = merge.turbo_merge(x, size, metric, semantic, 5, 6.0, 1)
        shapes.add((tuple(out.shape), tuple(s.shape)))
    assert len(shapes) == 1


def test_decision_margin_detects_ties():
    _, _, metric, semantic = _inputs(tokens=17, batch=2)
    clear = merge.decision_margin(metric, 4, semantic, 6.0)
    assert clear.shape == (2,) and (clear > 0).all()
    tied = metric.clone()
    tied[1, 3] = tied[1, 5]  # two B tokens identical: every A token's best and second-best destination tie
    margin = merge.decision_margin(tied, 4, semantic, 6.0)
    assert margin[1] == 0 and margin[0] == clear[0]


def test_gpu_eager_scatter_form_equals_the_row_merge():
    """merge_wavg's CUDA-eager form (gather / scatter_reduce, fewer kernels) computes the same merge: checked on CPU."""
    x, size, metric, semantic = _inputs(tokens=197, channels=16, dim=12, batch=2)
    plan = merge.bipartite_soft_matching(metric, 16, semantic, 6.0)
    rows_x, rows_s = merge.merge_wavg(plan, x, size)
    scatter_x, scatter_s = merge._merge_wavg_scatter(plan, x, size)
    assert torch.equal(rows_s, scatter_s)
    torch.testing.assert_close(rows_x, scatter_x, rtol=1e-6, atol=1e-6)
    tome = tome_bipartite_matching(metric, 16, class_token=True)
    tome_x, tome_s = tome_merge_wavg(tome, x, size)
    plan0 = merge.bipartite_soft_matching(metric, 16, semantic, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(merge._merge_wavg_scatter(plan0, x, size), (tome_x, tome_s)))
