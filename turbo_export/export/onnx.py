"""torch -> ONNX (dynamo exporter), onnx.checker, and parity validation against PyTorch in ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from turbo_export.errors import ParityError, TurboExportError

TWO_GB = 2**31
DEFAULT_ATOL = 1e-4
DEFAULT_TIE_TOLERANCE = 1e-5


@dataclass
class GraphSpec:
    """One graph to export: a module whose forward takes tensors in ``input_names`` order and returns a tuple."""

    name: str
    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    atol: float = DEFAULT_ATOL
    # The Turbo-patched model inside ``module``: lets validation tell a float32 near-tie in a merge decision
    # (which either correct implementation may resolve either way) from a wrong graph.
    merge_model: nn.Module | None = None
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and warnings for every export; keep the CLI output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _user_error_in(exc: BaseException) -> TurboExportError | None:
    """The TurboExportError that torch.export wrapped (in its own TorchExportError), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TurboExportError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def export_onnx(spec: GraphSpec, path: str) -> str:
    """Export ``spec`` to ``path`` with static shapes; weights go to external data above 2 GB."""
    import onnx

    from turbo_export.core.plugin_ops import custom_translation_table

    module = spec.module.eval()
    args = tuple(spec.example_inputs.values())
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module, args, None, dynamo=True, input_names=list(spec.example_inputs),
                output_names=spec.output_names, optimize=True, custom_translation_table=custom_translation_table(),
            )
        except Exception as exc:  # a user error raised while tracing (plugin_ops.check_plugin_sizes) stays one
            user_error = _user_error_in(exc)
            if user_error is None:
                raise
            raise user_error from None
        param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        program.save(path, external_data=param_bytes >= TWO_GB)
    onnx.checker.check_model(path if param_bytes >= TWO_GB else onnx.load(path), full_check=False)
    return path


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    max_abs_diff: float
    cosine: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.shape == self.reference_shape and self.max_abs_diff <= self.atol


@dataclass
class ParityReport:
    graph: str
    path: str
    outputs: list[OutputCheck] = field(default_factory=list)
    # samples left out of the comparison: their merge decisions were within the tie tolerance
    tie_samples: dict[int, float] = field(default_factory=dict)
    samples: int = 0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max(o.max_abs_diff for o in self.outputs)

    @property
    def cosine(self) -> float:
        return min(o.cosine for o in self.outputs)

    def lines(self) -> list[str]:
        mark = lambda ok: "✓" if ok else "x"  # noqa: E731
        out = [f"Validating ONNX model {self.path} against PyTorch ({self.graph}):"]
        for sample, margin in self.tie_samples.items():
            out.append(f"  -[!] sample {sample} of {self.samples}: a merge decision is {margin:.1e} from a tie "
                       "(float32 rounding decides it); left out of the comparison")
        for o in self.outputs:
            out.append(f'  - output "{o.name}":')
            out.append(f"    -[{mark(o.shape == o.reference_shape)}] shape {o.shape} matches {o.reference_shape}")
            out.append(
                f"    -[{mark(o.ok)}] values close (atol: {o.atol:g}): max abs diff {o.max_abs_diff:.3g}, "
                f"cosine {o.cosine:.6f}"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff, "cosine": self.cosine, "ok": self.ok,
            "outputs": {o.name: {"max_abs_diff": o.max_abs_diff, "cosine": o.cosine, "atol": o.atol,
                                 "shape": list(o.shape)} for o in self.outputs},
            "tie_samples": {str(k): v for k, v in self.tie_samples.items()},
        }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))


def compare_outputs(
    names: Sequence[str], actual: Sequence[np.ndarray], reference: Sequence[np.ndarray], atol: float
) -> list[OutputCheck]:
    checks = []
    for name, got, ref in zip(names, actual, reference):
        same_shape = tuple(got.shape) == tuple(ref.shape)
        diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if same_shape else float("inf")
        cos = cosine(got, ref) if same_shape else 0.0
        checks.append(OutputCheck(name, tuple(got.shape), tuple(ref.shape), diff, cos, atol))
    return checks


def torch_outputs(spec: GraphSpec, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = spec.module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().float().cpu().numpy() for t in out]


def validate(spec: GraphSpec, path: str, runner: Any, inputs: dict[str, torch.Tensor] | None = None) -> ParityReport:
    """Run the ONNX file (through ``runner``) and the PyTorch module on the same inputs and compare.

    For a Turbo graph, a sample whose outputs differ is left out (and listed) only when PyTorch's merge
    decisions for it lie within ``spec.tie_tolerance`` of a tie; any other difference fails.
    """
    inputs = inputs if inputs is not None else spec.example_inputs
    reference = torch_outputs(spec, inputs)
    outputs = runner.run({k: v.cpu().numpy() for k, v in inputs.items()})
    actual = [outputs[n] for n in spec.output_names]
    report = ParityReport(spec.name, path, samples=int(reference[0].shape[0]))
    report.outputs = compare_outputs(spec.output_names, actual, reference, spec.atol)
    if not report.ok and spec.merge_model is not None:
        ties = _tied_samples(spec, inputs, actual, reference)
        if ties and len(ties) < report.samples:
            keep = [i for i in range(report.samples) if i not in ties]
            report.outputs = compare_outputs(spec.output_names, [a[keep] for a in actual],
                                             [r[keep] for r in reference], spec.atol)
            report.tie_samples = ties
    return report


def _tied_samples(spec: GraphSpec, inputs: dict[str, torch.Tensor], actual: list[np.ndarray],
                  reference: list[np.ndarray]) -> dict[int, float]:
    """The differing samples if every one of them has a merge decision within the tie tolerance, else {}."""
    from turbo_export.patch.blocks import sample_margins

    if any(a.shape != r.shape for a, r in zip(actual, reference)):
        return {}
    bad = set()
    for a, r in zip(actual, reference):
        diff = np.abs(a.astype(np.float64) - r.astype(np.float64)).reshape(a.shape[0], -1).max(axis=1)
        bad.update(np.nonzero(diff > spec.atol)[0].tolist())
    margins = sample_margins(spec.merge_model, lambda: spec.module(*inputs.values()))
    if margins is None or any(float(margins[i]) >= spec.tie_tolerance for i in bad):
        return {}
    return {i: float(margins[i]) for i in sorted(bad)}


def require_parity(report: ParityReport) -> None:
    if not report.ok:
        worst = max(report.outputs, key=lambda o: o.max_abs_diff)
        raise ParityError(
            f"{report.graph}: ONNX output '{worst.name}' differs from PyTorch: max abs diff "
            f"{worst.max_abs_diff:.3g} > atol {worst.atol:g} (shape {worst.shape} vs {worst.reference_shape})"
        )


def file_size(path: str) -> int:
    total = os.path.getsize(path)
    data = path + ".data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)
