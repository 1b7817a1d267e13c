"""BLIP export job: image encoder (unaccelerated and Turbo) plus the text graphs each task needs, every graph
validated against PyTorch, the ONNX pipelines checked against transformers token for token, and both the
image encoder and the whole pipeline benchmarked interleaved.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .. import bench, merge
from ..errors import TurboExportError
from ..files import staged_output, write_json_atomic
from ..patch import apply_turbo
from ..presets import BLIP_TASK_CLASSES, LoadedModel
from ..runtime.blip import CaptionPipeline, TokenIds
from .blip_graphs import CrossKV, DecoderStep, VisionGraph
from .onnx import DEFAULT_ATOL, GraphSpec
from .pipeline import _environment, _stderr, check_ratio, export_graphs, validate_graphs
from .specs import vision_encoder_flops

Log = Callable[[str], None]
DEFAULT_MIN_TOKENS = {"caption": 40, "vqa": 40, "retrieval": 100}  # the reference code's thresholds
PROMPT_ALLOWANCE = 8  # decoder cache positions beyond max_new_tokens, for bos and a short prompt


@dataclass
class BlipOptions:
    task: str
    ratio: merge.RSchedule
    out_dir: str
    alpha: float = 6.0
    min_tokens: int | None = None  # None: the task's default
    batch: int = 4
    image_size: int | None = None
    max_new_tokens: int = 20
    num_beams: int = 1
    size_aware: bool = False
    backend: str = "onnxruntime"
    validate: bool = True
    bench: bool = True
    bench_runs: int = 10
    bench_warmup: int = 2
    atol: float = DEFAULT_ATOL
    progress: bool = True

    def resolved_min_tokens(self) -> int:
        return DEFAULT_MIN_TOKENS[self.task] if self.min_tokens is None else self.min_tokens


def check_task(loaded: LoadedModel, task: str) -> None:
    expected = BLIP_TASK_CLASSES.get(task)
    if expected is None:
        raise TurboExportError(f"task: unknown '{task}'; choose one of {', '.join(BLIP_TASK_CLASSES)}")
    actual = type(loaded.model).__name__
    if actual != expected:
        fits = [t for t, c in BLIP_TASK_CLASSES.items() if c == actual]
        hint = f"; this checkpoint fits --task {fits[0]}" if fits else ""
        raise TurboExportError(f"task: --task {task} needs a {expected} checkpoint, got {actual}{hint}")


def _vision_layers(loaded: LoadedModel, options: BlipOptions, image_size: int):
    cfg = loaded.model.config.vision_config
    num_tokens = (image_size // int(cfg.patch_size)) ** 2 + 1
    try:
        schedule = merge.r_schedule(options.ratio, int(cfg.num_hidden_layers))
    except (TypeError, ValueError) as exc:
        raise TurboExportError(f"ratio: {exc}") from None
    check_ratio(schedule, num_tokens, 1)
    turbo = merge.tokens_per_layer(num_tokens, schedule, 1, options.resolved_min_tokens())
    return schedule, num_tokens, [(num_tokens, 0)] * len(schedule), turbo


def _vision_flops(loaded: LoadedModel, image_size: int, layers) -> int:
    cfg = loaded.model.config.vision_config
    heads = int(cfg.num_attention_heads)
    return vision_encoder_flops(int(cfg.hidden_size), heads, int(cfg.hidden_size) // heads,
                                int(cfg.intermediate_size), int(cfg.patch_size), 3, image_size, layers)


def caption_graphs(baseline, turbo, options: BlipOptions, image_size: int, tokens: dict[str, int]
                   ) -> dict[str, GraphSpec]:
    """Vision, cross-KV and decoder-step graphs for both models (the text weights are shared)."""
    gen = torch.Generator().manual_seed(0)
    text_cfg = baseline.config.text_config
    layers, heads = int(text_cfg.num_hidden_layers), int(text_cfg.num_attention_heads)
    head_dim = int(text_cfg.hidden_size) // heads
    enc_width = int(baseline.config.vision_config.hidden_size)
    images, rows = options.batch, options.batch * options.num_beams
    cache_len = options.max_new_tokens + PROMPT_ALLOWANCE
    graphs = {}
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        n = tokens[name]
        pixels = torch.randn(images, 3, image_size, image_size, generator=gen)
        interpolate = image_size != int(model.config.vision_config.image_size)
        graphs[f"{name}_vision"] = GraphSpec(f"{name}_vision", VisionGraph(model.vision_model,
                                             interpolate_pos_encoding=interpolate),
                                             {"pixel_values": pixels}, ["image_embeds", "image_sizes"])
        graphs[f"{name}_cross_kv"] = GraphSpec(
            f"{name}_cross_kv", CrossKV(model.text_decoder.bert),
            {"encoder_hidden_states": torch.randn(images, n, enc_width, generator=gen)},
            ["cross_keys", "cross_values"])
        cache = (layers, rows, heads, cache_len, head_dim)
        graphs[f"{name}_decoder"] = GraphSpec(
            f"{name}_decoder", DecoderStep(model.text_decoder, cache_len),
            {"input_ids": torch.randint(0, int(text_cfg.vocab_size), (rows, 1), generator=gen),
             "position": torch.tensor([3]),
             "past_keys": torch.randn(cache, generator=gen), "past_values": torch.randn(cache, generator=gen),
             "cross_keys": torch.randn(layers, rows, heads, n, head_dim, generator=gen),
             "cross_values": torch.randn(layers, rows, heads, n, head_dim, generator=gen),
             "cross_bias": torch.zeros(rows, 1, 1, n)},
            ["logits", "present_keys", "present_values"])
    return graphs


class _PipelineAsRunner:
    """Lets bench.interleaved time a whole pipeline call like a runner."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        self.fn = fn

    def run(self, feed: dict[str, Any]) -> Any:
        return self.fn(feed)


def token_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions (over the longer sequence) where two token rows agree."""
    agree, total = 0, 0
    for x, y in zip(a, b):
        width = max(len(x), len(y))
        x = np.pad(x, (0, width - len(x)), constant_values=-1)
        y = np.pad(y, (0, width - len(y)), constant_values=-1)
        agree += int((x == y).sum())
        total += width
    return agree / total if total else 1.0


def run_blip_export(loaded: LoadedModel, options: BlipOptions, log: Log = _stderr) -> dict[str, Any]:
    check_task(loaded, options.task)
    if options.task != "caption":
        raise TurboExportError(f"task: '{options.task}' export is not implemented yet; --task caption works")
    if options.batch < 1:
        raise TurboExportError(f"batch: must be >= 1, got {options.batch}")
    if options.max_new_tokens < 1:
        raise TurboExportError(f"max-new-tokens: must be >= 1, got {options.max_new_tokens}")
    if options.num_beams < 1:
        raise TurboExportError(f"num-beams: must be >= 1, got {options.num_beams}")
    vision_cfg = loaded.model.config.vision_config
    image_size = options.image_size or loaded.image_size
    if image_size <= 0 or image_size % int(vision_cfg.patch_size):
        raise TurboExportError(f"image-size: {image_size} must be a positive multiple of the patch size "
                               f"{vision_cfg.patch_size}")
    schedule, num_tokens, layers_base, layers_turbo = _vision_layers(loaded, options, image_size)
    final = {"baseline": num_tokens, "turbo": num_tokens - sum(r for _, r in layers_turbo)}

    baseline = loaded.model
    turbo = apply_turbo(copy.deepcopy(baseline), options.ratio, alpha=options.alpha,
                        min_tokens=options.resolved_min_tokens())
    graphs = caption_graphs(baseline, turbo, options, image_size, final)
    for g in graphs.values():
        g.atol = options.atol

    ids = TokenIds.from_text_config(baseline.config.text_config)
    report: dict[str, Any] = {}
    with staged_output(options.out_dir) as stage:
        runners = export_graphs(graphs, stage, options.backend, log)
        parity = validate_graphs(graphs, runners, options.out_dir, log) if options.validate else {}
        pipelines = {
            name: CaptionPipeline(runners[f"{name}_vision"], runners[f"{name}_cross_kv"], runners[f"{name}_decoder"],
                                  ids, size_aware=options.size_aware and name == "turbo")
            for name in ("baseline", "turbo")
        }
        pixels = graphs["baseline_vision"].example_inputs["pixel_values"]
        task = caption_parity(baseline, turbo, pipelines, runners, ids, pixels, options, log)
        timings, pipeline_timings = None, None
        if options.bench:
            vision_runners = {n: runners[f"{n}_vision"] for n in ("baseline", "turbo")}
            feeds = {n: {"pixel_values": pixels} for n in vision_runners}
            timings = bench.interleaved(vision_runners, feeds, options.batch, warmup=options.bench_warmup,
                                        runs=options.bench_runs, progress=options.progress,
                                        desc="image encoder")
            whole = {n: _PipelineAsRunner(lambda feed, p=p: p.generate(
                feed["pixel_values"], options.max_new_tokens, options.num_beams, stop_at_eos=False))
                for n, p in pipelines.items()}
            pipeline_timings = bench.interleaved(whole, {n: {"pixel_values": pixels.numpy()} for n in whole},
                                                 options.batch, warmup=1, runs=max(3, options.bench_runs // 2),
                                                 progress=options.progress, desc="caption pipeline")
        flops = {"baseline": _vision_flops(loaded, image_size, layers_base),
                 "turbo": _vision_flops(loaded, image_size, layers_turbo)}
        report = blip_report(loaded, options, schedule, image_size, layers_base, layers_turbo, flops, parity,
                             timings, pipeline_timings, task, graphs)
        write_json_atomic(os.path.join(stage, "report.json"), report)
    return report


def caption_parity(baseline, turbo, pipelines, runners, ids: TokenIds, pixels: torch.Tensor,
                   options: BlipOptions, log: Log) -> dict[str, Any]:
    """Greedy (and beam) captions: ONNX pipelines vs transformers' generate, and Turbo vs unaccelerated."""
    n = options.max_new_tokens
    result: dict[str, Any] = {"name": "caption", "max_new_tokens": n, "num_beams": options.num_beams,
                              "size_aware_cross_attention": options.size_aware}
    with torch.no_grad():
        reference = {name: model.generate(pixel_values=pixels, max_new_tokens=n, num_beams=1, do_sample=False
                                          ).numpy() for name, model in (("baseline", baseline), ("turbo", turbo))}
    if options.num_beams == 1:
        onnx_tokens = {name: p.generate(pixels.numpy(), n) for name, p in pipelines.items()}
        for name in ("baseline", "turbo"):
            if name == "turbo" and options.size_aware:
                continue  # the size-aware variant has no transformers counterpart
            same = onnx_tokens[name].shape == reference[name].shape and bool(
                (onnx_tokens[name] == reference[name]).all())
            result[f"{name}_onnx_equals_pytorch"] = same
            log(f"  -[{'✓' if same else 'x'}] {name} ONNX greedy captions equal transformers' generate "
                "token for token")
            if not same:
                raise_parity(name, onnx_tokens[name], reference[name])
        result["turbo_vs_baseline_token_agreement"] = token_agreement(onnx_tokens["turbo"], onnx_tokens["baseline"])
        result["tokens"] = {k: v.tolist() for k, v in onnx_tokens.items()}
    else:
        beams = {name: p.generate(pixels.numpy(), n, options.num_beams) for name, p in pipelines.items()}
        result["turbo_vs_baseline_token_agreement"] = token_agreement(beams["turbo"], beams["baseline"])
        result["tokens"] = {k: v.tolist() for k, v in beams.items()}
    result["note"] = ("agreement between Turbo and unaccelerated captions; with random weights (random: presets) "
                      "it is weak evidence of caption quality")
    return result


def raise_parity(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    from ..errors import ParityError

    raise ParityError(f"{name} caption pipeline: ONNX tokens {got.tolist()} != transformers {expected.tolist()}")


def blip_report(loaded, options, schedule, image_size, layers_base, layers_turbo, flops, parity, timings,
                pipeline_timings, task, graphs) -> dict[str, Any]:
    report: dict[str, Any] = {
        "family": "blip",
        "task": task,
        "model": loaded.source,
        "model_class": type(loaded.model).__name__,
        "ratio": options.ratio if isinstance(options.ratio, int) else list(schedule),
        "r_schedule": schedule,
        "alpha": options.alpha,
        "min_tokens": options.resolved_min_tokens(),
        "image_size": image_size,
        "batch": options.batch,
        "tokens_per_layer": {"baseline": [n for n, _ in layers_base], "turbo": [n for n, _ in layers_turbo]},
        "merged_per_layer": [r for _, r in layers_turbo],
        "flops": {"baseline": flops["baseline"], "turbo": flops["turbo"],
                  "ratio": flops["baseline"] / flops["turbo"], "scope": "image encoder"},
        "files": {name: f"{name}.onnx" for name in graphs},
        "parity": None,
        "bench": None,
        "environment": _environment({}),
    }
    if parity:
        report["parity"] = {"compared": "turbo_vision.onnx (ONNX Runtime) vs Turbo vision model (PyTorch)",
                            **parity["turbo_vision"].as_dict(),
                            "graphs": {name: p.as_dict() for name, p in parity.items()}}
        report["parity_baseline"] = {"compared": "baseline_vision.onnx (ONNX Runtime) vs vision model (PyTorch)",
                                     **parity["baseline_vision"].as_dict()}
    if timings:
        speed = bench.speedup(timings)
        report["bench"] = {
            "backend": options.backend, "batch": options.batch, "runs": options.bench_runs,
            "scope": "image encoder",
            "baseline_ips": timings["baseline"].items_per_s, "turbo_ips": timings["turbo"].items_per_s,
            "baseline_median_ms": timings["baseline"].median_s * 1e3,
            "turbo_median_ms": timings["turbo"].median_s * 1e3,
            "speedup": speed, "speedup_over_flops_ratio": speed / report["flops"]["ratio"],
        }
        if pipeline_timings:
            report["bench"]["pipeline"] = {
                "what": f"captions/s, {options.max_new_tokens} new tokens, num_beams {options.num_beams}",
                "baseline_per_s": pipeline_timings["baseline"].items_per_s,
                "turbo_per_s": pipeline_timings["turbo"].items_per_s,
                "speedup": bench.speedup(pipeline_timings),
            }
    return report
