"""int8 with Turbo on ONNX Runtime CPU, against the peers a user would pick instead, in ONE interleaved run.

Exports ViT-B/16 (seeded random weights) unaccelerated and with Turbo r=16, quantizes them, and times side by side:

- ONNX Runtime: unaccelerated fp32; unaccelerated int8 by one plain ``quantize_dynamic`` call; unaccelerated int8
  by ONNX Runtime's recommended pre-processing (``quant_pre_process``) + ``quantize_dynamic``, the path that
  gives 74 DynamicQuantizeLinear / ~190 Reshapes; unaccelerated int8 by ``quantize_graph`` (this project);
  Turbo fp32; Turbo int8 by ``quantize_graph``;
- optimum-onnx's export of the same weights (saved with ``save_pretrained``) quantized by one ``quantize_dynamic``
  call, when a second Python with optimum-onnx exists (optimum-onnx needs transformers < 5; ``--optimum-python``);
- PyTorch eager (``torch.no_grad``): the transformers model unaccelerated and with ``apply_turbo(model, ratio)``.

Every graph's int8 output is compared with its fp32 output (cosine, same inputs). Medians with min / max over
``--runs`` interleaved rounds (the order alternates each round), in blocks: before each block the ONNX Runtime
sessions are created anew in a rotated order, since on this machine the session created last runs fastest
(``bench.interleaved``). A shared machine makes absolute figures noisy; the ratios within one run are what to
read. OMP_WAIT_POLICY=PASSIVE (unless set) keeps PyTorch's idle OpenMP threads from spinning on the cores the next
ONNX Runtime session runs on.

    python scripts/bench_int8.py --model random:vit-base-patch16-224 --ratio 16 --batch 8 --runs 10 \\
        --optimum-python ../venv-optimum/bin/python --json int8.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import torch
from torch import nn

from turbo_export import apply_turbo
from turbo_export.backends import bench, make_runner
from turbo_export.backends.torch_runner import TorchRunner
from turbo_export.export.onnx import export_onnx
from turbo_export.export.parity import check_graph as validate
from turbo_export.export.parity import require_parity
from turbo_export.export.quantize import naive_quantize_dynamic, op_counts, quantize_graph
from turbo_export.families import get_family
from turbo_export.families.base import GraphSpec
from turbo_export.files import write_json_atomic
from turbo_export.metrics import cosine

OPTIMUM_EXPORT = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="image-classification", do_validation=False)
"""


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(pixel_values=pixel_values).logits,)


def log(message: str) -> None:
    click.echo(message, err=True)


def export_pair(model: nn.Module, turbo: nn.Module, pixels: dict[str, torch.Tensor], folder: str,
                static_batch: bool = False) -> dict[str, str]:
    """baseline.onnx and turbo.onnx in ``folder`` (reused when there), each checked against PyTorch; a symbolic
    batch, as ``turbo-export vit`` exports them (and optimum-onnx its graphs), unless ``static_batch``."""
    paths = {}
    for name, m in (("baseline", model), ("turbo", turbo)):
        path = os.path.join(folder, f"{name}{'_static' if static_batch else ''}.onnx")
        graph = GraphSpec(name, Logits(m), pixels, ["logits"], merge_model=turbo if name == "turbo" else None,
                          batch_axes={"pixel_values": 0})
        if not os.path.isfile(path):
            start = time.perf_counter()
            export_onnx(graph, path, dynamic_batch=not static_batch)
            log(f"exported {name}.onnx in {time.perf_counter() - start:.0f} s")
        report = validate(graph, path, make_runner(path))
        require_parity(report)
        log(f"  {name}.onnx vs PyTorch: max abs diff {report.max_abs_diff:.2e}")
        paths[name] = path
    return paths


def export_optimum(model: nn.Module, python: str, folder: str) -> str | None:
    """optimum-onnx's export of ``model`` (saved with save_pretrained) by ``python``; None (said) when it fails."""
    out = os.path.join(folder, "optimum", "model.onnx")
    if os.path.isfile(out):
        return out
    checkpoint = os.path.join(folder, "checkpoint")
    model.save_pretrained(checkpoint)
    start = time.perf_counter()
    result = subprocess.run([python, "-c", OPTIMUM_EXPORT, checkpoint, os.path.dirname(out)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0 or not os.path.isfile(out):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        log(f"optimum export failed, left out: {tail[0]}")
        return None
    log(f"exported optimum/model.onnx in {time.perf_counter() - start:.0f} s ({python})")
    return out


def quantize_all(paths: dict[str, str], optimum: str | None, folder: str) -> tuple[dict[str, str], dict]:
    """The int8 graphs; returns {runner name: path} and the quantize reports / op counts."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    q = {name: os.path.join(folder, f"{name}.onnx") for name in
         ("baseline_int8_naive", "baseline_preprocessed", "baseline_int8_preprocessed", "baseline_int8",
          "turbo_int8", "optimum_int8")}
    info: dict = {"counts": {}}
    start = time.perf_counter()
    naive_quantize_dynamic(paths["baseline"], q["baseline_int8_naive"])
    info["naive_seconds"] = time.perf_counter() - start
    quant_pre_process(paths["baseline"], q["baseline_preprocessed"])
    naive_quantize_dynamic(q["baseline_preprocessed"], q["baseline_int8_preprocessed"])
    for name in ("baseline", "turbo"):
        report = quantize_graph(paths[name], q[f"{name}_int8"], "dynamic")
        for line in report.lines():
            log(line)
        info[f"{name}_report"] = report.as_dict()
    if optimum:
        naive_quantize_dynamic(optimum, q["optimum_int8"])
    files = {"baseline fp32": paths["baseline"], "baseline fp32 (ORT pre-processed)": q["baseline_preprocessed"],
             "baseline int8 (quantize_dynamic)": q["baseline_int8_naive"],
             "baseline int8 (pre-process + quantize_dynamic)": q["baseline_int8_preprocessed"],
             "baseline int8 (quantize_graph)": q["baseline_int8"], "turbo fp32": paths["turbo"],
             "turbo int8 (quantize_graph)": q["turbo_int8"]}
    if optimum:
        files.update({"optimum fp32": optimum, "optimum int8 (quantize_dynamic)": q["optimum_int8"]})
    for name, path in files.items():
        c = op_counts(path)
        info["counts"][name] = {k: c.get(k, 0) for k in ("DynamicQuantizeLinear", "Reshape", "MatMulInteger",
                                                         "MatMul", "Gemm")}
    return q, info


@click.command()
@click.option("--model", "model_source", default="random:vit-base-patch16-224", show_default=True)
@click.option("--ratio", default=16, show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--runs", default=10, show_default=True)
@click.option("--warmup", default=2, show_default=True)
@click.option("--work", default=None, help="Folder for the ONNX files (kept, and reused by a later run); "
                                           "default: a temporary folder.")
@click.option("--optimum-python", default=lambda: os.environ.get("TURBO_OPTIMUM_PYTHON", ""),
              help="A Python with optimum-onnx (transformers < 5) [default: $TURBO_OPTIMUM_PYTHON]; optimum is left "
                   "out without one.")
@click.option("--no-torch", is_flag=True, help="Leave out the PyTorch eager peers.")
@click.option("--static-batch", is_flag=True, help="Export our graphs with the static batch --batch (default: a "
                                                   "symbolic batch, as turbo-export and optimum-onnx export them).")
@click.option("--json", "json_path", default=None)
def main(model_source: str, ratio: int, batch: int, runs: int, warmup: int, work: str | None, optimum_python: str,
         no_torch: bool, static_batch: bool, json_path: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = work or tmp
        os.makedirs(folder, exist_ok=True)
        run(model_source, ratio, batch, runs, warmup, folder, optimum_python, no_torch, json_path, static_batch)


def run(model_source, ratio, batch, runs, warmup, folder, optimum_python, no_torch, json_path,
        static_batch=False) -> None:
    loaded = get_family("vit").load(model_source)
    model = loaded.model.eval()
    turbo = apply_turbo(copy.deepcopy(model), ratio)
    size = loaded.image_size
    pixels = {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}
    paths = export_pair(model, turbo, pixels, folder, static_batch)
    optimum = export_optimum(model, optimum_python, folder) if os.path.isfile(optimum_python) else None
    if optimum is None and not os.path.isfile(optimum_python):
        log(f"no optimum-onnx Python at '{optimum_python}' (--optimum-python): optimum left out")
    q, info = quantize_all(paths, optimum, folder)
    feed = {"pixel_values": pixels["pixel_values"].numpy()}
    if optimum:  # the same weights: optimum's fp32 graph must give our fp32 graph's logits
        diff = float(np.abs(make_runner(optimum).run(feed)["logits"]
                            - make_runner(paths["baseline"]).run(feed)["logits"]).max())
        log(f"optimum fp32 vs our unaccelerated fp32 graph: max abs diff {diff:.2e}")
        info["optimum_fp32_max_abs_diff_vs_ours"] = diff

    onnx_files = {
        "unaccelerated fp32": (paths["baseline"], "onnxruntime", "fp32"),
        "unaccelerated int8, quantize_dynamic": (q["baseline_int8_naive"], "onnxruntime", "int8"),
        "unaccelerated int8, pre-process + quantize_dynamic": (q["baseline_int8_preprocessed"], "onnxruntime",
                                                                "int8"),
        "unaccelerated int8, quantize_graph": (q["baseline_int8"], "onnxruntime", "int8"),
        "turbo fp32": (paths["turbo"], "onnxruntime", "fp32"),
        "turbo int8, quantize_graph": (q["turbo_int8"], "onnxruntime", "int8"),
    }
    if optimum:
        onnx_files["optimum int8, quantize_dynamic"] = (q["optimum_int8"], "onnxruntime", "int8")
    runners = {name: make_runner(path) for name, (path, _, _) in onnx_files.items()}
    kinds = {name: (rt, p) for name, (_, rt, p) in onnx_files.items()}
    if not no_torch:
        runners["pytorch eager"] = TorchRunner(Logits(model), pixels, ["logits"], "pytorch")
        runners[f"pytorch eager + apply_turbo(r={ratio})"] = TorchRunner(Logits(turbo), pixels, ["logits"], "turbo")
        kinds["pytorch eager"] = kinds[f"pytorch eager + apply_turbo(r={ratio})"] = ("pytorch", "fp32")

    # accuracy of each int8 graph against its own fp32 graph (optimum's against ours: same weights)
    outputs = {name: r.run(feed)["logits"] for name, r in runners.items()}
    reference = {"unaccelerated": outputs["unaccelerated fp32"], "turbo": outputs["turbo fp32"]}
    accuracy = {}
    for name, out in outputs.items():
        ref = reference["turbo"] if "turbo" in name else reference["unaccelerated"]
        accuracy[name] = {"cosine_vs_fp32": cosine(out, ref), "cosine_vs_unaccelerated_fp32":
                          cosine(out, reference["unaccelerated"])}

    log(f"timing {len(runners)} runners interleaved: {warmup} warm-up + {runs} rounds, batch {batch}")
    feeds = {name: feed for name in runners}
    timings = bench.interleaved(runners, feeds, batch, warmup=warmup, runs=runs, desc="interleaved")

    blocks = len(next(iter(timings.values())).block_medians_s)
    rows = []
    for name, t in timings.items():
        runtime, precision = kinds[name]
        rows.append({"name": name, "runtime": runtime, "precision": precision, "items_per_s": t.items_per_s,
                     "median_ms": t.median_s * 1e3, "min_ms": min(t.seconds) * 1e3, "max_ms": max(t.seconds) * 1e3,
                     "block_medians_ms": [m * 1e3 for m in t.block_medians_s], **accuracy[name]})
    ips = {r["name"]: r["items_per_s"] for r in rows}
    ratios = {
        "turbo_int8_vs_unaccelerated_fp32": ips["turbo int8, quantize_graph"] / ips["unaccelerated fp32"],
        "turbo_int8_vs_unaccelerated_int8": ips["turbo int8, quantize_graph"]
        / ips["unaccelerated int8, quantize_graph"],
        "unaccelerated_int8_vs_naive_int8": ips["unaccelerated int8, quantize_graph"]
        / ips["unaccelerated int8, quantize_dynamic"],
        "unaccelerated_int8_vs_preprocessed_int8": ips["unaccelerated int8, quantize_graph"]
        / ips["unaccelerated int8, pre-process + quantize_dynamic"],
        "turbo_fp32_vs_unaccelerated_fp32": ips["turbo fp32"] / ips["unaccelerated fp32"],
    }
    if optimum:
        ratios["unaccelerated_int8_vs_optimum_int8"] = (ips["unaccelerated int8, quantize_graph"]
                                                        / ips["optimum int8, quantize_dynamic"])
        ratios["turbo_int8_vs_optimum_int8"] = ips["turbo int8, quantize_graph"] / ips["optimum int8, quantize_dynamic"]

    click.echo(f"\n{model_source}, {size} px, batch {batch}, Turbo r={ratio}; ONNX Runtime CPU "
               f"({os.cpu_count()} cores); {runs} interleaved rounds after {warmup} warm-up, in {blocks} blocks of "
               "sessions created anew in a rotated order; images/s from the median, min/max latency in ms\n")
    click.echo("| runner | runtime | precision | images/s | median ms | min ms | max ms | cosine vs its fp32 |")
    click.echo("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        click.echo(f"| {r['name']} | {r['runtime']} | {r['precision']} | {r['items_per_s']:.2f} | "
                   f"{r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} | {r['cosine_vs_fp32']:.5f} |")
    click.echo("")
    targets = {"turbo_int8_vs_unaccelerated_fp32": 3.8, "turbo_int8_vs_unaccelerated_int8": 1.85,
               "unaccelerated_int8_vs_optimum_int8": 1.0}
    for key, value in ratios.items():
        target = f" (target >= {targets[key]})" if key in targets else ""
        click.echo(f"{key}: {value:.2f}x{target}")
    click.echo("\nnode counts (DynamicQuantizeLinear / Reshape / MatMulInteger / MatMul / Gemm):")
    for name, c in info["counts"].items():
        click.echo(f"  {name}: {c['DynamicQuantizeLinear']} / {c['Reshape']} / {c['MatMulInteger']} / "
                   f"{c['MatMul']} / {c['Gemm']}")
    if json_path:
        import onnxruntime

        write_json_atomic(json_path, {
            "model": model_source, "ratio": ratio, "batch": batch, "static_batch": static_batch, "runs": runs,
            "warmup": warmup, "blocks": blocks,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "rows": rows, "ratios": ratios,
            "counts": info["counts"], "quantize": {k: v for k, v in info.items() if k.endswith("_report")},
            "optimum_fp32_max_abs_diff_vs_ours": info.get("optimum_fp32_max_abs_diff_vs_ours"),
            "environment": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                            "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        })


if __name__ == "__main__":
    main()
