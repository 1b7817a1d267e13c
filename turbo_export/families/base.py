"""The family declaration: everything the one export job, ``validate``, ``sweep``, ``visualize`` and ``serve`` need
to know about a model family, in one small class per family (optimum's ``OnnxConfig`` idea).

A family module subclasses :class:`Family`, fills in the class attributes and implements :meth:`Family.load` and
:meth:`Family.plan`; ``@register`` puts it in the one registry. Nothing outside a family's own module names a
family: the CLI, the export job, evaluate and serve look families up here, by report.json's ``family`` or by a
model's class. This module imports no torch, so the registry is cheap to read (``turbo-export presets``, serve).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from turbo_export.errors import TurboExportError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_ATOL = 1e-4
DEFAULT_TIE_TOLERANCE = 1e-5
Log = Callable[[str], None]


@dataclass(frozen=True)
class Defaults:
    """A family's Turbo defaults; ``evidence`` says which measurement settled them (docs/validation.md)."""

    alpha: float
    min_tokens: int = 0
    atol: float = DEFAULT_ATOL
    evidence: str = ""


@dataclass(frozen=True)
class PresetInfo:
    """A ``random:<name>`` model: seeded random weights from a config class, built offline."""

    name: str
    model_class: str
    description: str


@dataclass
class GraphSpec:
    """One graph to export: a module whose forward takes tensors in ``example_inputs`` order and returns a tuple."""

    name: str
    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    atol: float = DEFAULT_ATOL
    # The Turbo-patched model inside ``module``: lets validation tell a float32 near-tie in a merge decision
    # (which either correct implementation may resolve either way) from a wrong graph.
    merge_model: nn.Module | None = None
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE
    # input name -> its batch axis: these become one symbolic "batch" dimension in a dynamic-batch export
    batch_axes: dict[str, int] = field(default_factory=dict)
    # input name -> {axis: dimension name}: symbolic in every export (e.g. the image tokens a shared decoder reads);
    # ``dim_ranges`` gives each name's (min, opt, max) for TensorRT's optimization profile
    symbolic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # merged-token output -> the output holding each token's size, for outputs whose consumer does not depend on
    # the token order (cross-attention reads a set). Where merge decisions may legitimately differ (int8), such an
    # output is compared as a set: its size-weighted mean token and its first (protected) token.
    token_sets: dict[str, str] = field(default_factory=dict)

    def rows(self) -> int:
        """The example inputs' batch (0 when no input has a batch axis)."""
        return next((int(self.example_inputs[n].shape[a]) for n, a in self.batch_axes.items()), 0)

    def first_rows(self, count: int) -> dict[str, torch.Tensor]:
        """The example inputs cut to their first ``count`` rows along each batch axis."""
        return {n: v.narrow(self.batch_axes[n], 0, count) if n in self.batch_axes else v
                for n, v in self.example_inputs.items()}


def batch_first(inputs: dict[str, Any]) -> dict[str, int]:
    """``batch_axes`` for graphs whose every input has its batch on axis 0."""
    return {name: 0 for name in inputs}


@dataclass
class BenchPlan:
    """What the interleaved benchmark times: one graph per side, fed ``feeds``, ``rows`` items per call."""

    graphs: dict[str, str]  # "baseline" / "turbo" -> graph name
    feeds: dict[str, dict[str, Any]]  # "baseline" / "turbo" -> inputs
    rows: int
    fields: dict[str, Any] = field(default_factory=dict)  # extra report.json bench fields (what was timed)


@dataclass
class ExportPlan:
    """A family's answer to "export this model with these options", made after every check has passed.

    The job exports ``graphs`` (names become ``<name>.onnx``), checks each against PyTorch, calls ``after_export``
    with the open runners (pipeline checks: captions equal to ``generate``, ...; returns report fields), times
    ``bench`` interleaved, and writes one report: the common fields, then ``report`` and ``after_export``'s.
    """

    source: str  # what the user passed as --model
    model_class: str
    graphs: dict[str, GraphSpec]
    report: dict[str, Any]  # family fields of report.json (ratio, tokens per layer, ...)
    flops: dict[str, Any]  # "baseline", "turbo" (+ "scope", "counted_by", ...); the job adds "ratio"
    bench: BenchPlan
    parity_pair: tuple[str, str] = ("baseline", "turbo")  # the graphs report.json's parity headline names
    parity_what: str = "model"  # "Turbo <what> (PyTorch)" in the parity headline
    merge_impl: str = "onnx"
    after_export: Callable[[dict[str, Any], Log], dict[str, Any]] | None = None
    # (runners) -> {"baseline": callable, "turbo": callable, "what": str, "flops": {...} | None}: a whole pipeline
    # timed after the graph benchmark (BLIP: captions/s)
    pipeline_bench: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    environment: dict[str, str] = field(default_factory=dict)  # extra library versions for report.json


class Family:
    """One model family. Subclasses declare the class attributes and implement ``load`` and ``plan``."""

    name: ClassVar[str]  # report.json's "family"
    command: ClassVar[str]  # the CLI command that exports it
    model_classes: ClassVar[tuple[str, ...]]  # the model classes it supports (transformers / diffusers names)
    defaults: ClassVar[Defaults]
    # What reads its exports: the evaluate validator and the serve pipelines are chosen by this kind
    # ("image-encoder", "vision-language", "text-to-image"), not by the family's name.
    kind: ClassVar[str]
    options_type: ClassVar[type]  # the family's export options (a dataclass)
    bench_warmup: ClassVar[int] = 3  # untimed calls per graph before the interleaved benchmark

    def presets(self) -> list[PresetInfo]:
        return []

    def preset_config(self, name: str) -> Any:
        """The config of ``random:<name>`` (without building the model), or TurboExportError for an unknown one."""
        raise TurboExportError(f"model: unknown preset 'random:{name}' for {self.command}")

    def defaults_for(self, model_class: str) -> Defaults:
        """The defaults for one supported class (a family may differ by head, e.g. classifier vs backbone)."""
        return self.defaults

    def load(self, source: str, options: Any) -> Any:
        """``random:<preset>``, a local folder or a hub id -> the loaded model (family's own type)."""
        raise NotImplementedError

    def plan(self, loaded: Any, options: Any, run: Any, log: Log) -> ExportPlan:
        """Check ``options`` against the model (every user mistake raises TurboExportError here, before any export
        work) and declare the graphs, FLOPs, benchmark and report fields. ``run``: the job's ``RunOptions``."""
        raise NotImplementedError

    def default_out_dir(self, loaded: Any, options: Any) -> str:
        raise NotImplementedError

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        """Lines printed after an export: the baseline-vs-Turbo table of report.json."""
        from turbo_export.families.summary import summary_lines

        return summary_lines(report)

    def task(self, report: dict[str, Any]) -> str:
        """The export's task, for families with several (BLIP: caption, retrieval, vqa)."""
        return self.kind

    def report_fields(self) -> dict[str, str]:
        """The report.json fields that readers of this family's exports use (validate, serve): dotted path -> a type
        of ``files.FIELD_TYPES``, ``?`` when optional. Default: what the readers of the family's kind read."""
        return KIND_REPORT_FIELDS.get(self.kind, {})

    def check_report(self, report: dict[str, Any], where: str = "report.json", present_only: bool = False) -> None:
        """Raise a one-line TurboExportError when a report.json of this family lacks what readers need, or has it
        with the wrong type (checked once, before any field is used). ``present_only``: type-check only the fields
        that are there (a reader that needs none of them, such as triton-repo)."""
        from turbo_export.files import check_fields

        fields = self.report_fields()
        if present_only:
            fields = {key: kind if kind.endswith("?") else kind + "?" for key, kind in fields.items()}
        check_fields(report, fields, where)

    def graph_signatures(self, report: dict[str, Any]) -> dict[str, GraphSignature]:
        """The graphs (report.json ``files`` keys) an export described by ``report`` holds, and what each takes and
        gives, for readers to check before they run one (``evaluate.common.read_export``): a graph of another model
        or another export is a one-line error, not a runtime failure. Call after ``check_report``. Default: the
        graphs the readers of the family's kind open; graphs not declared are still compared with their Turbo /
        baseline counterpart."""
        return kind_graph_signatures(self.kind, report)


@dataclass(frozen=True)
class GraphSignature:
    """The inputs and outputs a graph must have, by name: a shape with None for a free dimension (a name mapped to
    None: any shape). ``outputs`` None: not declared."""

    inputs: dict[str, tuple[int | None, ...] | None]
    outputs: dict[str, tuple[int | None, ...] | None] | None = None


_ENCODER_FIELDS = {
    "model": "str", "model_class": "str", "batch": "pos-int", "image_size": "pos-int", "ratio": "int|int-list", "alpha": "number",
    "min_tokens": "int", "tokens_per_layer": "dict", "tokens_per_layer.baseline": "int-list",
    "tokens_per_layer.turbo": "int-list", "merged_per_layer": "int-list?", "flops": "dict", "flops.ratio": "number",
}
# What the readers of each kind (validate's validators, serve's pipelines) read from report.json.
KIND_REPORT_FIELDS: dict[str, dict[str, str]] = {
    "image-encoder": {**_ENCODER_FIELDS, "r_schedule": "int-list", "prop_attn": "bool", "files.baseline": "str",
                      "files.turbo": "str"},
    "vision-language": {**_ENCODER_FIELDS, "task": "dict", "task.name": "str:caption|retrieval|vqa", "task.max_new_tokens": "pos-int?",
                        "task.num_beams": "pos-int?", "task.text_len": "pos-int?", "task.size_aware_cross_attention": "bool?",
                        "files.baseline_vision": "str", "files.turbo_vision": "str"},
    "text-to-image": {"model": "str", "batch": "pos-int", "graph_batch": "pos-int?", "ratio": "number",
                      "alpha": "number", "text_len": "pos-int?", "latent_size": "int-list?", "resolution": "int?",
                      "flops": "dict", "flops.ratio": "number", "files.baseline": "str", "files.turbo": "str"},
}


def kind_graph_signatures(kind: str, report: dict[str, Any]) -> dict[str, GraphSignature]:
    """The graphs the readers of ``kind`` open, with the shapes report.json implies (see ``graph_signatures``)."""
    symbolic = report.get("batch_dim") == "symbolic"  # any batch: the graphs' first dimension is symbolic
    batch = None if symbolic else report.get("batch")
    if kind in ("image-encoder", "vision-language"):
        size = report.get("image_size")
        pixels = {"pixel_values": (batch, None, size, size)}
        if kind == "vision-language":
            return {f"{n}_vision": GraphSignature(pixels) for n in ("baseline", "turbo")}
        tokens, merged = report.get("tokens_per_layer") or {}, report.get("merged_per_layer")
        final: dict[str, int | None] = {"baseline": None, "turbo": None}  # tokens after the last block
        if tokens.get("baseline"):
            final["baseline"] = tokens["baseline"][-1]
        if tokens.get("turbo") and merged and len(merged) == len(tokens["turbo"]):
            final["turbo"] = tokens["turbo"][-1] - merged[-1]
        out: dict[str, GraphSignature] = {}
        for name in ("baseline", "turbo"):
            if "ForImageClassification" in str(report.get("model_class", "")):
                outputs: dict[str, Any] = {"logits": (batch, None)}
            elif report.get("model_class"):  # a backbone: the tokens after the last block, and the pooled CLS
                outputs = {"last_hidden_state": (batch, final[name], None), "pooler_output": (batch, None)}
            else:
                outputs = None
            out[name] = GraphSignature(pixels, outputs)
        return out
    if kind == "text-to-image":
        rows = None if symbolic else report.get("graph_batch") or (2 * batch if isinstance(batch, int) else None)
        latent = list(report.get("latent_size") or [None, None])[:2]
        sample = (rows, None, *latent)
        inputs: dict[str, Any] = {"sample": sample, "timestep": (rows,),
                                  "encoder_hidden_states": (rows, report.get("text_len"), None)}
        if report.get("layout") == "sdxl":  # SDXL's added conditioning: pooled text embeddings and size ids
            inputs.update(text_embeds=(rows, None), time_ids=(rows, None))
        signature = GraphSignature(inputs, {"noise_pred": sample})
        return {"baseline": signature, "turbo": signature}
    return {}


REGISTRY: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family declaration to the registry (its ``name`` must be new)."""
    if cls.name in REGISTRY:
        raise ValueError(f"family '{cls.name}' is registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def get_family(name: str) -> Family:
    _load_declarations()
    family = REGISTRY.get(name)
    if family is None:
        raise TurboExportError(f"family: unknown '{name}'; known: {', '.join(sorted(REGISTRY))}")
    return family


def families() -> list[Family]:
    _load_declarations()
    return list(REGISTRY.values())


def family_for_class(class_name: str) -> Family | None:
    """The family that supports a model class, or None."""
    return next((f for f in families() if class_name in f.model_classes), None)


def image_encoder_for(source: str, kind: str = "image-encoder") -> Family:
    """The family of ``kind`` that exports ``source``: a ``random:<preset>`` by the preset's name, a checkpoint
    folder or hub id by the class its config.json names (read without loading the weights). One export command
    (``turbo-export vit``) serves every family of the kind this way, and so do sweep and visualize."""
    candidates = [f for f in families() if f.kind == kind]
    supported = sorted(c for f in candidates for c in f.model_classes)
    if source.startswith("random:"):
        name = source[len("random:"):]
        found = next((f for f in candidates if any(p.name == name for p in f.presets())), None)
        if found is None:
            raise TurboExportError(f"model: unknown preset '{source}'; available: "
                                   + ", ".join(f"random:{p.name}" for f in candidates for p in f.presets()))
        return found
    from turbo_export.models.presets import checkpoint_classes

    classes = checkpoint_classes(source)
    found = next((f for f in candidates if any(c in f.model_classes for c in classes)), None)
    if found is None:
        raise TurboExportError(f"model: '{source}' is a {', '.join(classes)} checkpoint; supported classes: "
                               + ", ".join(supported))
    return found


def supported_classes() -> list[str]:
    return sorted(c for f in families() for c in f.model_classes)


def _load_declarations() -> None:
    import turbo_export.families  # noqa: F401  (its __init__ imports every declaration, which registers it)
