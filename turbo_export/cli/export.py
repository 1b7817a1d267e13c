"""The export commands of the encoder families (`vit`, `blip`) and `presets`."""

from __future__ import annotations

import os
from typing import Any

import click

from turbo_export.cli.common import JobChoices, job_options, parse_ratio, user_errors
from turbo_export.errors import TurboExportError
from turbo_export.families.defaults import DEFAULTS


@click.command()
@click.option("--model", "model_source", required=True,
              help="random:<preset> (vit-base-patch16-224, vit-large-patch16-224, tiny, ...), a local "
                   "Hugging Face folder, or a hub id.")
@click.option("--ratio", required=True, help="Tokens merged per block (r): an int, or a comma-separated per-layer list.")
@click.option("--schedule", type=click.Choice(["constant", "decreasing"]), default="constant", show_default=True,
              help="For an int ratio: constant r, or ToMe's decreasing schedule (1.5r down to 0.5r).")
@click.option("--alpha", type=float, default=None,
              help="Weight of the semantic value I in E = R - alpha * I (0 = ToMe) [default: the family's, see "
                   "turbo_export/families/defaults.py].")
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
    from turbo_export.export.pipeline import JobOptions, check_backend, run_export, summary_lines
    from turbo_export.export.specs import SPECS, TurboOptions
    from turbo_export.models.presets import load_model

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
        from turbo_export.families.defaults import defaults_for

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


@click.command()
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
    from turbo_export.export.blip import BlipOptions, check_user_inputs, run_blip_export
    from turbo_export.export.pipeline import check_backend
    from turbo_export.models.presets import BLIP_TASK_CLASSES, RANDOM_PREFIX, build_random_blip, load_pretrained

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
    from turbo_export.export.pipeline import summary_lines

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


@click.command("presets")
def list_presets() -> None:
    """List the random:<preset> models (seeded random weights, built offline)."""
    from turbo_export.models.presets import BLIP_PRESET_NOTES, VIT_PRESETS

    width = max(len(n) for n in VIT_PRESETS) + len("random:")
    for name, preset in VIT_PRESETS.items():
        click.echo(f"{'random:' + name:{width}}  vit   {preset.model_class:38}  {preset.description}")
    for name, note in BLIP_PRESET_NOTES.items():
        click.echo(f"{'random:' + name:{width}}  blip  {'(one model class per --task)':38}  {note}")
    from turbo_export.models.sd_presets import SD_PRESETS

    for name, sd in SD_PRESETS.items():
        click.echo(f"{'random:' + name:{width}}  sd    {'UNet2DConditionModel (sd-unet)':38}  {sd.description}")


