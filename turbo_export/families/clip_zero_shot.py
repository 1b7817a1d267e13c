"""Zero-shot classification with a full CLIPModel / SiglipModel: the image tower unaccelerated and with Turbo (as the
``clip`` family exports it), plus the unchanged text tower, and the label prompts, tokenized once at export time.

``turbo-export clip --labels "a cat,a dog" [--template "a photo of {}"]`` writes ``baseline.onnx`` / ``turbo.onnx``
(pixel_values -> last_hidden_state, pooler_output[, image_embeds]) and ``text.onnx`` (the prompts' token ids ->
text_embeds), checks all three against PyTorch, and scores the prompts against the export's example images with both
image graphs (top-1 agreement). ``turbo-export validate`` on the folder (kind "image-text") measures zero-shot top-1
agreement and retrieval recall agreement on real images. A label's score is the cosine of the image and text
embeddings: CLIP's logit scale and SigLIP's scale and bias do not change any ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from turbo_export.errors import TurboExportError
from turbo_export.families.base import (
    KIND_REPORT_FIELDS,
    ExportPlan,
    GraphSignature,
    GraphSpec,
    Log,
    batch_first,
    register,
)
from turbo_export.families.clip import PRESETS as TOWERS
from turbo_export.families.clip import ClipFamily
from turbo_export.families.vit import VitOptions

if TYPE_CHECKING:
    from turbo_export.models.presets import LoadedModel

DEFAULT_TEMPLATE = "a photo of {}"
_TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=1000,
                  max_position_embeddings=16)
_CLIP_TEXT_IDS = dict(bos_token_id=998, eos_token_id=999, pad_token_id=1)
_SIGLIP_TEXT_IDS = dict(bos_token_id=None, eos_token_id=1, pad_token_id=1)  # SigLIP's tokenizer: </s> = <pad> = 1


def _vision(preset: str) -> dict[str, Any]:
    return {k: v for k, v in TOWERS[preset][2].items() if k != "projection_dim"}


# (model class, config class, config, description): the public checkpoints' configs
PRESETS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "clip-vit-base-patch16-zero-shot": (
        "CLIPModel", "CLIPConfig",
        dict(vision_config=_vision("clip-vit-base-patch16"), projection_dim=512,
             text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                              max_position_embeddings=77, hidden_act="quick_gelu")),
        "CLIP ViT-B/16 image and text towers (openai/clip-vit-base-patch16), 224 px, 77 text tokens"),
    "siglip-base-patch16-224-zero-shot": (
        "SiglipModel", "SiglipConfig",
        dict(vision_config=_vision("siglip-base-patch16-224"),
             text_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              max_position_embeddings=64, **_SIGLIP_TEXT_IDS)),
        "SigLIP B/16 image and text towers (google/siglip-base-patch16-224), 224 px, 64 text tokens"),
    "tiny-clip-zero-shot": (
        "CLIPModel", "CLIPConfig",
        dict(vision_config=_vision("tiny-clip"), projection_dim=16, text_config={**_TINY_TEXT, **_CLIP_TEXT_IDS}),
        "tiny CLIPModel for tests: the tiny-clip tower and a 2-layer text tower, 16 text tokens"),
    "tiny-siglip-zero-shot": (
        "SiglipModel", "SiglipConfig",
        dict(vision_config=_vision("tiny-siglip"), text_config={**_TINY_TEXT, **_SIGLIP_TEXT_IDS}),
        "tiny SiglipModel for tests: the tiny-siglip tower and a 2-layer text tower, 16 text tokens"),
}


@dataclass
class ZeroShotOptions(VitOptions):
    labels: tuple[str, ...] = ()
    template: str = DEFAULT_TEMPLATE


def prompts_for(labels: tuple[str, ...] | list[str], template: str) -> list[str]:
    """The label prompts, or a one-line error for an empty or repeated label list or a template without ``{}``."""
    labels = [label.strip() for label in labels]
    if not labels or any(not label for label in labels):
        raise TurboExportError('labels: empty label in the list; pass --labels "a cat,a dog,..." (comma-separated)')
    if len(set(labels)) != len(labels):
        raise TurboExportError(f"labels: repeated label in {labels}")
    if "{}" not in template:
        raise TurboExportError(f"template: '{template}' has no {{}} for the label (e.g. '{DEFAULT_TEMPLATE}')")
    return [template.replace("{}", label) for label in labels]


def is_clip(model: nn.Module) -> bool:
    return hasattr(model, "text_projection")


def offline_tokens(prompts: list[str], cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """Token ids for ``random:`` presets: ``models.tokenizer.offline_clip_tokens`` (shared with serving)."""
    from turbo_export.models.tokenizer import offline_clip_tokens

    return offline_clip_tokens(prompts, cfg)


def tokenize(loaded: LoadedModel, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The prompts as the text tower reads them: padded to its length (SigLIP was trained on max-length padding)."""
    cfg = loaded.model.config.text_config
    tokenizer = getattr(loaded.image_processor, "tokenizer", None)
    if tokenizer is None:
        return offline_tokens(prompts, cfg)
    length = int(cfg.max_position_embeddings)
    enc = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    return ids, np.asarray(enc.get("attention_mask", np.ones_like(ids)), np.int64)


class TextTowerGraph(nn.Module):
    """CLIP: (input_ids, attention_mask) -> text_embeds (projected EOS state); SigLIP: input_ids -> text_embeds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        if is_clip(self.model):
            out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
            return (self.model.text_projection(out.pooler_output),)
        return (self.model.text_model(input_ids=input_ids).pooler_output,)


def logit_scale_and_bias(model: nn.Module) -> dict[str, float]:
    """What turns a cosine into a logit (``logit_scale`` * cosine + ``logit_bias``; SigLIP alone has a bias): served
    zero-shot probabilities are CLIP's softmax and SigLIP's sigmoid of these logits."""
    out = {"logit_scale": float(model.logit_scale.detach().exp())}
    if getattr(model, "logit_bias", None) is not None:
        out["logit_bias"] = float(model.logit_bias.detach())
    return out


def zero_shot_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Cosine of every image to every prompt [images, labels]."""
    image = image / np.linalg.norm(image, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    return image @ text.T


@register
class ClipZeroShotFamily(ClipFamily):
    name = "clip-zero-shot"
    command = "turbo-export clip"
    kind = "image-text"
    model_classes = ("CLIPModel", "SiglipModel")
    options_type = ZeroShotOptions
    preset_table = PRESETS

    def load(self, source: str, options: Any = None) -> LoadedModel:
        from turbo_export.models.presets import RANDOM_PREFIX, LoadedModel, build_seeded, load_pretrained

        if not source.startswith(RANDOM_PREFIX):
            return load_pretrained(source, list(self.model_classes), text_and_image=True)
        name = source[len(RANDOM_PREFIX):]
        if name not in PRESETS:
            raise TurboExportError(f"model: unknown preset '{source}' for {self.command}; available: "
                                   + ", ".join(f"random:{n}" for n in PRESETS))
        model = build_seeded(PRESETS[name][0], self.preset_config(name))
        vision = model.config.vision_config
        return LoadedModel(model, name, source, int(vision.image_size), int(vision.num_channels))

    def image_output(self, loaded: LoadedModel) -> str:
        return "image_embeds" if is_clip(loaded.model) else "pooler_output"

    def text_graph(self, loaded: LoadedModel, ids: np.ndarray, mask: np.ndarray) -> GraphSpec:
        inputs = {"input_ids": torch.from_numpy(ids)}
        if is_clip(loaded.model):
            inputs["attention_mask"] = torch.from_numpy(mask)
        return GraphSpec("text", TextTowerGraph(loaded.model), inputs, ["text_embeds"], batch_axes=batch_first(inputs))

    def plan(self, loaded: LoadedModel, options: ZeroShotOptions, run: Any, log: Log) -> ExportPlan:
        prompts = prompts_for(options.labels, options.template)
        ids, mask = tokenize(loaded, prompts)
        plan = super().plan(loaded, options, run, log)
        plan.graphs["text"] = self.text_graph(loaded, ids, mask)
        plan.flops["scope"] = "image tower per image (the text tower runs once per label set)"
        output = self.image_output(loaded)
        zero_shot: dict[str, Any] = {
            "labels": [label.strip() for label in options.labels], "template": options.template, "prompts": prompts,
            "image_output": output, "input_ids": ids.tolist(),
            **({"attention_mask": mask.tolist()} if is_clip(loaded.model) else {}),
            "tokenizer": "offline (random weights)" if loaded.image_processor is None else "the checkpoint's",
            **logit_scale_and_bias(loaded.model)}
        plan.report["zero_shot"] = zero_shot
        pixels = plan.graphs["baseline"].example_inputs

        def after_export(runners: dict[str, Any], log: Log) -> dict[str, Any]:
            from turbo_export import metrics

            text = runners["text"].run({k: v.numpy() for k, v in plan.graphs["text"].example_inputs.items()})
            feed = {k: v.numpy() for k, v in pixels.items()}
            scores = {side: zero_shot_scores(runners[side].run(feed)[output], text["text_embeds"])
                      for side in ("baseline", "turbo")}
            agreement = metrics.agreement(scores["turbo"], scores["baseline"])
            log(f"zero-shot top-1 agreement on the {len(scores['turbo'])} example images: {agreement:.4f}")
            return {"zero_shot_example": {"images": len(scores["turbo"]), "top1_agreement": agreement,
                                          "what": "the export's random example inputs; validate measures real "
                                                  "images"}}

        plan.after_export = after_export
        return plan

    def report_fields(self) -> dict[str, str]:
        return {**KIND_REPORT_FIELDS["image-encoder"], "files.text": "str", "zero_shot": "dict",
                "zero_shot.template": "str", "zero_shot.image_output": "str:image_embeds|pooler_output",
                "zero_shot.logit_scale": "number?", "zero_shot.logit_bias": "number?"}

    def check_report(self, report: dict[str, Any], where: str = "report.json", present_only: bool = False) -> None:
        super().check_report(report, where, present_only)
        zero_shot = report.get("zero_shot")
        if present_only and zero_shot is None:
            return
        labels = zero_shot.get("labels")
        if not (present_only and labels is None) and not (
                isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise TurboExportError(f"{where}: zero_shot.labels must be a non-empty list of strings")
        for key in ("input_ids", "attention_mask"):
            value = zero_shot.get(key)
            if value is None and (key == "attention_mask" or present_only):
                continue
            if labels is None:
                labels = value  # present_only without labels: the rows need only agree among themselves
            if not (isinstance(value, list) and len(value) == len(labels) and all(
                    isinstance(row, list) and row and len(row) == len(value[0])
                    and all(isinstance(t, int) and not isinstance(t, bool) for t in row) for row in value)):
                raise TurboExportError(f"{where}: zero_shot.{key} must be one list of token ids per label, all of "
                                       "one length")

    def graph_signatures(self, report: dict[str, Any]) -> dict[str, GraphSignature]:
        zero_shot = report["zero_shot"]
        length = len(zero_shot["input_ids"][0])
        inputs: dict[str, Any] = {"input_ids": (None, length)}
        if "attention_mask" in zero_shot:
            inputs["attention_mask"] = (None, length)
        return {**super().graph_signatures(report), "text": GraphSignature(inputs, {"text_embeds": (None, None)})}

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        lines = super().summary_lines(report)
        example = report.get("zero_shot_example")
        if example:
            lines.append(f"zero-shot top-1 agreement ({len(report['zero_shot']['labels'])} labels, "
                         f"{example['images']} example images): {example['top1_agreement']:.4f}")
        return lines
