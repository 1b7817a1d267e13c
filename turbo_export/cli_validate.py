"""`turbo-export validate`, `sweep` and `visualize`: accuracy parity on real inputs, ratio sweeps, pictures."""

from __future__ import annotations

import click

from .cli import main, user_errors
from .errors import TurboExportError
from .files import write_json_atomic

DATA_HELP = ("A folder of images (optional labels.csv 'filename,label' or labels.txt 'filename label') or "
             "builtin:mnist | builtin:skimage | builtin:lfw | builtin:foolbox-imagenet.")


def _int_list(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise TurboExportError(f"{what}: expected comma-separated integers, got '{value}'") from None
    if not out or any(v < 0 for v in out):
        raise TurboExportError(f"{what}: expected non-negative integers, got '{value}'")
    return out


def _float_list(value: str, what: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise TurboExportError(f"{what}: expected comma-separated numbers, got '{value}'") from None
    if not out or any(v < 0 for v in out):
        raise TurboExportError(f"{what}: expected non-negative numbers, got '{value}'")
    return out


@main.command("validate")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--data", "source", required=True, help=DATA_HELP)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@click.option("--model", "model_source", default=None,
              help="The checkpoint the export was made from [default: the 'model' in report.json].")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch reference run of the Turbo model.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every figure to this JSON file (atomically).")
@user_errors
def validate_cmd(export_dir: str, source: str, limit: int | None, model_source: str | None, no_torch: bool,
                 json_path: str | None) -> None:
    """Accuracy parity of EXPORT_DIR's turbo.onnx against its baseline.onnx on real images."""
    from .validate import public, summary_lines, validate_export

    result = validate_export(export_dir, source, limit, model=model_source, torch_reference=not no_torch)
    for line in summary_lines(result):
        click.echo(line)
    if json_path:
        write_json_atomic(json_path, public(result))
        click.echo(f"wrote {json_path}")
