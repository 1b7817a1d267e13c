"""BLIP export job: image encoder (unaccelerated and Turbo) plus the text graphs each task needs, every graph
validated against PyTorch, the ONNX pipelines checked against transformers, and both the image encoder and
the whole pipeline benchmarked interleaved.

Tasks and their graphs (``<m>`` is ``baseline`` or ``turbo``; text graphs that never see image tokens are
exported once and shared, since Turbo leaves the text weights alone):

- caption: ``<m>_vision``, ``<m>_cross_kv``, ``<m>_decoder``
- retrieval: ``<m>_vision`` (+ ITC ``image_feat``), ``text_itc``, ``<m>_itm``
- vqa: ``<m>_vision``, ``<m>_question``, ``answer_cross_kv``, ``answer_decoder`` (the question length is static)
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from turbo_export.backends import bench
from turbo_export.backends.base import Runner
from turbo_export.core import merge
from turbo_export.errors import ParityError, TurboExportError
from turbo_export.export.blip_graphs import CrossKV, DecoderStep, TextEncoder, VisionGraph
from turbo_export.export.onnx import GraphSpec
from turbo_export.export.pipeline import (
    RunOptions,
    check_backend,
    check_ratio,
    engine_files,
    environment,
    export_graphs,
    log_to_stderr,
    plugin_graph_benchmarkable,
    set_tolerances,
    validate_graphs,
)
from turbo_export.export.specs import check_image_size, vision_encoder_flops
from turbo_export.families.defaults import DEFAULTS
from turbo_export.files import staged_output, write_json_atomic
from turbo_export.metrics import corpus_bleu, strip_special
from turbo_export.models.presets import BLIP_TASK_CLASSES, LoadedModel
from turbo_export.patch import apply_turbo
from turbo_export.pipelines.blip import (
    CaptionPipeline,
    RetrievalPipeline,
    RetrievalScores,
    TokenIds,
    VqaPipeline,
    pad_rows,
    softmax,
)

Log = Callable[[str], None]
NAMES = ("baseline", "turbo")
DEFAULT_MIN_TOKENS = {"caption": 40, "vqa": 40, "retrieval": 100}  # the reference code's thresholds
PROMPT_ALLOWANCE = 8  # decoder cache positions beyond max_new_tokens, for bos and a short prompt
AGREEMENT_SET = 8  # images and texts ranked against each other for the retrieval agreement
RANDOM_WEIGHTS_NOTE = "with random weights (random: presets) it is weak evidence of quality"


@dataclass(kw_only=True)
class BlipOptions(RunOptions):
    task: str
    ratio: merge.RSchedule
    alpha: float = DEFAULTS["blip"].alpha
    min_tokens: int | None = None  # None: the task's default
    batch: int = 4
    image_size: int | None = None
    max_new_tokens: int = 20
    num_beams: int = 1
    text_len: int = 32  # static token length of retrieval texts and VQA questions
    size_aware: bool = False
    merge_impl: str = "onnx"  # "plugin": one turbo.TurboMerge node per image-encoder block
    bench_runs: int = 10
    bench_warmup: int = 2
    images: tuple[str, ...] = ()  # the user's images, run through both pipelines after the export
    question: str | None = None  # vqa
    texts: tuple[str, ...] = ()  # retrieval

    def resolved_min_tokens(self) -> int:
        return DEFAULT_MIN_TOKENS[self.task] if self.min_tokens is None else self.min_tokens


@dataclass
class TaskInputs:
    """The inputs the ONNX pipelines are checked and timed on: one static batch."""

    pixel_values: torch.Tensor  # [B, 3, S, S]
    input_ids: torch.Tensor  # [B, text_len] (questions, retrieval texts; unused by captioning)
    attention_mask: torch.Tensor
    interpolate_pos_encoding: bool

    def feed(self) -> dict[str, np.ndarray]:
        return {"pixel_values": self.pixel_values.numpy(), "input_ids": self.input_ids.numpy(),
                "attention_mask": self.attention_mask.numpy()}


@dataclass
class UserInputs:
    """--image / --question / --text, preprocessed by the checkpoint's processor."""

    images: list[str]
    pixel_values: np.ndarray
    texts: list[str]  # the question (vqa) or the texts (retrieval)
    input_ids: np.ndarray | None
    attention_mask: np.ndarray | None
    tokenizer: Any


def check_task(loaded: LoadedModel, task: str) -> None:
    expected = BLIP_TASK_CLASSES.get(task)
    if expected is None:
        raise TurboExportError(f"task: unknown '{task}'; choose one of {', '.join(BLIP_TASK_CLASSES)}")
    actual = type(loaded.model).__name__
    if actual != expected:
        fits = [t for t, c in BLIP_TASK_CLASSES.items() if c == actual]
        hint = f"; this checkpoint fits --task {fits[0]}" if fits else ""
        raise TurboExportError(f"task: --task {task} needs a {expected} checkpoint, got {actual}{hint}")


def check_user_inputs(task: str, images: tuple[str, ...], question: str | None, texts: tuple[str, ...]) -> None:
    """Reject unusable --image / --question / --text before anything is loaded or exported."""
    if question is not None and task != "vqa":
        raise TurboExportError(f"question: --question is for --task vqa, not --task {task}")
    if texts and task != "retrieval":
        raise TurboExportError(f"text: --text is for --task retrieval, not --task {task}")
    if any(not t.strip() for t in texts):
        raise TurboExportError("text: empty --text; give the text to match against the image(s)")
    if task == "vqa" and (images or question is not None):
        if not images:
            raise TurboExportError("question: --question needs an --image to ask about")
        if question is None or not question.strip():
            raise TurboExportError("question: --task vqa with --image needs a non-empty --question")
    if task == "retrieval" and (images or texts):
        if not images:
            raise TurboExportError("text: --text needs at least one --image to match against")
        if not texts:
            raise TurboExportError("text: --task retrieval with --image needs at least one --text to score")
    for path in images:
        read_image(path)


def read_image(path: str) -> Any:
    """The file as an RGB PIL image, or a TurboExportError saying why not."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise TurboExportError(f"image: '{path}' does not exist")
    if os.path.isdir(path):
        raise TurboExportError(f"image: '{path}' is a folder, not an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise TurboExportError(f"image: '{path}' is not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TurboExportError(f"image: cannot read '{path}': {reason}") from None


def prepare_user_inputs(loaded: LoadedModel, options: BlipOptions, image_size: int) -> UserInputs | None:
    if not options.images:
        return None
    processor = loaded.image_processor
    tokenizer = getattr(processor, "tokenizer", None)
    if processor is None or tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise TurboExportError(f"image: '{loaded.source}' has no BLIP processor (image processor and tokenizer) "
                               "to prepare --image with")
    resize = {} if image_size == loaded.image_size else {"size": {"height": image_size, "width": image_size}}
    pixels = processor(images=[read_image(p) for p in options.images], return_tensors="np", **resize)
    pixels = np.asarray(pixels["pixel_values"], np.float32)
    if pixels.shape[1:] != (3, image_size, image_size):
        raise TurboExportError(f"image: the processor gives {tuple(pixels.shape[1:])} pixels, the graphs take "
                               f"{(3, image_size, image_size)}")
    texts = [options.question.strip()] if options.task == "vqa" and options.question else list(options.texts)
    ids, mask = None, None
    if texts:
        label = "question" if options.task == "vqa" else "text"
        for text, tokens in zip(texts, tokenizer(texts)["input_ids"]):
            if len(tokens) > options.text_len:
                raise TurboExportError(f"{label}: '{text}' is {len(tokens)} tokens, longer than --text-len "
                                       f"{options.text_len}")
        enc = tokenizer(texts, padding="max_length", max_length=options.text_len, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    return UserInputs(list(options.images), pixels, texts, ids, mask, tokenizer)


def _vision_layers(loaded: LoadedModel, options: BlipOptions, image_size: int):
    cfg = loaded.model.config.vision_config
    num_tokens = (image_size // int(cfg.patch_size)) ** 2 + 1
    try:
        schedule = merge.r_schedule(options.ratio, int(cfg.num_hidden_layers))
    except (TypeError, ValueError) as exc:
        raise TurboExportError(f"ratio: {exc}") from None
    check_ratio(schedule, num_tokens, 1, options.merge_impl)
    turbo = merge.tokens_per_layer(num_tokens, schedule, 1, options.resolved_min_tokens())
    return schedule, num_tokens, [(num_tokens, 0)] * len(schedule), turbo


def _vision_flops(loaded: LoadedModel, image_size: int, layers) -> int:
    cfg = loaded.model.config.vision_config
    heads = int(cfg.num_attention_heads)
    return vision_encoder_flops(int(cfg.hidden_size), heads, int(cfg.hidden_size) // heads,
                                int(cfg.intermediate_size), int(cfg.patch_size), 3, image_size, layers)


# ---- graphs ---------------------------------------------------------------------------------------------------


def example_text(rows: int, length: int, text_cfg: Any, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [rows, length] with padding after a random number (3 .. length) of real tokens, and the mask."""
    ids = torch.randint(1, int(text_cfg.vocab_size), (rows, length), generator=gen)
    lengths = torch.randint(min(3, length), length + 1, (rows,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return torch.where(mask.bool(), ids, int(text_cfg.pad_token_id)), mask


def _size_bias(rows: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """A log(size)-like cross bias, so validation also covers the size-aware path."""
    return torch.log(torch.randint(1, 5, (rows, 1, 1, tokens), generator=gen).float())


def _vision_graphs(baseline: nn.Module, turbo: nn.Module, options: BlipOptions, image_size: int,
                   gen: torch.Generator, itc: bool = False) -> dict[str, GraphSpec]:
    graphs = {}
    outputs = ["image_embeds", "image_sizes"] + (["image_feat"] if itc else [])
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        pixels = torch.randn(options.batch, 3, image_size, image_size, generator=gen)
        interpolate = image_size != int(model.config.vision_config.image_size)
        module = VisionGraph(model.vision_model, model.vision_proj if itc else None,
                             interpolate_pos_encoding=interpolate)
        graphs[f"{name}_vision"] = GraphSpec(f"{name}_vision", module, {"pixel_values": pixels}, outputs,
                                             merge_model=model if name == "turbo" else None)
    return graphs


def _decoder_graph(name: str, lm_model: nn.Module, options: BlipOptions, cross_tokens: int, gen: torch.Generator
                   ) -> GraphSpec:
    text_cfg = lm_model.config
    layers, heads = int(text_cfg.num_hidden_layers), int(text_cfg.num_attention_heads)
    head_dim = int(text_cfg.hidden_size) // heads
    rows, cache_len = options.batch * options.num_beams, options.max_new_tokens + PROMPT_ALLOWANCE
    cache = (layers, rows, heads, cache_len, head_dim)
    cross = (layers, rows, heads, cross_tokens, head_dim)
    return GraphSpec(
        name, DecoderStep(lm_model, cache_len),
        {"input_ids": torch.randint(0, int(text_cfg.vocab_size), (rows, 1), generator=gen),
         "position": torch.tensor([3]),
         "past_keys": torch.randn(cache, generator=gen), "past_values": torch.randn(cache, generator=gen),
         "cross_keys": torch.randn(cross, generator=gen), "cross_values": torch.randn(cross, generator=gen),
         "cross_bias": torch.zeros(rows, 1, 1, cross_tokens)},
        ["logits", "present_keys", "present_values"])


def caption_graphs(baseline, turbo, options: BlipOptions, image_size: int, tokens: dict[str, int]
                   ) -> dict[str, GraphSpec]:
    """Vision, cross-KV and decoder-step graphs for both models (the text weights are shared)."""
    gen = torch.Generator().manual_seed(0)
    enc_width = int(baseline.config.vision_config.hidden_size)
    graphs = _vision_graphs(baseline, turbo, options, image_size, gen)
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        n = tokens[name]
        graphs[f"{name}_cross_kv"] = GraphSpec(
            f"{name}_cross_kv", CrossKV(model.text_decoder.bert),
            {"encoder_hidden_states": torch.randn(options.batch, n, enc_width, generator=gen)},
            ["cross_keys", "cross_values"])
        graphs[f"{name}_decoder"] = _decoder_graph(f"{name}_decoder", model.text_decoder, options, n, gen)
    return graphs


def _cross_text_inputs(options: BlipOptions, text_cfg: Any, image_tokens: int, width: int, gen: torch.Generator
                       ) -> dict[str, torch.Tensor]:
    ids, mask = example_text(options.batch, options.text_len, text_cfg, gen)
    return {"input_ids": ids, "attention_mask": mask,
            "encoder_hidden_states": torch.randn(options.batch, image_tokens, width, generator=gen),
            "cross_bias": _size_bias(options.batch, image_tokens, gen)}


def retrieval_graphs(baseline, turbo, options: BlipOptions, image_size: int, tokens: dict[str, int]
                     ) -> dict[str, GraphSpec]:
    """Vision (+ ITC image feature), the text-only ITC encoder (shared) and the ITM encoder per image length."""
    gen = torch.Generator().manual_seed(0)
    text_cfg = baseline.config.text_config
    enc_width = int(baseline.config.vision_config.hidden_size)
    graphs = _vision_graphs(baseline, turbo, options, image_size, gen, itc=True)
    ids, mask = example_text(options.batch, options.text_len, text_cfg, gen)
    graphs["text_itc"] = GraphSpec("text_itc", TextEncoder(baseline.text_encoder, cross=False,
                                                           text_proj=baseline.text_proj),
                                   {"input_ids": ids, "attention_mask": mask}, ["text_feat"])
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        graphs[f"{name}_itm"] = GraphSpec(
            f"{name}_itm", TextEncoder(model.text_encoder, cross=True, itm_head=model.itm_head),
            _cross_text_inputs(options, text_cfg, tokens[name], enc_width, gen), ["itm_logits"])
    return graphs


def vqa_graphs(baseline, turbo, options: BlipOptions, image_size: int, tokens: dict[str, int]
               ) -> dict[str, GraphSpec]:
    """Vision and question encoder per image length; the answer decoder over the static question (shared)."""
    gen = torch.Generator().manual_seed(0)
    text_cfg = baseline.config.text_config
    enc_width = int(baseline.config.vision_config.hidden_size)
    graphs = _vision_graphs(baseline, turbo, options, image_size, gen)
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        graphs[f"{name}_question"] = GraphSpec(
            f"{name}_question", TextEncoder(model.text_encoder, cross=True),
            _cross_text_inputs(options, text_cfg, tokens[name], enc_width, gen), ["question_embeds"])
    question = torch.randn(options.batch, options.text_len, int(text_cfg.hidden_size), generator=gen)
    graphs["answer_cross_kv"] = GraphSpec("answer_cross_kv", CrossKV(baseline.text_decoder.bert),
                                          {"encoder_hidden_states": question}, ["cross_keys", "cross_values"])
    graphs["answer_decoder"] = _decoder_graph("answer_decoder", baseline.text_decoder, options, options.text_len, gen)
    return graphs


# ---- pipelines ------------------------------------------------------------------------------------------------


def _size_aware(options: BlipOptions, name: str) -> bool:
    return options.size_aware and name == "turbo"


def caption_pipelines(runners: dict[str, Runner], ids: TokenIds, options: BlipOptions) -> dict[str, Any]:
    return {n: CaptionPipeline(runners[f"{n}_vision"], runners[f"{n}_cross_kv"], runners[f"{n}_decoder"], ids,
                               size_aware=_size_aware(options, n)) for n in NAMES}


def retrieval_pipelines(runners: dict[str, Runner], ids: TokenIds, options: BlipOptions) -> dict[str, Any]:
    return {n: RetrievalPipeline(runners[f"{n}_vision"], runners["text_itc"], runners[f"{n}_itm"],
                                 size_aware=_size_aware(options, n)) for n in NAMES}


def vqa_pipelines(runners: dict[str, Runner], ids: TokenIds, options: BlipOptions) -> dict[str, Any]:
    return {n: VqaPipeline(runners[f"{n}_vision"], runners[f"{n}_question"], runners["answer_cross_kv"],
                           runners["answer_decoder"], ids, size_aware=_size_aware(options, n)) for n in NAMES}


class _PipelineAsRunner:
    """Lets bench.interleaved time a whole pipeline call like a runner."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        self.fn = fn

    def run(self, feed: dict[str, Any]) -> Any:
        return self.fn(feed)


# ---- checks against transformers and Turbo-vs-baseline agreement ----------------------------------------------


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


def sequence_agreement(a: np.ndarray, b: np.ndarray, pad: int) -> float:
    """Fraction of rows whose token sequences are identical (trailing padding ignored)."""
    def trim(row: np.ndarray) -> list[int]:
        row = list(row)
        while row and row[-1] == pad:
            row.pop()
        return row

    return float(np.mean([trim(x) == trim(y) for x, y in zip(a, b)])) if len(a) else 1.0


def _generation_parity(task: str, unit: str, models: dict[str, nn.Module], run: Callable[[Any], np.ndarray],
                       reference: Callable[[nn.Module], torch.Tensor], pipelines: dict[str, Any],
                       options: BlipOptions, log: Log) -> dict[str, Any]:
    """Tokens of the ONNX pipelines == transformers' generate (greedy, or beam search with the exported number of
    beams); Turbo vs unaccelerated agreement."""
    result: dict[str, Any] = {"name": task, "max_new_tokens": options.max_new_tokens, "num_beams": options.num_beams,
                              "size_aware_cross_attention": options.size_aware}
    search = "greedy" if options.num_beams == 1 else f"beam-search (num_beams {options.num_beams})"
    tokens = {name: run(p) for name, p in pipelines.items()}
    for name in NAMES:
        if name == "turbo" and options.size_aware:
            continue  # the size-aware variant has no transformers counterpart
        with torch.no_grad():
            expected = reference(models[name]).numpy()
        same = tokens[name].shape == expected.shape and bool((tokens[name] == expected).all())
        result[f"{name}_onnx_equals_pytorch"] = same
        log(f"  -[{'✓' if same else 'x'}] {name} ONNX {search} {unit}s equal transformers' generate token for token")
        if not same:
            raise ParityError(f"{name} {task} pipeline: ONNX tokens {tokens[name].tolist()} != transformers "
                              f"{expected.tolist()}")
    pad = pipelines["baseline"].ids.pad
    result["turbo_vs_baseline_token_agreement"] = token_agreement(tokens["turbo"], tokens["baseline"])
    result[f"turbo_vs_baseline_{unit}_agreement"] = sequence_agreement(tokens["turbo"], tokens["baseline"], pad)
    ids = pipelines["baseline"].ids
    special = {ids.bos, ids.eos, ids.pad}
    result["turbo_bleu4_vs_baseline"] = corpus_bleu([strip_special(t, special) for t in tokens["turbo"]],
                                                    [strip_special(t, special) for t in tokens["baseline"]])
    result["tokens"] = {k: v.tolist() for k, v in tokens.items()}
    result["note"] = f"agreement between Turbo and unaccelerated {unit}s; {RANDOM_WEIGHTS_NOTE}"
    return result


def caption_parity(models: dict[str, nn.Module], pipelines: dict[str, Any], inputs: TaskInputs,
                   options: BlipOptions, log: Log) -> dict[str, Any]:
    pixels, n = inputs.pixel_values, options.max_new_tokens
    return _generation_parity(
        "caption", "caption", models, lambda p: p.generate(pixels.numpy(), n, options.num_beams),
        lambda m: m.generate(pixel_values=pixels, max_new_tokens=n, num_beams=options.num_beams, do_sample=False,
                             interpolate_pos_encoding=inputs.interpolate_pos_encoding),
        pipelines, options, log)


def vqa_parity(models: dict[str, nn.Module], pipelines: dict[str, Any], inputs: TaskInputs,
               options: BlipOptions, log: Log) -> dict[str, Any]:
    feed, n = inputs.feed(), options.max_new_tokens
    result = _generation_parity(
        "vqa", "answer", models,
        lambda p: p.generate(feed["pixel_values"], feed["input_ids"], feed["attention_mask"], n, options.num_beams),
        lambda m: m.generate(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                             attention_mask=inputs.attention_mask, max_new_tokens=n, num_beams=options.num_beams,
                             do_sample=False,
                             interpolate_pos_encoding=inputs.interpolate_pos_encoding),
        pipelines, options, log)
    result["text_len"] = options.text_len
    return result


def transformers_retrieval_scores(model: nn.Module, inputs: TaskInputs) -> RetrievalScores:
    """ITC similarity and ITM probability of every image with every text, by BlipForImageTextRetrieval itself."""
    pixels, ids, mask = inputs.pixel_values, inputs.input_ids, inputs.attention_mask
    interpolate = inputs.interpolate_pos_encoding
    with torch.no_grad():
        itc = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False,
                    interpolate_pos_encoding=interpolate).itm_score
        itm = [model(input_ids=ids, pixel_values=pixels[i:i + 1].expand(len(ids), -1, -1, -1), attention_mask=mask,
                     use_itm_head=True, interpolate_pos_encoding=interpolate).itm_score for i in range(len(pixels))]
    return RetrievalScores(itc=itc.numpy(), itm=np.stack([softmax(s.numpy())[:, 1] for s in itm]))


def rank_agreement(turbo: RetrievalScores, baseline: RetrievalScores) -> dict[str, float]:
    """Top-1 retrieval agreement in both directions (ITC and ITM) and the rank correlation of all ITM scores."""
    def top1(a: np.ndarray, b: np.ndarray, axis: int) -> float:
        return float((a.argmax(axis=axis) == b.argmax(axis=axis)).mean())

    def ranks(x: np.ndarray) -> np.ndarray:
        return x.ravel().argsort(kind="stable").argsort(kind="stable").astype(np.float64)

    rt, rb = ranks(turbo.itm), ranks(baseline.itm)
    spearman = float(np.corrcoef(rt, rb)[0, 1]) if rt.std() > 0 and rb.std() > 0 else 1.0
    return {
        "itc_text_to_image_top1": top1(turbo.itc, baseline.itc, 0),
        "itc_image_to_text_top1": top1(turbo.itc, baseline.itc, 1),
        "itm_text_to_image_top1": top1(turbo.itm, baseline.itm, 0),
        "itm_image_to_text_top1": top1(turbo.itm, baseline.itm, 1),
        "itm_rank_correlation": spearman,
        "itm_max_abs_diff": float(np.abs(turbo.itm - baseline.itm).max()),
        "itc_max_abs_diff": float(np.abs(turbo.itc - baseline.itc).max()),
    }


def retrieval_parity(models: dict[str, nn.Module], pipelines: dict[str, Any], inputs: TaskInputs,
                     options: BlipOptions, log: Log) -> dict[str, Any]:
    """ITC and ITM scores of the ONNX pipelines vs transformers (within atol); rank agreement Turbo vs baseline."""
    result: dict[str, Any] = {"name": "retrieval", "text_len": options.text_len,
                              "size_aware_cross_attention": options.size_aware, "max_abs_diff": {}}
    feed = inputs.feed()
    for name in NAMES:
        if name == "turbo" and options.size_aware:
            continue  # the size-aware variant has no transformers counterpart
        mine = pipelines[name].scores(feed["pixel_values"], feed["input_ids"], feed["attention_mask"])
        ref = transformers_retrieval_scores(models[name], inputs)
        diffs = {"itc": float(np.abs(mine.itc - ref.itc).max()), "itm": float(np.abs(mine.itm - ref.itm).max())}
        same = max(diffs.values()) <= options.atol
        result[f"{name}_onnx_equals_pytorch"] = same
        result["max_abs_diff"][name] = diffs
        log(f"  -[{'✓' if same else 'x'}] {name} ONNX ITC and ITM scores equal transformers' "
            f"(atol {options.atol:g}): max abs diff ITC {diffs['itc']:.2g}, ITM {diffs['itm']:.2g}")
        if not same:
            raise ParityError(f"{name} retrieval pipeline: ONNX scores differ from transformers by "
                              f"{max(diffs.values()):.3g} > atol {options.atol:g} ({diffs})")
    # a larger set than one batch, so top-1 over candidates means something
    gen = torch.Generator().manual_seed(1)
    count = max(AGREEMENT_SET, options.batch)
    pixels = torch.randn(count, *inputs.pixel_values.shape[1:], generator=gen).numpy()
    ids, mask = example_text(count, options.text_len, models["baseline"].config.text_config, gen)
    scores = {name: p.scores(pixels, ids.numpy(), mask.numpy()) for name, p in pipelines.items()}
    result["agreement"] = {"images": count, "texts": count, **rank_agreement(scores["turbo"], scores["baseline"])}
    result["note"] = f"agreement between Turbo and unaccelerated retrieval; {RANDOM_WEIGHTS_NOTE}"
    return result


# ---- the user's own inputs -------------------------------------------------------------------------------------


def _generate_rows(fn: Callable[..., np.ndarray], batch: int, **arrays: np.ndarray) -> list[list[int]]:
    """Generation over any number of inputs with a static-batch pipeline: full batches, the last one padded."""
    rows: list[list[int]] = []
    total = len(next(iter(arrays.values())))
    for start in range(0, total, batch):
        chunk = {k: v[start:start + batch] for k, v in arrays.items()}
        real = len(next(iter(chunk.values())))
        out = fn(**{k: pad_rows(v, batch) for k, v in chunk.items()})
        rows += [row.tolist() for row in out[:real]]
    return rows


def caption_user_outputs(pipelines: dict[str, Any], user: UserInputs, options: BlipOptions) -> dict[str, Any]:
    result: dict[str, Any] = {"images": user.images}
    for name, p in pipelines.items():
        rows = _generate_rows(lambda pixel_values, p=p: p.generate(pixel_values, options.max_new_tokens,
                                                                   options.num_beams),
                              options.batch, pixel_values=user.pixel_values)
        result[name] = [user.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return result


def vqa_user_outputs(pipelines: dict[str, Any], user: UserInputs, options: BlipOptions) -> dict[str, Any]:
    result: dict[str, Any] = {"images": user.images, "question": user.texts[0]}
    count = len(user.pixel_values)
    for name, p in pipelines.items():
        rows = _generate_rows(
            lambda pixel_values, input_ids, attention_mask, p=p: p.generate(
                pixel_values, input_ids, attention_mask, options.max_new_tokens, options.num_beams),
            options.batch, pixel_values=user.pixel_values,
            input_ids=np.repeat(user.input_ids, count, 0), attention_mask=np.repeat(user.attention_mask, count, 0))
        result[name] = [user.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return result


def retrieval_user_outputs(pipelines: dict[str, Any], user: UserInputs, options: BlipOptions) -> dict[str, Any]:
    result: dict[str, Any] = {"images": user.images, "texts": user.texts}
    for name, p in pipelines.items():
        scores = p.scores(user.pixel_values, user.input_ids, user.attention_mask)
        result[name] = {"itm": scores.itm.tolist(), "itc": scores.itc.tolist()}
    return result


# ---- the job ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlipTask:
    """What differs between tasks; everything else (export, validation, benchmark, report) is shared."""

    graphs: Callable[..., dict[str, GraphSpec]]
    pipelines: Callable[[dict[str, Runner], TokenIds, BlipOptions], dict[str, Any]]
    parity: Callable[[dict[str, nn.Module], dict[str, Any], TaskInputs, BlipOptions, Log], dict[str, Any]]
    bench_call: Callable[[Any, BlipOptions], Callable[[dict[str, Any]], Any]]
    bench_what: Callable[[BlipOptions], str]
    user_outputs: Callable[[dict[str, Any], UserInputs, BlipOptions], dict[str, Any]]
    generates: bool  # has an answer/caption decoder (max_new_tokens, num_beams apply)


TASKS: dict[str, BlipTask] = {
    "caption": BlipTask(
        caption_graphs, caption_pipelines, caption_parity,
        lambda p, o: lambda f: p.generate(f["pixel_values"], o.max_new_tokens, o.num_beams, stop_at_eos=False),
        lambda o: f"captions/s, {o.max_new_tokens} new tokens, num_beams {o.num_beams}",
        caption_user_outputs, True),
    "retrieval": BlipTask(
        retrieval_graphs, retrieval_pipelines, retrieval_parity,
        lambda p, o: lambda f: p.score_pairs(f["pixel_values"], f["input_ids"], f["attention_mask"]),
        lambda o: f"ITM pairs/s, image encoder + ITM graph, {o.text_len}-token texts",
        retrieval_user_outputs, False),
    "vqa": BlipTask(
        vqa_graphs, vqa_pipelines, vqa_parity,
        lambda p, o: lambda f: p.generate(f["pixel_values"], f["input_ids"], f["attention_mask"], o.max_new_tokens,
                                          o.num_beams, stop_at_eos=False),
        lambda o: f"answers/s, {o.text_len}-token questions, {o.max_new_tokens} new tokens, num_beams {o.num_beams}",
        vqa_user_outputs, True),
}


def _check_options(loaded: LoadedModel, options: BlipOptions) -> int:
    """Validate the options against the checkpoint; returns the image size."""
    if options.batch < 1:
        raise TurboExportError(f"batch: must be >= 1, got {options.batch}")
    text_cfg = loaded.model.config.text_config
    max_positions = int(text_cfg.max_position_embeddings)
    if TASKS[options.task].generates:
        if options.max_new_tokens < 1:
            raise TurboExportError(f"max-new-tokens: must be >= 1, got {options.max_new_tokens}")
        if options.num_beams < 1:
            raise TurboExportError(f"num-beams: must be >= 1, got {options.num_beams}")
        if options.max_new_tokens + PROMPT_ALLOWANCE > max_positions:
            raise TurboExportError(f"max-new-tokens: {options.max_new_tokens} + {PROMPT_ALLOWANCE} prompt positions "
                                   f"exceed the text model's {max_positions} positions")
    if not 2 <= options.text_len <= max_positions:
        raise TurboExportError(f"text-len: must be between 2 and the text model's {max_positions} positions, "
                               f"got {options.text_len}")
    patch_size = int(loaded.model.config.vision_config.patch_size)
    return check_image_size(options.image_size or loaded.image_size, patch_size)


def run_blip_export(loaded: LoadedModel, options: BlipOptions, log: Log = log_to_stderr) -> dict[str, Any]:
    check_backend(options.backend, options.precision)
    check_task(loaded, options.task)
    check_user_inputs(options.task, options.images, options.question, options.texts)
    task = TASKS[options.task]
    image_size = _check_options(loaded, options)
    schedule, num_tokens, layers_base, layers_turbo = _vision_layers(loaded, options, image_size)
    final = {"baseline": num_tokens, "turbo": num_tokens - sum(r for _, r in layers_turbo)}
    if any(schedule) and final["turbo"] == num_tokens:
        log(f"note: Turbo merges nothing: the {num_tokens} image tokens are below --min-tokens "
            f"{options.resolved_min_tokens()} (the {options.task} default is {DEFAULT_MIN_TOKENS[options.task]})")
    user = prepare_user_inputs(loaded, options, image_size)

    baseline = loaded.model
    turbo = apply_turbo(copy.deepcopy(baseline), options.ratio, alpha=options.alpha,
                        min_tokens=options.resolved_min_tokens(), merge_impl=options.merge_impl)
    models = {"baseline": baseline, "turbo": turbo}
    graphs = task.graphs(baseline, turbo, options, image_size, final)
    set_tolerances(graphs, options.atol, options.precision, options.backend)
    text_cfg = baseline.config.text_config
    ids, mask = example_text(options.batch, options.text_len, text_cfg, torch.Generator().manual_seed(2))
    inputs = TaskInputs(graphs["baseline_vision"].example_inputs["pixel_values"], ids, mask,
                        image_size != int(baseline.config.vision_config.image_size))

    with staged_output(options.out_dir) as stage:
        runners = export_graphs(graphs, stage, options.backend, log, out_dir=options.out_dir,
                                precision=options.precision)
        parity = validate_graphs(graphs, runners, options.out_dir, log) if options.validate else {}
        pipelines = task.pipelines(runners, TokenIds.from_text_config(text_cfg), options)
        task_result = task.parity(models, pipelines, inputs, options, log)
        timings, pipeline_timings = None, None
        if options.bench and plugin_graph_benchmarkable(options.merge_impl, options.backend, log):
            vision_runners = {n: runners[f"{n}_vision"] for n in NAMES}
            feeds = {n: {"pixel_values": inputs.pixel_values} for n in NAMES}
            timings = bench.interleaved(vision_runners, feeds, options.batch, warmup=options.bench_warmup,
                                        runs=options.bench_runs, progress=options.progress,
                                        desc="image encoder")
            whole = {n: _PipelineAsRunner(task.bench_call(p, options)) for n, p in pipelines.items()}
            pipeline_timings = bench.interleaved(whole, {n: inputs.feed() for n in whole}, options.batch, warmup=1,
                                                 runs=max(3, options.bench_runs // 2), progress=options.progress,
                                                 desc=f"{options.task} pipeline")
        if user is not None:
            task_result["user_inputs"] = task.user_outputs(pipelines, user, options)
        flops = {"baseline": _vision_flops(loaded, image_size, layers_base),
                 "turbo": _vision_flops(loaded, image_size, layers_turbo)}
        report = blip_report(loaded, options, schedule, image_size, layers_base, layers_turbo, flops, parity,
                             timings, pipeline_timings, task_result, graphs, runners)
        write_json_atomic(os.path.join(stage, "report.json"), report)
    return report


def caption_text_flops(config: Any, image_tokens: int, new_tokens: int) -> int:
    """Analytic FLOPs per image of the caption text side: cross-attention keys/values once, then one decoder
    step per generated token over the full static cache (bos + new tokens + the prompt allowance)."""
    text = config.text_config
    width, mlp, layers = int(text.hidden_size), int(text.intermediate_size), int(text.num_hidden_layers)
    enc_width, vocab = int(text.encoder_hidden_size), int(text.vocab_size)
    cache = new_tokens + PROMPT_ALLOWANCE
    cross_kv = layers * 2 * 2 * image_tokens * enc_width * width
    per_layer = (2 * 4 * width * width + 2 * 2 * cache * width  # self-attention: q, k, v, out; scores, mix
                 + 2 * 2 * width * width + 2 * 2 * image_tokens * width  # cross-attention: q, out; scores, mix
                 + 2 * 2 * width * mlp)
    step = layers * per_layer + 2 * width * width + 2 * width * vocab  # + LM head
    return cross_kv + new_tokens * step


def blip_report(loaded, options, schedule, image_size, layers_base, layers_turbo, flops, parity, timings,
                pipeline_timings, task, graphs, runners=None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "family": "blip",
        "task": task,
        "model": loaded.source,
        "model_class": type(loaded.model).__name__,
        "ratio": options.ratio if isinstance(options.ratio, int) else list(schedule),
        "r_schedule": schedule,
        "alpha": options.alpha,
        "merge_impl": options.merge_impl,
        "min_tokens": options.resolved_min_tokens(),
        "image_size": image_size,
        "batch": options.batch,
        "tokens_per_layer": {"baseline": [n for n, _ in layers_base], "turbo": [n for n, _ in layers_turbo]},
        "merged_per_layer": [r for _, r in layers_turbo],
        "flops": {"baseline": flops["baseline"], "turbo": flops["turbo"],
                  "ratio": flops["baseline"] / flops["turbo"], "scope": "image encoder"},
        "files": {name: f"{name}.onnx" for name in graphs},
        "precision": options.precision,
        "parity": None,
        "bench": None,
        "environment": environment(),
    }
    if engine_files(runners or {}):
        report["engines"] = engine_files(runners)
    runtime = "TensorRT" if options.backend == "tensorrt" else "ONNX Runtime"
    if parity:
        report["parity"] = {"compared": f"turbo_vision.onnx ({runtime}) vs Turbo vision model (PyTorch)",
                            **parity["turbo_vision"].as_dict(),
                            "graphs": {name: p.as_dict() for name, p in parity.items()}}
        report["parity_baseline"] = {"compared": f"baseline_vision.onnx ({runtime}) vs vision model (PyTorch)",
                                     **parity["baseline_vision"].as_dict()}
    if timings:
        speed = bench.speedup(timings)
        report["bench"] = {
            "backend": options.backend, "batch": options.batch, "runs": options.bench_runs,
            "scope": "image encoder", "timer": timings["turbo"].timer,
            "baseline_ips": timings["baseline"].items_per_s, "turbo_ips": timings["turbo"].items_per_s,
            "baseline_median_ms": timings["baseline"].median_s * 1e3,
            "turbo_median_ms": timings["turbo"].median_s * 1e3,
            "speedup": speed, "speedup_over_flops_ratio": speed / report["flops"]["ratio"],
        }
        if pipeline_timings:
            pipeline_speed = bench.speedup(pipeline_timings)
            report["bench"]["pipeline"] = {
                "what": TASKS[options.task].bench_what(options),
                "baseline_per_s": pipeline_timings["baseline"].items_per_s,
                "turbo_per_s": pipeline_timings["turbo"].items_per_s,
                "speedup": pipeline_speed,
            }
            if options.task == "caption":
                final = {n: layers[-1][0] - layers[-1][1] for n, layers in
                         (("baseline", layers_base), ("turbo", layers_turbo))}
                total = {n: flops[n] + caption_text_flops(loaded.model.config, final[n], options.max_new_tokens)
                         for n in final}
                report["bench"]["pipeline"].update(
                    flops={**total, "ratio": total["baseline"] / total["turbo"]},
                    speedup_over_flops_ratio=pipeline_speed * total["turbo"] / total["baseline"])
    return report
