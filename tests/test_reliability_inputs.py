"""Issue 13, corrupt or mismatched inputs: every bad input is refused before any work with one line on stderr that
names the file or option, exit code 2 and no traceback (weights, configs, report.json, graphs of another model,
non-ONNX files, decompression bombs, non-UTF-8 text, labels beyond 64 bits, report paths outside the folder);
the Python API (hidden states and attentions with Turbo, impossible ratios); triton-repo's instance kind and run
hint; the speedup's spread."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import onnx
import pytest

from turbo_export.errors import TurboExportError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- fixtures: tiny exports and a checkpoint folder -------------------------------------------------------------


def _export(tmp_path_factory, preset: str, name: str) -> str:
    from turbo_export.export.job import RunOptions, run_export
    from turbo_export.families import get_family
    from turbo_export.families.vit import VitOptions

    out = str(tmp_path_factory.mktemp("exports") / name)
    vit = get_family("vit")
    run_export(vit, vit.load(preset), VitOptions(ratio=2, batch=1),
               RunOptions(out_dir=out, validate=False, bench=False), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    return _export(tmp_path_factory, "random:tiny", "vit")


@pytest.fixture(scope="module")
def dino_export(tmp_path_factory):
    return _export(tmp_path_factory, "random:tiny-dinov2", "dino")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """random:tiny saved as a Hugging Face folder (config.json + model.safetensors)."""
    from turbo_export.families import get_family

    folder = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    get_family("vit").load("random:tiny").model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def copy_export(src: str, tmp_path, name: str = "export") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def edit_report(folder: str, change) -> str:
    path = os.path.join(folder, "report.json")
    with open(path) as f:
        report = json.load(f)
    with open(path, "w") as f:
        json.dump(change(report), f)
    return folder


def run_cli(args: list[str], capfd) -> tuple[int, list[str]]:
    """The CLI in this process: exit code and every non-empty stderr line (click's and anything a library wrote
    to file descriptor 2). An exception escaping the CLI fails the test (a traceback)."""
    from click.testing import CliRunner

    from turbo_export.cli import main

    capfd.readouterr()
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    lines = [line for line in (result.stderr + capfd.readouterr().err).splitlines() if line.strip()]
    return result.exit_code, lines


def assert_one_line(code: int, lines: list[str], *words: str) -> None:
    """Exit code 2 and one error line naming ``words``; the export job's progress line ("loading SOURCE ...",
    printed before the model is read) is the only other line allowed."""
    assert code == 2, (code, lines)
    lines = [line for line in lines if not (line.startswith("loading ") and line.endswith(" ..."))]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and lines[0].startswith("turbo-export: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def subprocess_cli(args: list[str], timeout: float = 300) -> tuple[int, list[str]]:
    """The CLI as a user runs it (a fresh process: library loggers write to the real stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "plugins")]))
    done = subprocess.run([sys.executable, "-m", "turbo_export.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


# ---- weights files that are not weights; configs that do not fit their weights -----------------------------------


def _corrupt(folder: str, how: str) -> str:
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    if how.startswith("bin"):
        os.remove(path)
        path = os.path.join(folder, "pytorch_model.bin")
    content = {"random": os.urandom(4096), "empty": b"", "truncated": data[: len(data) // 2],
               "json": b'{"weights": 1}', "bin": os.urandom(2048),
               "bin-pickle": b"\x80\x02" + os.urandom(2046)}[how]
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.mark.parametrize("how", ["random", "empty", "truncated", "json", "bin", "bin-pickle"])
def test_corrupt_weights_one_line(checkpoint, tmp_path, capfd, how):
    folder = copy_export(checkpoint, tmp_path, "ckpt")
    path = _corrupt(folder, how)
    code, lines = run_cli(["vit", "--model", folder, "--ratio", "2", "--no-bench", "--out", str(tmp_path / "o")],
                          capfd)
    assert_one_line(code, lines, path if how != "bin-pickle" else folder)
    assert not (tmp_path / "o").exists()


CONFIG_CHANGES = {
    "wider": ({"hidden_size": 64}, "of another shape"),
    "more-layers": ({"num_hidden_layers": 6}, "missing from the weights"),
    "fewer-layers": ({"num_hidden_layers": 2}, "not in the model"),
    "labels": ({"num_labels": 5, "id2label": {str(i): str(i) for i in range(5)},
                "label2id": {str(i): i for i in range(5)}}, "classifier.weight"),
    "mlp": ({"intermediate_size": 128}, "fc1.weight"),
    "bad-type": ({"hidden_size": "wide"}, "config"),
}


def _mismatch(checkpoint: str, tmp_path, change: dict) -> str:
    folder = copy_export(checkpoint, tmp_path, "ckpt")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(change)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


@pytest.mark.parametrize("name", list(CONFIG_CHANGES))
def test_config_not_matching_weights_one_line(checkpoint, tmp_path, capfd, name):
    change, words = CONFIG_CHANGES[name]
    folder = _mismatch(checkpoint, tmp_path, change)
    code, lines = run_cli(["vit", "--model", folder, "--ratio", "2", "--no-bench", "--out", str(tmp_path / "o")],
                          capfd)
    assert_one_line(code, lines, folder, words)


def test_weights_and_config_errors_in_a_fresh_process(checkpoint, tmp_path):
    """transformers' 31-line load report and its progress bars stay silent for a user too (not only under pytest)."""
    mismatched = _mismatch(checkpoint, tmp_path / "a", {"num_hidden_layers": 6})
    code, lines = subprocess_cli(["vit", "--model", mismatched, "--ratio", "2", "--no-bench", "--out",
                                  str(tmp_path / "o")])
    assert_one_line(code, lines, "missing from the weights", "vit.layers.4.")
    corrupt = copy_export(checkpoint, tmp_path / "b", "ckpt")
    path = _corrupt(corrupt, "random")
    code, lines = subprocess_cli(["vit", "--model", corrupt, "--ratio", "2", "--no-bench"])
    assert_one_line(code, lines, path, "not a safetensors file")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """random:tiny's UNet, text encoder and VAE saved in the diffusers layout (the tokenizer is never reached)."""
    from turbo_export.models.sd_presets import build_random_sd

    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    parts = build_random_sd("tiny")
    for name in ("unet", "text_encoder", "vae"):
        getattr(parts, name).save_pretrained(str(folder / name))
    (folder / "tokenizer").mkdir()
    return str(folder)


@pytest.mark.parametrize("case", ["unet weights random", "vae weights truncated", "unet config wider",
                                  "text encoder config deeper"])
def test_sd_folder_weights_and_configs_one_line(sd_folder, tmp_path, capfd, case):
    folder = copy_export(sd_folder, tmp_path, "sd")
    part = {"unet": "unet", "vae": "vae", "text": "text_encoder"}[case.split()[0]]
    if "weights" in case:
        path = next(os.path.join(folder, part, n) for n in os.listdir(os.path.join(folder, part))
                    if n.endswith(".safetensors"))
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(os.urandom(4096) if "random" in case else data[: len(data) // 3])
        words = (path, "not a safetensors file")
    else:
        path = os.path.join(folder, part, "config.json")
        with open(path) as f:
            config = json.load(f)
        if part == "unet":
            config["cross_attention_dim"] = 64
        else:
            config["num_hidden_layers"] = 3
        with open(path, "w") as f:
            json.dump(config, f)
        words = (os.path.join(folder, part), "do not match its config")
    code, lines = run_cli(["sd-unet", "--model", folder, "--ratio", "0.5", "--no-bench", "--out",
                           str(tmp_path / "o")], capfd)
    assert_one_line(code, lines, *words)


# ---- report.json that parses but has the wrong structure ---------------------------------------------------------

REPORT_MUTATIONS = {
    "a list": (lambda r: [r], "expected a JSON object"),
    "files a list": (lambda r: {**r, "files": ["baseline.onnx", "turbo.onnx"]}, "'files'"),
    "files missing": (lambda r: {k: v for k, v in r.items() if k != "files"}, "'files' is missing"),
    "file names numbers": (lambda r: {**r, "files": {"baseline": 1, "turbo": 2}}, "'files'"),
    "batch a string": (lambda r: {**r, "batch": "eight"}, "'batch'"),
    "batch zero": (lambda r: {**r, "batch": 0}, "'batch'"),
    "image size null": (lambda r: {**r, "image_size": None}, "'image_size'"),
    "tokens missing": (lambda r: {k: v for k, v in r.items() if k != "tokens_per_layer"}, "'tokens_per_layer'"),
    "flops a string": (lambda r: {**r, "flops": "many"}, "'flops'"),
    "flops ratio NaN": (lambda r: {**r, "flops": {**r["flops"], "ratio": float("nan")}}, "'flops.ratio'"),
    "family a number": (lambda r: {**r, "family": 3}, "'family'"),
    "model a list": (lambda r: {**r, "model": ["random:tiny"]}, "'model'"),
    "bench runs strings": (lambda r: {**r, "bench": {"baseline_ms": ["1"], "turbo_ms": [1]}}, "'bench.baseline_ms'"),
}
# triton-repo reads only report.json's files: it type-checks the fields that are there, needs no other
TRITON_REPO_READS = set(REPORT_MUTATIONS) - {"image size null", "tokens missing"}


def _command(command: str, folder: str, tmp_path, images: str) -> list[str]:
    return {"validate": ["validate", folder, "--data", images, "--no-torch"],
            "compare": ["compare", folder],
            "triton-repo": ["triton-repo", folder, "--out", str(tmp_path / "repo")],
            "serve": ["serve", folder, "--port", "18931", "--grpc-port", "0"]}[command]


@pytest.mark.parametrize("command", ["validate", "compare", "triton-repo", "serve"])
@pytest.mark.parametrize("mutation", list(REPORT_MUTATIONS))
def test_wrong_report_structure_one_line(vit_export, images, tmp_path, capfd, command, mutation):
    if command == "triton-repo" and mutation not in TRITON_REPO_READS:
        pytest.skip("a field triton-repo does not read")
    change, words = REPORT_MUTATIONS[mutation]
    folder = edit_report(copy_export(vit_export, tmp_path), change)
    code, lines = run_cli(_command(command, folder, tmp_path, images), capfd)
    assert_one_line(code, lines, os.path.join(folder, "report.json"), words)
    assert not (tmp_path / "repo").exists()


def test_wrong_report_structure_stops_serve_before_the_server(vit_export, tmp_path):
    """Where serve reads report.json (bindings_for): checked before any model repository or server exists."""
    from turbo_export.serve.server import ServeOptions, bindings_for

    folder = edit_report(copy_export(vit_export, tmp_path), lambda r: {**r, "batch": [1]})
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(TurboExportError, match="'batch' must be an integer"):
        bindings_for(folder, ServeOptions(), str(work))
    assert os.listdir(work) == []


# ---- graphs of another model -------------------------------------------------------------------------------------


def _rename_output(path: str) -> None:
    model = onnx.load(path)
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["features" if o == old else o for o in node.output]
    model.graph.output[0].name = "features"
    onnx.save(model, path)


def _batch_of_two(path: str) -> None:
    model = onnx.load(path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, path)


def _other_weights(path: str) -> None:
    model = onnx.load(path)
    tensor = next(t for t in model.graph.initializer if "." in t.name and t.raw_data)
    values = onnx.numpy_helper.to_array(tensor) + 1
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save(model, path)


@pytest.mark.parametrize("case, words", [
    ("dinov2", "outputs"),  # a DINOv2 backbone's turbo.onnx in a ViT classifier's export
    ("baseline of dinov2", "outputs"),
    ("renamed output", "outputs"),
    ("batch 2", "'pixel_values' is [2, 3, 32, 32]"),
    ("other weights", "holds another model's weights"),
])
def test_graph_of_another_model_validate_one_line(vit_export, dino_export, images, tmp_path, capfd, case, words):
    folder = copy_export(vit_export, tmp_path)
    turbo = os.path.join(folder, "turbo.onnx")
    if case == "dinov2":
        shutil.copyfile(os.path.join(dino_export, "turbo.onnx"), turbo)
    elif case == "baseline of dinov2":
        shutil.copyfile(os.path.join(dino_export, "baseline.onnx"), os.path.join(folder, "baseline.onnx"))
    else:
        {"renamed output": _rename_output, "batch 2": _batch_of_two, "other weights": _other_weights}[case](turbo)
    code, lines = run_cli(["validate", folder, "--data", images, "--no-torch"], capfd)
    assert_one_line(code, lines, folder, words)


def test_backbone_graphs_checked_against_the_token_count(dino_export, images, tmp_path, capfd):
    """A DINOv2 export whose report says fewer merged tokens than its turbo.onnx has: the graph is not this export's."""
    folder = edit_report(copy_export(dino_export, tmp_path),
                         lambda r: {**r, "merged_per_layer": [1] * len(r["merged_per_layer"])})
    code, lines = run_cli(["validate", folder, "--data", images, "--no-torch"], capfd)
    assert_one_line(code, lines, "turbo.onnx", "last_hidden_state")


# ---- 0-byte and non-ONNX graphs ----------------------------------------------------------------------------------

NOT_ONNX = {"empty": b"", "text": b"hello, not an ONNX model\n", "random bytes": os.urandom(1000),
            "json": b'{"graph": {"node": []}}'}


@pytest.mark.parametrize("command", ["check-trt", "triton-repo", "serve", "validate", "compare"])
@pytest.mark.parametrize("content", list(NOT_ONNX))
def test_not_an_onnx_file_one_line(vit_export, images, tmp_path, capfd, command, content):
    folder = copy_export(vit_export, tmp_path)
    path = os.path.join(folder, "turbo.onnx")
    with open(path, "wb") as f:
        f.write(NOT_ONNX[content])
    args = ["check-trt", path] if command == "check-trt" else _command(command, folder, tmp_path, images)
    code, lines = run_cli(args, capfd)
    assert_one_line(code, lines, path, "not a valid ONNX model")
    assert not (tmp_path / "repo").exists()


# ---- report paths outside the export folder ----------------------------------------------------------------------

OUTSIDE = {
    "dot-dot": lambda r, other: {**r, "files": {**r["files"], "turbo": "../elsewhere/turbo.onnx"}},
    "absolute": lambda r, other: {**r, "files": {**r["files"], "turbo": other}},
    "engines": lambda r, other: {**r, "engines": {"turbo": "../../etc/passwd"}},
    "graph name": lambda r, other: {**r, "files": {**r["files"], "../../evil": "turbo.onnx"}},
}


@pytest.mark.parametrize("command", ["validate", "triton-repo", "compare", "serve"])
@pytest.mark.parametrize("case", list(OUTSIDE))
def test_report_path_outside_the_folder_is_never_opened(vit_export, images, tmp_path, capfd, command, case):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(vit_export, elsewhere)  # a real graph there: refused for where it is, not for what it is
    folder = edit_report(copy_export(vit_export, tmp_path),
                         lambda r: OUTSIDE[case](r, str(elsewhere / "turbo.onnx")))
    code, lines = run_cli(_command(command, folder, tmp_path, images), capfd)
    assert_one_line(code, lines, os.path.join(folder, "report.json"))
    assert "outside the export folder" in lines[0] or "not a plain graph name" in lines[0]


# ---- images: decompression bombs; text: non-UTF-8 files; labels beyond 64 bits -----------------------------------


def png_bomb(path: str, width: int, height: int) -> None:
    """A few hundred bytes of PNG whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1) * 4)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("pixels", [(20000, 20000), (10000, 10000), (8200, 8200)],
                         ids=["beyond PIL's error", "PIL's warning band", "just over our limit"])
@pytest.mark.parametrize("command", ["validate", "visualize"])
def test_decompression_bomb_refused_one_line(vit_export, tmp_path, capfd, pixels, command):
    folder = tmp_path / "data"
    folder.mkdir()
    path = str(folder / "bomb.png")
    png_bomb(path, *pixels)
    args = (["validate", vit_export, "--data", str(folder), "--no-torch"] if command == "validate" else
            ["visualize", "--model", "random:tiny", "--image", path, "--ratio", "2", "--out", str(tmp_path / "v.png")])
    code, lines = run_cli(args, capfd)
    assert_one_line(code, lines, path, "too large")


def test_open_image_limit_is_pil_limit():
    from PIL import Image

    from turbo_export.files import MAX_IMAGE_PIXELS, open_image

    with pytest.raises(TurboExportError):
        open_image("/nonexistent.png")
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS <= 8192 * 8192


@pytest.mark.parametrize("case", ["labels.csv latin-1", "labels.txt binary", "texts latin-1", "prompts utf-16"])
def test_non_utf8_text_files_one_line(vit_export, images, tmp_path, capfd, case):
    folder = tmp_path / "data"
    shutil.copytree(images, folder)
    if case == "labels.csv latin-1":
        path = folder / "labels.csv"
        path.write_bytes("0.png,1\n1.png,0\n# caf\xe9\n".encode("latin-1"))
        args = ["validate", vit_export, "--data", str(folder), "--no-torch"]
    elif case == "labels.txt binary":
        path = folder / "labels.txt"
        path.write_bytes(b"0.png 1\n\xff\xfe\x00\x01 2\n")
        args = ["validate", vit_export, "--data", str(folder), "--no-torch"]
    elif case == "texts latin-1":
        path = tmp_path / "texts.txt"
        path.write_bytes("a caf\xe9\n".encode("latin-1"))
        args = ["validate", vit_export, "--data", str(folder), "--texts", str(path)]
    else:
        path = tmp_path / "prompts.txt"
        path.write_bytes("a cat\n".encode("utf-16"))
        args = ["validate", vit_export, "--prompts", str(path)]
    code, lines = run_cli(args, capfd)
    assert_one_line(code, lines, str(path), "not UTF-8")


@pytest.mark.parametrize("label", [str(2 ** 64), str(2 ** 63), "-1", "1" + "0" * 30, "9" * 5000, "1.5"])
def test_labels_beyond_64_bits_one_line(vit_export, images, tmp_path, capfd, label):
    folder = tmp_path / "data"
    shutil.copytree(images, folder)
    (folder / "labels.csv").write_text(f"filename,label\n0.png,{label}\n1.png,0\n")
    code, lines = run_cli(["validate", vit_export, "--data", str(folder), "--no-torch"], capfd)
    assert_one_line(code, lines, str(folder / "labels.csv"), "line 2")
    assert len(lines[0]) < 400  # a 5,000-digit label is not echoed whole


# ---- the Python API ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-dinov2", "tiny-deit"])
def test_api_hidden_states_and_attentions_with_turbo(preset):
    import torch

    from turbo_export.api import apply_turbo, remove_turbo
    from turbo_export.families import get_family

    model = get_family("vit").load(f"random:{preset}").model
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        apply_turbo(model, ratio=0)  # nothing merged: exactly what the model computed before
        same = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        apply_turbo(model, ratio=4)
        merged = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        quiet = model(pixel_values=pixels)
    for a, b in zip(plain.hidden_states + plain.attentions, same.hidden_states + same.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    tokens = plain.hidden_states[0].shape[1]
    assert [h.shape[1] for h in merged.hidden_states] == [tokens - 4 * i for i in range(5)]
    assert [tuple(a.shape[2:]) for a in merged.attentions] == [(tokens - 4 * i,) * 2 for i in range(4)]
    assert quiet.hidden_states is None and quiet.attentions is None
    remove_turbo(model)


def test_api_hidden_states_of_blip_vision():
    import torch

    from turbo_export.api import apply_turbo
    from turbo_export.families import get_family
    from turbo_export.families.blip import BlipOptions

    vision = get_family("blip").load("random:tiny", BlipOptions(task="caption", ratio=2)).model.vision_model
    apply_turbo(vision, ratio=2)
    with torch.no_grad():
        out = vision(pixel_values=torch.randn(1, 3, 32, 32), output_hidden_states=True, output_attentions=True)
    layers = len(vision.encoder.layers)
    assert [h.shape[1] for h in out.hidden_states] == [65 - 2 * i for i in range(layers + 1)]
    assert len(out.attentions) == layers


@pytest.mark.parametrize("kwargs, words", [
    ({"ratio": 40}, "ratio: 40 is above the maximum 32"),
    ({"ratio": [33, 0, 0, 0]}, "above the maximum 32"),
    ({"ratio": -1}, "ratio: must be >= 0"),
    ({"ratio": 2, "alpha": float("nan")}, "alpha: must be a finite number"),
    ({"ratio": 2, "min_tokens": -3}, "min_tokens"),
])
def test_api_refuses_what_the_cli_refuses(kwargs, words):
    from turbo_export.api import apply_turbo
    from turbo_export.families import get_family

    model = get_family("vit").load("random:tiny").model
    with pytest.raises(TurboExportError, match=words.replace("[", r"\[")):
        apply_turbo(model, **kwargs)
    assert getattr(model, "_turbo", None) is None  # refused before patching
    apply_turbo(model, ratio=32)  # the maximum itself is fine


# ---- triton-repo: instance kind and a run hint that works --------------------------------------------------------


def test_triton_repo_kind_follows_the_machine(vit_export, tmp_path, monkeypatch, capfd):
    from turbo_export.serve import triton_repo

    for has_gpu, kind in ((False, "KIND_CPU"), (True, "KIND_GPU")):
        monkeypatch.setattr(triton_repo, "machine_has_gpu", lambda has_gpu=has_gpu: has_gpu)
        models = triton_repo.plan_repository(vit_export)
        assert {m.config.instance_kind for m in models} == {kind}
    monkeypatch.setattr(triton_repo, "machine_has_gpu", lambda: False)
    assert {m.config.instance_kind for m in triton_repo.plan_repository(vit_export, kind="gpu")} == {"KIND_GPU"}
    with pytest.raises(TurboExportError, match="gpus"):
        triton_repo.plan_repository(vit_export, kind="cpu", gpus=[0])
    assert {m.config.instance_kind for m in triton_repo.plan_repository(vit_export, gpus=[0, 1])} == {"KIND_GPU"}
    monkeypatch.setattr(triton_repo.shutil, "which", lambda name: None)  # no full tritonserver, no nvidia-smi
    from click.testing import CliRunner

    from turbo_export.cli import main

    out = tmp_path / "repo"
    result = CliRunner().invoke(main, ["triton-repo", vit_export, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "KIND_CPU" in (out / "turbo" / "config.pbtxt").read_text()
    assert "1 x KIND_CPU" in result.output
    assert "run: tritonserver" not in result.output  # the bundled one cannot load onnxruntime_onnx models
    assert "with NVIDIA's container" in result.output and "--gpus" not in result.output
    import importlib.util

    if importlib.util.find_spec("pytriton") is not None:
        assert f"turbo-export serve {vit_export}" in result.output


def test_machine_has_gpu_on_this_machine():
    import torch

    from turbo_export.serve.triton_repo import machine_has_gpu

    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi here: what it lists decides")
    assert machine_has_gpu() == torch.cuda.is_available()


# ---- the speedup's spread ----------------------------------------------------------------------------------------


def test_speedup_spread_pairs_the_interleaved_runs():
    from turbo_export.families.summary import speedup_spread

    spread = speedup_spread([10.0, 12.0, 11.0], [5.0, 8.0, 11.0], flops_ratio=1.5)
    assert (spread["runs"], spread["min"], spread["median"], spread["max"]) == (3, 1.0, 1.5, 2.0)
    assert spread["verdict"] == "" and not spread["above_flops_ratio"]
    noisy = speedup_spread([15.0, 16.0, 14.0], [10.0, 10.0, 10.0], flops_ratio=1.22)
    assert noisy["above_flops_ratio"] and "likely noise or a measurement artifact" in noisy["verdict"]
    within = speedup_spread([10.0, 15.0, 16.0], [10.0, 10.0, 10.0], flops_ratio=1.22)
    assert not within["above_flops_ratio"] and "within the run-to-run spread" in within["verdict"]
    assert speedup_spread([], [], 1.5) is None


def test_summary_prints_the_spread(vit_export):
    from turbo_export.families import get_family

    with open(os.path.join(vit_export, "report.json")) as f:
        report = json.load(f)
    report["flops"]["ratio"] = 1.2
    report["bench"] = {"backend": "onnxruntime", "batch": 1, "baseline_ips": 150.0, "turbo_ips": 100.0,
                       "baseline_median_ms": 15.0, "turbo_median_ms": 10.0, "speedup": 1.5,
                       "speedup_over_flops_ratio": 1.25, "baseline_ms": [15.0, 14.0, 16.0],
                       "turbo_ms": [10.0, 10.0, 10.0]}
    text = "\n".join(get_family("vit").summary_lines(report))
    assert "1.40x  to 1.60x, median 1.50x (3 interleaved runs" in text
    assert "likely noise" in text
