"""What every command shares: one-line user errors with exit code 2, SIGTERM handled like Ctrl+C, --quiet, the
ratio parser, the export-job options."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import click

from turbo_export.errors import ParityError, TurboExportError

EXIT_USAGE = 2
EXIT_PARITY = 1
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_DISK_FULL = 1
_QUIET = {"on": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl+C, so that staged output is cleaned up the same way."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated()


def progress_enabled() -> bool:
    """Progress bars only on a terminal (never carriage returns and escape codes in a log), and not with --quiet."""
    return not _QUIET["on"] and sys.stderr.isatty()


def _set_quiet(_ctx: Any, _param: Any, value: bool) -> bool:
    if value:
        _QUIET["on"] = True
    return value


quiet_option = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_quiet, is_eager=True,
                            help="No progress bars (they are off anyway when stderr is not a terminal).")


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
        except Terminated:
            _fail("terminated (SIGTERM), nothing was written", EXIT_SIGTERM)
        except KeyboardInterrupt:
            _fail("interrupted, nothing was written", EXIT_SIGINT)
        except OSError as exc:
            if not _disk_full(exc):
                raise
            _fail(f"no space left on the device while writing ({exc}); nothing was written (a full-size UNet's "
                  "graphs need about 4 bytes per parameter each, SDXL's 10.3 GB)", EXIT_DISK_FULL)

    return wrapper


def _disk_full(exc: OSError) -> bool:
    """ENOSPC / EDQUOT, or numpy's ``tofile`` failing on a full disk (an OSError without an errno)."""
    import errno

    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and "problem writing" in str(exc))


class OneLineErrorGroup(click.Group):
    """click's own usage errors (unknown option, bad type) as one line with exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        _QUIET["on"] = False
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.BadParameter as exc:
            _fail(_bad_parameter(exc))
        except click.UsageError as exc:
            _fail(exc.format_message().replace("\n", " "))
        except Terminated:
            _fail("terminated (SIGTERM)", EXIT_SIGTERM)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _fail("aborted", EXIT_SIGINT)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _bad_parameter(exc: click.BadParameter) -> str:
    """click's "Invalid value for '--steps': ..." as "steps: ..." (the format of the library's range errors)."""
    param = exc.param
    if isinstance(exc, click.MissingParameter) or param is None:
        return exc.format_message().replace("\n", " ")
    name = param.opts[0].lstrip("-") if isinstance(param, click.Option) and param.opts else param.human_readable_name
    return f"{name}: {exc.message}".replace("\n", " ")


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
    int8_mode: str = "dynamic"
    calib_data: str | None = None
    overwrite: bool = False
    peers: bool = True

    def run_options(self) -> Any:
        from turbo_export.export.job import RunOptions

        if self.out_dir is not None and not self.out_dir.strip():
            raise TurboExportError("out: empty path; leave --out out for the default folder")
        return RunOptions(out_dir=self.out_dir or "", backend=self.backend, precision=self.precision,
                          validate=self.validate, bench=self.bench, bench_runs=self.runs, atol=self.atol,
                          static_batch=self.static_batch, max_batch=self.max_batch, int8_mode=self.int8_mode,
                          calib_data=self.calib_data, progress=progress_enabled(), overwrite=self.overwrite,
                          peers=self.peers)


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
    files = [*result.report["files"].values(), *result.report.get("files_fp32", {}).values(),
             *result.report.get("engines", {}).values(), "report.json"]
    click.echo(f"\nwrote {result.out_dir}/: {', '.join(files)}")
    return result.report


def job_options(runs: int, out_help: str, merge_help: str = "one turbo.TurboMerge node per block") -> Callable:
    """The options every export command shares, handed to the command as one ``job: JobChoices`` argument."""
    options = [
        click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                     show_default=True),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
                     help="int8: quantized from the checked fp32 graphs, Turbo's merge kept float (the fast path on "
                          "a CPU); fp16: half-precision graphs, needs --backend tensorrt or ONNX Runtime with CUDA."),
        click.option("--int8-mode", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
                     help="dynamic: int8 weights, activations quantized at run time; static: QDQ with calibration "
                          "(what TensorRT builds int8 engines from)."),
        click.option("--calib-data", default=None,
                     help="--int8-mode static: images to calibrate on (a folder or builtin:<name>, as for validate); "
                          "random: presets calibrate on seeded inputs without it."),
        click.option("--merge-impl", type=click.Choice(["onnx", "plugin"]), default="onnx", show_default=True,
                     help=f"onnx: the merge as standard ops; plugin: {merge_help} (TensorRT plugin)."),
        click.option("--out", "out_dir", type=str, default=None,
                     help=f"Output folder (default: {out_help})."),
        click.option("--overwrite", is_flag=True,
                     help="Replace an export made with other settings in the output folder (else refused, saying "
                          "what differs; the same export again needs no flag)."),
        click.option("--no-bench", is_flag=True, help="Skip the throughput comparison."),
        click.option("--no-validate", is_flag=True, help="Skip the ONNX-vs-PyTorch parity check (not recommended)."),
        click.option("--runs", type=int, default=runs, show_default=True, help="Timed runs per model."),
        click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity tolerance (max abs diff)."),
        click.option("--no-peers", is_flag=True,
                     help="Time only the exported graphs (not also the PyTorch eager models in the same run)."),
        click.option("--static-batch", is_flag=True,
                     help="Export graphs with the static batch --batch (default: a symbolic batch dimension; parity "
                          "is then checked at batch 1 and at --batch)."),
        click.option("--max-batch", type=click.IntRange(min=1, max=4096), default=None,
                     help="Dynamic batch: the largest batch of TensorRT's optimization profile [default: 64, or "
                          "--batch if larger]."),
        quiet_option,
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, backend: str, precision: str, merge_impl: str, out_dir: str | None, overwrite: bool,
                    no_bench: bool, no_validate: bool, runs: int, atol: float, static_batch: bool,
                    max_batch: int | None, int8_mode: str, calib_data: str | None, no_peers: bool,
                    **kwargs: Any) -> Any:
            job = JobChoices(backend, precision, merge_impl, out_dir, not no_validate, not no_bench, runs, atol,
                             static_batch, max_batch or 0, int8_mode, calib_data, overwrite, not no_peers)
            return command(*args, job=job, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


