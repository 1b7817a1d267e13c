"""The BLIP family: captioning, retrieval and VQA (transformers ``Blip*``). Turbo merges in the ViT image encoder;
the text side reads the shorter image sequence. ``blip_tasks`` holds what differs per task (graphs, pipelines,
checks against transformers); this module is the declaration, the options and their checks.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from turbo_export.core.merge import RSchedule
from turbo_export.errors import TurboExportError
from turbo_export.families.base import BenchPlan, Defaults, ExportPlan, Family, Log, PresetInfo, register
from turbo_export.families.blip_tasks import (
    NAMES,
    PROMPT_ALLOWANCE,
    TASKS,
    TaskInputs,
    caption_text_flops,
    example_text,
)
from turbo_export.families.encoders import TokenPlan, check_image_size, ratio_tag, token_plan, vision_encoder_flops
from turbo_export.families.summary import summary_lines
from turbo_export.models.presets import RANDOM_PREFIX, LoadedModel, load_pretrained
from turbo_export.patch import copy_for_patching, patch_model
from turbo_export.pipelines.blip import TokenIds

TASK_CLASSES = {
    "caption": "BlipForConditionalGeneration",
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
}
DEFAULT_MIN_TOKENS = {"caption": 40, "vqa": 40, "retrieval": 100}  # the reference code's thresholds

# BLIP base: ViT-B/16 at 384 px (577 tokens) + the BERT-base text side; large: ViT-L/16 (24 layers).
PRESETS: dict[str, dict[str, Any]] = {
    "blip-base": dict(vision_config={}, text_config={}),
    "blip-large": dict(
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text_config=dict(encoder_hidden_size=1024),
    ),
    "tiny": dict(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=4),
        text_config=dict(vocab_size=512, bos_token_id=510, hidden_size=32, encoder_hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64),
        image_text_hidden_size=32, projection_dim=32,
    ),
}
PRESET_NOTES = {
    "blip-base": "BLIP base: ViT-B/16 at 384 px (577 tokens), BERT-base text side",
    "blip-large": "BLIP large captioning: ViT-L/16 at 384 px, 24 layers",
    "tiny": "tiny BLIP for tests: 32 px, 65 image tokens, 2+2 layers",
}


@dataclass
class BlipOptions:
    task: str
    ratio: RSchedule
    alpha: float = 6.0
    min_tokens: int | None = None  # None: the task's default
    batch: int = 4
    image_size: int | None = None
    max_new_tokens: int = 20
    num_beams: int = 1
    text_len: int = 32  # static token length of retrieval texts and VQA questions
    size_aware: bool = False
    merge_impl: str = "onnx"  # "plugin": one turbo.TurboMerge node per image-encoder block
    images: tuple[str, ...] = ()  # the user's images, run through both pipelines after the export
    question: str | None = None  # vqa
    texts: tuple[str, ...] = ()  # retrieval

    def resolved_min_tokens(self) -> int:
        return DEFAULT_MIN_TOKENS[self.task] if self.min_tokens is None else self.min_tokens


@dataclass
class UserInputs:
    """--image / --question / --text, preprocessed by the checkpoint's processor."""

    images: list[str]
    pixel_values: np.ndarray
    texts: list[str]  # the question (vqa) or the texts (retrieval)
    input_ids: np.ndarray | None
    attention_mask: np.ndarray | None
    tokenizer: Any



def random_settings(presets: dict[str, dict[str, Any]], tasks: dict[str, str], preset_name: str, task: str
                    ) -> dict[str, Any]:
    """A copy of a preset's config arguments, once the preset and the task are known ones (BLIP and BLIP-2)."""
    if preset_name not in presets:
        raise TurboExportError(f"model: unknown preset 'random:{preset_name}'; available: "
                               + ", ".join(f"random:{n}" for n in presets))
    if task not in tasks:
        raise TurboExportError(f"task: unknown '{task}'; choose one of {', '.join(tasks)}")
    settings = copy.deepcopy(presets[preset_name])
    # the vision config's default initializer_range is 1e-10, which makes every random image token alike
    settings["vision_config"].setdefault("initializer_range", 0.02)
    return settings


def build_random_blip(preset_name: str, task: str, seed: int = 0) -> LoadedModel:
    """A BLIP model of the task's class from a preset config with seeded random weights, plus an offline processor."""
    from transformers import BlipConfig

    from turbo_export.models.presets import build_seeded
    from turbo_export.models.tokenizer import offline_blip_processor

    config = BlipConfig(**random_settings(PRESETS, TASK_CLASSES, preset_name, task))
    model = build_seeded(TASK_CLASSES[task], config, seed)
    vision = config.vision_config
    processor = offline_blip_processor(config.text_config.vocab_size, config.text_config.bos_token_id,
                                       int(vision.image_size))
    return LoadedModel(model, f"{preset_name}-{task}", RANDOM_PREFIX + preset_name, int(vision.image_size), 3,
                       processor)


def check_task(loaded: LoadedModel, task: str, classes: dict[str, str] = TASK_CLASSES) -> None:
    """The checkpoint's class is the one ``--task`` needs (``classes``: task -> model class)."""
    expected = classes.get(task)
    if expected is None:
        raise TurboExportError(f"task: unknown '{task}'; choose one of {', '.join(classes)}")
    actual = type(loaded.model).__name__
    if actual != expected:
        fits = [t for t, c in classes.items() if c == actual]
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
    from turbo_export.files import MAX_IMAGE_PIXELS, open_image

    try:
        with Image.open(path) as probe:  # the header only: decompression bombs are refused before decoding
            width, height = probe.size
    except UnidentifiedImageError:
        raise TurboExportError(f"image: '{path}' is not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, Image.DecompressionBombError):
        width = height = 0  # open_image below says why, in one line
    if width * height > MAX_IMAGE_PIXELS:
        raise TurboExportError(f"image: '{path}' is too large ({width} x {height} pixels); at most "
                               f"{MAX_IMAGE_PIXELS:,} pixels are read, a guard against decompression bombs")
    try:
        with open_image(path, "image") as image:
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



def vision_flops(loaded: LoadedModel, image_size: int, layers: list[tuple[int, int]]) -> int:
    cfg = loaded.model.config.vision_config
    heads = int(cfg.num_attention_heads)
    return vision_encoder_flops(int(cfg.hidden_size), heads, int(cfg.hidden_size) // heads,
                                int(cfg.intermediate_size), int(cfg.patch_size), 3, image_size, layers)


def check_options(loaded: LoadedModel, options: BlipOptions) -> int:
    """Validate the options against the checkpoint; returns the image size."""
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



@register
class BlipFamily(Family):
    name = "blip"
    command = "turbo-export blip"
    kind = "vision-language"
    model_classes = ("BlipVisionModel", *TASK_CLASSES.values())
    defaults = Defaults(6.0, 0, evidence="not measured on real weights (none available offline); the paper's alpha; "
                                         "min-tokens per task: 40 caption/VQA, 100 retrieval (the reference code)")
    options_type = BlipOptions
    bench_warmup = 2
    # the random: presets: config keyword arguments, a note each, and the transformers config class they build
    preset_kwargs: dict[str, dict[str, Any]] = PRESETS
    preset_notes: dict[str, str] = PRESET_NOTES
    config_class = "BlipConfig"

    def presets(self) -> list[PresetInfo]:
        return [PresetInfo(name, "(one model class per --task)", note) for name, note in self.preset_notes.items()]

    def preset_config(self, name: str) -> Any:
        import transformers

        if name not in self.preset_kwargs:
            return super().preset_config(name)
        return getattr(transformers, self.config_class)(**copy.deepcopy(self.preset_kwargs[name]))

    def load(self, source: str, options: BlipOptions) -> LoadedModel:
        if source.startswith(RANDOM_PREFIX):
            return build_random_blip(source[len(RANDOM_PREFIX):], options.task)
        return load_pretrained(source, sorted(TASK_CLASSES.values()), text_and_image=True)

    def task(self, report: dict[str, Any]) -> str:
        return report["task"]["name"]

    def default_out_dir(self, loaded: LoadedModel, options: BlipOptions) -> str:
        return f"engines/{loaded.name}-r{ratio_tag(options.ratio)}"

    def token_plan(self, loaded: LoadedModel, options: BlipOptions, image_size: int) -> TokenPlan:
        """The image encoder's r schedule and tokens per block (the CLS token is protected)."""
        vision_cfg = loaded.model.config.vision_config
        num_tokens = (image_size // int(vision_cfg.patch_size)) ** 2 + 1
        return token_plan(options.ratio, int(vision_cfg.num_hidden_layers), num_tokens, 1,
                          options.resolved_min_tokens(), options.merge_impl)

    def plan(self, loaded: LoadedModel, options: BlipOptions, run: Any, log: Log) -> ExportPlan:
        check_task(loaded, options.task)
        check_user_inputs(options.task, options.images, options.question, options.texts)
        task = TASKS[options.task]
        image_size = check_options(loaded, options)
        tokens = self.token_plan(loaded, options, image_size)
        num_tokens, final = tokens.num_tokens, tokens.final_tokens()
        user = prepare_user_inputs(loaded, options, image_size)  # mistakes in --image / --text first
        if any(tokens.schedule) and final["turbo"] == num_tokens:
            raise TurboExportError(
                f"min-tokens: Turbo merges nothing: the {num_tokens} image tokens are below --min-tokens "
                f"{options.resolved_min_tokens()} (the {options.task} default is {DEFAULT_MIN_TOKENS[options.task]}); "
                f"pass --min-tokens {num_tokens} or less (0: merge in every block), or a larger --image-size")

        baseline = loaded.model
        turbo = patch_model(copy_for_patching(baseline), options.ratio, alpha=options.alpha,
                            min_tokens=options.resolved_min_tokens(), merge_impl=options.merge_impl)
        models = {"baseline": baseline, "turbo": turbo}
        graphs = task.graphs(baseline, turbo, options, image_size, final)
        text_cfg = baseline.config.text_config
        ids, mask = example_text(options.batch, options.text_len, text_cfg, torch.Generator().manual_seed(2))
        inputs = TaskInputs(graphs["baseline_vision"].example_inputs["pixel_values"], ids, mask,
                            image_size != int(baseline.config.vision_config.image_size))
        pipelines: dict[str, Any] = {}

        def after_export(runners: dict[str, Any], log: Log) -> dict[str, Any]:
            pipelines.update(task.pipelines(runners, TokenIds.from_text_config(text_cfg), options))
            result = task.parity(models, pipelines, inputs, options, log, run.atol)
            if user is not None:
                result["user_inputs"] = task.user_outputs(pipelines, user, options)
            return {"task": result}

        def pipeline_bench(runners: dict[str, Any]) -> dict[str, Any]:
            flops = None
            if options.task == "caption":
                flops = {n: vision_flops(loaded, image_size, layers) + caption_text_flops(
                    loaded.model.config, final[n], options.max_new_tokens)
                    for n, layers in (("baseline", tokens.baseline), ("turbo", tokens.turbo))}
            timed = task.pipelines(runners, TokenIds.from_text_config(text_cfg), options)  # int8: the int8 graphs
            return {**{n: task.bench_call(timed[n], options) for n in NAMES}, "feed": inputs.feed(),
                    "what": task.bench_what(options), "desc": f"{options.task} pipeline", "flops": flops}

        report = {**tokens.report_fields(options.ratio), "alpha": options.alpha, "merge_impl": options.merge_impl,
                  "min_tokens": options.resolved_min_tokens(), "image_size": image_size, "batch": options.batch}
        flops = {"baseline": vision_flops(loaded, image_size, tokens.baseline),
                 "turbo": vision_flops(loaded, image_size, tokens.turbo), "scope": "image encoder"}
        bench = BenchPlan({n: f"{n}_vision" for n in NAMES}, {n: {"pixel_values": inputs.pixel_values} for n in NAMES},
                          options.batch, {"scope": "image encoder"})
        return ExportPlan(loaded.source, type(loaded.model).__name__, graphs, report, flops, bench,
                          parity_pair=("baseline_vision", "turbo_vision"), parity_what="vision model",
                          merge_impl=options.merge_impl, after_export=after_export, pipeline_bench=pipeline_bench)

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        lines = summary_lines(report)
        task = report["task"]
        checks = [f"{name} {'✓' if task[f'{name}_onnx_equals_pytorch'] else 'x'}" for name in ("baseline", "turbo")
                  if f"{name}_onnx_equals_pytorch" in task]
        if checks:
            what = "scores (ITC, ITM)" if task["name"] == "retrieval" else "tokens"
            lines.append(f"ONNX pipeline == transformers, {what}: {', '.join(checks)}")
        if task.get("size_aware_cross_attention"):
            lines.append("size-aware cross-attention (Turbo): no transformers counterpart, graphs validated only")
        unit = {"caption": "caption", "vqa": "answer"}.get(task["name"])
        if unit:
            lines.append(f"{unit} agreement (Turbo vs baseline): tokens "
                         f"{task['turbo_vs_baseline_token_agreement']:.3f}, "
                         f"whole {unit}s {task[f'turbo_vs_baseline_{unit}_agreement']:.3f}, "
                         f"BLEU-4 {task['turbo_bleu4_vs_baseline']:.3f}  [{task['note']}]")
        if "agreement" in task:
            a = task["agreement"]
            lines.append(f"retrieval agreement (Turbo vs baseline, {a['images']} images x {a['texts']} texts): "
                         f"ITC top-1 text->image {a['itc_text_to_image_top1']:.3f}, image->text "
                         f"{a['itc_image_to_text_top1']:.3f}; ITM top-1 text->image {a['itm_text_to_image_top1']:.3f}, "
                         f"image->text {a['itm_image_to_text_top1']:.3f}, rank correlation "
                         f"{a['itm_rank_correlation']:.3f}  [{task['note']}]")
        pipeline = (report.get("bench") or {}).get("pipeline")
        if pipeline:
            lines.append(f"pipeline ({pipeline['what']}): {pipeline['baseline_per_s']:.2f} -> "
                         f"{pipeline['turbo_per_s']:.2f}  speedup {pipeline['speedup']:.2f}x")
        user = task.get("user_inputs")
        if user:
            lines.append("")
            if task["name"] == "vqa":
                lines.append(f"question: {user['question']}")
            for i, image in enumerate(user["images"]):
                lines.append(f"{image}:")
                if task["name"] == "retrieval":
                    base, tur = user["baseline"], user["turbo"]
                    lines += [f"  ITM {base['itm'][i][j]:.4f} -> {tur['itm'][i][j]:.4f}  "
                              f"ITC {base['itc'][i][j]:+.4f} -> {tur['itc'][i][j]:+.4f}  \"{text}\""
                              for j, text in enumerate(user["texts"])]
                else:
                    lines += [f"  baseline: {user['baseline'][i]}", f"  turbo:    {user['turbo'][i]}"]
        return lines
