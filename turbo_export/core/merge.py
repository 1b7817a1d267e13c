"""Turbo token merging as pure tensor functions (no model knowledge).

Turbo (ECCV 2024) extends ToMe's bipartite soft matching with an *information degree*
``E = R - alpha * I``: R is a token's mutual redundancy (its best cosine similarity to the other
set) and I its semantic value (the CLS token's attention to it). The ``r`` tokens of set A with the
largest E are merged into their most similar token of set B by size-weighted average.

Every shape here depends only on input shapes and on the Python int ``r``: no data-dependent shape,
so the functions trace into a static ONNX graph. Index selection uses ``topk`` (the understanding models) or
``argsort``/``sort`` (the UNet), all TopK in ONNX; the understanding models' merge moves whole token rows
(``take_rows``: one Gather) and sums sources through a one-hot MatMul; the UNet's grid merge uses ``gather``
(GatherElements) and ``scatter_reduce(reduce="sum")`` (ScatterElements with reduction "add"); never
``index_add`` or ``reduce="mean"``, which export wrongly.

Token layout convention (understanding models): A = tokens 0, 2, 4, ... (CLS first), B = tokens
1, 3, 5, ...; the first ``protected`` tokens (CLS, distillation token) are never sources, and a
protected token in B is never a destination.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence, Union

import torch

RSchedule = Union[int, Sequence[int], tuple]


class MergePlan(NamedTuple):
    """Which tokens merge where; everything ``merge_wavg`` and ``unmerge`` need.

    Indices are into the A / B halves of the sequence, shape [batch, k].
    """

    unm_idx: torch.Tensor  # A tokens that stay, ascending (original order)
    src_idx: torch.Tensor  # A tokens merged away
    dst_idx: torch.Tensor  # for each source, its destination in B


def split_alternate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = tokens 0, 2, 4, ...; B = tokens 1, 3, 5, ... along dim 1."""
    return x[:, ::2], x[:, 1::2]


def similarity(metric: torch.Tensor, protected: int = 1) -> torch.Tensor:
    """Cosine similarity of every A token to every B token [B, Na, Nb]; protected B tokens get -inf."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = split_alternate(metric)
    scores = a @ b.transpose(-1, -2)
    protected_b = protected // 2  # B holds the odd indices below `protected`
    return _protect_first(scores, protected_b) if protected_b else scores


def _protect_first(values: torch.Tensor, count: int) -> torch.Tensor:
    """``values`` with the first ``count`` entries of the last dimension -inf: one Where on a constant mask (a slice
    assignment exports as a dozen shape nodes around a ScatterND)."""
    mask = torch.tensor([i < count for i in range(values.shape[-1])], device=values.device)
    return values.masked_fill(mask, -math.inf)


def information_degree(
    metric: torch.Tensor,
    semantic: torch.Tensor | None,
    alpha: float,
    protected: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """E[a] = max_b cos(a, b) - alpha * I[a] for every A token, and its best B token.

    metric: [B, N, C] (need not be normalised); semantic: [B, N] or None (treated as 0).
    Returns (E [B, Na], dst [B, Na]); protected A tokens get E = -inf.
    """
    scores = similarity(metric, protected)
    protected_a = (protected + 1) // 2
    redundancy, dst = scores.max(dim=-1)

    if semantic is not None and alpha != 0.0:
        degree = redundancy - alpha * semantic[:, ::2]
    else:
        degree = redundancy
    return (_protect_first(degree, protected_a) if protected_a else degree), dst


SEMANTIC_VALUES = ("cls", "received", "mean-query")

# The semantic value I without a CLS token (SigLIP; docs/clip-siglip.md has the figures).
# Turbo's I is the CLS row: how much the token that becomes the image representation reads from each token. A model
# without a CLS token needs a stand-in with the same scale (a distribution over the tokens, summing to 1, so the same
# alpha weighs it the same way against R in [-1, 1]), static shapes, and little cost. Two were built and checked on
# the real DINOv2 (which has a CLS row to compare with), scripts/semantic_no_cls_check.py:
# - "mean-query" (SigLIP's default): the attention row of the size-weighted mean query. It is a CLS-like query made
#   from the tokens themselves: one row, as peaked as the CLS row, asking what the image as a whole attends to. At
#   alpha 6 it lies between ToMe and the CLS row on the mean cosine and has the best worst case at r = 16 (CLS output
#   cosine on 60 photo views: mean 0.9929, min 0.9732; ToMe 0.9937 / 0.9618; CLS row 0.9950 / 0.9537).
# - "received": the attention each token receives, averaged over heads and queries (the column mean). Measured worse
#   than ToMe at r = 8 and 16, and the reason is structural: a token in a large uniform region is attended by the many
#   tokens similar to it, so what it receives grows with its redundancy; E = R - alpha * I then cancels part of R and
#   pushes the merge onto distinct tokens. Kept as an option (and as the negative result it is).


def cls_attention(probs: torch.Tensor) -> torch.Tensor:
    """Turbo's semantic value: the CLS query's attention to every token, averaged over heads. [B, H, N, N] -> [B, N]."""
    return probs[:, :, 0, :].mean(dim=1)


def received_attention(probs: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
    """The attention each token receives, averaged over heads and over queries, each query weighted by how many
    patches it stands for (a merged query counts as its ``size`` tokens). [B, H, N, N] -> [B, N], summing to 1.

    Grows with a token's redundancy (see the note above): measured worse than ToMe as Turbo's I on DINOv2.
    """
    per_query = probs.mean(dim=1)  # [B, N (queries), N (keys)]
    if size is None:
        return per_query.mean(dim=1)
    weight = size / size.sum(dim=1, keepdim=True)  # [B, N, 1], sums to 1 over the queries
    return (per_query * weight).sum(dim=1)


def mean_query_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                         size: torch.Tensor | None = None) -> torch.Tensor:
    """The attention row of the *mean query* (queries weighted by size), averaged over heads: [B, N], summing to 1.

    q, k: [B, H, N, D]; bias: the block's key bias [B, 1, 1, N] (log size, so a merged key counts as its tokens)
    or None. It equals the softmax over keys of the size-weighted mean of the queries' log attention: a geometric
    mean of the rows, where ``received_attention`` is their arithmetic mean. Cost: one [1, N] row per head.
    """
    if size is None:
        mean_q = q.mean(dim=2, keepdim=True)  # [B, H, 1, D]
    else:
        weight = (size / size.sum(dim=1, keepdim=True))[:, None]  # [B, 1, N, 1]
        mean_q = (q * weight).sum(dim=2, keepdim=True)
    logits = torch.matmul(mean_q, k.transpose(2, 3)) * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)[:, :, 0, :].mean(dim=1)


def semantic_value(probs: torch.Tensor, kind: str, size: torch.Tensor | None = None, q: torch.Tensor | None = None,
                   k: torch.Tensor | None = None, scale: float = 1.0, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """I for one block: ``"cls"`` (Turbo's CLS row of ``probs`` [B, H, N, N]), ``"received"`` (the column mean of
    ``probs``) or ``"mean-query"`` (the mean query's row, from ``q``, ``k``, ``scale`` and the key ``bias``)."""
    if kind == "cls":
        return cls_attention(probs)
    if kind == "received":
        return received_attention(probs, size)
    if kind == "mean-query":
        return mean_query_attention(q, k, scale, bias, size)
    raise ValueError(f"semantic value: unknown '{kind}'; choose one of {', '.join(SEMANTIC_VALUES)}")


def bipartite_soft_matching(metric: torch.Tensor, r: int, semantic: torch.Tensor | None = None, alpha: float = 0.0,
                            protected: int = 1) -> MergePlan:
    """Choose the r A tokens with the largest information degree and their destinations.

    With ``alpha = 0`` (or no semantic value) this is exactly ToMe's bipartite soft matching.
    ``r`` must already respect ``r <= (N - protected) // 2`` (see ``layer_r``).
    """
    degree, dst = information_degree(metric, semantic, alpha, protected)
    order = degree.topk(degree.shape[-1], dim=-1)[1]  # argsort, descending; topk's K is a constant in ONNX
    src_idx = order[:, :r]
    unm_idx = order[:, r:].topk(order.shape[-1] - r, dim=-1, largest=False)[0]
    dst_idx = dst.gather(dim=-1, index=src_idx)
    return MergePlan(unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)


def decision_margin(metric: torch.Tensor, r: int, semantic: torch.Tensor | None = None, alpha: float = 0.0,
                    protected: int = 1) -> torch.Tensor:
    """How far each sample's merge decisions are from a tie: [B].

    The smaller of (a) the gap between the r-th and (r+1)-th largest information degree (which tokens
    are sources) and (b) each source's gap between its best and second-best destination. Two correct
    float32 implementations (PyTorch, ONNX Runtime) may resolve a decision within ~1e-6 of a tie either way.
    """
    degree, _ = information_degree(metric, semantic, alpha, protected)
    ranked = degree.sort(dim=-1, descending=True)[0]
    gaps = [ranked[:, r - 1] - ranked[:, r]] if 0 < r < ranked.shape[1] else []
    scores = similarity(metric, protected)
    if scores.shape[-1] > 1 and r > 0:
        top2 = scores.topk(2, dim=-1)[0]
        order = degree.argsort(dim=-1, descending=True)[:, :r]
        gaps.append((top2[..., 0] - top2[..., 1]).gather(-1, order).min(dim=-1)[0])
    if not gaps:
        return torch.full((metric.shape[0],), math.inf)
    return torch.stack(gaps).min(dim=0)[0]


def merge_wavg(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x: [B, N, C], size: [B, N, 1] -> [B, N - r, C], [B, N - r, 1].

    Output order: the unmerged A tokens in original order, then all of B in original order. A destination d with
    sources i becomes ``(s_d x_d + sum s_i x_i) / S``, ``S = s_d + sum s_i``, computed as ``x_d + sum (s_i / S)
    (x_i - x_d)``: every other row is an exact copy (``_MergePositions`` says why rows, not elements). Eager on a
    GPU, where a merge is bound by kernel launches, the same average runs as ToMe's gather / scatter_reduce.
    """
    if x.is_cuda:
        return _merge_wavg_scatter(plan, x, size)
    positions = _merge_positions(plan, x.shape[1], x.dtype)
    src_size = _rows(size, positions.src)
    new_size = _rows(size, positions.kept) + positions.receives @ src_size
    weight = src_size / (positions.receives.transpose(-1, -2) @ new_size)  # exactly each destination's new size
    delta = weight * (_rows(x, positions.src) - _rows(x, positions.dst))
    return _rows(x, positions.kept) + positions.receives @ delta, new_size


def _merge_wavg_scatter(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_wavg`` in 1/3 of the kernels (measured 2x faster eager on an H200 at batch 64, docs/gpu-check.md)."""
    return _scatter_wavg(plan, *split_alternate(torch.cat([x * size, size], dim=-1)))


def _scatter_wavg(plan: MergePlan, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The A / B halves of ``cat([x * size, size])`` -> merged tokens and sizes, by gather / scatter_reduce."""
    rows = lambda idx: idx.unsqueeze(-1).expand(*idx.shape, a.shape[-1])  # noqa: E731
    b = b.scatter_reduce(1, rows(plan.dst_idx), a.gather(1, rows(plan.src_idx)), reduce="sum")
    merged = torch.cat([a.gather(1, rows(plan.unm_idx)), b], dim=1)
    return merged[..., :-1] / merged[..., -1:], merged[..., -1:]


# Why rows: ``gather`` / ``scatter_reduce`` export as GatherElements / ScatterElements with an int64 index expanded to
# every channel ([B, k, C], twice the size of the tokens it moves), the split as strided Slices: a fifth of an int8
# ViT-B call. Here every token moves as one row of the flattened [B * N, C] tensor (one Gather each), and the sources
# reach their destinations through a one-hot [B, N - r, r] MatMul (no scatter: TensorRT needs a plugin for that).
class _MergePositions(NamedTuple):
    kept: torch.Tensor  # [B, N - r] rows of the flattened tokens in the output: unmerged A (ascending), then B
    src: torch.Tensor  # [B, r] rows of the flattened tokens: the sources
    dst: torch.Tensor  # [B, r] rows of the flattened tokens: their destinations
    receives: torch.Tensor  # [B, N - r, r] float: 1 where output row j receives source i


def _merge_positions(plan: MergePlan, num_tokens: int, dtype: torch.dtype) -> _MergePositions:
    batch, num_unm = plan.unm_idx.shape
    num_b = num_tokens // 2
    device = plan.unm_idx.device
    first = torch.arange(batch, device=device)[:, None] * num_tokens  # each sample's first row, flattened
    b_rows = 2 * torch.arange(num_b, device=device) + 1
    kept = torch.cat([2 * plan.unm_idx + first, b_rows + first], dim=1)
    dst_out = plan.dst_idx + num_unm  # the destinations' positions in the output sequence
    receives = (torch.arange(num_unm + num_b, device=device)[None, :, None] == dst_out[:, None, :]).to(dtype)
    return _MergePositions(kept, 2 * plan.src_idx + first, 2 * plan.dst_idx + 1 + first, receives)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, rows[b, k]]`` for every b and k: [B, N, C], [B, K] -> [B, K, C], as one Gather of whole rows."""
    return _rows(x, rows + torch.arange(x.shape[0], device=rows.device)[:, None] * x.shape[1])


def _rows(x: torch.Tensor, flat_rows: torch.Tensor) -> torch.Tensor:  # [B, N, C], [B, K] rows of [B * N, C]
    return torch.nn.functional.embedding(flat_rows, x.reshape(-1, x.shape[-1]))  # one Gather (indexing: GatherND)


def unmerge(plan: MergePlan, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Restore a merged sequence [B, N - r, C] to [B, N, C] in the original token order.

    Unmerged tokens get their own value back; each source receives a copy of its destination.
    """
    num_a = (num_tokens + 1) // 2
    inverse = [t // 2 if t % 2 == 0 else num_a + t // 2 for t in range(num_tokens)]  # token -> row of cat([A, B])
    return take_rows(x, _restore_positions(plan, num_a, num_tokens - num_a, torch.tensor(inverse)))


def turbo_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    semantic: torch.Tensor | None,
    r: int,
    alpha: float,
    protected: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, MergePlan]:
    """The merge boundary: one call from (tokens, sizes, metric, semantic value) to merged tokens.

    Exporters that emit a single custom node (the TensorRT plugin) replace exactly this function.
    """
    plan = bipartite_soft_matching(metric, r, semantic, alpha, protected)
    x, size = merge_wavg(plan, x, size)
    return x, size, plan


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """log(size) as an additive attention bias over keys: [B, N, 1] -> [B, 1, 1, N]."""
    return size.log().reshape(-1, 1, 1, size.shape[1])


def r_schedule(r: RSchedule, num_layers: int) -> list[int]:
    """Per-layer r from an int (constant), a list (padded with 0), or ToMe's (r, inflection) tuple.

    ``(r, -0.5)`` is ToMe's decreasing schedule: 1.5 r in the first layer down to 0.5 r in the last,
    the same total as a constant r.
    """
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a schedule tuple must be (r, inflection), got {r!r}")
        base, inflect = r
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        if num_layers == 1:
            return [int(base)]
        step = (hi - lo) / (num_layers - 1)
        return [int(lo + step * i) for i in range(num_layers)]
    if isinstance(r, (list, tuple)) or hasattr(r, "__iter__"):
        values = [int(v) for v in r]
        if len(values) > num_layers:
            raise ValueError(f"r schedule has {len(values)} entries but the model has {num_layers} layers")
        return values + [0] * (num_layers - len(values))
    return [int(r)] * num_layers


def layer_r(r: int, num_tokens: int, protected: int = 1, min_tokens: int = 0) -> int:
    """Tokens actually merged in a block with ``num_tokens`` input tokens."""
    if num_tokens < min_tokens:
        return 0
    return max(0, min(r, (num_tokens - protected) // 2))


def tokens_per_layer(
    num_tokens: int, schedule: Sequence[int], protected: int = 1, min_tokens: int = 0
) -> list[tuple[int, int]]:
    """(tokens entering the block, tokens merged in it) for every block."""
    out = []
    for r in schedule:
        merged = layer_r(r, num_tokens, protected, min_tokens)
        out.append((num_tokens, merged))
        num_tokens -= merged
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation models (Stable Diffusion UNet): ToMe-for-SD style merge *and restore* on a 2x2 destination grid.
#
# Exact semantics (shared with any other implementation of this merge, e.g. a TensorRT plugin):
# - Tokens are the h x w latent grid in raster order (token t = row * w + col), x: [B, N = h * w, C].
# - B (destinations): one token per complete 2x2 cell, at a fixed position inside the cell ((0, 0) = top-left,
#   ToMe for SD without randomness) or at a seeded random position per cell, chosen once when the model is
#   patched and stored in the graph as a constant. B is listed by ascending token index. A (candidate
#   sources): every other token (incomplete border cells included), by ascending token index. Na = N - Nb.
# - metric: the transformer block's *input* hidden states (not keys, not normalised), L2-normalised here.
# - R[a] = max over b of cos(metric_a, metric_b); dst[a] = the argmax (ties: the lowest B index).
# - E[a] = R[a] - alpha * I[a] (I: a semantic value per token, [B, N]; None or alpha = 0: E = R exactly).
# - sources: the r A tokens with the largest E: a descending sort of E over A (argsort -> ONNX TopK with
#   K = Na; exact ties: lower A index first in ONNX, unspecified in PyTorch's CPU sort, which is why the
#   exporter's stable sort is not used: it has no ONNX lowering); src_idx = order[:r], unm_idx = order[r:]
#   (kept in that order, not re-sorted:
#   attention and FFN are permutation-equivariant over queries and restore puts every token back).
# - merge: plain mean, no size tracking (ToMe for SD): b <- (b + sum of its sources) / (1 + number of sources).
#   Output: [unmerged A in unm_idx order, then all of B in B order], N - r tokens.
# - restore: a [B, N - r, C] sequence back to [B, N, C]: B tokens and unmerged A tokens get their own value,
#   each source gets a copy of its destination's value. It is one gather with per-token positions.
# - Sort size: the sort is over Na = 3N/4 tokens; TensorRT's TopK needs K < 3840, which holds up to
#   Na = 3072 (64 x 64 latents, 512 px, in SD's finest level). ``check_topk_limit`` says when it does not.
# ---------------------------------------------------------------------------------------------------------------

TENSORRT_TOPK_LIMIT = 3840


class GridSplit(NamedTuple):
    """A constant partition of an h x w token grid into A (sources) and B (destinations)."""

    a_idx: torch.Tensor  # [Na] token indices of A, ascending
    b_idx: torch.Tensor  # [Nb] token indices of B, ascending
    inverse: torch.Tensor  # [N]: token t sits at position inverse[t] of cat([A, B])
    height: int
    width: int


def grid_split(height: int, width: int, seed: int | None = None, stride: int = 2) -> GridSplit:
    """One destination per complete ``stride x stride`` cell: top-left when ``seed`` is None, else seeded random.

    ``random.Random(seed)`` picks each cell's position in raster order of the cells. The index lists are plain
    Python (cached); the tensors are made on every call, so they are graph constants when traced.
    """
    a_list, b_list, inverse = _grid_lists(height, width, seed, stride)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return GridSplit(as_long(a_list), as_long(b_list), as_long(inverse), height, width)


@functools.lru_cache(maxsize=64)
def _grid_lists(height: int, width: int, seed: int | None, stride: int) -> tuple[list, list, list]:
    import random

    rng = random.Random(seed) if seed is not None else None
    b_list = []
    for cell_row in range(height // stride):
        for cell_col in range(width // stride):
            offset = rng.randrange(stride * stride) if rng is not None else 0
            b_list.append((cell_row * stride + offset // stride) * width + cell_col * stride + offset % stride)
    b_list.sort()
    is_b = set(b_list)
    a_list = [t for t in range(height * width) if t not in is_b]
    inverse = [0] * (height * width)
    for position, token in enumerate(a_list + b_list):
        inverse[token] = position
    return a_list, b_list, inverse


def grid_r(num_tokens: int, ratio: float, split: GridSplit) -> int:
    """Tokens merged: int(N * ratio) (ToMe for SD), at most all of A."""
    return max(0, min(int(num_tokens * ratio), split.height * split.width - (split.height // 2) * (split.width // 2)))


def check_topk_limit(split: GridSplit, limit: int = TENSORRT_TOPK_LIMIT) -> None:
    """Raise ValueError when the sort over A would exceed TensorRT's TopK limit (K < ``limit``)."""
    if split.a_idx.shape[0] >= limit:
        raise ValueError(
            f"a {split.height}x{split.width} token grid sorts {split.a_idx.shape[0]} tokens, above TensorRT's TopK "
            f"limit (K < {limit}); merge only in coarser blocks or use a smaller resolution"
        )


def grid_redundancy(metric: torch.Tensor, split: GridSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """R [B, Na] (best cosine of each A token to B) and dst [B, Na] (that B token's index into B)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, split.a_idx], metric[:, split.b_idx]
    return (a @ b.transpose(-1, -2)).max(dim=-1)


def grid_plan(
    redundancy: torch.Tensor,
    dst: torch.Tensor,
    split: GridSplit,
    r: int,
    semantic: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> MergePlan:
    """Sources = the r A tokens with the largest E = R - alpha * I (see the section comment for tie rules)."""
    degree = redundancy
    if semantic is not None and alpha != 0.0:
        degree = redundancy - alpha * semantic[:, split.a_idx]
    order = degree.argsort(dim=-1, descending=True)
    src_idx = order[:, :r]
    return MergePlan(unm_idx=order[:, r:], src_idx=src_idx, dst_idx=dst.gather(dim=-1, index=src_idx))


def grid_matching(
    metric: torch.Tensor, split: GridSplit, r: int, semantic: torch.Tensor | None = None, alpha: float = 0.0
) -> MergePlan:
    """ToMe for SD's bipartite matching on the 2x2 grid, with Turbo's information degree when alpha != 0."""
    redundancy, dst = grid_redundancy(metric, split)
    return grid_plan(redundancy, dst, split, r, semantic, alpha)


def merge_mean(plan: MergePlan, split: GridSplit, x: torch.Tensor) -> torch.Tensor:
    """Plain-mean merge [B, N, C] -> [B, N - r, C]: unmerged A (unm_idx order), then B."""
    batch, _, channels = x.shape
    a, b = x[:, split.a_idx], x[:, split.b_idx]
    unm = a.gather(dim=1, index=plan.unm_idx.unsqueeze(-1).expand(batch, plan.unm_idx.shape[1], channels))
    src = a.gather(dim=1, index=plan.src_idx.unsqueeze(-1).expand(batch, plan.src_idx.shape[1], channels))
    summed = torch.cat([b, b.new_ones(batch, b.shape[1], 1)], dim=-1).scatter_reduce(
        dim=1, index=plan.dst_idx.unsqueeze(-1).expand(batch, plan.dst_idx.shape[1], channels + 1),
        src=torch.cat([src, src.new_ones(batch, src.shape[1], 1)], dim=-1), reduce="sum",
    )
    return torch.cat([unm, summed[..., :-1] / summed[..., -1:]], dim=1)


def _restore_positions(plan: MergePlan, num_a: int, num_b: int, inverse: torch.Tensor) -> torch.Tensor:
    """For every original token, its row in the merged sequence [B, N]; ``inverse``: token -> row of cat([A, B])."""
    batch, num_unm = plan.unm_idx.shape
    device = plan.unm_idx.device
    pos_a = torch.zeros(batch, num_a, dtype=torch.long, device=device)
    pos_a = pos_a.scatter(1, plan.unm_idx, torch.arange(num_unm, device=device).expand(batch, num_unm))
    pos_a = pos_a.scatter(1, plan.src_idx, plan.dst_idx + num_unm)
    pos_b = (torch.arange(num_b, device=device) + num_unm).expand(batch, num_b)
    return torch.cat([pos_a, pos_b], dim=1)[:, inverse.to(device)]


def unmerge_grid(plan: MergePlan, split: GridSplit, x: torch.Tensor) -> torch.Tensor:
    """Restore [B, N - r, C] -> [B, N, C]: every token its own value, every source its destination's."""
    return take_rows(x, _restore_positions(plan, split.a_idx.numel(), split.b_idx.numel(), split.inverse))


# ---------------------------------------------------------------------------------------------------------------
# Any A/B split given as index tensors: the TurboMerge / TurboUnmerge node contract (plugins/README.md) in PyTorch,
# which ``plugin_ops`` runs eagerly for a split other than the alternate one (the UNet's 2x2 grid).
# - a_idx [Na], b_idx [Nb]: token rows of A and B (any partition). Rows below ``protected`` are never a source
#   (A) or a destination (B). R, dst, E as in ``grid_redundancy`` / ``grid_plan`` (same ops, so the same plan).
# - merge: size-weighted mean; output [unmerged A in A order (unm_idx ascending), then all of B]. With all-ones
#   sizes the values equal ``merge_mean``'s exactly (x * 1 = x, sums in the same source order); only the unmerged
#   A rows come in ascending rather than descending-E order, and ``unmerge_split`` inverts exactly that order.
# ---------------------------------------------------------------------------------------------------------------


def split_matching(
    metric: torch.Tensor,
    a_idx: torch.Tensor,
    b_idx: torch.Tensor,
    r: int,
    semantic: torch.Tensor | None = None,
    alpha: float = 0.0,
    protected: int = 0,
) -> MergePlan:
    """Sources = the r A tokens with the largest E = R - alpha * I; unm_idx ascending (the node's order)."""
    a_idx, b_idx = a_idx.long(), b_idx.long()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, a_idx] @ metric[:, b_idx].transpose(-1, -2)
    if protected:
        scores = scores.masked_fill(b_idx < protected, -math.inf)
    redundancy, dst = scores.max(dim=-1)
    degree = redundancy
    if semantic is not None and alpha != 0.0:
        degree = redundancy - alpha * semantic[:, a_idx]
    if protected:
        degree = degree.masked_fill(a_idx < protected, -math.inf)
    order = degree.argsort(dim=-1, descending=True)
    src_idx = order[:, :r]
    return MergePlan(unm_idx=order[:, r:].sort(dim=-1)[0], src_idx=src_idx, dst_idx=dst.gather(dim=-1, index=src_idx))


def merge_wavg_split(
    plan: MergePlan, a_idx: torch.Tensor, b_idx: torch.Tensor, x: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge over an indexed split: [B, N, C] -> [B, N - r, C], [B, N - r, 1]."""
    weighted = torch.cat([x * size, size], dim=-1)
    return _scatter_wavg(plan, weighted[:, a_idx.long()], weighted[:, b_idx.long()])


def unmerge_split(plan: MergePlan, a_idx: torch.Tensor, b_idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Restore [B, N - r, C] -> [B, N, C]: unmerged A and B tokens their own row, each source its destination's."""
    inverse = torch.cat([a_idx, b_idx]).long().argsort()  # token -> row of cat([A, B])
    return take_rows(x, _restore_positions(plan, a_idx.numel(), b_idx.numel(), inverse))
