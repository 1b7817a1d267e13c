"""Ahead-of-time compilation of the Turbo kernels to PTX (what the TensorRT plugin embeds in an engine).

Needs no GPU: ``triton.compile`` with an explicit ``GPUTarget`` (sm_80, sm_90, ...). Without a target it
compiles for the visible GPU, which is what ``@trtp.aot_impl`` does at engine-build time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from . import kernels

DTYPES = {"fp32": "fp32", "fp16": "fp16", "float32": "fp32", "float16": "fp16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int  # bytes of dynamic shared memory
    blocks: dict
    target: Any

    @property
    def block_x(self) -> int:
        return self.num_warps * 32


def _compile(fn, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int, target) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernels.jit_kernel(fn)
    names = list(jit.arg_names)
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=jit, signature={n: full[n] for n in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    if isinstance(target, int):
        target = GPUTarget("cuda", target, 32)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}  # no FMA contraction: rounding as on CPU
    compiled = triton.compile(src, target=target, options=options) if target is not None else \
        triton.compile(src, options=options)
    meta = compiled.metadata
    # TensorRT launches the kernel with exactly the node's pointers and the int32 scalars; Triton's trailing
    # scratch-buffer parameters are then null, which is only correct while the kernel needs no scratch memory.
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, field, 0):
            raise RuntimeError(f"{meta.name}: Triton asks for {field}={getattr(meta, field)}; the TensorRT AOT "
                               "launch passes no scratch buffer")
    return compiled


@functools.lru_cache(maxsize=None)
def compile_merge(dtype: str, r: int, alpha: float, protected: int, num_a: int, num_b: int, dim: int,
                  channels: int, target=None) -> CompiledKernel:
    """PTX of the merge kernel for one node (its attributes and static token counts are compile-time)."""
    t = DTYPES[dtype]
    signature = {"X": f"*{t}", "S": f"*{t}", "K": f"*{t}", "SEM": f"*{t}", "A_IDX": "*i32", "B_IDX": "*i32",
                 "n_tokens": "i32", "channels": "i32", "dim": "i32", "num_a": "i32", "num_b": "i32",
                 "X_OUT": f"*{t}", "S_OUT": f"*{t}", "UNM": "*i32", "SRC": "*i32", "DST": "*i32"}
    blocks = kernels.merge_blocks(num_a, num_b, dim, channels)
    constexprs = {"R_": int(r), "ALPHA": float(alpha), "PROTECTED": int(protected), **blocks}
    compiled = _compile(kernels.turbo_merge_kernel, signature, constexprs, kernels.MERGE_WARPS, target)
    return CompiledKernel(compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps,
                          compiled.metadata.shared, blocks, compiled.metadata.target)


@functools.lru_cache(maxsize=None)
def compile_unmerge(dtype: str, channels: int, target=None) -> CompiledKernel:
    t = DTYPES[dtype]
    signature = {"XM": f"*{t}", "UNM": "*i32", "SRC": "*i32", "DST": "*i32", "A_IDX": "*i32", "B_IDX": "*i32",
                 "n_tokens": "i32", "channels": "i32", "num_a": "i32", "num_b": "i32", "r": "i32",
                 "X_OUT": f"*{t}"}
    blocks = kernels.unmerge_blocks(channels)
    compiled = _compile(kernels.turbo_unmerge_kernel, signature, blocks, kernels.UNMERGE_WARPS, target)
    return CompiledKernel(compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps,
                          compiled.metadata.shared, blocks, compiled.metadata.target)
