"""The export commands of the encoder families (`vit`, `clip`, `blip`, `blip2`) and `presets`."""

from __future__ import annotations

import click

from turbo_export.cli.common import JobChoices, export_and_print, job_options, parse_ratio, user_errors
from turbo_export.errors import TurboExportError

BATCH_HELP = ("Images per call: parity is checked and the benchmark runs at this batch (and at 1); the graphs take "
              "any batch unless --static-batch.")


@click.command()
@click.option("--model", "model_source", required=True,
              help="random:<preset> (vit-base-patch16-224, clip-vit-base-patch16, siglip-base-patch16-224, "
                   "tiny, ...: 'turbo-export presets'), a local Hugging Face folder, or a hub id (ViT, DeiT, "
                   "DINOv2, CLIP or SigLIP image encoders).")
@click.option("--ratio", required=True, help="Tokens merged per block (r): an int, or a comma-separated per-layer list.")
@click.option("--schedule", type=click.Choice(["constant", "decreasing"]), default="constant", show_default=True,
              help="For an int ratio: constant r, or ToMe's decreasing schedule (1.5r down to 0.5r).")
@click.option("--alpha", type=float, default=None,
              help="Weight of the semantic value I in E = R - alpha * I (0 = ToMe) [default: the family's: 150 for "
                   "classifiers, 6 for backbones].")
@click.option("--min-tokens", type=int, default=0, show_default=True,
              help="No merge in a block whose input is shorter than this.")
@click.option("--no-prop-attn", is_flag=True, help="Disable proportional attention (log size bias).")
@click.option("--batch", type=int, default=8, show_default=True, help=BATCH_HELP)
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the checkpoint's).")
@job_options(runs=20, out_help="engines/<name>-r<ratio>/")
@user_errors
def vit(model_source: str, ratio: str, schedule: str, alpha: float | None, min_tokens: int, no_prop_attn: bool,
        batch: int, image_size: int | None, job: JobChoices) -> None:
    """Export an image encoder (ViT, DeiT, DINOv2, CLIP, SigLIP) unaccelerated and with Turbo, check parity,
    compare throughput."""
    from turbo_export.families.base import image_encoder_for
    from turbo_export.families.vit import VitOptions

    r = parse_ratio(ratio)
    if schedule == "decreasing":
        if not isinstance(r, int):
            raise TurboExportError("schedule: 'decreasing' needs an int --ratio, not a list")
        r = (r, -0.5)
    options = VitOptions(ratio=r, alpha=alpha, min_tokens=min_tokens, prop_attn=not no_prop_attn, batch=batch,
                         image_size=image_size, merge_impl=job.merge_impl)
    export_and_print(image_encoder_for(model_source).name, model_source, options, job)


@click.command()
@click.option("--task", type=click.Choice(["caption", "retrieval", "vqa"]), default="caption", show_default=True)
@click.option("--model", "model_source", default=None,
              help="random:<preset> (blip-base, blip-large, tiny), a local BLIP folder, or a hub id "
                   "[default: random:blip-base, seeded random weights].")
@click.option("--ratio", required=True, help="Tokens merged per image-encoder block (r): an int or a per-layer list.")
@click.option("--alpha", type=float, default=6.0, show_default=True,
              help="Weight of the semantic value I (0 = ToMe).")
@click.option("--min-tokens", type=int, default=None,
              help="No merge below this many tokens [default: 40 for caption and VQA, 100 for retrieval].")
@click.option("--batch", type=int, default=4, show_default=True, help=BATCH_HELP)
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
    from turbo_export.families.blip import BlipOptions, check_user_inputs

    r = parse_ratio(ratio)
    check_user_inputs(task, images, question, texts)
    if model_source is None:
        model_source = "random:blip-base"
        click.echo("no --model given: using random:blip-base (BLIP base configs, seeded random weights; "
                   "pass --model for a real checkpoint)", err=True)
    options = BlipOptions(task=task, ratio=r, alpha=alpha, min_tokens=min_tokens, batch=batch,
                          image_size=image_size, max_new_tokens=max_new_tokens, num_beams=num_beams,
                          text_len=text_len, size_aware=size_aware, images=images, question=question,
                          texts=texts, merge_impl=job.merge_impl)
    export_and_print("blip", model_source, options, job)


@click.command("blip2")
@click.option("--task", type=click.Choice(["caption", "retrieval"]), default="caption", show_default=True)
@click.option("--model", "model_source", default="random:blip2-opt-2.7b", show_default=True,
              help="random:<preset> (blip2-opt-2.7b: the full-size image side with an OPT-125m-sized language "
                   "model; tiny-blip2), or a local Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval folder.")
@click.option("--ratio", required=True, help="Tokens merged per ViT-g block (r): an int or a per-layer list.")
@click.option("--alpha", type=float, default=6.0, show_default=True, help="Weight of the semantic value I (0 = ToMe).")
@click.option("--min-tokens", type=int, default=None,
              help="No merge below this many tokens [default: 40 for caption, 100 for retrieval].")
@click.option("--batch", type=int, default=2, show_default=True, help="Images per call.")
@click.option("--max-new-tokens", type=int, default=20, show_default=True, help="Caption length (greedy).")
@click.option("--text-len", type=int, default=32, show_default=True,
              help="Static token length of retrieval texts (padded to it).")
@job_options(runs=5, out_help="engines/<name>-<task>-r<ratio>/")
@user_errors
def blip2(task: str, model_source: str, ratio: str, alpha: float, min_tokens: int | None, batch: int,
          max_new_tokens: int, text_len: int, job: JobChoices) -> None:
    """Export BLIP-2 (caption with OPT, retrieval) unaccelerated and with Turbo in the ViT-g image encoder, check
    every graph and the pipelines against transformers, compare throughput."""
    from turbo_export.families.blip2 import Blip2Options

    options = Blip2Options(task=task, ratio=parse_ratio(ratio), alpha=alpha, min_tokens=min_tokens, batch=batch,
                           max_new_tokens=max_new_tokens, text_len=text_len, merge_impl=job.merge_impl)
    export_and_print("blip2", model_source, options, job)


@click.command("clip")
@click.option("--model", "model_source", default="random:clip-vit-base-patch16-zero-shot", show_default=True,
              help="random:<preset> (clip-vit-base-patch16-zero-shot, siglip-base-patch16-224-zero-shot, "
                   "tiny-clip-zero-shot, tiny-siglip-zero-shot), or a CLIPModel / SiglipModel folder or hub id.")
@click.option("--labels", required=True, help='The classes, comma-separated: "a cat,a dog,a car".')
@click.option("--template", default="a photo of {}", show_default=True,
              help="The prompt of each label ({} is the label).")
@click.option("--ratio", required=True, help="Tokens merged per image-tower block (r): an int or a per-layer list.")
@click.option("--alpha", type=float, default=None, help="Weight of the semantic value I (0 = ToMe) [default: 6].")
@click.option("--min-tokens", type=int, default=0, show_default=True,
              help="No merge in a block whose input is shorter than this.")
@click.option("--no-prop-attn", is_flag=True, help="Disable proportional attention (log size bias).")
@click.option("--batch", type=int, default=8, show_default=True, help="Images per call of the image graphs.")
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the checkpoint's).")
@job_options(runs=10, out_help="engines/<name>-r<ratio>/")
@user_errors
def clip(model_source: str, labels: str, template: str, ratio: str, alpha: float | None, min_tokens: int,
         no_prop_attn: bool, batch: int, image_size: int | None, job: JobChoices) -> None:
    """Zero-shot classification with CLIP / SigLIP: the image tower unaccelerated and with Turbo plus the text
    tower, with the label prompts; parity of the three graphs, zero-shot agreement, throughput."""
    from turbo_export.families.clip_zero_shot import ZeroShotOptions, prompts_for

    prompts_for(labels.split(","), template)  # a bad label list is one line before the model loads
    options = ZeroShotOptions(ratio=parse_ratio(ratio), alpha=alpha, min_tokens=min_tokens,
                              prop_attn=not no_prop_attn, batch=batch, image_size=image_size,
                              merge_impl=job.merge_impl, labels=tuple(labels.split(",")), template=template)
    export_and_print("clip-zero-shot", model_source, options, job)


@click.command("presets")
def list_presets() -> None:
    """List the random:<preset> models (seeded random weights, built offline)."""
    from turbo_export.families import families

    rows = [(f"random:{p.name}", f.name, p.model_class, p.description) for f in families() for p in f.presets()]
    width = max(len(r[0]) for r in rows)
    for name, family, model_class, description in rows:
        click.echo(f"{name:{width}}  {family:14} {model_class:38}  {description}")
