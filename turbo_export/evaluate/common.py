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
    lines = [line.strip() for line in read_text(path, what).splitlines() if line.strip()]
    if not lines:
        raise TurboExportError(f"{what}: '{path}' has no non-empty line")
    return lines


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file (a BOM is dropped), or a one-line error naming it and the first byte that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TurboExportError(f"{what}: cannot read '{path}': {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TurboExportError(f"{what}: '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                               "save it as UTF-8") from None


def weights_note(model: str) -> dict[str, str]:
    return {"note": RANDOM_NOTE} if str(model).startswith("random:") else {}



def read_export(folder: str, kinds: tuple[str, ...] | None = None, command: str = "validate",
                match_graphs: bool = True) -> dict[str, Any]:
    """The export folder's report.json, made by a known family (of one of ``kinds``), checked once before use:
    ``read_family_report`` then ``check_export``."""
    report, family = read_family_report(folder, kinds, command)
    check_export(folder, report, family, command, match_graphs)
    return report


def read_family_report(folder: str, kinds: tuple[str, ...] | None = None, command: str = "validate"
                       ) -> tuple[dict[str, Any], Any]:
    """report.json's structure (``files.read_report``: a JSON object, its common fields, file names inside the
    folder) and its family, one of ``kinds``. The family's own fields and the graphs: ``check_export``."""
    known = [f for f in families() if kinds is None or f.kind in kinds]
    report = files.read_report(folder, made_by=" / ".join(f.command for f in known))
    name = report.get("family")
    if name not in {f.name for f in known}:
        raise TurboExportError(f"{command}: family '{name}' is not one {command} knows (exports of "
                               + ", ".join(f"'{f.command}'" for f in known) + ")")
    return report, get_family(name)


def check_export(folder: str, report: dict[str, Any], family: Any, command: str = "validate",
                 match_graphs: bool = True) -> None:
    """Every file report.json lists exists, the family's fields are there with their types
    (``Family.check_report``), every graph is a valid ONNX file and, with ``match_graphs``, has the inputs and
    outputs the family declares and those of its Turbo / baseline counterpart (a graph of another model is refused
    before anything runs)."""
    for path in report["files"].values():
        if not os.path.isfile(os.path.join(folder, path)):
            raise TurboExportError(f"{command}: {folder} has no {path}")
    family.check_report(report, os.path.join(folder, "report.json"))
    if match_graphs:
        check_graphs(folder, report, family.graph_signatures(report), command)
    else:
        for path in report["files"].values():
            files.read_onnx(os.path.join(folder, path))


def task_of(family: Any, report: dict[str, Any], folder: str) -> str:
    """The export's task (``Family.task``); a report too broken to say is the family check's one-line error."""
    try:
        return str(family.task(report))
    except (KeyError, TypeError, AttributeError, IndexError):
        family.check_report(report, os.path.join(folder, "report.json"))
        raise TurboExportError(f"{os.path.join(folder, 'report.json')}: cannot tell the export's task") from None


Signature = dict[str, dict[str, tuple[int, tuple[Any, ...]]]]  # "inputs" / "outputs" -> name -> (type, dims)


def graph_signature(model: Any) -> Signature:
    """Inputs (initializers left out) and outputs of an ONNX model: name -> (element type, dims; None if symbolic)."""
    initializers = {i.name for i in model.graph.initializer}

    def tensors(values: Any) -> dict[str, tuple[int, tuple[Any, ...]]]:
        return {v.name: (v.type.tensor_type.elem_type,
                         tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim))
                for v in values if v.name not in initializers}

    return {"inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output)}


def _shape(dims: Any) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _parameters(model: Any) -> dict[str, bytes]:
    """The model's named parameters (dotted module paths, stored in the file) -> their bytes."""
    return {i.name: i.raw_data for i in model.graph.initializer
            if "." in i.name and i.raw_data and not i.external_data}


def check_graphs(folder: str, report: dict[str, Any], declared: dict[str, Any], command: str = "validate") -> None:
    """Every graph of report.json: a valid ONNX model whose inputs and outputs are the declared ones, and a Turbo
    graph like its baseline one (same inputs and outputs, batch, types and weights; token counts at most the
    baseline's). One-line TurboExportError naming the file otherwise."""
    listed = report["files"]
    missing = [key for key in declared if key not in listed]
    if missing:
        raise TurboExportError(f"{command}: {os.path.join(folder, 'report.json')} lists no '{missing[0]}' graph "
                               f"(files: {', '.join(listed)})")
    pairs = [(key.replace("turbo", "baseline"), key) for key in listed
             if "turbo" in key and key.replace("turbo", "baseline") in listed]
    paired = {k for pair in pairs for k in pair}
    for group in [*pairs, *[(key,) for key in listed if key not in paired]]:
        models = {key: files.read_onnx(os.path.join(folder, listed[key])) for key in group}
        signatures = {key: graph_signature(m) for key, m in models.items()}
        for key in group:
            if key in declared:
                _check_declared(os.path.join(folder, listed[key]), signatures[key], declared[key], command)
        if len(group) == 2:
            base, turbo = group
            _check_pair(*(os.path.join(folder, listed[k]) for k in group), signatures[base], signatures[turbo],
                        command)
            base_weights, turbo_weights = _parameters(models[base]), _parameters(models[turbo])
            common = sorted(set(base_weights) & set(turbo_weights))
            differ = [n for n in common if base_weights[n] != turbo_weights[n]]
            if differ or (base_weights and turbo_weights and not common):
                why = f"weight '{differ[0]}' differs" if differ else "no weight in common"
                raise TurboExportError(f"{command}: '{os.path.join(folder, listed[turbo])}' holds another model's "
                                       f"weights than '{listed[base]}' ({why}); re-export the folder")


def _check_declared(path: str, actual: Signature, declared: Any, command: str) -> None:
    for side, wanted in (("inputs", declared.inputs), ("outputs", declared.outputs)):
        if wanted is None:
            continue
        names = list(actual[side])
        if sorted(names) != sorted(wanted):
            raise TurboExportError(f"{command}: '{path}' has {side} {names}, this export's report.json implies "
                                   f"{list(wanted)} (a graph of another model or export?)")
        for name, shape in wanted.items():
            dims = actual[side][name][1]
            if shape is not None and (len(dims) != len(shape)
                                      or any(s is not None and d != s for d, s in zip(dims, shape))):
                raise TurboExportError(f"{command}: '{path}': {side[:-1]} '{name}' is {_shape(dims)}, this export's "
                                       f"report.json implies {_shape(shape)} (a graph of another model or export?)")


def _check_pair(base_path: str, turbo_path: str, base: Signature, turbo: Signature, command: str) -> None:
    """A Turbo graph has every input and output of its baseline graph (it may add some: token sizes), of the same
    type, rank and batch, and no dimension larger (merging only removes tokens)."""
    for side in ("inputs", "outputs"):
        lacking = [name for name in base[side] if name not in turbo[side]]
        if lacking:
            raise TurboExportError(f"{command}: '{turbo_path}' has {side} {list(turbo[side])}, without its baseline "
                                   f"'{os.path.basename(base_path)}''s {lacking} (a graph of another model?)")
        for name, (base_type, base_dims) in base[side].items():
            turbo_type, turbo_dims = turbo[side][name]
            fits = (turbo_type == base_type and len(turbo_dims) == len(base_dims)
                    and (not base_dims or turbo_dims[0] == base_dims[0])
                    and all(t is None or b is None or t <= b for t, b in zip(turbo_dims, base_dims)))
            if not fits:
                raise TurboExportError(
                    f"{command}: '{turbo_path}': {side[:-1]} '{name}' is {_shape(turbo_dims)} (ONNX type {turbo_type}),"
                    f" its baseline '{os.path.basename(base_path)}' has {_shape(base_dims)} (type {base_type}): a graph"
                    " of another model or export?")


def load_image_encoder(source: str) -> tuple[Any, Any]:
    """(family, loaded model) for ``source`` among the image-encoder families (sweep and visualize use them)."""
    family = image_encoder_for(source)
    return family, family.load(source)
