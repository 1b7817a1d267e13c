"""The `turbo-export` command line: parse, call the library, print, map user errors to exit code 2."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import click

from .defaults import DEFAULTS
from .errors import ParityError, TurboExportError

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


class _OneLineErrors(click.Group):
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

    def run_fields(self, out_dir: str) -> dict[str, Any]:
        return {"out_dir": out_dir, "backend": self.backend, "precision": self.precision, "validate": self.validate,
                "bench": self.bench, "bench_runs": self.runs, "atol": self.atol}


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
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, backend: str, precision: str, merge_impl: str, out_dir: str | None, no_bench: bool,
                    no_validate: bool, runs: int, atol: float, **kwargs: Any) -> Any:
            job = JobChoices(backend, precision, merge_impl, out_dir, not no_validate, not no_bench, runs, atol)
            return command(*args, job=job, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="turbo-export")
def main() -> None:
    """Bake Turbo token merging into ONNX graphs (and TensorRT engines) and measure it honestly."""


@main.command()
@click.option("--model", "model_source", required=True,
              help="random:<preset> (vit-base-patch16-224, vit-large-patch16-224, tiny, ...), a local "
                   "Hugging Face folder, or a hub id.")
@click.option("--ratio", required=True, help="Tokens merged per block (r): an int, or a comma-separated per-layer list.")
@click.option("--schedule", type=click.Choice(["constant", "decreasing"]), default="constant", show_default=True,
              help="For an int ratio: constant r, or ToMe's decreasing schedule (1.5r down to 0.5r).")
@click.option("--alpha", type=float, default=None,
              help="Weight of the semantic value I in E = R - alpha * I (0 = ToMe) [default: the family's, see "
                   "turbo_export/defaults.py].")
@click.option("--min-tokens", type=int, default=0, show_default=True,
              help="No merge in a block whose input is shorter than this.")
@click.option("--no-prop-attn", is_flag=True, help="Disable proportional attention (log size bias).")
@click.option("--batch", type=int, default=8, show_default=True, help="Static batch size of the exported graphs.")
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the checkpoint's).")
@job_options(runs=20, out_help="engines/<name>-r<ratio>/")
@user_errors
def vit(model_source: str, ratio: str, schedule: str, alpha: float | None, min_tokens: int, no_prop_attn: bool,
        batch: int, image_size: int | None, job: JobChoices) -> None:
    """Export a ViT / DeiT / DINOv2 model unaccelerated and with Turbo, check parity, compare throughput."""
    from .export.pipeline import JobOptions, check_backend, run_export, summary_lines
    from .export.specs import SPECS, TurboOptions
    from .presets import load_model

    r = parse_ratio(ratio)
    if schedule == "decreasing":
        if not isinstance(r, int):
            raise TurboExportError("schedule: 'decreasing' needs an int --ratio, not a list")
        r = (r, -0.5)
    if batch < 1:
        raise TurboExportError(f"batch: must be >= 1, got {batch}")
    if image_size is not None and image_size < 1:
        raise TurboExportError(f"image-size: must be positive, got {image_size}")
    check_backend(job.backend, job.precision)
    spec = SPECS["vit"]
    click.echo(f"loading {model_source} ...", err=True)
    loaded = load_model(model_source, "vit", spec.supported())
    if alpha is None:
        from .defaults import defaults_for

        alpha = defaults_for(type(loaded.model).__name__).alpha
    ratio_tag = ratio.replace(",", "_") + ("d" if schedule == "decreasing" else "")
    out = job.out_dir or os.path.join("engines", f"{loaded.name}-r{ratio_tag}")
    options = JobOptions(
        turbo=TurboOptions(ratio=r, alpha=alpha, min_tokens=min_tokens, prop_attn=not no_prop_attn, batch=batch,
                           image_size=image_size, merge_impl=job.merge_impl),
        **job.run_fields(out),
    )
    result = run_export(spec, loaded, options)
    click.echo("")
    for line in summary_lines(result.report):
        click.echo(line)
    engines = list(result.report.get("engines", {}).values())
    click.echo(f"\nwrote {result.out_dir}/: {', '.join(['baseline.onnx', 'turbo.onnx', *engines, 'report.json'])}")


@main.command()
@click.option("--task", type=click.Choice(["caption", "retrieval", "vqa"]), default="caption", show_default=True)
@click.option("--model", "model_source", default=None,
              help="random:<preset> (blip-base, blip-large, tiny), a local BLIP folder, or a hub id "
                   "[default: random:blip-base, seeded random weights].")
@click.option("--ratio", required=True, help="Tokens merged per image-encoder block (r): an int or a per-layer list.")
@click.option("--alpha", type=float, default=DEFAULTS["blip"].alpha, show_default=True,
              help="Weight of the semantic value I (0 = ToMe).")
@click.option("--min-tokens", type=int, default=None,
              help="No merge below this many tokens [default: 40 for caption and VQA, 100 for retrieval].")
@click.option("--batch", type=int, default=4, show_default=True, help="Images per call (static).")
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the checkpoint's).")
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option("--text-len", type=int, default=32, show_default=True,
              help="Static token length of retrieval texts and VQA questions (padded to it).")
@click.option("--size-aware", is_flag=True,
              help="Add log(size) of each merged image token to the text side's cross-attention logits.")
@click.option("--image", "images", multiple=True, type=str,
              help="An image to run both exported pipelines on (repeatable).")
@click.option("--question", default=None, help="With --task vqa: the question to ask about each --image.")
@click.option("--text", "texts", multiple=True, help="With --task retrieval: a text to score against each --image "
                                                      "(repeatable).")
@job_options(runs=10, out_help="engines/<name>-<task>-r<ratio>/")
@user_errors
def blip(task: str, model_source: str | None, ratio: str, alpha: float, min_tokens: int | None, batch: int,
         image_size: int | None, max_new_tokens: int, num_beams: int, text_len: int, size_aware: bool,
         images: tuple[str, ...], question: str | None, texts: tuple[str, ...], job: JobChoices) -> None:
    """Export BLIP (caption, retrieval, VQA) unaccelerated and with Turbo, check parity, compare throughput."""
    from .export.blip import BlipOptions, check_user_inputs, run_blip_export
    from .export.pipeline import check_backend
    from .presets import BLIP_TASK_CLASSES, RANDOM_PREFIX, build_random_blip, load_pretrained

    r = parse_ratio(ratio)
    check_user_inputs(task, images, question, texts)
    check_backend(job.backend, job.precision)
    if model_source is None:
        model_source = RANDOM_PREFIX + "blip-base"
        click.echo("no --model given: using random:blip-base (BLIP base configs, seeded random weights; "
                   "pass --model for a real checkpoint)", err=True)
    click.echo(f"loading {model_source} ...", err=True)
    if model_source.startswith(RANDOM_PREFIX):
        loaded = build_random_blip(model_source[len(RANDOM_PREFIX):], task)
    else:
        loaded = load_pretrained(model_source, sorted(BLIP_TASK_CLASSES.values()), with_processor="blip")
    out = job.out_dir or os.path.join("engines", f"{loaded.name}-r{ratio.replace(',', '_')}")
    options = BlipOptions(task=task, ratio=r, alpha=alpha, min_tokens=min_tokens, batch=batch,
                          image_size=image_size, max_new_tokens=max_new_tokens, num_beams=num_beams,
                          text_len=text_len, size_aware=size_aware, images=images, question=question,
                          texts=texts, merge_impl=job.merge_impl, **job.run_fields(out))
    report = run_blip_export(loaded, options)
    click.echo("")
    for line in blip_summary(report):
        click.echo(line)
    click.echo(f"\nwrote {os.path.abspath(out)}/: {', '.join(report['files'].values())}, report.json")


def blip_summary(report: dict[str, Any]) -> list[str]:
    from .export.pipeline import summary_lines

    lines = summary_lines(report)
    task = report["task"]
    checks = [f"{name} {'✓' if task[f'{name}_onnx_equals_pytorch'] else 'x'}" for name in ("baseline", "turbo")
              if f"{name}_onnx_equals_pytorch" in task]
    if checks:
        what = "scores (ITC, ITM)" if task["name"] == "retrieval" else "tokens"
        lines.append(f"ONNX pipeline == transformers, {what}: {', '.join(checks)}")
    if task.get("size_aware_cross_attention"):
        lines.append("size-aware cross-attention (Turbo): no transformers counterpart, graphs validated only")
    unit = {"caption": "caption", "vqa": "answer"}.get(task["name"])
    if unit:
        lines.append(f"{unit} agreement (Turbo vs baseline): tokens {task['turbo_vs_baseline_token_agreement']:.3f}, "
                     f"whole {unit}s {task[f'turbo_vs_baseline_{unit}_agreement']:.3f}, "
                     f"BLEU-4 {task['turbo_bleu4_vs_baseline']:.3f}  [{task['note']}]")
    if "agreement" in task:
        a = task["agreement"]
        lines.append(f"retrieval agreement (Turbo vs baseline, {a['images']} images x {a['texts']} texts): "
                     f"ITC top-1 text->image {a['itc_text_to_image_top1']:.3f}, image->text "
                     f"{a['itc_image_to_text_top1']:.3f}; ITM top-1 text->image {a['itm_text_to_image_top1']:.3f}, "
                     f"image->text {a['itm_image_to_text_top1']:.3f}, rank correlation "
                     f"{a['itm_rank_correlation']:.3f}  [{task['note']}]")
    pipeline = (report.get("bench") or {}).get("pipeline")
    if pipeline:
        lines.append(f"pipeline ({pipeline['what']}): {pipeline['baseline_per_s']:.2f} -> {pipeline['turbo_per_s']:.2f}"
                     f"  speedup {pipeline['speedup']:.2f}x")
    user = task.get("user_inputs")
    if user:
        lines.append("")
        if task["name"] == "vqa":
            lines.append(f"question: {user['question']}")
        for i, image in enumerate(user["images"]):
            lines.append(f"{image}:")
            if task["name"] == "retrieval":
                base, tur = user["baseline"], user["turbo"]
                lines += [f"  ITM {base['itm'][i][j]:.4f} -> {tur['itm'][i][j]:.4f}  ITC {base['itc'][i][j]:+.4f} -> "
                          f"{tur['itc'][i][j]:+.4f}  \"{text}\"" for j, text in enumerate(user["texts"])]
            else:
                lines += [f"  baseline: {user['baseline'][i]}", f"  turbo:    {user['turbo'][i]}"]
    return lines


@main.command("presets")
def list_presets() -> None:
    """List the random:<preset> models (seeded random weights, built offline)."""
    from .presets import BLIP_PRESET_NOTES, VIT_PRESETS

    width = max(len(n) for n in VIT_PRESETS) + len("random:")
    for name, preset in VIT_PRESETS.items():
        click.echo(f"{'random:' + name:{width}}  vit   {preset.model_class:38}  {preset.description}")
    for name, note in BLIP_PRESET_NOTES.items():
        click.echo(f"{'random:' + name:{width}}  blip  {'(one model class per --task)':38}  {note}")
    from .sd_presets import SD_PRESETS

    for name, sd in SD_PRESETS.items():
        click.echo(f"{'random:' + name:{width}}  sd    {'UNet2DConditionModel (sd-unet)':38}  {sd.description}")


from . import cli_validate  # noqa: E402,F401
from . import cli_trt  # noqa: E402,F401
from . import cli_serve  # noqa: E402,F401
from . import cli_sd  # noqa: E402,F401

if __name__ == "__main__":
    main()
