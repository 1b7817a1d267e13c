"""Where the plugin's merge kernel stops being viable: compile its AOT PTX (and ptxas' cubin) at growing sizes.

  python scripts/measure_plugin_kernel.py [--arch 80 90] [--timeout 300] [--cases vit-b16-224,sd-512] [--ptx-only]

Each case compiles in its own subprocess (fresh Triton cache, ``timeout``, under the shared timing lock), exactly
as ``aot.compile_merge`` does (fp32, 8 warps, no FMA contraction), and reports one JSON line: wall time of
``triton.compile`` (Triton -> PTX -> ptxas cubin), PTX size, the PTX's ``.local`` declarations and ``ld.local`` /
``st.local`` counts, and ptxas' own resource report (registers, stack frame, spill stores / loads, ptxas' compile
time) from ``TRITON_DUMP_PTXAS_LOG``. No GPU needed (Triton ships ptxas). Growing stops at the first failure
or timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

LOCK = "/tmp/turbo-bench.lock"  # the shared timing lock, held for each compile
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# name: (num_a, num_b, metric width D, channels C, r)
CASES = {
    "vit-b16-224": (99, 98, 64, 768, 16),  # 197 tokens (ViT-B/16 and ViT-L/16 at 224 px share the tiles)
    "dinov2-s14-224": (129, 128, 64, 384, 16),  # 257 tokens: the first 256-row A vector
    "256x256": (256, 256, 64, 768, 16),
    "vit-l14-336": (289, 288, 64, 1024, 16),  # 577 tokens (also ViT-B/16 at 384 px)
    "512x512": (512, 512, 64, 1024, 16),
    "577x576": (577, 576, 64, 1024, 16),  # 1153 tokens: the first 1024-row A vector
    "1024x1024": (1024, 1024, 64, 1024, 16),
    "1025x1024": (1025, 1024, 64, 1024, 16),  # the first 2048-row A vector
    "2048x2048": (2048, 2048, 64, 1024, 16),
    "2049x2048": (2049, 2048, 64, 1024, 16),  # the first 4096-row A vector
    "sd-512": (3072, 1024, 320, 320, 1536),  # SD 1.5 at 512 px: 64x64 latent, 2x2 grid, ratio 0.5
}

UNMERGE_CASES = {"unmerge-c320": 320, "unmerge-c1280": 1280}  # TurboUnmerge: channels only


def one(case: str, arch: int, ptx_only: bool = False) -> dict:
    if ptx_only:  # stop after Triton's PTX (what aot_impl hands TensorRT): skip ptxas
        from triton.backends.nvidia.compiler import CUDABackend

        CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "plugins"))
    from turbo_plugin import aot, kernels

    if case in UNMERGE_CASES:  # per-token tiles: nothing depends on the token counts
        start = time.perf_counter()
        ck = aot.compile_unmerge("fp32", UNMERGE_CASES[case], target=arch)
        return {"seconds": round(time.perf_counter() - start, 1), "ptx_bytes": len(ck.ptx), "blocks": ck.blocks,
                "ptx_ld_local": ck.ptx.count("ld.local"), "ptx_st_local": ck.ptx.count("st.local"),
                "shared": ck.shared}
    num_a, num_b, dim, channels, r = CASES[case]
    t = "fp32"
    signature = {"X": f"*{t}", "S": f"*{t}", "K": f"*{t}", "SEM": f"*{t}", "A_IDX": "*i32", "B_IDX": "*i32",
                 "n_tokens": "i32", "channels": "i32", "dim": "i32", "num_a": "i32", "num_b": "i32",
                 "X_OUT": f"*{t}", "S_OUT": f"*{t}", "UNM": "*i32", "SRC": "*i32", "DST": "*i32"}
    blocks = kernels.merge_blocks(num_a, num_b, dim, channels)
    constexprs = {"R_": r, "ALPHA": 6.0, "PROTECTED": 1, **blocks}
    start = time.perf_counter()
    compiled = aot._compile(kernels.turbo_merge_kernel, signature, constexprs, kernels.MERGE_WARPS, arch)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    return {"seconds": round(seconds, 1), "ptx_bytes": len(ptx), "blocks": blocks,
            "ptx_local_decls": len(re.findall(r"^\s*\.local\b", ptx, re.M)),
            "ptx_ld_local": ptx.count("ld.local"), "ptx_st_local": ptx.count("st.local"),
            "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm.get("cubin", b""))}


def parse_ptxas(log: str) -> dict:
    out = {}
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
    if m := re.search(r"Used (\d+) registers", log):
        out["registers"] = int(m[1])
    if m := re.search(r"Compile time = ([\d.]+) ms", log):
        out["ptxas_seconds"] = round(float(m[1]) / 1000, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--cases", default=",".join([*UNMERGE_CASES, *CASES]))
    p.add_argument("--ptx-only", action="store_true", help="Triton -> PTX only (no ptxas): PTX time and size")
    p.add_argument("--one", nargs=2, metavar=("CASE", "ARCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], int(args.one[1]), args.ptx_only)), flush=True)
        return
    for arch in args.arch:
        for case in args.cases.split(","):
            row = {"case": case, "arch": f"sm_{arch}", "ptx_only": args.ptx_only}
            if case in CASES:
                row.update(zip(("num_a", "num_b", "dim", "channels", "r"), CASES[case]))
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TRITON_CACHE_DIR": cache, "TRITON_DUMP_PTXAS_LOG": "1"}
                start = time.perf_counter()
                command = ["flock", LOCK, "timeout", str(args.timeout), sys.executable, __file__, "--one", case,
                           str(arch)] + (["--ptx-only"] if args.ptx_only else [])
                proc = subprocess.run(command, env=env, capture_output=True, text=True)
                row["process_seconds"] = round(time.perf_counter() - start, 1)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode == 0 and result:
                row.update(json.loads(result[-1][len("RESULT "):]))
                row.update(parse_ptxas(proc.stdout))
            else:
                row["failed"] = "timeout" if proc.returncode == 124 else f"exit {proc.returncode}"
                row["stderr_tail"] = (proc.stderr or proc.stdout)[-400:]
            print(json.dumps(row), flush=True)
            if "failed" in row:  # the next, larger case would fail too
                break


if __name__ == "__main__":
    main()
