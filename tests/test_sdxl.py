"""Image-to-image (SD 1.5 and SDXL) and the SDXL UNet layout (added conditioning, two text encoders), on tiny
presets: graph parity through the CLI, remove_turbo bit for bit, sd-generate end to end, bad input."""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from turbo_export.cli import main


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("turbo-export: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def _export(tmp_path_factory, model):
    out = tmp_path_factory.mktemp(model.split(":")[1]) / "export"
    result = _run(["sd-unet", "--model", model, "--ratio", "0.5", "--blocks", "all", "--no-bench", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    return _export(tmp_path_factory, "random:tiny")


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    y, x = np.mgrid[0:48, 0:48]
    Image.fromarray(np.stack([x * 5, y * 5, (x + y) * 2], -1).astype(np.uint8)).save(path)
    return path


def _img2img(export, init_png, tmp_path, strength="0.6"):
    png = tmp_path / "i2i.png"
    result = _run(["sd-generate", str(export), "--prompt", "a cat", "--steps", "4", "--seed", "3",
                   "--image", str(init_png), "--strength", strength, "--out", str(png)])
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads((tmp_path / "i2i.json").read_text())
    return png, metrics, result


def test_sd_img2img_end_to_end(sd_export, init_png, tmp_path):
    out, _ = sd_export
    png, metrics, result = _img2img(out, init_png, tmp_path)
    assert Image.open(png).size == (64 * 2 + 8, 64)
    assert metrics["mode"] == "image-to-image" and metrics["strength"] == 0.6 and metrics["denoised_steps"] == 2
    assert metrics["images_psnr_db"] > 0 and metrics["images_ssim"] <= 1.0
    assert metrics["unet_timing"]["calls"] == 2  # only the denoised steps call the UNet
    assert "image-to-image" in result.output and "PSNR" in result.output


def test_img2img_pipeline_matches_diffusers_schedule(sd_export, init_png):
    """Strength 1 starts from the first timestep; lower strengths denoise int(steps * strength) steps; the ONNX
    Turbo UNet gives the PyTorch Turbo UNet's latents."""
    from turbo_export.backends import make_runner
    from turbo_export.backends.torch_runner import TorchRunner
    from turbo_export.families.sd import OUTPUT_NAMES, UNetGraph
    from turbo_export.models.sd_presets import build_random_sd
    from turbo_export.patch.unet import apply_turbo_unet
    from turbo_export.pipelines.sd import generate, load_init_image

    out, _ = sd_export
    tiny = build_random_sd("tiny")
    image = load_init_image(str(init_png))
    turbo = apply_turbo_unet(copy.deepcopy(tiny.unet), 0.5, alpha=1.0, blocks="all")
    names = {"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.zeros(2),
             "encoder_hidden_states": torch.zeros(2, 77, 32)}
    calls = []

    class Counting(TorchRunner):
        def run(self, feed):
            calls.append(float(feed["timestep"][0]))
            return super().run(feed)

    ref = generate(Counting(UNetGraph(turbo), names, OUTPUT_NAMES), tiny, "a cat", steps=4, seed=2, progress=False,
                   init_image=image, strength=0.5)
    assert len(calls) == 2 and calls[0] < 1000 * 0.5 + 1
    got = generate(make_runner(str(out / "turbo.onnx")), tiny, "a cat", steps=4, seed=2, progress=False,
                   init_image=image, strength=0.5)
    assert np.abs(got.latents - ref.latents).max() < 1e-3


@pytest.mark.parametrize("args, fragments", [
    (["--strength", "0"], ("strength", "(0, 1]")),
    (["--strength", "1.5"], ("strength", "(0, 1]")),
    (["--strength", "0.1"], ("strength", "no denoising step")),
    (["--image", "MISSING"], ("image", "does not exist")),
    (["--image", "NOTIMAGE"], ("image", "not an image")),
])
def test_img2img_bad_input(args, fragments, init_png, tmp_path):
    # checked before the export folder is read: the folder does not even exist
    args = [str(init_png) if a == "INIT" else str(tmp_path / "missing.png") if a == "MISSING" else a for a in args]
    if "NOTIMAGE" in args:
        bad = tmp_path / "bad.png"
        bad.write_text("not a png")
        args[args.index("NOTIMAGE")] = str(bad)
    if "--image" not in args:
        args += ["--image", str(init_png)]
    result = _run(["sd-generate", str(tmp_path / "no-export"), "--prompt", "a cat", "--steps", "4", *args])
    _assert_one_line_error(result, *fragments)


# ---- SDXL layout -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-sdxl") / "export"
    result = _run(["sd-unet", "--model", "random:tiny-sdxl", "--ratio", "0.5", "--no-bench", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


def test_sdxl_unet_cli_parity_and_layout(sdxl_export):
    import onnx

    out, _ = sdxl_export
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == "sdxl" and report["family"] == "sd-unet"
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert report["graph_inputs"] == names
    assert [i.name for i in onnx.load(str(out / "turbo.onnx"), load_external_data=False).graph.input] == names
    assert report["parity"]["max_abs_diff"] < 1e-4 and report["parity_baseline"]["max_abs_diff"] < 1e-4
    # "default" = the finest level with transformer blocks (SDXL has none at full latent size): 4x4, 2 layers
    merged = report["blocks_merged"]
    assert len(merged) == 8 and all(b["tokens"] == 16 for b in report["tokens_per_block"] if b["merged"])
    assert report["flops"]["baseline"] > report["flops"]["turbo"] > 0


def test_sdxl_conditioning_and_remove_turbo_bit_for_bit():
    from turbo_export import remove_turbo
    from turbo_export.families.sd import UNetGraph, example_inputs
    from turbo_export.models.sd_presets import load_sd
    from turbo_export.patch.unet import apply_turbo_unet

    c = load_sd("random:tiny-sdxl")
    cond = c.conditioning(["", "a cat"], (64, 96))
    assert cond["encoder_hidden_states"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    assert cond["time_ids"].tolist()[1] == [64, 96, 0, 0, 64, 96]
    assert not cond["encoder_hidden_states"][0].any() and cond["encoder_hidden_states"][1].any()  # zeros for ""
    inputs = example_inputs(c, (8, 8), 1)
    graph = UNetGraph(c.unet)
    with torch.no_grad():
        before = graph(*inputs.values())[0]
        apply_turbo_unet(c.unet, 0.5)
        merged = graph(*inputs.values())[0]
        remove_turbo(c.unet)
        after = graph(*inputs.values())[0]
    assert not torch.equal(before, merged) and torch.equal(before, after)


def test_sdxl_generate_text_and_image_to_image(sdxl_export, init_png, tmp_path):
    out, _ = sdxl_export
    png = tmp_path / "t2i.png"
    result = _run(["sd-generate", str(out), "--prompt", "a cat", "--steps", "2", "--out", str(png)])
    assert result.exit_code == 0, result.output + result.stderr
    assert Image.open(png).size == (64 * 2 + 8, 64)
    assert json.loads((tmp_path / "t2i.json").read_text())["mode"] == "text-to-image"
    png, metrics, result = _img2img(out, init_png, tmp_path, strength="1")
    assert metrics["mode"] == "image-to-image" and metrics["denoised_steps"] == 4
    assert metrics["images_psnr_db"] > 0 and Image.open(png).size == (64 * 2 + 8, 64)


def test_sdxl_full_config_topk_limit_on_meta_device():
    """The real SDXL UNet config (no weights): at 1024 px the finest merged level is 64x64, K = 3072 < 3840;
    1152 px is refused for TensorRT."""
    from diffusers import UNet2DConditionModel

    from turbo_export.errors import TurboExportError
    from turbo_export.families.sd import check_backend_sort_limit, largest_sort
    from turbo_export.models.sdxl_presets import SDXL_PRESETS
    from turbo_export.patch.unet import apply_turbo_unet

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_PRESETS["sdxl"].unet)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.57
    apply_turbo_unet(unet, 0.5)
    assert largest_sort(unet, (128, 128)) == 3072 and largest_sort(unet, (140, 140)) == 3675
    check_backend_sort_limit(unet, (128, 128), "tensorrt")
    with pytest.raises(TurboExportError, match="3888"):
        check_backend_sort_limit(unet, (144, 144), "tensorrt")
