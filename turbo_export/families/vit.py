"""The ViT family: transformers ViT, DeiT (CLS + distillation token protected) and DINOv2 (layer scale).

One image graph, unaccelerated and with Turbo; read by the image-encoder validator (top-1 / CLS cosine / linear
probe) and served as a classifier or an embedding model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from turbo_export.families.base import BenchPlan, Defaults, ExportPlan, Family, GraphSpec, Log, PresetInfo, register
from turbo_export.families.encoders import check_image_size, config_flops, ratio_tag, token_plan
from turbo_export.patch import adapter_for, copy_for_patching, patch_model

if TYPE_CHECKING:
    from turbo_export.core.merge import RSchedule
    from turbo_export.models.presets import LoadedModel

CLASSIFIER = Defaults(150.0, 0, evidence="vit-mnist, 5,000 digits: top-1 agreement with the unaccelerated model >= "
                                          "ToMe's at r = 2, 4, 6, 8 only for alpha 30 and 150 (150 highest at every "
                                          "r); top-1 drop 0.16 point at r = 4")
BACKBONE = Defaults(6.0, 0, evidence="dinov2-small-imgfocus, 224 px: on scikit-image photos alpha 6 gives the highest "
                                     "CLS cosine at r = 8, 16, 20 (150 is worst); on lfw_subset's upscaled 25x25 "
                                     "faces ToMe is best, alpha 6 second")

# (model class, config class, config, description); the ViT-B/L configs are google/vit-{base,large}-patch16-224's
PRESETS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "vit-base-patch16-224": (
        "ViTForImageClassification", "ViTConfig",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             image_size=224, patch_size=16, num_labels=1000),
        "ViT-B/16, 224 px, 197 tokens, 12 layers"),
    "vit-large-patch16-224": (
        "ViTForImageClassification", "ViTConfig",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             image_size=224, patch_size=16, num_labels=1000),
        "ViT-L/16, 224 px, 197 tokens, 24 layers"),
    "deit-small-distilled-patch16-224": (
        "DeiTForImageClassificationWithTeacher", "DeiTConfig",
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             image_size=224, patch_size=16, num_labels=1000),
        "DeiT-S/16 distilled, 224 px, 198 tokens (CLS + distillation), 12 layers"),
    "dinov2-small": (
        "Dinov2Model", "Dinov2Config",
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=224, patch_size=14),
        "DINOv2 ViT-S/14 backbone at 224 px, 257 tokens, 12 layers"),
    "tiny": (
        "ViTForImageClassification", "ViTConfig",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=4, num_labels=10),
        "tiny ViT for tests: 32 px, 65 tokens, 4 layers, width 32"),
    "tiny-deit": (
        "DeiTForImageClassificationWithTeacher", "DeiTConfig",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=4, num_labels=10),
        "tiny DeiT for tests: 66 tokens (CLS + distillation)"),
    "tiny-dinov2": (
        "Dinov2Model", "Dinov2Config",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
             image_size=32, patch_size=4, layerscale_value=0.5),
        "tiny DINOv2 for tests: 65 tokens, layer scale"),
}


@dataclass
class VitOptions:
    ratio: RSchedule
    alpha: float | None = None  # None: the family's default for the model's class
    min_tokens: int = 0
    prop_attn: bool = True
    batch: int = 1
    image_size: int | None = None
    merge_impl: str = "onnx"  # "plugin": one turbo.TurboMerge node per block (TensorRT plugin)


def is_classifier(model: Any) -> bool:
    return "ForImageClassification" in type(model).__name__


class ImageModelGraph(nn.Module):
    """pixel_values -> the named outputs of a transformers image model, as a tuple."""

    def __init__(self, model: nn.Module, output_names: list[str], forward_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names
        self.forward_kwargs = forward_kwargs

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values, **self.forward_kwargs)
        return tuple(out[name] for name in self.output_names)


@register
class VitFamily(Family):
    name = "vit"
    command = "turbo-export vit"
    kind = "image-encoder"
    model_classes = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
                     "DeiTForImageClassificationWithTeacher", "Dinov2Model")
    defaults = BACKBONE
    options_type = VitOptions
    preset_table: dict[str, tuple[str, str, dict[str, Any], str]] = PRESETS

    def defaults_for(self, model_class: str) -> Defaults:
        return CLASSIFIER if "ForImageClassification" in model_class else BACKBONE

    def presets(self) -> list[PresetInfo]:
        return [PresetInfo(name, p[0], p[3]) for name, p in self.preset_table.items()]

    def preset_config(self, name: str) -> Any:
        import transformers

        if name not in self.preset_table:
            return super().preset_config(name)
        return getattr(transformers, self.preset_table[name][1])(**self.preset_table[name][2])

    def load(self, source: str, options: Any = None) -> LoadedModel:
        from turbo_export.models.presets import load_model

        return load_model(source, self.preset_table, list(self.model_classes))

    # ---- what the graphs are ----------------------------------------------------------------------------------

    def vision_config(self, loaded: LoadedModel) -> Any:
        """The config of the image encoder (the model's own here; a two-tower model's ``vision_config``)."""
        return loaded.model.config

    def protected(self, loaded: LoadedModel) -> int:
        return adapter_for(loaded.model).protected

    def num_layers(self, loaded: LoadedModel) -> int:
        return int(self.vision_config(loaded).num_hidden_layers)

    def image_size(self, loaded: LoadedModel, options: VitOptions) -> int:
        return check_image_size(options.image_size or loaded.image_size, int(self.vision_config(loaded).patch_size))

    def num_tokens(self, loaded: LoadedModel, image_size: int) -> int:
        patch = int(self.vision_config(loaded).patch_size)
        return (image_size // patch) ** 2 + self.protected(loaded)

    def output_names(self, loaded: LoadedModel) -> list[str]:
        return ["logits"] if is_classifier(loaded.model) else ["last_hidden_state", "pooler_output"]

    def forward_kwargs(self, loaded: LoadedModel, image_size: int) -> dict[str, Any]:
        if loaded.model.config.model_type == "dinov2":
            return {}  # DINOv2 always interpolates its position grid
        return {"interpolate_pos_encoding": image_size != int(self.vision_config(loaded).image_size)}

    def example_inputs(self, loaded: LoadedModel, batch: int, image_size: int, seed: int = 0
                       ) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, loaded.num_channels, image_size, image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def graph_module(self, model: nn.Module, loaded: LoadedModel, image_size: int) -> nn.Module:
        """pixel_values -> the tuple of ``output_names`` (what is exported, and what validate runs in PyTorch)."""
        return ImageModelGraph(model, self.output_names(loaded), self.forward_kwargs(loaded, image_size))

    def graph(self, name: str, model: nn.Module, loaded: LoadedModel, options: VitOptions) -> GraphSpec:
        size = self.image_size(loaded, options)
        module = self.graph_module(model, loaded, size)
        merge_model = model if getattr(model, "_turbo", None) is not None else None
        return GraphSpec(name, module, self.example_inputs(loaded, options.batch, size), self.output_names(loaded),
                         merge_model=merge_model, batch_axes={"pixel_values": 0})

    def make_turbo(self, model: nn.Module, options: VitOptions) -> nn.Module:
        alpha = self.defaults_for(type(model).__name__).alpha if options.alpha is None else options.alpha
        return patch_model(model, options.ratio, alpha=alpha, min_tokens=options.min_tokens,
                           prop_attn=options.prop_attn, merge_impl=options.merge_impl)

    def flops(self, loaded: LoadedModel, image_size: int, layers: list[tuple[int, int]]) -> int:
        """Analytic FLOPs (2 per multiply-add) of one image through the model, merge cost included."""
        cfg = loaded.model.config
        head = int(cfg.hidden_size) * int(getattr(cfg, "num_labels", 0)) * 2 if is_classifier(loaded.model) else 0
        return config_flops(cfg, loaded.num_channels, image_size, layers) + head

    # ---- the export ----------------------------------------------------------------------------------------------

    def plan(self, loaded: LoadedModel, options: VitOptions, run: Any, log: Log) -> ExportPlan:
        if options.alpha is None:
            options.alpha = self.defaults_for(type(loaded.model).__name__).alpha
        image_size = self.image_size(loaded, options)
        tokens = token_plan(options.ratio, self.num_layers(loaded), self.num_tokens(loaded, image_size),
                            self.protected(loaded), options.min_tokens, options.merge_impl)
        turbo_model = self.make_turbo(copy_for_patching(loaded.model), options)
        graphs = {"baseline": self.graph("baseline", loaded.model, loaded, options),
                  "turbo": self.graph("turbo", turbo_model, loaded, options)}
        report = {**tokens.report_fields(options.ratio), "alpha": options.alpha, "min_tokens": options.min_tokens,
                  "prop_attn": options.prop_attn, "semantic": adapter_for(loaded.model).semantic,
                  "protected": self.protected(loaded), "merge_impl": options.merge_impl, "image_size": image_size,
                  "batch": options.batch}
        flops = {"baseline": self.flops(loaded, image_size, tokens.baseline),
                 "turbo": self.flops(loaded, image_size, tokens.turbo)}
        bench = BenchPlan({"baseline": "baseline", "turbo": "turbo"},
                          {n: graphs[n].example_inputs for n in graphs}, options.batch)
        return ExportPlan(loaded.source, type(loaded.model).__name__, graphs, report, flops, bench,
                          merge_impl=options.merge_impl)

    def default_out_dir(self, loaded: LoadedModel, options: VitOptions) -> str:
        return f"engines/{loaded.name}-r{ratio_tag(options.ratio)}"
