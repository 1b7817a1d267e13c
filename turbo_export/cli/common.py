"""What every command shares: one-line user errors with exit code 2, the ratio parser, the export-job options."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable

import click

from turbo_export.errors import ParityError, TurboExportError

EXIT_USAGE = 2
EXIT_PARITY = 1


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"turbo-export: error: {message}", err=True)
    sys.exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TurboExportError as exc:
            _fail(str(exc))
        except ParityError as exc:
            _fail(f"parity check failed, nothing was written: {exc}", EXIT_PARITY)
        except KeyboardInterrupt:
            _fail("interrupted, nothing was written", 130)

    return wrapper


class OneLineErrorGroup(click.Group):
    """click's own usage errors (unknown option, bad type) as one line with exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            _fail(exc.format_message().replace("\n", " "))
        except click.exceptions.Abort:
            _fail("aborted", 130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)


def parse_ratio(value: str) -> int | list[int]:
    """`16` -> 16; `16,16,8` -> a per-layer list."""
    text = str(value).strip()
    try:
        parts = [int(p) for p in text.split(",") if p.strip() != ""]
    except ValueError:
        raise TurboExportError(f"ratio: expected an integer or a comma-separated list of integers, got '{value}'") from None
    if not parts:
        raise TurboExportError("ratio: empty")
    if any(p < 0 for p in parts):
        raise TurboExportError(f"ratio: must be >= 0 (tokens merged per block), got '{value}'")
    return parts[0] if len(parts) == 1 and "," not in text else parts


@dataclass
class JobChoices:
    """What every export command asks the same way; ``run_fields`` is the RunOptions part."""

    backend: str
    precision: str
    merge_impl: str
    out_dir: str | None
    validate: bool
    bench: bool
    runs: int
    atol: float
    static_batch: bool = False
    max_batch: int = 0
    peers: bool = True

    def run_options(self) -> Any:
        from turbo_export.export.job import RunOptions

        return RunOptions(out_dir=self.out_dir or "", backend=self.backend, precision=self.precision,
                          validate=self.validate, bench=self.bench, bench_runs=self.runs, atol=self.atol,
                          static_batch=self.static_batch, max_batch=self.max_batch, peers=self.peers)


def export_and_print(family_name: str, source: str, options: Any, job: JobChoices) -> dict[str, Any]:
    """The body of every export command: the one export job, then the family's summary and the files written."""
    from turbo_export.export.job import export_model
    from turbo_export.families import get_family

    family = get_family(family_name)
    result = export_model(family, source, options, job.run_options())
    click.echo("")
    from turbo_export.families.summary import peer_lines

    for line in family.summary_lines(result.report) + peer_lines(result.report):
        click.echo(line)
    files = [*result.report["files"].values(), *result.report.get("engines", {}).values(), "report.json"]
    click.echo(f"\nwrote {result.out_dir}/: {', '.join(files)}")
    return result.report


def job_options(runs: int, out_help: str, merge_help: str = "one turbo.TurboMerge node per block") -> Callable:
    """The options every export command shares, handed to the command as one ``job: JobChoices`` argument."""
    options = [
        click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                     show_default=True),
        click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
                     help="fp16 exports half-precision graphs (weights and inputs); needs --backend tensorrt."),
        click.option("--merge-impl", type=click.Choice(["onnx", "plugin"]), default="onnx", show_default=True,
                     help=f"onnx: the merge as standard ops; plugin: {merge_help} (TensorRT plugin)."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
                     help=f"Output folder (default: {out_help})."),
        click.option("--no-bench", is_flag=True, help="Skip the throughput comparison."),
        click.option("--no-validate", is_flag=True, help="Skip the ONNX-vs-PyTorch parity check (not recommended)."),
        click.option("--runs", type=click.IntRange(min=1), default=runs, show_default=True,
                     help="Timed runs per model."),
        click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity tolerance (max abs diff)."),
        click.option("--no-peers", is_flag=True,
                     help="Time only the exported graphs (not also the PyTorch eager models in the same run)."),
        click.option("--static-batch", is_flag=True,
                     help="Export graphs with the static batch --batch (default: a symbolic batch dimension; parity "
                          "is then checked at batch 1 and at --batch)."),
        click.option("--max-batch", type=click.IntRange(min=1, max=4096), default=None,
                     help="Dynamic batch: the largest batch of TensorRT's optimization profile [default: 64, or "
                          "--batch if larger]."),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, backend: str, precision: str, merge_impl: str, out_dir: str | None, no_bench: bool,
                    no_validate: bool, runs: int, atol: float, no_peers: bool, static_batch: bool,
                    max_batch: int | None, **kwargs: Any) -> Any:
            job = JobChoices(backend, precision, merge_impl, out_dir, not no_validate, not no_bench, runs, atol,
                             static_batch, max_batch or 0, not no_peers)
            return command(*args, job=job, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


