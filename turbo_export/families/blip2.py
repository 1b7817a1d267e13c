"""The BLIP-2 family: captioning (``Blip2ForConditionalGeneration``, an OPT language model) and image-text retrieval
(``Blip2ForImageTextRetrieval``). Turbo merges in the ViT-g image encoder; the Q-Former's cross-attention reads the
shorter sequence. Graphs (``<m>`` is ``baseline`` or ``turbo``; the language-model and text graphs never see image
tokens, so they are exported once and shared):

- caption: ``<m>_vision`` (ViT-g + Q-Former + language_projection), ``lm_prefill``, ``decoder`` (one token over a
  static KV cache, as BLIP's caption pipeline does)
- retrieval: ``<m>_vision`` (ViT-g + Q-Former + ITC projection of every query), ``text_itc``, ``<m>_itm``

The declaration extends BLIP's (``BlipFamily``: the token plan, the output folder, the summary); what differs is the
presets, the graphs, the pipelines and the checks against transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from turbo_export.core.merge import RSchedule
from turbo_export.errors import ParityError, TurboExportError
from turbo_export.families.base import BenchPlan, Defaults, ExportPlan, GraphSpec, Log, register
from turbo_export.families.blip import DEFAULT_MIN_TOKENS, BlipFamily, check_task, random_settings, vision_flops
from turbo_export.families.blip2_graphs import ImageGraph, ItmGraph, LmPrefill, LmStep, TextFeatures
from turbo_export.families.blip_tasks import (
    AGREEMENT_SET,
    NAMES,
    RANDOM_WEIGHTS_NOTE,
    _cross_text_inputs,
    _generation_parity,
    example_text,
    rank_agreement,
)
from turbo_export.families.encoders import check_image_size
from turbo_export.models.presets import RANDOM_PREFIX, LoadedModel, load_pretrained
from turbo_export.patch import copy_for_patching, patch_model
from turbo_export.pipelines.blip import RetrievalScores, TokenIds, softmax
from turbo_export.pipelines.blip2 import blip2_pipelines

TASK_CLASSES = {"caption": "Blip2ForConditionalGeneration", "retrieval": "Blip2ForImageTextRetrieval"}

# The OPT of the full-size preset: OPT-125m's sizes, not OPT-2.7b's (2.7 B parameters, ~11 GB in float32, do not fit
# beside the exports on the 24 GB machine this project is measured on). Turbo does not touch the language model.
SMALL_OPT = dict(model_type="opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                 word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048)
PRESETS: dict[str, dict[str, Any]] = {
    # ViT-g/14 at 224 px (257 tokens, 39 layers, width 1408, MLP 6144), the Q-Former (12 layers, 32 queries,
    # cross-attention every 2nd layer): transformers' Blip2Config defaults, which are BLIP-2's sizes
    "blip2-opt-2.7b": dict(vision_config={}, qformer_config={}, text_config=SMALL_OPT, image_token_index=50265),
    "tiny-blip2": dict(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=128, max_position_embeddings=64),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                         word_embed_proj_dim=32, vocab_size=128, max_position_embeddings=128, bos_token_id=2,
                         eos_token_id=3, pad_token_id=1),
        num_query_tokens=8, image_token_index=127, image_text_hidden_size=16,
    ),
}
PRESET_NOTES = {
    "blip2-opt-2.7b": "BLIP-2 OPT-2.7b image side at full size (ViT-g/14 224 px, 257 tokens; Q-Former 32 queries); "
                      "the language model is OPT-125m-sized",
    "tiny-blip2": "tiny BLIP-2 for tests: 32 px, 65 image tokens, 8 queries, 2-layer OPT",
}


@dataclass
class Blip2Options:
    task: str
    ratio: RSchedule
    alpha: float = 6.0
    min_tokens: int | None = None  # None: the task's default (BLIP's)
    batch: int = 2
    max_new_tokens: int = 20
    text_len: int = 32  # static token length of retrieval texts
    merge_impl: str = "onnx"
    num_beams: int = 1  # greedy only; the fields BLIP's shared checks read
    size_aware: bool = False

    def resolved_min_tokens(self) -> int:
        return DEFAULT_MIN_TOKENS[self.task] if self.min_tokens is None else self.min_tokens


@dataclass
class Blip2Processing:
    tokenizer: Any  # a transformers tokenizer or models.tokenizer.OfflineTokenizer
    image_processor: Any | None
    ids: TokenIds  # the language model's (caption)
    image_token: int | None
    queries: int


def offline_tokenizer(config: Any, task: str) -> Any:
    """A preset's tokenizer: the Q-Former's BERT-style ids for retrieval texts ([CLS] words [SEP]), the language
    model's for captions (its special ids and the image placeholder skipped when decoding)."""
    from turbo_export.models.tokenizer import OfflineTokenizer

    if task == "retrieval":
        qformer = config.qformer_config
        return OfflineTokenizer(int(qformer.vocab_size), 101, 102, int(qformer.pad_token_id or 0))
    text = config.text_config
    return OfflineTokenizer(int(text.vocab_size), int(text.bos_token_id), None, int(text.pad_token_id),
                            [int(text.eos_token_id)] + ([int(config.image_token_index)]
                                                        if config.image_token_index is not None else []))


def build_random_blip2(preset_name: str, task: str, seed: int = 0) -> LoadedModel:
    """A BLIP-2 model of the task's class from a preset config with seeded random weights."""
    from transformers import Blip2Config

    from turbo_export.models.presets import build_seeded

    settings = random_settings(PRESETS, TASK_CLASSES, preset_name, task)
    # the Q-Former's text feed-forward exists only in retrieval checkpoints
    settings["qformer_config"]["use_qformer_text_input"] = task == "retrieval"
    config = Blip2Config(**settings)
    model = build_seeded(TASK_CLASSES[task], config, seed)
    size = int(config.vision_config.image_size)
    return LoadedModel(model, f"{preset_name}-{task}", RANDOM_PREFIX + preset_name, size, 3)


def qformer_flops(config: Any, image_tokens: int, out_width: int) -> int:
    """Analytic FLOPs of the Q-Former's queries over ``image_tokens`` image tokens, and the projection after it."""
    qf, queries = config.qformer_config, int(config.num_query_tokens)
    width, mlp, enc = int(qf.hidden_size), int(qf.intermediate_size), int(qf.encoder_hidden_size)
    total = 0
    for layer in range(int(qf.num_hidden_layers)):
        total += 2 * 4 * queries * width * width + 2 * 2 * queries * queries * width + 2 * 2 * queries * width * mlp
        if layer % int(qf.cross_attention_frequency) == 0:  # keys/values of every image token, then the queries'
            total += 2 * 2 * image_tokens * enc * width + 2 * 2 * queries * width * width
            total += 2 * 2 * queries * image_tokens * width
    return total + 2 * queries * width * out_width


def _token_ids(model: nn.Module) -> TokenIds:
    gen = model.language_model.generation_config
    eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, (list, tuple)) else gen.eos_token_id
    return TokenIds(bos=int(gen.bos_token_id), eos=int(eos), pad=int(gen.pad_token_id))


def _check_options(loaded: LoadedModel, options: Blip2Options) -> int:
    """Validate the options against the checkpoint; returns the static decoder cache length (caption) or 0."""
    config = loaded.model.config
    queries = int(config.num_query_tokens)
    if options.task == "retrieval":
        positions = int(config.qformer_config.max_position_embeddings)
        if options.text_len > positions:
            raise TurboExportError(f"text-len: {options.text_len} is above the Q-Former's {positions} positions")
        return 0
    if config.image_token_index is None:
        raise TurboExportError(f"model: '{loaded.source}' has no image_token_index in its config (a checkpoint from "
                               "before transformers expanded the image tokens); captioning needs it")
    cache_len = queries + 1 + options.max_new_tokens
    positions = int(config.text_config.max_position_embeddings)
    if cache_len > positions:
        raise TurboExportError(f"max-new-tokens: {queries} image tokens + bos + {options.max_new_tokens} new tokens "
                               f"exceed the language model's {positions} positions")
    return cache_len


def _vision_graphs(baseline: nn.Module, turbo: nn.Module, options: Blip2Options, image_size: int,
                   gen: torch.Generator) -> dict[str, GraphSpec]:
    retrieval = options.task == "retrieval"
    outputs = ["image_embeds", "image_sizes", "image_feat" if retrieval else "language_inputs"]
    pixels = torch.randn(options.batch, 3, image_size, image_size, generator=gen)
    return {f"{n}_vision": GraphSpec(f"{n}_vision", ImageGraph(m, retrieval), {"pixel_values": pixels}, outputs,
                                     merge_model=m if n == "turbo" else None, batch_axes={"pixel_values": 0},
                                     token_sets={"image_embeds": "image_sizes"})
            for n, m in (("baseline", baseline), ("turbo", turbo))}


def caption_graphs(baseline: nn.Module, turbo: nn.Module, options: Blip2Options, image_size: int, cache_len: int
                   ) -> dict[str, GraphSpec]:
    gen = torch.Generator().manual_seed(0)
    graphs = _vision_graphs(baseline, turbo, options, image_size, gen)
    lm, text = baseline.language_model, baseline.config.text_config
    queries, rows = int(baseline.config.num_query_tokens), options.batch
    layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    cache = (layers, rows, heads, cache_len, int(text.hidden_size) // heads)
    width = int(baseline.language_projection.out_features)
    ids = torch.full((rows, 1), _token_ids(baseline).bos)
    graphs["lm_prefill"] = GraphSpec(
        "lm_prefill", LmPrefill(lm, cache_len),
        {"language_inputs": torch.randn(rows, queries, width, generator=gen), "input_ids": ids},
        ["logits", "present_keys", "present_values"], batch_axes={"language_inputs": 0, "input_ids": 0})
    graphs["decoder"] = GraphSpec(
        "decoder", LmStep(lm, cache_len),
        {"input_ids": torch.randint(0, int(text.vocab_size), (rows, 1), generator=gen),
         "position": torch.tensor([queries + 2]),
         "past_keys": torch.randn(cache, generator=gen), "past_values": torch.randn(cache, generator=gen)},
        ["logits", "present_keys", "present_values"],
        batch_axes={"input_ids": 0, "past_keys": 1, "past_values": 1})
    return graphs


def retrieval_graphs(baseline: nn.Module, turbo: nn.Module, options: Blip2Options, image_size: int,
                     tokens: dict[str, int]) -> dict[str, GraphSpec]:
    gen = torch.Generator().manual_seed(0)
    graphs = _vision_graphs(baseline, turbo, options, image_size, gen)
    qformer_cfg = baseline.config.qformer_config
    ids, mask = example_text(options.batch, options.text_len, qformer_cfg, gen)
    graphs["text_itc"] = GraphSpec("text_itc", TextFeatures(baseline), {"input_ids": ids, "attention_mask": mask},
                                   ["text_feat"], batch_axes={"input_ids": 0, "attention_mask": 0})
    width = int(baseline.config.vision_config.hidden_size)
    for name, model in (("baseline", baseline), ("turbo", turbo)):
        inputs = _cross_text_inputs(options, qformer_cfg, tokens[name], width, gen)
        graphs[f"{name}_itm"] = GraphSpec(f"{name}_itm", ItmGraph(model), inputs, ["itm_logits"],
                                          batch_axes={n: 0 for n in inputs})
    return graphs


def transformers_retrieval_scores(model: nn.Module, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                                  ) -> RetrievalScores:
    """ITC similarity and ITM probability of every image with every text, by Blip2ForImageTextRetrieval itself
    (with the image placeholder tokens its processor puts before the text, where the config has them)."""
    config = model.config
    if config.image_token_index is not None:
        placeholders = torch.full((len(ids), int(config.num_query_tokens)), int(config.image_token_index))
        ids, mask = torch.cat([placeholders, ids], 1), torch.cat([torch.ones_like(placeholders), mask], 1)
    with torch.no_grad():
        itc = model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                    use_image_text_matching_head=False).logits_per_image
        itm = [model(pixel_values=pixels[i:i + 1].expand(len(ids), -1, -1, -1), input_ids=ids, attention_mask=mask,
                     use_image_text_matching_head=True).logits_per_image for i in range(len(pixels))]
    return RetrievalScores(itc=itc.numpy(), itm=np.stack([softmax(s.numpy())[:, 1] for s in itm]))


def retrieval_parity(models: dict[str, nn.Module], pipelines: dict[str, Any], feed: dict[str, np.ndarray],
                     options: Blip2Options, log: Log, atol: float) -> dict[str, Any]:
    """ITC and ITM scores of the ONNX pipelines vs transformers (within atol); rank agreement Turbo vs baseline."""
    result: dict[str, Any] = {"name": "retrieval", "text_len": options.text_len, "size_aware_cross_attention": False,
                              "max_abs_diff": {}}
    for name in NAMES:
        mine = pipelines[name].scores(feed["pixel_values"], feed["input_ids"], feed["attention_mask"])
        ref = transformers_retrieval_scores(models[name], *(torch.from_numpy(feed[k]) for k in
                                                            ("pixel_values", "input_ids", "attention_mask")))
        diffs = {"itc": float(np.abs(mine.itc - ref.itc).max()), "itm": float(np.abs(mine.itm - ref.itm).max())}
        same = max(diffs.values()) <= atol
        result[f"{name}_onnx_equals_pytorch"] = same
        result["max_abs_diff"][name] = diffs
        log(f"  -[{'✓' if same else 'x'}] {name} ONNX ITC and ITM scores equal transformers' (atol {atol:g}): max abs "
            f"diff ITC {diffs['itc']:.2g}, ITM {diffs['itm']:.2g}")
        if not same:
            raise ParityError(f"{name} retrieval pipeline: ONNX scores differ from transformers by "
                              f"{max(diffs.values()):.3g} > atol {atol:g} ({diffs})")
    gen = torch.Generator().manual_seed(1)
    count = max(AGREEMENT_SET, options.batch)
    pixels = torch.randn(count, *feed["pixel_values"].shape[1:], generator=gen).numpy()
    ids, mask = example_text(count, options.text_len, models["baseline"].config.qformer_config, gen)
    scores = {name: p.scores(pixels, ids.numpy(), mask.numpy()) for name, p in pipelines.items()}
    result["agreement"] = {"images": count, "texts": count, **rank_agreement(scores["turbo"], scores["baseline"])}
    result["note"] = f"agreement between Turbo and unaccelerated retrieval; {RANDOM_WEIGHTS_NOTE}"
    return result


@register
class Blip2Family(BlipFamily):
    name = "blip2"
    command = "turbo-export blip2"
    # BLIP's validator and served pipelines ("vision-language") read BLIP's graphs and text model; this kind has its
    # own (evaluate/validate_vl_llm.py, serve/handlers_blip2.py), which take the text side from ``processing``
    kind = "vision-language-llm"
    model_classes = ("Blip2VisionModel", *TASK_CLASSES.values())
    defaults = Defaults(6.0, 0, evidence="not measured on real weights (none available offline); the paper's alpha; "
                                         "min-tokens per task as BLIP's: 40 caption, 100 retrieval")
    options_type = Blip2Options
    bench_warmup = 1
    preset_kwargs = PRESETS
    preset_notes = PRESET_NOTES
    config_class = "Blip2Config"

    def processing(self, source: str, task: str) -> Blip2Processing:
        """What validate and serve need besides the graphs, without loading the weights: the tokenizer (the
        checkpoint's processor's, or an offline one for a ``random:`` preset), the image processor (None for a
        preset: images scaled to [-1, 1]), the language model's token ids and the image placeholder token."""
        if source.startswith(RANDOM_PREFIX):
            config = self.preset_config(source[len(RANDOM_PREFIX):])
            processor = None
            tokenizer = offline_tokenizer(config, task)
        else:
            path = os.path.expanduser(source)
            if not os.path.isdir(path):
                raise TurboExportError(f"model: the BLIP-2 model '{source}' is not a local folder here; its "
                                       "tokenizer and image processor are read from it")
            from transformers import AutoConfig, AutoProcessor

            config = AutoConfig.from_pretrained(path)
            try:
                processor = AutoProcessor.from_pretrained(path)
            except Exception as exc:
                raise TurboExportError(f"model: '{source}' has no BLIP-2 processor (image processor and tokenizer): "
                                       f"{type(exc).__name__}") from None
            tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is None or getattr(processor, "image_processor", None) is None:
                raise TurboExportError(f"model: '{source}' has no BLIP-2 processor (image processor and tokenizer)")
            processor = processor.image_processor
        text = config.text_config
        eos = text.eos_token_id[0] if isinstance(text.eos_token_id, (list, tuple)) else text.eos_token_id
        ids = TokenIds(bos=int(text.bos_token_id), eos=int(eos), pad=int(text.pad_token_id))
        return Blip2Processing(tokenizer, processor, ids, config.image_token_index, int(config.num_query_tokens))

    def load(self, source: str, options: Blip2Options) -> LoadedModel:
        if source.startswith(RANDOM_PREFIX):
            return build_random_blip2(source[len(RANDOM_PREFIX):], options.task)
        return load_pretrained(source, sorted(TASK_CLASSES.values()), text_and_image=True)

    def plan(self, loaded: LoadedModel, options: Blip2Options, run: Any, log: Log) -> ExportPlan:
        check_task(loaded, options.task, TASK_CLASSES)
        cache_len = _check_options(loaded, options)
        config = loaded.model.config
        image_size = check_image_size(int(config.vision_config.image_size), int(config.vision_config.patch_size))
        tokens = self.token_plan(loaded, options, image_size)
        num_tokens, final = tokens.num_tokens, tokens.final_tokens()
        if any(tokens.schedule) and final["turbo"] == num_tokens:
            raise TurboExportError(
                f"min-tokens: Turbo merges nothing: the {num_tokens} image tokens are below --min-tokens "
                f"{options.resolved_min_tokens()}; pass --min-tokens {num_tokens} or less (0: merge in every block)")
        baseline = loaded.model
        turbo = patch_model(copy_for_patching(baseline), options.ratio, alpha=options.alpha,
                            min_tokens=options.resolved_min_tokens(), merge_impl=options.merge_impl)
        models = {"baseline": baseline, "turbo": turbo}
        retrieval = options.task == "retrieval"
        graphs = (retrieval_graphs(baseline, turbo, options, image_size, final) if retrieval
                  else caption_graphs(baseline, turbo, options, image_size, cache_len))
        pixels = graphs["baseline_vision"].example_inputs["pixel_values"]
        ids, mask = example_text(options.batch, options.text_len, config.qformer_config, torch.Generator().manual_seed(2))
        feed = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}

        def pipelines(runners: dict[str, Any]) -> dict[str, Any]:
            ids = None if retrieval else _token_ids(baseline)  # a retrieval model has no language model
            return blip2_pipelines(runners, options.task, ids, config.image_token_index, NAMES)

        def after_export(runners: dict[str, Any], log: Log) -> dict[str, Any]:
            made = pipelines(runners)
            if retrieval:
                return {"task": retrieval_parity(models, made, feed, options, log, run.atol)}
            n = options.max_new_tokens
            result = _generation_parity(
                "caption", "caption", models, lambda p: p.generate(feed["pixel_values"], n),
                lambda m: m.generate(pixel_values=pixels, max_new_tokens=n, num_beams=1, do_sample=False),
                made, options, log)
            return {"task": result}

        def pipeline_bench(runners: dict[str, Any]) -> dict[str, Any]:
            made = pipelines(runners)
            if retrieval:
                calls = {n: lambda f, p=made[n]: p.score_pairs(f["pixel_values"], f["input_ids"], f["attention_mask"])
                         for n in NAMES}
                what = f"ITM pairs/s, image graph + ITM graph, {options.text_len}-token texts"
            else:
                calls = {n: lambda f, p=made[n]: p.generate(f["pixel_values"], options.max_new_tokens,
                                                            stop_at_eos=False) for n in NAMES}
                what = f"captions/s, {options.max_new_tokens} new tokens, greedy"
            return {**calls, "feed": feed, "what": what, "desc": f"{options.task} pipeline", "flops": None}

        head = baseline.vision_projection if retrieval else baseline.language_projection
        text = config.text_config
        report = {**tokens.report_fields(options.ratio), "alpha": options.alpha, "merge_impl": options.merge_impl,
                  "min_tokens": options.resolved_min_tokens(), "image_size": image_size, "batch": options.batch,
                  "num_query_tokens": int(config.num_query_tokens)}
        if not retrieval:
            report["language_model"] = {"model_type": str(text.model_type), "hidden_size": int(text.hidden_size),
                                        "num_hidden_layers": int(text.num_hidden_layers),
                                        "vocab_size": int(text.vocab_size), "cache_len": cache_len}
        flops = {n: vision_flops(loaded, image_size, layers) + qformer_flops(config, final[n], head.out_features)
                 for n, layers in (("baseline", tokens.baseline), ("turbo", tokens.turbo))}
        scope = "image encoder + Q-Former"
        bench = BenchPlan({n: f"{n}_vision" for n in NAMES}, {n: {"pixel_values": feed["pixel_values"]} for n in NAMES},
                          options.batch, {"scope": scope})
        return ExportPlan(loaded.source, type(loaded.model).__name__, graphs, report, {**flops, "scope": scope}, bench,
                          parity_pair=("baseline_vision", "turbo_vision"), parity_what="image encoder + Q-Former",
                          merge_impl=options.merge_impl, after_export=after_export, pipeline_bench=pipeline_bench)
