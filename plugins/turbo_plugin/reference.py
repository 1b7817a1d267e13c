"""The TurboMerge / TurboUnmerge node semantics in numpy (float32 arithmetic, like the PyTorch merge).

The ONNX Runtime implementations of the nodes (``ort_ops.py``) call these; the kernels are tested against
``turbo_export.core.merge`` directly. Ties in E are broken by the lower A index (ONNX TopK's rule).
"""

from __future__ import annotations

import numpy as np


def turbo_merge(x: np.ndarray, size: np.ndarray, metric: np.ndarray, semantic: np.ndarray, a_idx: np.ndarray,
                b_idx: np.ndarray, r: int, alpha: float, protected: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x [B,N,C], size [B,N,1], metric [B,N,D], semantic [B,N], a_idx [Na], b_idx [Nb] ->
    x [B,N-r,C], size [B,N-r,1], unm [B,Na-r], src [B,r], dst [B,r] (int32)."""
    a_idx = np.asarray(a_idx, dtype=np.int64)
    b_idx = np.asarray(b_idx, dtype=np.int64)
    dtype = x.dtype
    x32, s32 = x.astype(np.float32), size.astype(np.float32)
    k = metric.astype(np.float32)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True).astype(np.float32)
    scores = k[:, a_idx] @ np.swapaxes(k[:, b_idx], -1, -2)  # [B, Na, Nb]
    scores[..., b_idx < protected] = -np.inf
    redundancy = scores.max(axis=-1)
    dst_all = scores.argmax(axis=-1)
    degree = redundancy - np.float32(alpha) * semantic.astype(np.float32)[:, a_idx] if alpha != 0 else redundancy
    degree = np.where(a_idx[None, :] < protected, -np.inf, degree).astype(np.float32)

    batch, num_a = degree.shape
    positions = np.arange(num_a)
    out_x, out_s, unms, srcs, dsts = [], [], [], [], []
    for n in range(batch):
        order = np.lexsort((positions, -degree[n]))  # descending E, lower index first
        src, unm = order[:r], np.sort(order[r:])
        dst = dst_all[n, src]
        weighted = x32[n] * s32[n]
        b_sum, b_size = weighted[b_idx].copy(), s32[n, b_idx].copy()
        for a, d in zip(src, dst):  # one source at a time, in the sources' order (PyTorch's scatter order)
            b_sum[d] += weighted[a_idx[a]]
            b_size[d] += s32[n, a_idx[a]]
        unm_rows = a_idx[unm]
        out_x.append(np.concatenate([weighted[unm_rows] / s32[n, unm_rows], b_sum / b_size]))
        out_s.append(np.concatenate([s32[n, unm_rows], b_size]))
        unms.append(unm)
        srcs.append(src)
        dsts.append(dst)
    return (np.stack(out_x).astype(dtype), np.stack(out_s).astype(size.dtype), np.stack(unms).astype(np.int32),
            np.stack(srcs).astype(np.int32).reshape(batch, r), np.stack(dsts).astype(np.int32).reshape(batch, r))


def turbo_unmerge(x: np.ndarray, unm: np.ndarray, src: np.ndarray, dst: np.ndarray, a_idx: np.ndarray,
                  b_idx: np.ndarray) -> np.ndarray:
    """[B, N-r, C] -> [B, N, C]: unmerged A tokens and B tokens get their row back, each source its destination's."""
    a_idx = np.asarray(a_idx, dtype=np.int64)
    b_idx = np.asarray(b_idx, dtype=np.int64)
    batch, _, channels = x.shape
    num_unm = unm.shape[1]
    out = np.zeros((batch, len(a_idx) + len(b_idx), channels), dtype=x.dtype)
    for n in range(batch):
        out[n, a_idx[unm[n]]] = x[n, :num_unm]
        out[n, b_idx] = x[n, num_unm:]
        out[n, a_idx[src[n]]] = x[n, num_unm + dst[n]]
    return out
