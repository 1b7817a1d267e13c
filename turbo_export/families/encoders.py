"""What every ViT-style image encoder family shares: the image-size check, the token schedule with its checks,
the graph wrapper and the analytic FLOPs. Used by the ViT and BLIP declarations (and any new encoder family)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from turbo_export.errors import TurboExportError

if TYPE_CHECKING:
    from turbo_export.core.merge import RSchedule


def check_image_size(image_size: int, patch_size: int) -> int:
    if image_size <= 0 or image_size % patch_size:
        raise TurboExportError(f"image-size: {image_size} must be a positive multiple of the patch size {patch_size}")
    return image_size


def check_schedule_fits(schedule: list[int], num_tokens: int, protected: int, merge_impl: str = "onnx") -> None:
    """A ratio that no block could apply is a user mistake, not something to clamp silently; so is a plugin
    merge the kernel cannot build (said before any export starts, not after the baseline graph)."""
    maximum = (num_tokens - protected) // 2
    if any(r < 0 for r in schedule):
        raise TurboExportError(f"ratio: must be >= 0 (tokens merged per block), got {schedule}")
    if schedule and schedule[0] > maximum:
        raise TurboExportError(
            f"ratio: {schedule[0]} is above the maximum {maximum} for this model "
            f"({num_tokens} tokens, {protected} protected)"
        )
    if merge_impl == "plugin" and any(r > 0 for r in schedule):
        from turbo_export.core.plugin_ops import check_plugin_sizes

        check_plugin_sizes((num_tokens + 1) // 2, num_tokens // 2, (num_tokens,))  # alternate split, first merge


@dataclass
class TokenPlan:
    """The r schedule of an encoder and the tokens entering each block, unaccelerated and with Turbo."""

    schedule: list[int]
    num_tokens: int
    baseline: list[tuple[int, int]]  # (tokens in, tokens merged) per block
    turbo: list[tuple[int, int]]

    def report_fields(self, ratio: RSchedule) -> dict[str, Any]:
        return {
            "ratio": ratio if isinstance(ratio, int) else list(self.schedule),
            "r_schedule": self.schedule,
            "tokens_per_layer": {"baseline": [n for n, _ in self.baseline], "turbo": [n for n, _ in self.turbo]},
            "merged_per_layer": [r for _, r in self.turbo],
        }

    def final_tokens(self) -> dict[str, int]:
        return {"baseline": self.num_tokens, "turbo": self.num_tokens - sum(r for _, r in self.turbo)}


def token_plan(ratio: RSchedule, num_layers: int, num_tokens: int, protected: int, min_tokens: int,
               merge_impl: str) -> TokenPlan:
    """The schedule for ``ratio`` over ``num_layers`` blocks, checked against the model's token count."""
    from turbo_export.core import merge

    try:
        schedule = merge.r_schedule(ratio, num_layers)
    except (TypeError, ValueError) as exc:
        raise TurboExportError(f"ratio: {exc}") from None
    check_schedule_fits(schedule, num_tokens, protected, merge_impl)
    turbo = merge.tokens_per_layer(num_tokens, schedule, protected, min_tokens)
    return TokenPlan(schedule, num_tokens, [(num_tokens, 0)] * len(schedule), turbo)


def ratio_tag(ratio: RSchedule) -> str:
    """``16`` -> "16", ``[8, 8, 4]`` -> "8_8_4", ToMe's decreasing ``(16, -0.5)`` -> "16d" (for folder names)."""
    if isinstance(ratio, int):
        return str(ratio)
    if isinstance(ratio, tuple) and len(ratio) == 2 and isinstance(ratio[1], float):
        return f"{ratio[0]}d"
    return "_".join(str(r) for r in ratio)


def vision_encoder_flops(width: int, heads: int, head_dim: int, mlp: int, patch: int, channels: int,
                         image_size: int, layers: list[tuple[int, int]]) -> int:
    """FLOPs of a patch embedding + pre-norm transformer blocks; ``layers`` = (tokens in, tokens merged)."""
    inner = heads * head_dim
    patches = (image_size // patch) ** 2
    total = 2 * patches * width * channels * patch * patch
    for tokens, r in layers:
        total += 2 * tokens * width * inner * 3 + 2 * 2 * tokens * tokens * inner + 2 * tokens * inner * width
        if r:
            total += 2 * ((tokens + 1) // 2) * (tokens // 2) * head_dim  # the matching's similarity matrix
        total += 2 * 2 * (tokens - r) * width * mlp
    return total


def config_flops(cfg: Any, channels: int, image_size: int, layers: list[tuple[int, int]]) -> int:
    """``vision_encoder_flops`` with the sizes read from a transformers vision config."""
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    mlp = int(getattr(cfg, "intermediate_size", 0) or cfg.hidden_size * getattr(cfg, "mlp_ratio", 4))
    return vision_encoder_flops(int(cfg.hidden_size), heads, head_dim, mlp, int(cfg.patch_size), channels,
                                image_size, layers)
