"""Triton kernels of the TurboMerge / TurboUnmerge nodes, written once as plain functions.

The same function becomes a ``JITFunction`` (CUDA tensors, and ``triton.compile`` for the plugin's
ahead-of-time PTX) or an ``InterpretedFunction`` (CPU tensors, Triton's interpreter: the tests here); the
interpreter needs ``TRITON_INTERPRET=1`` set before triton is first imported (Triton's own library functions
are only interpretable then). See ``jit_kernel`` / ``interpreted_kernel`` / ``kernel_for``.

Argument order is TensorRT's AOT plugin calling convention: input pointers, then int32 scalars, then output
pointers, then the compile-time constants (attributes and block sizes).

Node semantics (``reference.py`` is the numpy statement of them, ``turbo_export.core.merge`` the PyTorch one):
A tokens are the rows ``a_idx`` of the sequence, B tokens the rows ``b_idx`` (ViT: even / odd positions;
the UNet: a fixed destination per 2x2 cell). A token is protected when its row is below ``PROTECTED``:
never a source (A) and never a destination (B). Per A token: R = max cosine to the B tokens, dst = argmax
(lowest B index on a tie),
E = R - ALPHA * I (I read at the A token's row); the R_ A tokens with the largest E are the sources, ties
broken by the lower A index (ONNX TopK's rule), listed in descending E. Output rows: the unmerged A tokens in
A order, then every B token, each B the size-weighted average of itself and its sources.

One program per (sample, channel block): every program recomputes the sample's matching (the metric is the
small head-averaged key, [N, D]) so that no second kernel or global synchronisation is needed; channel
block 0 also writes the sizes and the plan. Only full-length vectors over A (BLOCK_A = next power of two
>= |A|) stay in registers; the 2-D work loops over tiles: A x TILE_B cosine scores (running max / argmax per A
token), TILE_J x A rank counts (descending E, the tile's E picked out of the full vector), TILE_J unmerged
rows at a time, TILE_M x BLOCK_C B sums (the sources added one at a time in their order, as PyTorch's
scatter_reduce does, so float32 results are bit-identical). Register use therefore grows with |A|, not |A|^2.
Measured (``scripts/measure_plugin_kernel.py``, plugins/README.md "Size limit"): up to a 2048-row A vector the
kernel builds in ~5 s for sm_80 and sm_90 with ~128 registers and no spills; a 4096-row vector (SD 1.5 at
512 px, 3072 / 1024) builds without spills but at the 255-register cap.
``turbo_export.core.plugin_ops.check_plugin_sizes`` refuses more than 2048 tokens per side at export.
Everything accumulates in float32 (no TF32); fp16 inputs and outputs are cast.
"""

from __future__ import annotations

import os
from typing import Any

import triton
import triton.language as tl


def turbo_merge_kernel(
    X, S, K, SEM, A_IDX, B_IDX,
    n_tokens, channels, dim, num_a, num_b,
    X_OUT, S_OUT, UNM, SRC, DST,
    R_: tl.constexpr, ALPHA: tl.constexpr, PROTECTED: tl.constexpr,
    BLOCK_A: tl.constexpr, TILE_B: tl.constexpr, TILE_J: tl.constexpr, TILE_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    cblock = tl.program_id(1)
    ia = tl.arange(0, BLOCK_A)
    va = ia < num_a
    rows_a = tl.load(A_IDX + ia, mask=va, other=0)

    # matching: per A token, the best cosine over the B tokens, one TILE_B-column tile at a time (running max,
    # strict > so the lowest B index wins a tie); each tile's scores are outer products summed over the metric
    # channels (no tl.dot, whose fp32 "ieee" lowering unrolls into megabytes of PTX and stages its operands in
    # shared memory)
    k_base = K + sample * n_tokens * dim
    sq_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    for d in range(0, dim):
        col_a = tl.load(k_base + rows_a * dim + d, mask=va, other=0.0).to(tl.float32)
        sq_a += col_a * col_a
    norm_a = tl.where(va, tl.sqrt(sq_a), 1.0)
    redundancy = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    dst = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, num_b, TILE_B):
        ib = b0 + tl.arange(0, TILE_B)
        vb = ib < num_b
        rows_b = tl.load(B_IDX + ib, mask=vb, other=0)
        sq_b = tl.zeros([TILE_B], dtype=tl.float32)
        for d in range(0, dim):
            col_b = tl.load(k_base + rows_b * dim + d, mask=vb, other=0.0).to(tl.float32)
            sq_b += col_b * col_b
        norm_b = tl.where(vb, tl.sqrt(sq_b), 1.0)
        scores = tl.zeros([BLOCK_A, TILE_B], dtype=tl.float32)
        for d in range(0, dim):
            col_a = tl.load(k_base + rows_a * dim + d, mask=va, other=0.0).to(tl.float32) / norm_a
            col_b = tl.load(k_base + rows_b * dim + d, mask=vb, other=0.0).to(tl.float32) / norm_b
            scores += col_a[:, None] * col_b[None, :]
        allowed_b = vb & (rows_b >= PROTECTED)
        scores = tl.where(allowed_b[None, :], scores, float("-inf"))
        tile_max = tl.max(scores, axis=1)
        tile_arg = tl.argmax(scores, axis=1).to(tl.int32) + b0
        better = tile_max > redundancy
        redundancy = tl.where(better, tile_max, redundancy)
        dst = tl.where(better, tile_arg, dst)

    degree = redundancy
    if ALPHA != 0.0:
        sem = tl.load(SEM + sample * n_tokens + rows_a, mask=va, other=0.0).to(tl.float32)
        degree = redundancy - ALPHA * sem
    degree = tl.where(rows_a < PROTECTED, float("-inf"), degree)

    # selection: rank of every A token by descending E (lower index first on ties), counted against TILE_J
    # A tokens at a time (their E picked out of the full vector); sources = rank < R_
    rank = tl.zeros([BLOCK_A], dtype=tl.int32)
    for j0 in range(0, num_a, TILE_J):
        ij = j0 + tl.arange(0, TILE_J)
        e_j = tl.max(tl.where(ij[:, None] == ia[None, :], degree[None, :], float("-inf")), axis=1)
        e_other = e_j[:, None]
        e_self = degree[None, :]
        beats = ((e_other > e_self) | ((e_other == e_self) & (ij[:, None] < ia[None, :]))) & (ij < num_a)[:, None]
        rank += tl.sum(beats.to(tl.int32), axis=0)
    is_src = (rank < R_) & va

    num_unm = num_a - R_
    n_out = n_tokens - R_
    if cblock == 0:
        tl.store(SRC + sample * R_ + rank, ia, mask=is_src)
        tl.store(DST + sample * R_ + rank, dst, mask=is_src)

    ic = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    vc = ic < channels
    x_base = X + sample * n_tokens * channels
    out_base = X_OUT + sample * n_out * channels
    s_base = S_OUT + sample * n_out

    # unmerged A tokens, TILE_J at a time: output position = A index - number of sources before it
    src_flag = is_src.to(tl.int32)
    for i0 in range(0, num_a, TILE_J):
        ii = i0 + tl.arange(0, TILE_J)
        vi = ii < num_a
        src_i = tl.max(tl.where(ii[:, None] == ia[None, :], src_flag[None, :], 0), axis=1)
        src_before = tl.sum(tl.where(ia[None, :] < ii[:, None], src_flag[None, :], 0), axis=1)
        unm_i = vi & (src_i == 0)
        unm_pos = ii - src_before
        rows_i = tl.load(A_IDX + ii, mask=vi, other=0)
        s_i = tl.load(S + sample * n_tokens + rows_i, mask=vi, other=1.0).to(tl.float32)
        x_i = tl.load(x_base + rows_i[:, None] * channels + ic[None, :], mask=unm_i[:, None] & vc[None, :],
                      other=0.0).to(tl.float32)
        tl.store(out_base + unm_pos[:, None] * channels + ic[None, :],
                 (x_i * s_i[:, None] / s_i[:, None]).to(X_OUT.dtype.element_ty), mask=unm_i[:, None] & vc[None, :])
        if cblock == 0:
            tl.store(UNM + sample * num_unm + unm_pos, ii, mask=unm_i)
            tl.store(s_base + unm_pos, s_i.to(S_OUT.dtype.element_ty), mask=unm_i)

    # merge: size-weighted sum of each B token and its sources (added one source at a time, in the sources'
    # order, as PyTorch's scatter_reduce does), divided by the summed size; TILE_M B tokens at a time
    for b0 in range(0, num_b, TILE_M):
        ib = b0 + tl.arange(0, TILE_M)
        vb = ib < num_b
        rows_b = tl.load(B_IDX + ib, mask=vb, other=0)
        xb = tl.load(x_base + rows_b[:, None] * channels + ic[None, :], mask=vb[:, None] & vc[None, :], other=0.0)
        sb = tl.load(S + sample * n_tokens + rows_b, mask=vb, other=1.0).to(tl.float32)
        b_sum = xb.to(tl.float32) * sb[:, None]
        b_size = sb
        for q in range(0, R_):
            pick = is_src & (rank == q)
            target = tl.sum(tl.where(pick, dst, 0), axis=0)
            if (target >= b0) & (target < b0 + TILE_M):
                row = tl.sum(tl.where(pick, rows_a, 0), axis=0)
                s_q = tl.load(S + sample * n_tokens + row).to(tl.float32)
                x_q = tl.load(x_base + row * channels + ic, mask=vc, other=0.0).to(tl.float32) * s_q
                hit = ib == target
                b_sum += tl.where(hit[:, None], x_q[None, :], 0.0)
                b_size += tl.where(hit, s_q, 0.0)
        tl.store(out_base + (num_unm + ib)[:, None] * channels + ic[None, :],
                 (b_sum / b_size[:, None]).to(X_OUT.dtype.element_ty), mask=vb[:, None] & vc[None, :])
        if cblock == 0:
            tl.store(s_base + num_unm + ib, b_size.to(S_OUT.dtype.element_ty), mask=vb)


def turbo_unmerge_kernel(
    XM, UNM, SRC, DST, A_IDX, B_IDX,
    n_tokens, channels, num_a, num_b, r,
    X_OUT,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Restore [N - r, C] -> [N, C]: every output row gathers one merged row (sources: their destination's)."""
    sample = tl.program_id(0).to(tl.int64)
    it = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # task t: 0..N-1
    ic = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    vc = ic < channels
    num_unm = num_a - r
    n_merged = n_tokens - r
    is_unm = it < num_unm
    is_src = (it >= num_unm) & (it < num_a)
    is_b = (it >= num_a) & (it < n_tokens)

    unm = tl.load(UNM + sample * num_unm + it, mask=is_unm, other=0)
    q = it - num_unm
    src = tl.load(SRC + sample * r + q, mask=is_src, other=0)
    dst = tl.load(DST + sample * r + q, mask=is_src, other=0)
    j = it - num_a
    a_token = tl.where(is_unm, unm, src)
    a_row = tl.load(A_IDX + a_token, mask=is_unm | is_src, other=0)
    b_row = tl.load(B_IDX + j, mask=is_b, other=0)
    target = tl.where(is_b, b_row, a_row)
    source = tl.where(is_unm, it, tl.where(is_src, num_unm + dst, num_unm + j))

    valid = (is_unm | is_src | is_b)[:, None] & vc[None, :]
    values = tl.load(XM + sample * n_merged * channels + source[:, None] * channels + ic[None, :], mask=valid)
    tl.store(X_OUT + sample * n_tokens * channels + target[:, None] * channels + ic[None, :], values, mask=valid)


MERGE_WARPS = 8
UNMERGE_WARPS = 4


def block(n: int, minimum: int = 16) -> int:
    """The power-of-two tile covering n (at least 16)."""
    return max(minimum, triton.next_power_of_2(int(n)))


TILE_ELEMENTS = 4096  # a 2-D tile of 4096 floats is 16 registers per thread at 8 warps


def merge_blocks(num_a: int, num_b: int, dim: int, channels: int) -> dict[str, int]:
    """Full A vector (BLOCK_A) plus the 2-D tiles: A x TILE_B scores, TILE_J x A rank counts, TILE_M x BLOCK_C sums."""
    block_a = block(num_a)
    block_c = min(64, block(channels))
    across_a = max(2, min(32, TILE_ELEMENTS // block_a))
    return {"BLOCK_A": block_a, "TILE_B": min(across_a, block(num_b)), "TILE_J": across_a,
            "TILE_M": min(block(num_b), max(16, TILE_ELEMENTS // block_c)), "BLOCK_C": block_c}


def unmerge_blocks(channels: int) -> dict[str, int]:
    return {"BLOCK_T": 32, "BLOCK_C": min(128, block(channels))}


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_CACHE: dict[tuple[str, bool], Any] = {}


def jit_kernel(fn) -> Any:
    """A JITFunction, whatever TRITON_INTERPRET says (``triton.compile`` needs one for the AOT PTX)."""
    key = (fn.__name__, False)
    if key not in _CACHE:
        from triton.runtime.jit import JITFunction

        _CACHE[key] = JITFunction(fn)
    return _CACHE[key]


def interpreted_kernel(fn) -> Any:
    """An InterpretedFunction: runs the kernel on CPU tensors with numpy (tests, machines without a GPU)."""
    key = (fn.__name__, True)
    if key not in _CACHE:
        from triton.runtime.interpreter import InterpretedFunction

        _CACHE[key] = InterpretedFunction(fn)
    return _CACHE[key]


def kernel_for(fn, device_type: str) -> Any:
    if device_type != "cpu":
        return jit_kernel(fn)
    if not interpret_requested():
        raise RuntimeError("the Turbo kernels run on CPU tensors only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    return interpreted_kernel(fn)


def alternate_split(n_tokens: int) -> tuple["np.ndarray", "np.ndarray"]:
    """ViT's split as index lists: A = rows 0, 2, 4, ..., B = rows 1, 3, 5, ... (int32)."""
    import numpy as np

    return np.arange(0, n_tokens, 2, dtype=np.int32), np.arange(1, n_tokens, 2, dtype=np.int32)


def launch_merge(x, size, metric, semantic, a_idx, b_idx, r: int, alpha: float, protected: int, out=None):
    """Run the merge kernel on torch tensors (CUDA: compiled; CPU: interpreted).

    x [B, N, C], size [B, N, 1], metric [B, N, D], semantic [B, N], a_idx / b_idx int32 [Na] / [Nb].
    Returns x [B, N-r, C], size [B, N-r, 1], unm [B, Na-r], src [B, r], dst [B, r] (int32), written into
    ``out`` (five contiguous tensors, e.g. TensorRT's output buffers) when given.
    """
    import torch

    batch, n_tokens, channels = x.shape
    dim = metric.shape[-1]
    num_a, num_b = int(a_idx.shape[0]), int(b_idx.shape[0])
    x, size, metric, semantic = (t.contiguous() for t in (x, size, metric, semantic))
    a_idx = a_idx.to(device=x.device, dtype=torch.int32).contiguous()
    b_idx = b_idx.to(device=x.device, dtype=torch.int32).contiguous()
    if out is None:
        index = dict(dtype=torch.int32, device=x.device)
        out = (x.new_empty(batch, n_tokens - r, channels), size.new_empty(batch, n_tokens - r, 1),
               torch.empty(batch, num_a - r, **index), torch.empty(batch, r, **index), torch.empty(batch, r, **index))
    x_out, s_out, unm, src, dst = out
    blocks = merge_blocks(num_a, num_b, dim, channels)
    grid = (batch, triton.cdiv(channels, blocks["BLOCK_C"]))
    kernel = kernel_for(turbo_merge_kernel, x.device.type)
    kernel[grid](x, size, metric, semantic, a_idx, b_idx, n_tokens, channels, dim, num_a, num_b,
                 x_out, s_out, unm, src, dst, R_=int(r), ALPHA=float(alpha), PROTECTED=int(protected),
                 num_warps=MERGE_WARPS, **blocks)
    return x_out, s_out, unm, src, dst


def launch_unmerge(x_merged, unm, src, dst, a_idx, b_idx, out=None):
    """Run the unmerge kernel: [B, N-r, C] -> [B, N, C] with N = |a_idx| + |b_idx|."""
    import torch

    batch, n_merged, channels = x_merged.shape
    num_a, num_b = int(a_idx.shape[0]), int(b_idx.shape[0])
    n_tokens = num_a + num_b
    r = n_tokens - n_merged
    x_merged = x_merged.contiguous()
    args = [t.to(device=x_merged.device, dtype=torch.int32).contiguous() for t in (unm, src, dst, a_idx, b_idx)]
    if out is None:
        out = x_merged.new_empty(batch, n_tokens, channels)
    blocks = unmerge_blocks(channels)
    grid = (batch, triton.cdiv(n_tokens, blocks["BLOCK_T"]), triton.cdiv(channels, blocks["BLOCK_C"]))
    kernel = kernel_for(turbo_unmerge_kernel, x_merged.device.type)
    kernel[grid](x_merged, *args, n_tokens, channels, num_a, num_b, r, out, num_warps=UNMERGE_WARPS, **blocks)
    return out
