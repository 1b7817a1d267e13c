"""One GPU check of Turbo on a CUDA machine: writes one JSON file (issue 14, item 6).

  bash scripts/gpu_check.sh                      # the real run (CUDA); ~3 minutes, hard cap < 6
  python scripts/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json   # the same code paths, tiny, on CPU

What it measures (each section runs in its own subprocess with a hard timeout; a section that fails or times out
is recorded as {"error": "<one line>", ...} with whatever it had measured by then, and the JSON is always written):

environment
    Python / torch / triton / transformers / onnx / onnxruntime versions, which optional packages are missing,
    the GPU (name, compute capability, memory, driver), the repository commit.
kernels
    The Triton TurboMerge / TurboUnmerge kernels (plugins/turbo_plugin/kernels.py) compiled for the GPU, against
    the PyTorch merge (turbo_export.merge) on the same fp16-rounded inputs: max abs error of merged tokens, sizes
    and restored tokens, whether the plans (unm / src / dst) are equal and whether the outputs are bit-equal to
    the PyTorch merge computed on CPU in float32 (the kernel accumulates in float32 in PyTorch's scatter order, so
    they should be) and on the GPU; ViT-B/16 (64 x 197 x 768, r = 16), BLIP base (577 tokens), the small shapes
    of scripts/check_plugin.py, exact ties (vs the numpy reference) and one UNet 2x2-grid split; fp32 and fp16.
    Timing (CUDA events, warm-up, median of repeats; Python launch overhead included) of the kernel merge and
    unmerge, of the PyTorch merge, and of one ViT-B block forward (batch 64, 197 tokens, fp16, eager and SDPA
    attention), with the kernel's time as a fraction of one block.
throughput
    ViT-B/16 (transformers ViTForImageClassification, random weights, the random:vit-base-patch16-224 config),
    batch 64, fp16, CUDA: unaccelerated with eager attention, unaccelerated with SDPA, and Turbo r = 16 through the
    public ``turbo_export.apply_turbo``. Interleaved timing rounds after warm-up: images/s median / min / max,
    host (enqueue) time per batch, speedups of Turbo over eager and SDPA, the analytic FLOPs ratio, output
    agreement (max abs diff / cosine of logits vs the unaccelerated model), and Turbo on CUDA vs Turbo on CPU in
    float32 (TF32 off) for a small batch: logits difference and whether every block's merge plan is equal.
    fp32 is measured too when Turbo fails in fp16.
pytest_gpu
    ``python -m pytest -m gpu -q -rsfE -p no:cacheprovider --continue-on-collection-errors tests``: the summary line,
    counts, skip reasons, collection errors.

``--cpu-smoke`` (or GPU_CHECK_CPU_SMOKE=1) runs every section on CPU with tiny sizes and the kernels under Triton's
interpreter (TRITON_INTERPRET=1): for checking the code paths on a machine without a GPU; its numbers mean nothing.
Output: --out, else $OUT/gpu_check.json when OUT is set, else ./gpu_check.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
for _path in (ROOT / "plugins", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# (section, timeout cap in seconds); the caps add up to the default overall budget (330 s)
SECTIONS: tuple[tuple[str, int], ...] = (("environment", 25), ("kernels", 120), ("throughput", 110),
                                         ("pytest_gpu", 75))
DEFAULT_BUDGET_S = 330

Case = tuple[int, int, int, int, int, float, int]  # (batch, tokens, channels, metric width, r, alpha, protected)

VIT_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               image_size=224, patch_size=16, num_labels=1000)  # random:vit-base-patch16-224 (presets.py)
VIT_TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                image_size=32, patch_size=4, num_labels=10)  # random:tiny


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the CUDA run and the CPU smoke run."""

    device: str
    kernel_cases: tuple[tuple[str, Case], ...]
    timed_cases: tuple[tuple[str, str], ...]  # (kernel case name, dtype) timed
    tie_tokens: tuple[int, ...]
    grid_case: tuple[int, int, int, int, float, float]  # (batch, height, width, channels, ratio, alpha)
    vit: dict[str, int] = field(default_factory=dict)
    batch: int = 64
    ratio: int = 16
    cross_batch: int = 4  # Turbo on the GPU vs on CPU
    warmup: int = 3
    rounds: int = 9
    iters: int = 15  # forwards per timed round
    op_warmup: int = 3
    op_repeats: int = 5
    op_iters: int = 20


CUDA_SIZES = Sizes(
    device="cuda",
    kernel_cases=(
        ("vit-b16-224", (64, 197, 768, 64, 16, 6.0, 1)),
        ("blip-base-384", (32, 577, 768, 64, 16, 6.0, 1)),
        ("small-21", (2, 21, 24, 8, 6, 6.0, 1)),  # scripts/check_plugin.py KERNEL_CASES from here on
        ("tome-even-ragged-channels", (2, 20, 70, 5, 5, 0.0, 2)),
        ("nothing-protected-max-r", (3, 17, 16, 16, 8, 3.0, 0)),
        ("dinov2-s14-tiles", (2, 257, 24, 6, 40, 6.0, 1)),
    ),
    timed_cases=(("vit-b16-224", "float16"), ("vit-b16-224", "float32"), ("blip-base-384", "float16")),
    tie_tokens=(13, 577),
    grid_case=(2, 32, 32, 320, 0.5, 0.0),
    vit=VIT_B16,
)
SMOKE_SIZES = Sizes(
    device="cpu",
    kernel_cases=(("vit-b16-224", (2, 21, 24, 8, 6, 6.0, 1)), ("blip-base-384", (1, 37, 16, 4, 8, 0.0, 1))),
    timed_cases=(("vit-b16-224", "float16"), ("vit-b16-224", "float32")),
    tie_tokens=(13,),
    grid_case=(1, 6, 6, 16, 0.5, 0.0),
    vit=VIT_TINY, batch=4, ratio=8, cross_batch=2,
    warmup=1, rounds=2, iters=2, op_warmup=1, op_repeats=2, op_iters=1,
)


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------

def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def error_entry(exc: BaseException) -> dict[str, str]:
    """{"error": one line, "where": the innermost frame}."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return {"error": one_line(exc), "where": where}


def jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats as strings, tuples as lists, floats rounded to 6 significant digits."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write, so a section killed mid-write leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=1) + "\n")
    os.replace(tmp, path)


def find_module(preferred: str, *names: str) -> ModuleType:
    """Import ``preferred``; if it has moved (turbo_export is being split into sub-packages), the module under
    turbo_export/ whose source defines every one of ``names``."""
    with contextlib.suppress(ImportError):
        module = importlib.import_module(preferred)
        if all(hasattr(module, n) for n in names):
            return module
    for path in sorted((ROOT / "turbo_export").rglob("*.py")):
        text = path.read_text(errors="replace")
        if all(re.search(rf"^def {n}\(", text, re.M) for n in names):
            return importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    raise ImportError(f"no module under turbo_export/ defines {', '.join(names)}")


class Recorder:
    """A section's results, rewritten to disk after every step so that a timeout keeps what was measured."""

    def __init__(self, path: Path, deadline: float):
        self.path = path
        self.deadline = deadline
        self.data: dict[str, Any] = {}

    def put(self, keys: tuple[str, ...], value: Any) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        write_json(self.path, self.data)

    def step(self, keys: tuple[str, ...], fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` guarded: its value, or {"error": ...}, or {"skipped": ...} when the section's time is
        up (recorded under ``keys`` and returned; None unless the step succeeded)."""
        if time.time() > self.deadline - 3.0:
            self.put(keys, {"skipped": "out of time"})
            return None
        try:
            value = fn(*args)
        except Exception as exc:  # noqa: BLE001 - every failure is a result here
            self.put(keys, error_entry(exc))
            return None
        self.put(keys, value)
        return value


def device_for(sizes: Sizes) -> torch.device:
    import torch

    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch (use --cpu-smoke to check the code paths on CPU)")
    return torch.device(sizes.device)


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
              iters: int) -> dict[str, float]:
    """Milliseconds per call: ``iters`` back-to-back calls between CUDA events (perf_counter on CPU), ``repeats``
    times after ``warmup`` calls; median / min / max over the repeats."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1000 / iters)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "repeats": repeats, "iters": iters}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the cosine between flattened outputs."""
    import torch

    a, b = a.double().cpu().flatten(1), b.double().cpu().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


# ---------------------------------------------------------------------------------------------------------------
# ViT models (transformers), shared by the kernels section (one block) and the throughput section
# ---------------------------------------------------------------------------------------------------------------

def build_vit(config: dict[str, int], num_layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    """ViTForImageClassification with seeded random weights and eager attention, float32, CPU, eval mode."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    settings = dict(config)
    if num_layers is not None:
        settings["num_hidden_layers"] = num_layers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTForImageClassification(ViTConfig(**settings))
    set_attention(model, "eager")
    return model.eval()


def set_attention(model: torch.nn.Module, impl: str) -> str:
    """Switch transformers' attention implementation; returns the one the config now names."""
    try:
        model.set_attn_implementation(impl)
    except Exception:  # noqa: BLE001 - older transformers: the config field is what the attention reads
        model.config._attn_implementation = impl
    return str(model.config._attn_implementation)


def vit_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    backbone = model.vit
    return backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer


def tokens_of(config: dict[str, int]) -> int:
    return (config["image_size"] // config["patch_size"]) ** 2 + 1


# ---------------------------------------------------------------------------------------------------------------
# section: environment
# ---------------------------------------------------------------------------------------------------------------

DISTRIBUTIONS = ("torch", "triton", "transformers", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "onnxruntime-extensions", "onnxscript", "diffusers", "click", "pytest", "tensorrt", "polygraphy",
                 "safetensors", "pillow")


def section_environment(rec: Recorder, sizes: Sizes) -> None:
    rec.put(("python",), sys.version.split()[0])
    rec.put(("platform",), platform.platform())
    rec.put(("cpu_count",), os.cpu_count())
    versions: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    rec.put(("versions",), versions)
    rec.put(("missing",), [d for d, v in versions.items() if v is None])
    rec.put(("env",), {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "TRITON_CACHE_DIR",
                                                     "PYTHONPATH", "HF_HUB_OFFLINE")})
    rec.step(("torch",), torch_info)
    rec.step(("triton",), triton_info)
    rec.step(("nvidia_smi",), nvidia_smi)
    rec.step(("git",), git_info)


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cuda_available": torch.cuda.is_available(), "devices": []}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(index)
            info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1),
                                    "multiprocessors": p.multi_processor_count})
    return info


def triton_info() -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {"version": triton.__version__}
    try:
        target = triton.runtime.driver.active.get_current_target()
        info["target"] = {"backend": target.backend, "arch": str(target.arch)}
    except Exception as exc:  # noqa: BLE001 - no GPU driver: recorded, not fatal
        info["target"] = error_entry(exc)
    return info


def nvidia_smi() -> str:
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
    return (done.stdout or done.stderr).strip()


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty_files": len(git("status", "--porcelain").splitlines())}


# ---------------------------------------------------------------------------------------------------------------
# section: kernels
# ---------------------------------------------------------------------------------------------------------------

def kernel_inputs(case: Case, seed: int) -> tuple[torch.Tensor, ...]:
    """x, size, metric, semantic on CPU in float32 (check_plugin.py's distributions)."""
    import torch

    batch, tokens, channels, dim, _, _, _ = case
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, channels, generator=g), torch.rand(batch, tokens, 1, generator=g) * 3 + 0.5,
            torch.randn(batch, tokens, dim, generator=g), torch.rand(batch, tokens, generator=g) * 0.05)


def compare_merge(got: tuple, restored: torch.Tensor, ref_x: torch.Tensor, ref_size: torch.Tensor,
                  ref_plan: tuple, ref_restored: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """Kernel outputs vs a float32 PyTorch merge: errors, plan equality, bit equality after casting to ``dtype``."""
    import torch

    x, size, unm, src, dst = (t.cpu() for t in got)
    restored = restored.cpu()
    ref = [t.cpu() for t in (ref_x, ref_size, ref_restored)]
    return {
        "x_max_abs_err": max_abs(x, ref[0]),
        "size_max_abs_err": max_abs(size, ref[1]),
        "unmerge_max_abs_err": max_abs(restored, ref[2]),
        "plan_equal": all(torch.equal(a.long(), b.cpu().long()) for a, b in zip((unm, src, dst), ref_plan)),
        "x_bit_equal": torch.equal(x, ref[0].to(dtype)),
        "size_bit_equal": torch.equal(size, ref[1].to(dtype)),
        "unmerge_bit_equal": torch.equal(restored, ref[2].to(dtype)),
    }


def kernel_case(kernels: ModuleType, merge: ModuleType, case: Case, dtype_name: str, seed: int,
                device: torch.device) -> dict[str, Any]:
    """One shape and dtype: kernel vs the PyTorch merge on CPU (float32) and on the device."""
    import torch

    dtype = getattr(torch, dtype_name)
    _, tokens, _, _, r, alpha, protected = case
    rounded = [t.to(dtype) for t in kernel_inputs(case, seed)]  # both sides see the same fp16-rounded values
    on_device = [t.to(device) for t in rounded]
    a_idx, b_idx = (torch.from_numpy(v).to(device) for v in kernels.alternate_split(tokens))
    start = time.perf_counter()
    got = kernels.launch_merge(*on_device, a_idx, b_idx, r, alpha, protected)
    restored = kernels.launch_unmerge(got[0], *got[2:], a_idx, b_idx)
    sync(device)
    out: dict[str, Any] = {"case": case, "first_call_s": round(time.perf_counter() - start, 2)}  # with the compile
    ref_x, ref_s, plan = merge.turbo_merge(*(t.float() for t in rounded), r, alpha, protected)
    out["vs_torch_cpu_fp32"] = compare_merge(got, restored, ref_x, ref_s, plan, merge.unmerge(plan, ref_x, tokens),
                                             dtype)
    if device.type != "cpu":
        ref_x, ref_s, plan = merge.turbo_merge(*(t.float() for t in on_device), r, alpha, protected)
        out["vs_torch_device_fp32"] = compare_merge(got, restored, ref_x, ref_s, plan,
                                                    merge.unmerge(plan, ref_x, tokens), dtype)
    return out


def kernel_ties(kernels: ModuleType, reference: ModuleType, tokens: int, device: torch.device) -> dict:
    """Exact ties in E and in the scores (repeated metric rows, zero semantic value) vs the numpy reference."""
    import numpy as np
    import torch

    x, size, metric, sem = kernel_inputs((1, tokens, 8, 4, 0, 0.0, 0), seed=3)
    if tokens <= 16:  # check_plugin.py's small case: every 4th token duplicates token 0
        metric[:, 2::4] = metric[:, 0:1]
        r = 3
    else:  # ten distinct rows repeated: equal scores span the B tiles, equal E the rank tiles
        metric[:] = metric[:, torch.arange(tokens) % 10]
        r = min(100, (tokens - 1) // 2)
    sem.zero_()
    a_np, b_np = kernels.alternate_split(tokens)
    args = [t.to(device) for t in (x, size, metric, sem)]
    got = kernels.launch_merge(*args, torch.from_numpy(a_np).to(device), torch.from_numpy(b_np).to(device), r, 0.0, 1)
    ref = reference.turbo_merge(x.numpy(), size.numpy(), metric.numpy(), sem.numpy(), a_np, b_np, r, 0.0, 1)
    got = [t.cpu().numpy() for t in got]
    return {"tokens": tokens, "r": r, "plan_equal": all(np.array_equal(g, e) for g, e in zip(got[2:], ref[2:])),
            "x_max_abs_err": float(np.abs(got[0] - ref[0]).max()), "x_bit_equal": bool(np.array_equal(got[0], ref[0])),
            "distinct_dst": len(set(got[4].flatten().tolist()))}


def kernel_grid(kernels: ModuleType, merge: ModuleType, sizes: Sizes, dtype_name: str,
                device: torch.device) -> dict[str, Any]:
    """The UNet's use: a 2x2-grid split, all-ones sizes, nothing protected, metric = the tokens; vs the PyTorch
    split merge (merge.split_matching / merge_wavg_split / unmerge_split) on CPU in float32."""
    import torch

    batch, height, width, channels, ratio, alpha = sizes.grid_case
    dtype = getattr(torch, dtype_name)
    split = merge.grid_split(height, width, None)
    tokens = height * width
    r = merge.grid_r(tokens, ratio, split)
    g = torch.Generator().manual_seed(100)
    x = torch.randn(batch, tokens, channels, generator=g).to(dtype)
    sem = torch.rand(batch, tokens, generator=g).to(dtype)
    ones = torch.ones(batch, tokens, 1, dtype=dtype)
    a_idx, b_idx = split.a_idx.int(), split.b_idx.int()
    dev = [t.to(device) for t in (x, ones, x, sem, a_idx, b_idx)]
    start = time.perf_counter()
    got = kernels.launch_merge(*dev, r, alpha, 0)
    restored = kernels.launch_unmerge(got[0], *got[2:], dev[4], dev[5])
    sync(device)
    first_call_s = round(time.perf_counter() - start, 2)
    plan = merge.split_matching(x.float(), a_idx, b_idx, r, sem.float(), alpha, 0)
    ref_x, ref_s = merge.merge_wavg_split(plan, a_idx, b_idx, x.float(), ones.float())
    ref_restored = merge.unmerge_split(plan, a_idx, b_idx, ref_x)
    return {"grid": [height, width], "batch": batch, "channels": channels, "r": r, "first_call_s": first_call_s,
            "vs_torch_cpu_fp32": compare_merge(got, restored, ref_x, ref_s, plan, ref_restored, dtype)}


def kernel_timing(kernels: ModuleType, merge: ModuleType, case: Case, dtype_name: str, sizes: Sizes,
                  device: torch.device) -> dict[str, Any]:
    """ms per call of the kernel merge / unmerge and of the PyTorch merge (same device, dtype, inputs)."""
    import torch

    dtype = getattr(torch, dtype_name)
    _, tokens, _, _, r, alpha, protected = case
    x, size, metric, sem = (t.to(dtype).to(device) for t in kernel_inputs(case, seed=0))
    a_idx, b_idx = (torch.from_numpy(v).to(device) for v in kernels.alternate_split(tokens))
    merged = kernels.launch_merge(x, size, metric, sem, a_idx, b_idx, r, alpha, protected)
    timing = dict(device=device, warmup=sizes.op_warmup, repeats=sizes.op_repeats, iters=sizes.op_iters)
    with torch.no_grad():
        return {
            "kernel_merge": time_call(lambda: kernels.launch_merge(x, size, metric, sem, a_idx, b_idx, r, alpha,
                                                                   protected), **timing),
            "kernel_unmerge": time_call(lambda: kernels.launch_unmerge(merged[0], *merged[2:], a_idx, b_idx),
                                        **timing),
            "torch_merge": time_call(lambda: merge.turbo_merge(x, size, metric, sem, r, alpha, protected), **timing),
        }


def block_timing(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """One ViT-B block forward (batch, tokens of the ViT config, fp16 on CUDA): eager and SDPA attention."""
    import torch

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out: dict[str, Any] = {"batch": sizes.batch, "tokens": tokens_of(sizes.vit), "dtype": str(dtype)[6:]}
    x = torch.randn(sizes.batch, tokens_of(sizes.vit), sizes.vit["hidden_size"], dtype=dtype, device=device)
    for impl in ("eager", "sdpa"):
        model = build_vit(sizes.vit, num_layers=1)
        out[f"{impl}_attn_impl"] = set_attention(model, impl)
        block = vit_blocks(model.to(device=device, dtype=dtype))[0]
        with torch.no_grad():
            out[impl] = time_call(functools.partial(block, x), device, sizes.op_warmup, sizes.op_repeats,
                                  sizes.op_iters)
    return out


def section_kernels(rec: Recorder, sizes: Sizes) -> None:
    device = device_for(sizes)
    from turbo_plugin import kernels, reference

    merge = find_module("turbo_export.merge", "turbo_merge", "unmerge", "split_matching")
    rec.put(("device",), str(device))
    rec.put(("interpreter",), kernels.interpret_requested() and device.type == "cpu")
    rec.put(("case_format",), "(batch, tokens, channels, metric width, r, alpha, protected)")
    cases = dict(sizes.kernel_cases)
    first = sizes.kernel_cases[0][0]
    # the most important results first (ViT-B/16 exactness, then timing), so that slow compiles leave them recorded
    for dtype_name in ("float32", "float16"):
        rec.step(("cases", f"{first}/{dtype_name}"), kernel_case, kernels, merge, cases[first], dtype_name, 0, device)
    block = rec.step(("timing", "vit_block"), block_timing, sizes, device)
    for name, dtype_name in sizes.timed_cases:
        timed = rec.step(("timing", f"{name}/{dtype_name}"), kernel_timing, kernels, merge, cases[name], dtype_name,
                         sizes, device)
        if timed and block and name == first:
            rec.put(("timing", f"{name}/{dtype_name}"), {**timed, **merge_vs_block(timed, block)})
    for index, (name, case) in enumerate(sizes.kernel_cases[1:], start=1):
        for dtype_name in ("float32", "float16"):
            rec.step(("cases", f"{name}/{dtype_name}"), kernel_case, kernels, merge, case, dtype_name, index, device)
    for tokens in sizes.tie_tokens:
        rec.step(("ties", str(tokens)), kernel_ties, kernels, reference, tokens, device)
    for dtype_name in ("float32", "float16"):
        rec.step(("grid_split", dtype_name), kernel_grid, kernels, merge, sizes, dtype_name, device)
    rec.put(("summary",), kernel_summary(rec.data))


def merge_vs_block(timed: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """The kernel's and PyTorch's merge time as a fraction of one ViT block (eager / SDPA attention)."""
    kernel_ms, torch_ms = timed["kernel_merge"]["median_ms"], timed["torch_merge"]["median_ms"]
    impls = [impl for impl in ("eager", "sdpa") if isinstance(block.get(impl), dict)]
    return {"kernel_merge_fraction_of_block": {i: kernel_ms / block[i]["median_ms"] for i in impls},
            "torch_merge_fraction_of_block": {i: torch_ms / block[i]["median_ms"] for i in impls},
            "kernel_speedup_over_torch_merge": torch_ms / kernel_ms}


def kernel_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Worst errors per dtype and whether every plan / output agreed with the CPU float32 PyTorch merge."""
    rows = [(key.split("/")[-1], value["vs_torch_cpu_fp32"]) for key, value in data.get("cases", {}).items()
            if isinstance(value, dict) and "vs_torch_cpu_fp32" in value]
    rows += [(key, value["vs_torch_cpu_fp32"]) for key, value in data.get("grid_split", {}).items()
             if isinstance(value, dict) and "vs_torch_cpu_fp32" in value]
    out: dict[str, Any] = {"compared": len(rows), "failed_or_skipped_steps": sorted(
        f"{group}/{key}" for group in ("cases", "ties", "grid_split", "timing")
        for key, value in data.get(group, {}).items() if isinstance(value, dict) and ("error" in value
                                                                                     or "skipped" in value))}
    for dtype_name in ("float32", "float16"):
        picked = [row for dt, row in rows if dt == dtype_name]
        if picked:
            out[dtype_name] = {
                "x_max_abs_err": max(row["x_max_abs_err"] for row in picked),
                "unmerge_max_abs_err": max(row["unmerge_max_abs_err"] for row in picked),
                "all_plans_equal": all(row["plan_equal"] for row in picked),
                "all_bit_equal": all(row["x_bit_equal"] and row["size_bit_equal"] and row["unmerge_bit_equal"]
                                     for row in picked),
            }
    ties = [v for v in data.get("ties", {}).values() if isinstance(v, dict) and "plan_equal" in v]
    if ties:
        out["ties_plans_equal"] = all(v["plan_equal"] for v in ties)
    return out


# ---------------------------------------------------------------------------------------------------------------
# section: throughput
# ---------------------------------------------------------------------------------------------------------------

def flops_ratio(config: dict[str, int], r: int, protected: int = 1) -> dict[str, Any]:
    """Analytic FLOPs of the unaccelerated and the Turbo encoder (turbo_export's vision_encoder_flops)."""
    try:
        flops = find_module("turbo_export.families.encoders", "vision_encoder_flops").vision_encoder_flops
        source = "turbo_export vision_encoder_flops"
    except Exception:  # noqa: BLE001 - moved or unimportable: the same formula inline
        flops, source = inline_encoder_flops, "inline copy of vision_encoder_flops"
    width, heads = config["hidden_size"], config["num_attention_heads"]
    layers, tokens = [], tokens_of(config)
    for _ in range(config["num_hidden_layers"]):
        merged = max(0, min(r, (tokens - protected) // 2))
        layers.append((tokens, merged))
        tokens -= merged
    shape = dict(width=width, heads=heads, head_dim=width // heads, mlp=config["intermediate_size"],
                 patch=config["patch_size"], channels=3, image_size=config["image_size"])
    base = flops(**shape, layers=[(tokens_of(config), 0)] * config["num_hidden_layers"])
    turbo = flops(**shape, layers=layers)
    return {"source": source, "gflops_per_image": base / 1e9, "turbo_gflops_per_image": turbo / 1e9,
            "ratio": base / turbo, "tokens_per_layer": [t for t, _ in layers], "final_tokens": tokens}


def inline_encoder_flops(width: int, heads: int, head_dim: int, mlp: int, patch: int, channels: int,
                         image_size: int, layers: list[tuple[int, int]]) -> int:
    inner = heads * head_dim
    total = 2 * (image_size // patch) ** 2 * width * channels * patch * patch
    for tokens, r in layers:
        total += 2 * tokens * width * inner * 3 + 2 * 2 * tokens * tokens * inner + 2 * tokens * inner * width
        if r:
            total += 2 * ((tokens + 1) // 2) * (tokens // 2) * head_dim
        total += 2 * 2 * (tokens - r) * width * mlp
    return total


def make_variant(base: torch.nn.Module, name: str, ratio: int) -> torch.nn.Module:
    """eager / sdpa: the unaccelerated model with that attention; turbo: apply_turbo(ratio) on the eager copy."""
    model = copy.deepcopy(base)
    if name == "turbo":
        from turbo_export import apply_turbo

        return apply_turbo(model, ratio=ratio)
    set_attention(model, name)
    return model


def throughput_for(base: torch.nn.Module, dtype_name: str, sizes: Sizes,
                   device: torch.device, rec: Recorder, key: str) -> dict[str, Any]:
    """Build the three variants in ``dtype``, check them once, then time them in interleaved rounds."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1)
    size = sizes.vit["image_size"]
    pixels = torch.randn(sizes.batch, 3, size, size, generator=g).to(device=device, dtype=dtype)
    models: dict[str, torch.nn.Module] = {}
    logits: dict[str, torch.Tensor] = {}
    out: dict[str, Any] = {"dtype": dtype_name, "batch": sizes.batch, "variants": {}}
    for name in ("eager", "sdpa", "turbo"):
        try:
            model = make_variant(base, name, sizes.ratio).to(device=device, dtype=dtype)
            with torch.no_grad():
                logits[name] = model(pixel_values=pixels).logits.float()
            sync(device)
            models[name] = model
            out["variants"][name] = {"attn_impl": str(model.config._attn_implementation)}
            if name == "turbo":
                settings = getattr(model, "_turbo", None)
                out["variants"][name].update(r=sizes.ratio, alpha=getattr(settings, "alpha", None))
        except Exception as exc:  # noqa: BLE001
            out["variants"][name] = error_entry(exc)
    if "eager" in logits:
        for name in ("sdpa", "turbo"):
            if name in logits:
                out["variants"][name]["logits_vs_eager"] = {"max_abs_diff": max_abs(logits[name], logits["eager"]),
                                                            "cosine": cosine(logits[name], logits["eager"])}
    rec.put((key,), out)
    samples: dict[str, list[float]] = {name: [] for name in models}  # device ms per batch, one per round
    host: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(sizes.warmup):
                model(pixel_values=pixels)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        names = list(models)
        for round_index in range(sizes.rounds):
            if time.time() > rec.deadline - 5:
                out["rounds_cut_short"] = round_index
                break
            for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                ms, host_ms = time_forward(models[name], pixels, sizes.iters, device)
                samples[name].append(ms)
                host[name].append(host_ms)
    for name, values in samples.items():
        if values:
            rates = [sizes.batch * 1000 / ms for ms in values]
            out["variants"][name]["images_per_s"] = {"median": statistics.median(rates), "min": min(rates),
                                                     "max": max(rates), "rounds": len(rates)}
            out["variants"][name]["ms_per_batch_median"] = statistics.median(values)
            out["variants"][name]["host_ms_per_batch_median"] = statistics.median(host[name])
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    speed = {n: v["images_per_s"]["median"] for n, v in out["variants"].items() if "images_per_s" in v}
    if "turbo" in speed:
        out["speedup"] = {f"turbo_vs_{n}": speed["turbo"] / speed[n] for n in ("eager", "sdpa") if n in speed}
    if "sdpa" in speed and "eager" in speed:
        out.setdefault("speedup", {})["sdpa_vs_eager"] = speed["sdpa"] / speed["eager"]
    return out


def time_forward(model: torch.nn.Module, pixels: torch.Tensor, iters: int,
                 device: torch.device) -> tuple[float, float]:
    """(device ms per batch, host ms per batch to enqueue it): the two close together means launch-bound."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(pixel_values=pixels)
        host_ms = (time.perf_counter() - t0) * 1000 / iters
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters, host_ms
    t0 = time.perf_counter()
    for _ in range(iters):
        model(pixel_values=pixels)
    ms = (time.perf_counter() - t0) * 1000 / iters
    return ms, ms


@contextlib.contextmanager
def no_tf32():
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_with_plans(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[Any, list, list]:
    """Logits, and every block's merge plan and decision margin (TurboSettings.record_plans)."""
    import torch

    settings = getattr(model, "_turbo", None)
    if settings is None:
        with torch.no_grad():
            return model(pixel_values=pixels).logits, [], []
    settings.record_plans = True
    try:
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        return logits, [tuple(t.cpu() for t in plan) for plan in settings.plans], [m.cpu() for m in settings.margins]
    finally:
        settings.record_plans = False
        settings.plans.clear()
        settings.margins.clear()


def turbo_device_vs_cpu(base: torch.nn.Module, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Turbo in float32 on the device (TF32 off) vs on CPU: logits and every block's plan."""
    import torch

    size = sizes.vit["image_size"]
    pixels = torch.randn(sizes.cross_batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    cpu_model = make_variant(base, "turbo", sizes.ratio)
    cpu_logits, cpu_plans, margins = run_with_plans(cpu_model, pixels)
    with no_tf32():
        dev_logits, dev_plans, _ = run_with_plans(copy.deepcopy(cpu_model).to(device), pixels.to(device))
    equal = [all(torch.equal(a, b) for a, b in zip(p, q)) for p, q in zip(cpu_plans, dev_plans)]
    return {"batch": sizes.cross_batch, "device": str(device), "logits_max_abs_diff": max_abs(dev_logits, cpu_logits),
            "logits_cosine": cosine(dev_logits, cpu_logits), "logits_max_abs": float(cpu_logits.abs().max()),
            "blocks_with_equal_plans": f"{sum(equal)}/{len(equal)}",
            "first_unequal_block": next((i for i, e in enumerate(equal) if not e), None),
            "min_decision_margin": float(torch.stack(margins).min()) if margins else None}


def section_throughput(rec: Recorder, sizes: Sizes) -> None:
    device = device_for(sizes)
    rec.put(("device",), str(device))
    rec.put(("model",), {"class": "ViTForImageClassification", "config": sizes.vit, "tokens": tokens_of(sizes.vit),
                         "weights": "random (seed 0)", "ratio": sizes.ratio})
    rec.step(("flops",), flops_ratio, sizes.vit, sizes.ratio)
    base = build_vit(sizes.vit)
    fp16 = rec.step(("float16",), throughput_for, base, "float16", sizes, device, rec, "float16")
    if dig(fp16, "variants", "turbo", "images_per_s") is None:  # Turbo failed (or never ran) in fp16
        rec.step(("float32",), throughput_for, base, "float32", sizes, device, rec, "float32")
    rec.step(("turbo_device_vs_cpu_fp32",), turbo_device_vs_cpu, base, sizes, device)


# ---------------------------------------------------------------------------------------------------------------
# section: pytest -m gpu (run by the orchestrator directly)
# ---------------------------------------------------------------------------------------------------------------

def run_pytest(timeout: float, env: dict[str, str]) -> dict[str, Any]:
    if importlib.util.find_spec("pytest") is None:
        return {"error": "pytest is not installed"}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rsfE", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "tests"]
    out: dict[str, Any] = {"command": " ".join(["python", *command[1:]])}
    rc, text = run_killable(command, env, timeout)
    lines = text.splitlines()
    summary = next((line.strip("= ") for line in reversed(lines)
                    if re.search(r"\b(passed|failed|skipped|deselected|errors?|no tests ran)\b", line)
                    and re.search(r" in [\d.]+s", line)), None)
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                        summary or "")}
    reasons: dict[str, int] = {}
    for line in lines:
        if m := re.match(r"SKIPPED \[(\d+)\] (.*)", line):
            reason = re.sub(r"^\S+:\d+: ", "", m[2])
            reasons[reason] = reasons.get(reason, 0) + int(m[1])
    collection: dict[str, str] = {}  # test module -> the first "E   ..." line under its "ERROR collecting" header
    module = None
    for line in lines:
        if m := re.match(r"_+ ERROR collecting (\S+) _+$", line):
            module = m[1]
        elif module and line.startswith("E   "):
            collection[module] = line[4:].strip()[:300]
            module = None
    out.update(rc=rc, summary=summary, counts=counts, skip_reasons=reasons, collection_errors=collection,
               failures_or_errors=[line for line in lines if re.match(r"(FAILED|ERROR) ", line)][:20])
    if rc is None:
        out["error"] = f"timed out after {timeout:.0f} s"
        out["output_tail"] = text[-1500:]
    elif rc not in (0, 5) or summary is None:
        out["error"] = (f"pytest exited with status {rc}" + ("" if summary else " without a summary line")
                        + (f"; {len(collection)} test modules failed to import" if collection else ""))
        out["output_tail"] = text[-1500:]
    return out


# ---------------------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------------------

SECTION_FUNCTIONS: dict[str, Callable[[Recorder, Sizes], None]] = {
    "environment": section_environment, "kernels": section_kernels, "throughput": section_throughput}


def child_env(cpu_smoke: bool, section: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "plugins")]
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HF_HUB_OFFLINE", "1")  # no network there: never wait on the hub
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu_smoke and section == "kernels":
        env["TRITON_INTERPRET"] = "1"  # before triton's first import, which is in the child
    elif not cpu_smoke:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_killable(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run in its own process group; on timeout kill the whole group. (exit status or None, stdout+stderr)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.seek(0)
        return rc, log.read()


def run_section(name: str, timeout: float, cpu_smoke: bool, workdir: Path) -> dict[str, Any]:
    """One section in a subprocess; its partial results survive a crash or a timeout."""
    result_path = workdir / f"{name}.json"
    command = [sys.executable, str(SCRIPT), "--section", name, "--result", str(result_path),
               "--deadline", f"{time.time() + timeout - 4:.1f}"] + (["--cpu-smoke"] if cpu_smoke else [])
    rc, text = run_killable(command, child_env(cpu_smoke, name), timeout)
    try:
        data = json.loads(result_path.read_text())
    except (OSError, ValueError):
        data = {}
    if rc is None:
        data["error"] = f"timed out after {timeout:.0f} s (results up to then kept)"
    elif rc != 0:
        last = [line for line in text.strip().splitlines() if line.strip()]
        data["error"] = (last[-1] if last else f"exit status {rc}")[:400]
    if rc != 0:
        data["log_tail"] = text[-1500:]
    return data


def orchestrate(out_path: Path, cpu_smoke: bool, budget_s: float, only: set[str] | None) -> dict[str, Any]:
    start = time.time()
    result: dict[str, Any] = {"script": "scripts/gpu_check.py", "mode": "cpu-smoke" if cpu_smoke else "cuda",
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
                              "budget_s": budget_s, "headline": {}, "section_wall_s": {}}
    write_json(out_path, result)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as workdir:
        for name, cap in SECTIONS:
            if only and name not in only:
                continue
            timeout = min(cap, start + budget_s - time.time())
            if timeout < 10:
                result[name] = {"error": "skipped: the overall time budget is spent"}
                continue
            print(f"gpu_check: {name} (timeout {timeout:.0f} s) ...", file=sys.stderr, flush=True)
            t0 = time.time()
            try:
                if name == "pytest_gpu":
                    result[name] = run_pytest(timeout, child_env(cpu_smoke, name))
                else:
                    result[name] = run_section(name, timeout, cpu_smoke, Path(workdir))
            except Exception as exc:  # noqa: BLE001 - the JSON is written whatever happens
                result[name] = error_entry(exc)
            result["section_wall_s"][name] = round(time.time() - t0, 1)
            print(f"gpu_check: {name} done in {result['section_wall_s'][name]} s"
                  + (f" - {result[name]['error']}" if "error" in result[name] else ""), file=sys.stderr, flush=True)
            save(out_path, result)
    result["wall_s"] = round(time.time() - start, 1)
    save(out_path, result)
    return result


def save(out_path: Path, result: dict[str, Any]) -> None:
    """Write the result with its headline refreshed (after every section: a killed run keeps what it had)."""
    try:
        result["headline"] = headline(result)
    except Exception as exc:  # noqa: BLE001
        result["headline"] = error_entry(exc)
    write_json(out_path, result)


def dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers the run is for, picked out of the sections (None where a section did not get there)."""
    timed = dig(result, "kernels", "timing", f"{CUDA_SIZES.kernel_cases[0][0]}/float16")
    fp16 = dig(result, "throughput", "float16") or {}
    fp32 = dig(result, "throughput", "float32") or {}
    run = fp16 if dig(fp16, "speedup", "turbo_vs_eager") is not None or not fp32 else fp32
    return {
        "sections_with_error": [name for name, _ in SECTIONS if isinstance(result.get(name), dict)
                                and "error" in result[name]],
        "kernel_fp32": dig(result, "kernels", "summary", "float32"),
        "kernel_fp16": dig(result, "kernels", "summary", "float16"),
        "kernel_failed_or_skipped_steps": dig(result, "kernels", "summary", "failed_or_skipped_steps"),
        "vit_b16_fp16_merge_ms": {"kernel": dig(timed, "kernel_merge", "median_ms"),
                                  "torch": dig(timed, "torch_merge", "median_ms"),
                                  "vit_block_sdpa": dig(result, "kernels", "timing", "vit_block", "sdpa", "median_ms")},
        "kernel_merge_fraction_of_block": dig(timed, "kernel_merge_fraction_of_block"),
        "throughput_dtype": run.get("dtype"),
        "images_per_s": {name: dig(v, "images_per_s", "median") for name, v in (run.get("variants") or {}).items()},
        "speedup": run.get("speedup"),
        "flops_ratio": dig(result, "throughput", "flops", "ratio"),
        "turbo_fp16_logits_cosine_vs_eager": dig(fp16, "variants", "turbo", "logits_vs_eager", "cosine"),
        "turbo_device_vs_cpu_fp32": {k: dig(result, "throughput", "turbo_device_vs_cpu_fp32", k)
                                     for k in ("logits_max_abs_diff", "blocks_with_equal_plans")},
        "pytest_gpu": dig(result, "pytest_gpu", "summary"),
    }


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path.cwd() / "gpu_check.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", default=os.environ.get("GPU_CHECK_CPU_SMOKE") == "1",
                        help="tiny sizes on CPU, kernels under TRITON_INTERPRET=1 (code paths only)")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT/gpu_check.json or ./gpu_check.json")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                        help="overall seconds for all sections (default %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated sections: "
                        + ",".join(name for name, _ in SECTIONS))
    parser.add_argument("--print", action="store_true", help="print the JSON when done")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = SMOKE_SIZES if args.cpu_smoke else CUDA_SIZES
    if args.section:  # a child: one section
        rec = Recorder(args.result, args.deadline or time.time() + 600)
        try:
            SECTION_FUNCTIONS[args.section](rec, sizes)
        except Exception as exc:  # noqa: BLE001
            rec.put(("error",), one_line(exc))
            rec.put(("where",), error_entry(exc)["where"])
        return
    out_path = args.out or default_out()
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    result = orchestrate(out_path, args.cpu_smoke, args.budget, only)
    if args.print:
        print(json.dumps(jsonable(result), indent=1))


if __name__ == "__main__":
    main()
