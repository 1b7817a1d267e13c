"""BLIP's three tasks: the graphs each exports, the ONNX pipelines over them, their checks against transformers,
the Turbo-vs-unaccelerated agreement, and the user's own inputs. ``TASKS`` says what differs between tasks.

Tasks and their graphs (``<m>`` is ``baseline`` or ``turbo``; text graphs that never see image tokens are
exported once and shared, since Turbo leaves the text weights alone):

- caption: ``<m>_vision``, ``<m>_cross_kv``, ``decoder`` (shared: its cross-attention length is symbolic)
- retrieval: ``<m>_vision`` (+ ITC ``image_feat``), ``text_itc``, ``<m>_itm``
- vqa: ``<m>_vision``, ``<m>_question``, ``answer_cross_kv``, ``answer_decoder`` (the question length is static)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from turbo_export.backends.base import Runner
from turbo_export.backends.batching import run_in_batches
from turbo_export.errors import ParityError
from turbo_export.families.base import DEFAULT_ATOL, GraphSpec, Log, batch_first
from turbo_export.families.blip_graphs import CrossKV, DecoderStep, TextEncoder, VisionGraph
from turbo_export.metrics import corpus_bleu, strip_special
from turbo_export.pipelines.blip import (
    CaptionPipeline,
    RetrievalPipeline,
    RetrievalScores,
    TokenIds,
    VqaPipeline,
    softmax,
)

if TYPE_CHECKING:
    from turbo_export.families.blip import BlipOptions, UserInputs

NAMES = ("baseline", "turbo")
PROMPT_ALLOWANCE = 8  # decoder cache positions beyond max_new_tokens, for bos and a short prompt
AGREEMENT_SET = 8  # images and texts ranked against each other for the retrieval agreement
RANDOM_WEIGHTS_NOTE = "with random weights (random: presets) it is weak evidence of quality"


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
                                             merge_model=model if name == "turbo" else None,
                                             batch_axes={"pixel_values": 0},
                                             token_sets={"image_embeds": "image_sizes"})
    return graphs


def _decoder_graph(name: str, lm_model: nn.Module, options: BlipOptions, cross_tokens: int, gen: torch.Generator,
                   shortest: int | None = None) -> GraphSpec:
    """One decoder step over a static KV cache. With ``shortest``, the cross-attention length is symbolic (from
    ``shortest`` to ``cross_tokens`` image tokens), so one graph serves the unaccelerated and the Turbo pipeline."""
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
        ["logits", "present_keys", "present_values"],
        batch_axes={"input_ids": 0, "past_keys": 1, "past_values": 1, "cross_keys": 1, "cross_values": 1,
                    "cross_bias": 0},
        symbolic_dims={} if shortest is None else {
            "cross_keys": {3: "image_tokens"}, "cross_values": {3: "image_tokens"}, "cross_bias": {3: "image_tokens"}},
        dim_ranges={} if shortest is None else {"image_tokens": (shortest, shortest, cross_tokens)})


def caption_graphs(baseline, turbo, options: BlipOptions, image_size: int, tokens: dict[str, int]
                   ) -> dict[str, GraphSpec]:
    """Vision and cross-KV graphs for both models, and one decoder step both share (the text weights are the same;
    its cross-attention length is symbolic)."""
    gen = torch.Generator().manual_seed(0)
    enc_width = int(baseline.config.vision_config.hidden_size)
    graphs = _vision_graphs(baseline, turbo, options, image_size, gen)
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        graphs[f"{name}_cross_kv"] = GraphSpec(
            f"{name}_cross_kv", CrossKV(model.text_decoder.bert),
            {"encoder_hidden_states": torch.randn(options.batch, tokens[name], enc_width, generator=gen)},
            ["cross_keys", "cross_values"], batch_axes={"encoder_hidden_states": 0})
    graphs["decoder"] = _decoder_graph("decoder", baseline.text_decoder, options, tokens["baseline"], gen,
                                       shortest=min(tokens.values()))
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
                                   {"input_ids": ids, "attention_mask": mask}, ["text_feat"],
                                   batch_axes={"input_ids": 0, "attention_mask": 0})
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        inputs = _cross_text_inputs(options, text_cfg, tokens[name], enc_width, gen)
        graphs[f"{name}_itm"] = GraphSpec(
            f"{name}_itm", TextEncoder(model.text_encoder, cross=True, itm_head=model.itm_head), inputs,
            ["itm_logits"], batch_axes=batch_first(inputs))
    return graphs


def vqa_graphs(baseline, turbo, options: BlipOptions, image_size: int, tokens: dict[str, int]
               ) -> dict[str, GraphSpec]:
    """Vision and question encoder per image length; the answer decoder over the static question (shared)."""
    gen = torch.Generator().manual_seed(0)
    text_cfg = baseline.config.text_config
    enc_width = int(baseline.config.vision_config.hidden_size)
    graphs = _vision_graphs(baseline, turbo, options, image_size, gen)
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        inputs = _cross_text_inputs(options, text_cfg, tokens[name], enc_width, gen)
        graphs[f"{name}_question"] = GraphSpec(f"{name}_question", TextEncoder(model.text_encoder, cross=True),
                                               inputs, ["question_embeds"], batch_axes=batch_first(inputs))
    question = torch.randn(options.batch, options.text_len, int(text_cfg.hidden_size), generator=gen)
    graphs["answer_cross_kv"] = GraphSpec("answer_cross_kv", CrossKV(baseline.text_decoder.bert),
                                          {"encoder_hidden_states": question}, ["cross_keys", "cross_values"],
                                          batch_axes={"encoder_hidden_states": 0})
    graphs["answer_decoder"] = _decoder_graph("answer_decoder", baseline.text_decoder, options, options.text_len, gen)
    return graphs


# ---- pipelines ------------------------------------------------------------------------------------------------


def _size_aware(options: BlipOptions, name: str) -> bool:
    return options.size_aware and name == "turbo"


def caption_pipelines(runners: dict[str, Runner], ids: TokenIds, options: BlipOptions) -> dict[str, Any]:
    return {n: CaptionPipeline(runners[f"{n}_vision"], runners[f"{n}_cross_kv"], runners["decoder"], ids,
                               size_aware=_size_aware(options, n)) for n in NAMES}


def retrieval_pipelines(runners: dict[str, Runner], ids: TokenIds, options: BlipOptions) -> dict[str, Any]:
    return {n: RetrievalPipeline(runners[f"{n}_vision"], runners["text_itc"], runners[f"{n}_itm"],
                                 size_aware=_size_aware(options, n)) for n in NAMES}


def vqa_pipelines(runners: dict[str, Runner], ids: TokenIds, options: BlipOptions) -> dict[str, Any]:
    return {n: VqaPipeline(runners[f"{n}_vision"], runners[f"{n}_question"], runners["answer_cross_kv"],
                           runners["answer_decoder"], ids, size_aware=_size_aware(options, n)) for n in NAMES}


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
                   options: BlipOptions, log: Log, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    pixels, n = inputs.pixel_values, options.max_new_tokens
    return _generation_parity(
        "caption", "caption", models, lambda p: p.generate(pixels.numpy(), n, options.num_beams),
        lambda m: m.generate(pixel_values=pixels, max_new_tokens=n, num_beams=options.num_beams, do_sample=False,
                             interpolate_pos_encoding=inputs.interpolate_pos_encoding),
        pipelines, options, log)


def vqa_parity(models: dict[str, nn.Module], pipelines: dict[str, Any], inputs: TaskInputs,
               options: BlipOptions, log: Log, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
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
                     options: BlipOptions, log: Log, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
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
        same = max(diffs.values()) <= atol
        result[f"{name}_onnx_equals_pytorch"] = same
        result["max_abs_diff"][name] = diffs
        log(f"  -[{'✓' if same else 'x'}] {name} ONNX ITC and ITM scores equal transformers' "
            f"(atol {atol:g}): max abs diff ITC {diffs['itc']:.2g}, ITM {diffs['itm']:.2g}")
        if not same:
            raise ParityError(f"{name} retrieval pipeline: ONNX scores differ from transformers by "
                              f"{max(diffs.values()):.3g} > atol {atol:g} ({diffs})")
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


def generate_rows(fn: Callable[..., np.ndarray], batch: int, **arrays: np.ndarray) -> list[list[int]]:
    """Generation over any number of inputs with a static-batch pipeline (``run_in_batches``): token rows."""
    return [row.tolist() for row in run_in_batches(lambda feed: fn(**feed), batch, arrays)]


def caption_user_outputs(pipelines: dict[str, Any], user: UserInputs, options: BlipOptions) -> dict[str, Any]:
    result: dict[str, Any] = {"images": user.images}
    for name, p in pipelines.items():
        rows = generate_rows(lambda pixel_values, p=p: p.generate(pixel_values, options.max_new_tokens,
                                                                   options.num_beams),
                              options.batch, pixel_values=user.pixel_values)
        result[name] = [user.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return result


def vqa_user_outputs(pipelines: dict[str, Any], user: UserInputs, options: BlipOptions) -> dict[str, Any]:
    result: dict[str, Any] = {"images": user.images, "question": user.texts[0]}
    count = len(user.pixel_values)
    for name, p in pipelines.items():
        rows = generate_rows(
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
    parity: Callable[..., dict[str, Any]]  # (models, pipelines, inputs, options, log, atol) -> report fields
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

