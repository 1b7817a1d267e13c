"""`turbo-export validate`, `sweep` and `visualize`: accuracy parity on real inputs, ratio sweeps, pictures."""

from __future__ import annotations

import click

from turbo_export.cli.common import parse_ratio, progress_enabled, quiet_option, user_errors
from turbo_export.errors import TurboExportError
from turbo_export.files import check_writable_target, write_json_atomic

DATA_HELP = ("A folder of images (optional labels.csv 'filename,label' or labels.txt 'filename label') or "
             "builtin:mnist | builtin:skimage | builtin:lfw | builtin:foolbox-imagenet.")


def _number_list(value: str, what: str, cast: type) -> list:
    kind = "integers" if cast is int else "numbers"
    try:
        out = [cast(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise TurboExportError(f"{what}: expected comma-separated {kind}, got '{value}'") from None
    if not out or any(v < 0 for v in out):
        raise TurboExportError(f"{what}: expected non-negative {kind}, got '{value}'")
    return out


@click.command("validate")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--data", "source", default=None,
              help=DATA_HELP + " Required for ViT, CLIP, BLIP and BLIP-2 exports; SD exports take --prompts instead.")
@click.option("--limit", type=int, default=None, help="Use only the first N images.")
@click.option("--model", "model_source", default=None,
              help="ViT: the checkpoint the export was made from [default: the 'model' in report.json].")
@click.option("--no-torch", is_flag=True, help="ViT: skip the PyTorch reference run of the Turbo model.")
@click.option("--texts", "texts_path", type=click.Path(dir_okay=False), default=None,
              help="BLIP / BLIP-2 retrieval: a text file, one text per line, ranked against the images "
                   "[default: a built-in list of generic texts].")
@click.option("--question", default=None, help="BLIP VQA: the question asked about every image "
                                               "[default: 'what is in the picture?'].")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None,
              help="SD: a text file, one prompt per line [default: a built-in list of prompts].")
@click.option("--steps", type=int, default=10, show_default=True, help="SD: denoising steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="SD: seed of the first prompt (+1 per prompt).")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="SD: classifier-free guidance scale.")
@click.option("--images", "images_dir", type=click.Path(file_okay=False), default=None,
              help="SD: also write each prompt's baseline and Turbo images as PNGs into this folder.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every figure to this JSON file (atomically).")
@quiet_option
@user_errors
def validate_cmd(export_dir: str, source: str | None, limit: int | None, model_source: str | None, no_torch: bool,
                 texts_path: str | None, question: str | None, prompts_path: str | None, steps: int, seed: int,
                 guidance: float, images_dir: str | None, json_path: str | None) -> None:
    """Accuracy parity of EXPORT_DIR's Turbo graphs against its unaccelerated ones (ViT: images; BLIP: captions,
    answers or retrieval rankings; SD: generated images at the same seeds)."""
    from turbo_export.evaluate.common import read_lines
    from turbo_export.evaluate.validate import public, summary_lines, validate_folder

    if question is not None and not question.strip():
        raise TurboExportError("question: empty --question")
    if json_path is not None:
        check_writable_target(json_path, "json")
    result = validate_folder(export_dir, source, limit, model=model_source, torch_reference=not no_torch,
                             progress=progress_enabled(),
                             texts=read_lines(texts_path, "texts") if texts_path else None, question=question,
                             prompts=read_lines(prompts_path, "prompts") if prompts_path else None, steps=steps,
                             seed=seed, guidance=guidance, images_dir=images_dir)
    for line in summary_lines(result):
        click.echo(line)
    if json_path:
        write_json_atomic(json_path, public(result))
        click.echo(f"wrote {json_path}")


@click.command("sweep")
@click.option("--model", "model_source", required=True, help="A checkpoint folder, hub id or random:<preset>.")
@click.option("--ratios", default="0,2,4,6,8", show_default=True, help="Tokens merged per block (0 = unaccelerated).")
@click.option("--alphas", default="0,6,30,150", show_default=True, help="Turbo's alpha values (0 = ToMe).")
@click.option("--data", "sources", required=True, multiple=True,
              help=DATA_HELP + " Repeatable: the first is plotted, every one gets a table.")
@click.option("--limit", type=int, default=None, help="Use only the first N images of each.")
@click.option("--batch", type=int, default=32, show_default=True,
              help="Static batch of the exported graphs (also the timed batch).")
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the checkpoint's).")
@click.option("--min-tokens", type=int, default=0, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per graph.")
@click.option("--no-bench", is_flag=True, help="Skip the timing (accuracy only; the plot uses the FLOPs ratio).")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="int8: every graph also quantized (dynamic, the merge float); accuracy against the fp32 graph.")
@click.option("--lock", default=None, help="Hold an flock on this file while timing (e.g. /tmp/turbo-bench.lock).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every figure here (rewritten after each configuration with \"complete\": false).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of throughput against accuracy here (needs matplotlib).")
@quiet_option
@user_errors
def sweep_cmd(model_source: str, ratios: str, alphas: str, sources: tuple[str, ...], limit: int | None, batch: int,
              image_size: int | None, min_tokens: int, runs: int, no_bench: bool, precision: str, lock: str | None,
              json_path: str | None, plot_path: str | None) -> None:
    """Throughput and accuracy parity for every (ratio, alpha): a table, JSON and a plot (Turbo vs ToMe)."""
    from turbo_export.evaluate.sweep import no_arrays, plot, run_sweep, tables

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TurboExportError("plot: needs matplotlib; pip install matplotlib (or 'turbo-export[viz]')"
                                   ) from None
        check_writable_target(plot_path, "plot")
    result = run_sweep(model_source, _number_list(ratios, "ratios", int), _number_list(alphas, "alphas", float),
                       sources, limit,
                       batch=batch, image_size=image_size, min_tokens=min_tokens, runs=runs, lock=lock,
                       timed=not no_bench, partial_json=json_path, progress=progress_enabled(), precision=precision)
    click.echo(f"{result['model']}, batch {batch}, image size {result['image_size']}; speedup: ONNX Runtime, "
               f"interleaved with the unaccelerated graph on a real batch")
    click.echo(tables(result))
    if json_path:
        write_json_atomic(json_path, no_arrays(result))
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)
        click.echo(f"wrote {plot_path}")


@click.command("visualize")
@click.option("--model", "model_source", required=True, help="A checkpoint folder, hub id or random:<preset>.")
@click.option("--image", "image_path", required=True, type=click.Path(dir_okay=False),
              help="The image to draw (png, jpg, ...).")
@click.option("--ratio", required=True, help="Tokens merged per block (r): an int or a per-layer list.")
@click.option("--alpha", type=float, default=None, help="Turbo's alpha [default: the family's default].")
@click.option("--min-tokens", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the checkpoint's).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@quiet_option
@user_errors
def visualize_cmd(model_source: str, image_path: str, ratio: str, alpha: float | None, min_tokens: int,
                  image_size: int | None, out_path: str) -> None:
    """Draw which patches merged (the paper's Figure 6): ToMe beside Turbo on one image."""
    import os

    from turbo_export.evaluate.visualize import visualize

    if not os.path.isfile(image_path):
        raise TurboExportError(f"image: '{image_path}' does not exist")
    result = visualize(model_source, image_path, parse_ratio(ratio), out_path, alpha=alpha, min_tokens=min_tokens,
                       image_size=image_size)
    groups = ", ".join(f"{k}: {v}" for k, v in result["groups"].items())
    click.echo(f"{result['tokens']} tokens in ({result['image_size']} px, patch {result['patch']}); patch groups "
               f"after the last block: {groups}")
    click.echo(f"wrote {out_path}")
