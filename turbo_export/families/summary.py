"""The baseline-vs-Turbo table printed after an export, from report.json alone (no torch)."""

from __future__ import annotations

from typing import Any


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Tokens per layer, FLOPs, parity and throughput side by side, closed by the FLOPs ratio and the speedup."""
    base, tur = report["tokens_per_layer"]["baseline"], report["tokens_per_layer"]["turbo"]
    rows = [
        ("model", report["model"], ""),
        ("tokens per layer", f"{base[0]} x {len(base)}", " ".join(str(n) for n in tur)),
        ("GFLOPs / image", f"{report['flops']['baseline'] / 1e9:.3f}", f"{report['flops']['turbo'] / 1e9:.3f}"),
    ]
    rows += parity_rows(report, cosine=True)
    if report.get("bench"):
        b = report["bench"]
        rows.append((f"{b['backend']} images/s (batch {b['batch']})", f"{b['baseline_ips']:.1f}",
                     f"{b['turbo_ips']:.1f}"))
        rows.append(("median latency ms", f"{b['baseline_median_ms']:.1f}", f"{b['turbo_median_ms']:.1f}"))
    return comparison_table(rows, report, f"turbo (r={report['ratio']}, alpha={report['alpha']:g})")


def parity_rows(report: dict[str, Any], cosine: bool) -> list[tuple[str, str, str]]:
    if not report.get("parity"):
        return []
    p, pb = report["parity"], report["parity_baseline"]
    rows = [("ONNX vs PyTorch max|diff|", f"{pb['max_abs_diff']:.2e}", f"{p['max_abs_diff']:.2e}")]
    if cosine:
        rows.append(("ONNX vs PyTorch cosine", f"{pb['cosine']:.6f}", f"{p['cosine']:.6f}"))
    return rows


def comparison_table(rows: list[tuple[str, str, str]], report: dict[str, Any], turbo_title: str) -> list[str]:
    """Rows of (what, baseline, turbo) as aligned columns, closed by the FLOPs ratio and the measured speedup."""
    width = max(len(r[0]) for r in rows)
    col = max(12, max(len(r[1]) for r in rows))
    lines = [f"{'':{width}}  {'baseline':>{col}}  {turbo_title}"]
    lines += [f"{a:{width}}  {b:>{col}}  {c}" for a, b, c in rows]
    lines.append(f"{'FLOPs ratio':{width}}  {report['flops']['ratio']:>{col}.2f}x")
    if report.get("bench"):
        b = report["bench"]
        lines.append(f"{'speedup':{width}}  {b['speedup']:>{col}.2f}x  "
                     f"({b['speedup_over_flops_ratio']:.2f} of the FLOPs ratio)")
        spread = speedup_spread(b.get("baseline_ms") or [], b.get("turbo_ms") or [], report["flops"]["ratio"])
        if spread:
            lines.append(f"{'speedup per run':{width}}  {spread['min']:>{col}.2f}x  to {spread['max']:.2f}x, median "
                         f"{spread['median']:.2f}x ({spread['runs']} interleaved runs, min to max)")
            if spread["verdict"]:
                lines.append(f"{'':{width}}  {spread['verdict']}")
    return lines


def peer_lines(report: dict[str, Any]) -> list[str]:
    """Every model of the interleaved run (report.json's bench.peers), fastest first, against the unaccelerated
    graph at the chosen precision."""
    bench = report.get("bench") or {}
    peers = bench.get("peers") or []
    if not peers:
        return []
    reference = bench["baseline_ips"]
    width = max(len(f"{p['name']} ({p['runtime']}, {p['precision']})") for p in peers)
    blocks = bench.get("blocks", 1)
    rotated = f"; {blocks} blocks, sessions created anew in a rotated order" if blocks > 1 else ""
    lines = ["", f"same interleaved run, batch {bench['batch']} (items/s, median with min..max of the timed "
             f"runs{rotated}):"]
    for p in sorted(peers, key=lambda p: -p["items_per_s"]):
        label = f"{p['name']} ({p['runtime']}, {p['precision']})"
        spread = f"{bench['batch'] / p['max_ms'] * 1e3:.1f}..{bench['batch'] / p['min_ms'] * 1e3:.1f}"
        lines.append(f"  {label:{width}}  {p['items_per_s']:9.1f}  [{spread}]  {p['items_per_s'] / reference:5.2f}x")
    return lines


def speedup_spread(baseline_ms: list[float], turbo_ms: list[float], flops_ratio: float) -> dict[str, Any] | None:
    """The spread of the speedup over the interleaved runs: run i's speedup is baseline_ms[i] / turbo_ms[i] (the two
    sides were timed one after the other in the same round). Returns min / median / max, the number of runs and a
    ``verdict``: a plain sentence when even the slowest run beats the FLOPs ratio (more speedup than the removed
    FLOPs explain: noise or a measurement artifact), or when only the median does (within the run-to-run spread);
    else "". None without paired runs."""
    pairs = [(b, t) for b, t in zip(baseline_ms, turbo_ms) if b > 0 and t > 0]
    if not pairs:
        return None
    runs = sorted(b / t for b, t in pairs)
    middle = len(runs) // 2
    median = runs[middle] if len(runs) % 2 else (runs[middle - 1] + runs[middle]) / 2
    verdict = ""
    if runs[0] > flops_ratio:
        verdict = (f"above the FLOPs ratio ({flops_ratio:.2f}x) in every run, by more than the run-to-run spread: "
                   "likely noise or a measurement artifact (a loaded machine?), not a gain beyond the FLOPs removed")
    elif median > flops_ratio:
        verdict = (f"median above the FLOPs ratio ({flops_ratio:.2f}x) but within the run-to-run spread "
                   f"(min {runs[0]:.2f}x): not a gain beyond the FLOPs removed")
    return {"runs": len(runs), "min": runs[0], "median": median, "max": runs[-1], "flops_ratio": flops_ratio,
            "above_flops_ratio": runs[0] > flops_ratio, "verdict": verdict}
