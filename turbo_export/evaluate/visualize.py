"""Which patches merged (the paper's Figure 6): each group of merged patches in one colour, ToMe beside Turbo.

The merge plans of every block are recorded through the PyTorch Turbo model (``TurboSettings.record_plans``)
and composed, so every original patch maps to the token it ends up in after the last block. Each group is
drawn in the mean colour of its pixels, with a line where neighbouring patches belong to different groups.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import numpy as np
import torch

from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.evaluate.common import load_image_encoder
from turbo_export.families import family_for_class
from turbo_export.families.encoders import check_schedule_fits
from turbo_export.files import check_writable_target
from turbo_export.limits import MAX_ALPHA, MAX_IMAGE_SIZE, MAX_MIN_TOKENS, check_optional, check_range
from turbo_export.models import datasets
from turbo_export.models.datasets import model_inputs
from turbo_export.models.presets import LoadedModel
from turbo_export.patch import copy_for_patching, turbo_settings

PANEL = 320  # the shorter side of each drawn panel, in pixels


def compose_plans(plans: Sequence[merge.MergePlan], num_tokens: int, sample: int = 0) -> np.ndarray:
    """Final token index of every original token after all merges: [num_tokens] ints.

    After a merge the sequence is [A tokens kept, in order] + [all B tokens, in order] (see ``merge.merge_wavg``);
    an A source goes where its B destination goes.
    """
    position = np.arange(num_tokens)
    length = num_tokens
    for plan in plans:
        unm = plan.unm_idx[sample].cpu().numpy()
        src = plan.src_idx[sample].cpu().numpy()
        dst = plan.dst_idx[sample].cpu().numpy()
        new_of_a = np.empty((length + 1) // 2, dtype=np.int64)
        new_of_a[unm] = np.arange(len(unm))
        new_of_a[src] = len(unm) + dst
        moved = np.where(position % 2 == 0, new_of_a[position // 2], len(unm) + position // 2)
        position = moved
        length = len(unm) + length // 2
    return position


def record_groups(loaded: LoadedModel, pixels: np.ndarray, ratio: merge.RSchedule, alpha: float,
                  min_tokens: int = 0) -> np.ndarray:
    """Run one image through the PyTorch Turbo model; the final group of every patch, [patches]."""
    spec = family_for_class(type(loaded.model).__name__)
    size = int(pixels.shape[-1])
    options = spec.options_type(ratio=ratio, alpha=alpha, min_tokens=min_tokens, image_size=size)
    model = spec.make_turbo(copy_for_patching(loaded.model), options)
    settings = turbo_settings(model)
    settings.record_plans = True
    try:
        with torch.no_grad():
            spec.graph_module(model, loaded, size)(torch.from_numpy(pixels[:1]))
        plans = list(settings.plans)
    finally:
        settings.record_plans = False
    tokens = spec.num_tokens(loaded, size)
    protected = spec.protected(loaded)
    return compose_plans(plans, tokens)[protected:]


def display_image(loaded: LoadedModel, pixels: np.ndarray) -> np.ndarray:
    """The model's input image back in [0, 1], [H, W, 3] (un-normalised with the processor's mean and std)."""
    image = pixels[0].astype(np.float64)
    processor = loaded.image_processor
    if processor is not None and getattr(processor, "do_normalize", False):
        mean = np.asarray(processor.image_mean, np.float64).reshape(-1, 1, 1)
        std = np.asarray(processor.image_std, np.float64).reshape(-1, 1, 1)
        image = image * std + mean
    elif processor is None:
        image = (image + 1.0) / 2.0
    image = np.clip(image.transpose(1, 2, 0), 0.0, 1.0)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def paint_groups(image: np.ndarray, groups: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every patch in the mean colour of its group; dark lines between patches of different groups."""
    side = int(round(np.sqrt(len(groups))))
    grid = groups.reshape(side, side)
    cells = image[:side * patch, :side * patch].reshape(side, patch, side, patch, 3).mean(axis=(1, 3))
    colours = {}
    for g in np.unique(grid):
        colours[g] = cells[grid == g].mean(axis=0)
    painted = np.stack([[colours[g] for g in row] for row in grid])  # [side, side, 3]
    out = np.repeat(np.repeat(painted, patch, axis=0), patch, axis=1)
    return out, grid


def upscale(image: np.ndarray, grid: np.ndarray | None, target: int) -> np.ndarray:
    """Nearest-neighbour upscale to about ``target`` px, then draw the group borders at the new scale."""
    scale = max(1, int(round(target / image.shape[0])))
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1).copy()
    if grid is not None:
        cell = big.shape[0] // grid.shape[0]
        line = (0.05, 0.05, 0.05)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                y, x = i * cell, j * cell
                if i + 1 < grid.shape[0] and grid[i, j] != grid[i + 1, j]:
                    big[y + cell - 1:y + cell + 1, x:x + cell] = line
                if j + 1 < grid.shape[1] and grid[i, j] != grid[i, j + 1]:
                    big[y:y + cell, x + cell - 1:x + cell + 1] = line
    return big


def compose_panels(panels: list[tuple[str, np.ndarray]]) -> Any:
    from PIL import Image, ImageDraw

    height = max(p.shape[0] for _, p in panels)
    gap, caption = 8, 18
    width = sum(p.shape[1] for _, p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + caption), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, panel in panels:
        canvas.paste(Image.fromarray((panel * 255).round().astype(np.uint8)), (x, caption))
        draw.text((x + 2, 3), title, fill="black")
        x += panel.shape[1] + gap
    return canvas


def visualize(model_source: str, image_path: str, ratio: merge.RSchedule, out: str, alpha: float | None = None,
              min_tokens: int = 0, image_size: int | None = None, loaded: LoadedModel | None = None
              ) -> dict[str, Any]:
    """Write a PNG: the input, ToMe's groups (alpha = 0) and Turbo's groups (``alpha``) at ``ratio``."""
    check_optional("alpha", alpha, 0.0, MAX_ALPHA, integer=False)
    check_range("min-tokens", min_tokens, 0, MAX_MIN_TOKENS)
    check_optional("image-size", image_size, 1, MAX_IMAGE_SIZE)
    check_writable_target(out, "out")
    if loaded is None:
        spec, loaded = load_image_encoder(model_source)
    else:
        spec = family_for_class(type(loaded.model).__name__)
    size = spec.image_size(loaded, spec.options_type(ratio=0, image_size=image_size))
    images = datasets.ImageSet(image_path, [datasets._read_image(image_path)], [image_path])
    pixels = model_inputs(loaded, images, size)
    patch = int(loaded.model.config.patch_size)
    schedule = merge.r_schedule(ratio, spec.num_layers(loaded))
    tokens = spec.num_tokens(loaded, size)
    check_schedule_fits(schedule, tokens, spec.protected(loaded))
    if alpha is None:
        alpha = spec.defaults_for(type(loaded.model).__name__).alpha
    if alpha == 0:
        raise TurboExportError("alpha: 0 is ToMe, which is always drawn beside Turbo; give Turbo's alpha > 0")
    picture = display_image(loaded, pixels)
    target = max(PANEL, picture.shape[0])
    panels = [("input", upscale(picture, None, target))]
    groups_count = {}
    for label, a in (("ToMe (alpha=0)", 0.0), (f"Turbo (alpha={alpha:g})", alpha)):
        groups = record_groups(loaded, pixels, ratio, a, min_tokens)
        painted, grid = paint_groups(picture, groups, patch)
        groups_count[label] = int(len(np.unique(groups)))
        panels.append((f"{label}, r={ratio}: {groups_count[label]} patch groups", upscale(painted, grid, target)))
    canvas = compose_panels(panels)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        canvas.save(tmp, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return {"out": out, "image_size": size, "patch": patch, "tokens": tokens, "groups": groups_count}
