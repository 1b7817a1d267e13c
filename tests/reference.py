"""Independent plain-loop references for the Turbo semantics (the issue's "exact semantics").

Written from the specification, not from turbo_export.core.merge: per sample, Python loops and lists.
"""

from __future__ import annotations

import math

import torch


def reference_merge(x, size, metric, semantic, r, alpha, protected=1):
    """Returns merged x [B, N-r, C], sizes [B, N-r, 1], and per sample (sources, destinations) in token indices."""
    out_x, out_s, choices = [], [], []
    for n in range(x.shape[0]):
        tokens = x.shape[1]
        a_idx = list(range(0, tokens, 2))
        b_idx = list(range(1, tokens, 2))
        feats = [metric[n, t] / metric[n, t].norm() for t in range(tokens)]
        degree, best = {}, {}
        for a in a_idx:
            if a < protected:
                continue  # CLS (and distillation token) are never sources
            best_b, best_cos = None, -math.inf
            for b in b_idx:
                if b < protected:
                    continue  # a protected B token is never a destination
                c = float(feats[a] @ feats[b])
                if c > best_cos:
                    best_b, best_cos = b, c
            sem = 0.0 if semantic is None else float(semantic[n, a])
            degree[a] = best_cos - alpha * sem
            best[a] = best_b
        sources = sorted(degree, key=lambda a: -degree[a])[:r]
        values = {t: x[n, t].double() * size[n, t, 0].double() for t in range(tokens)}
        sizes = {t: size[n, t, 0].double() for t in range(tokens)}
        for a in sources:
            values[best[a]] = values[best[a]] + values[a]
            sizes[best[a]] = sizes[best[a]] + sizes[a]
        order = [a for a in a_idx if a not in sources] + b_idx
        out_x.append(torch.stack([values[t] / sizes[t] for t in order]))
        out_s.append(torch.stack([sizes[t] for t in order]).unsqueeze(-1))
        choices.append((sources, [best[a] for a in sources]))
    return torch.stack(out_x).to(x.dtype), torch.stack(out_s).to(x.dtype), choices


def tome_bipartite_matching(metric, r, class_token=True, distill_token=False):
    """ToMe's bipartite soft matching as ToMe publishes it (sort-based, score matrix with -inf masks)."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="sum"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def tome_merge_wavg(merge, x, size):
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size
