"""Parity of an exported graph with its PyTorch module: run both on the same inputs, compare every output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from turbo_export.errors import ParityError
from turbo_export.families.base import GraphSpec
from turbo_export.metrics import OutputCheck, compare_outputs


@dataclass
class ParityReport:
    graph: str
    path: str
    outputs: list[OutputCheck] = field(default_factory=list)
    # samples left out of the comparison: their merge decisions were within the tie tolerance
    tie_samples: dict[int, float] = field(default_factory=dict)
    samples: int = 0
    batches: list[int] = field(default_factory=list)  # the batch sizes checked (a dynamic-batch graph: B and 1)
    max_abs_diff_by_batch: dict[int, float] = field(default_factory=dict)

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
            "batches": self.batches or [self.samples],
            "max_abs_diff_by_batch": {str(k): v for k, v in (self.max_abs_diff_by_batch or {
                self.samples: self.max_abs_diff}).items()},
        }



def torch_outputs(spec: GraphSpec, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = spec.module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().float().cpu().numpy() for t in out]


def _both_sides(spec: GraphSpec, runner: Any, inputs: dict[str, torch.Tensor]
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The PyTorch module's outputs and the graph's (through ``runner``) on the same inputs, in output order."""
    outputs = runner.run({k: v.cpu().numpy() for k, v in inputs.items()})
    return torch_outputs(spec, inputs), [outputs[n] for n in spec.output_names]


def check_graph(spec: GraphSpec, path: str, runner: Any, inputs: dict[str, torch.Tensor] | None = None) -> ParityReport:
    """Run the ONNX file (through ``runner``) and the PyTorch module on the same inputs and compare.

    For a Turbo graph, a sample whose outputs differ is left out (and listed) only when PyTorch's merge
    decisions for it lie within ``spec.tie_tolerance`` of a tie; any other difference fails.
    """
    inputs = inputs if inputs is not None else spec.example_inputs
    reference, actual = _both_sides(spec, runner, inputs)
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


def check_graph_as_sets(spec: GraphSpec, path: str, runner: Any, inputs: dict[str, torch.Tensor] | None = None
                        ) -> ParityReport:
    """``check_graph`` where merge decisions may differ (an int8 graph against the fp32 model): each output in
    ``spec.token_sets`` is compared by what its consumer sees whatever the token order (the size-weighted mean token
    and the first, protected, token) and its sizes output by its total; every other output as it is."""
    inputs = inputs if inputs is not None else spec.example_inputs
    reference, actual = (dict(zip(spec.output_names, side)) for side in _both_sides(spec, runner, inputs))
    names, got, want = [], [], []
    for name in spec.output_names:
        sizes = spec.token_sets.get(name)
        if sizes is not None:
            names.append(f"{name} (as a set)")
            got.append(set_summary(actual[name], actual[sizes]))
            want.append(set_summary(reference[name], reference[sizes]))
        elif name in spec.token_sets.values():
            names.append(f"{name} (total)")
            got.append(actual[name].sum(axis=1))
            want.append(reference[name].sum(axis=1))
        else:
            names.append(name)
            got.append(actual[name])
            want.append(reference[name])
    report = ParityReport(spec.name, path, samples=int(want[0].shape[0]))
    report.outputs = compare_outputs(names, got, want, spec.atol)
    return report


def set_summary(tokens: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """[batch, tokens, dim] -> [batch, 2, dim]: the size-weighted mean token and the first token."""
    weights = sizes.astype(np.float64)[..., None]
    mean = (tokens.astype(np.float64) * weights).sum(axis=1) / weights.sum(axis=1)
    return np.stack([mean, tokens[:, 0].astype(np.float64)], axis=1)


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


