"""What every validator shares: report.json of an export folder checked against its family, text files."""

from __future__ import annotations

import os
from typing import Any

from turbo_export import files
from turbo_export.errors import TurboExportError
from turbo_export.families import families, get_family
from turbo_export.families.base import image_encoder_for

RANDOM_NOTE = ("random weights (random: presets): these figures only show that the Turbo graphs track the "
               "unaccelerated ones; they are weak evidence of quality on real weights")
def read_lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a text file (texts, prompts), or a one-line error."""
    if not os.path.isfile(path):
        raise TurboExportError(f"{what}: '{path}' is not a file (one {what[:-1]} per line)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise TurboExportError(f"{what}: '{path}' has no non-empty line")
    return lines


def weights_note(model: str) -> dict[str, str]:
    return {"note": RANDOM_NOTE} if str(model).startswith("random:") else {}



def read_export(folder: str, kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The export folder's report.json, made by a known family (of one of ``kinds``), with every graph it lists."""
    known = [f for f in families() if kinds is None or f.kind in kinds]
    report = files.read_report(folder, made_by=" / ".join(f.command for f in known))
    name = report.get("family")
    if name not in {f.name for f in known}:
        raise TurboExportError(f"validate: family '{name}' is not one validate knows (exports of "
                               + ", ".join(f"'{f.command}'" for f in known) + ")")
    get_family(name).check_report(report)
    for path in (report.get("files") or {}).values():
        if not os.path.isfile(os.path.join(folder, path)):
            raise TurboExportError(f"validate: {folder} has no {path}")
    return report


def load_image_encoder(source: str) -> tuple[Any, Any]:
    """(family, loaded model) for ``source`` among the image-encoder families (sweep and visualize use them)."""
    family = image_encoder_for(source)
    return family, family.load(source)
