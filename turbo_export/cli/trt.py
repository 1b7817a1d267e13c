"""TensorRT commands: `check-trt FILE.onnx|DIR` (what TensorRT's ONNX parser would reject) and `compare DIR`
(ONNX Runtime vs TensorRT on the same inputs through polygraphy's Comparator)."""

from __future__ import annotations

import json
import sys

import click

from turbo_export.cli.common import quiet_option, user_errors


@click.command("check-trt")
@click.argument("onnx_files", metavar="FILE.onnx|DIR...", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--static-shapes", is_flag=True,
              help="Flag symbolic input/output dimensions (for an engine built without an optimization profile; "
                   "exports get one over their symbolic batch by default).")
@click.option("--allow-dynamic", is_flag=True, hidden=True, help="The default now (kept for old scripts).")
@quiet_option
@user_errors
def check_trt(onnx_files: tuple[str, ...], as_json: bool, static_shapes: bool, allow_dynamic: bool) -> None:
    """List every node TensorRT's ONNX parser would reject or build only through a plugin (exit 1 if any
    would be rejected). A folder (an export) stands for every .onnx file in it."""
    from turbo_export.backends.trt_lint import lint_file
    from turbo_export.files import onnx_files_in

    results = [lint_file(path, static=static_shapes) for path in onnx_files_in(onnx_files)]
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        for r in results:
            for line in r.lines():
                click.echo(line)
    if not all(r.ok for r in results):
        sys.exit(1)


@click.command("compare")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--atol", type=float, default=1e-3, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random float inputs.")
@click.option("--iterations", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@quiet_option
@user_errors
def compare(folder: str, atol: float, rtol: float, seed: int, iterations: int, as_json: bool) -> None:
    """Run every ONNX graph of an export folder in ONNX Runtime and, where available, TensorRT, through
    polygraphy's Comparator on the same seeded inputs; report max abs / rel errors (exit 1 on a mismatch)."""
    from turbo_export.evaluate.compare import compare_folder

    results = compare_folder(folder, atol=atol, rtol=rtol, seed=seed, iterations=iterations,
                             log=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(results.as_dict(), indent=2))
    else:
        for line in results.lines():
            click.echo(line)
    if not results.ok:
        sys.exit(1)
