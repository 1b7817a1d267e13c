"""Serving an image-text export (``turbo-export clip``, tiny random CLIP): the tensor-level towers and the zero-shot
pipelines answer what the ONNX graphs compute, bad requests get 400 without failing concurrent good ones, and
triton-repo writes the three graphs."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from test_serve import HAVE_TRITON, http, needs_triton, png, read_config, tensor_body

from turbo_export.cli import main

LABELS = ["a cat", "a dog", "a bird"]


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serve") / "clip")
    result = CliRunner().invoke(main, ["clip", "--model", "random:tiny-clip-zero-shot", "--labels", ",".join(LABELS),
                                       "--ratio", "4", "--batch", "2", "--no-bench", "--out", out])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def clip_server(clip_export):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton / tritonclient not installed (pip install 'turbo-export[serve]')")
    from turbo_export.serve.server import ServeOptions, free_port, serving

    with serving(clip_export, ServeOptions(max_batch=8, threads=1), http_port=free_port(), grpc_port=None) as (s, b):
        yield s


@pytest.fixture(scope="module")
def graphs(clip_export):
    from turbo_export.backends import make_runner

    report = json.load(open(os.path.join(clip_export, "report.json")))
    return report, {n: make_runner(os.path.join(clip_export, f)) for n, f in report["files"].items()}


def _client(server):
    import tritonclient.http as httpclient

    return httpclient, httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def _bytes_input(httpclient, name: str, rows: list[list[bytes]]):
    tensor = httpclient.InferInput(name, [len(rows), len(rows[0])], "BYTES")
    tensor.set_data_from_numpy(np.array(rows, dtype=np.object_))
    return tensor


def _pixels(images: list[bytes]) -> np.ndarray:
    from turbo_export.serve.handlers import decode_image

    return np.stack([decode_image(b, 32, [0.5] * 3, [0.5] * 3) for b in images])


def _probs(image: np.ndarray, text: np.ndarray, scale: float) -> np.ndarray:
    image = image / np.linalg.norm(image, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    logits = scale * image.astype(np.float64) @ text.astype(np.float64).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


@needs_triton
@pytest.mark.parametrize("name", ["turbo", "baseline", "text"])
def test_tensor_level_towers_equal_the_graphs(clip_server, graphs, name):
    report, runners = graphs
    if name == "text":
        feed = {k: np.asarray(report["zero_shot"][k], np.int64) for k in ("input_ids", "attention_mask")}
        body = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64",
                                       "data": v.reshape(-1).tolist()} for k, v in feed.items()]}).encode()
    else:
        feed = {"pixel_values": np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)}
        body = tensor_body(feed["pixel_values"])
    status, answer = http(clip_server, f"/v2/models/{name}/infer", body)
    assert status == 200, answer
    expected = runners[name].run(feed)  # a dynamic-batch export: all rows in one call, no padding rows
    for out in answer["outputs"]:
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), expected[out["name"]], atol=1e-5)


@needs_triton
@pytest.mark.parametrize("flavour", ["turbo", "baseline"])
def test_zero_shot_pipelines_equal_the_graphs(clip_server, graphs, flavour):
    report, runners = graphs
    zero_shot = report["zero_shot"]
    httpclient, client = _client(clip_server)
    images = [png(1), png(2, size=(64, 20))]
    embeds = runners[flavour].run({"pixel_values": _pixels(images)})["image_embeds"]
    got = client.infer(f"clip-image-{flavour}", [_bytes_input(httpclient, "image", [[b] for b in images])])
    np.testing.assert_allclose(got.as_numpy("image_embeds"), embeds, atol=1e-5)

    # the export's labels, scored with the token ids the export wrote
    text = runners["text"].run({k: np.asarray(zero_shot[k], np.int64) for k in ("input_ids", "attention_mask")})
    probs = _probs(embeds, text["text_embeds"], zero_shot["logit_scale"])
    ids = np.argsort(-probs, -1, kind="stable")
    result = client.infer(f"clip-classify-{flavour}", [_bytes_input(httpclient, "image", [[b] for b in images])])
    np.testing.assert_array_equal(result.as_numpy("class_ids"), ids)
    np.testing.assert_allclose(result.as_numpy("scores"), np.take_along_axis(probs, ids, -1), atol=1e-5)
    assert [[s.decode() for s in row] for row in result.as_numpy("labels")] == [[LABELS[j] for j in r] for r in ids]

    # labels given in the request: the export's template and tokenizer, then the same scoring
    from turbo_export.families import get_family
    from turbo_export.models.tokenizer import offline_clip_tokens

    mine = ["a fish", "a red car"]
    cfg = get_family("clip-zero-shot").preset_config("tiny-clip-zero-shot").text_config
    tok_ids, mask = offline_clip_tokens([zero_shot["template"].replace("{}", x) for x in mine], cfg)
    text = runners["text"].run({"input_ids": tok_ids, "attention_mask": mask})["text_embeds"]
    probs = _probs(embeds[:1], text, zero_shot["logit_scale"])
    result = client.infer(f"clip-classify-{flavour}", [_bytes_input(httpclient, "image", [[images[0]]]),
                                                        _bytes_input(httpclient, "candidate_labels", [mine])])
    ids = np.argsort(-probs, -1, kind="stable")
    assert [[s.decode() for s in row] for row in result.as_numpy("labels")] == [[mine[j] for j in r] for r in ids]
    np.testing.assert_allclose(result.as_numpy("scores"), np.take_along_axis(probs, ids, -1), atol=1e-5)


@needs_triton
def test_clip_text_tokenizes_as_the_export(clip_server, graphs):
    """The export's own prompts through clip-text give the text tower's embeddings of the export's token ids."""
    report, runners = graphs
    zero_shot = report["zero_shot"]
    httpclient, client = _client(clip_server)
    result = client.infer("clip-text", [_bytes_input(httpclient, "text", [[p.encode()] for p in zero_shot["prompts"]])])
    text = runners["text"].run({k: np.asarray(zero_shot[k], np.int64) for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(result.as_numpy("text_embeds"), text["text_embeds"], atol=1e-5)


@needs_triton
def test_bad_requests_are_400_and_never_fail_concurrent_good_ones(clip_server, graphs):
    report, runners = graphs
    import tritonclient.utils

    good = [png(10 + i) for i in range(4)]
    expected = runners["turbo"].run({"pixel_values": _pixels(good)})["image_embeds"]
    bad = {"corrupt image": ("clip-classify-turbo", [("image", [[b"corrupt"]])], "image"),
           "empty label": ("clip-classify-turbo", [("image", [[good[0]]]), ("candidate_labels", [[b"a cat", b" "]])],
                           "empty label"),
           "repeated label": ("clip-classify-baseline", [("image", [[good[0]]]),
                                                         ("candidate_labels", [[b"a cat", b"a cat"]])], "repeated"),
           "text too long": ("clip-text", [("text", [[b"word " * 40]])], "longer than"),
           "empty text": ("clip-text", [("text", [[b"  "]])], "empty text")}
    outcome: dict[str, object] = {}

    def send(key: str) -> None:
        httpclient, client = _client(clip_server)
        try:
            if key.startswith("good"):
                i = int(key[4:])
                out = client.infer("clip-image-turbo", [_bytes_input(httpclient, "image", [[good[i]]])])
                outcome[key] = out.as_numpy("image_embeds")
            else:
                model, inputs, _ = bad[key]
                client.infer(model, [_bytes_input(httpclient, n, rows) for n, rows in inputs])
                outcome[key] = "answered"
        except tritonclient.utils.InferenceServerException as exc:
            outcome[key] = exc

    keys = [*bad, *(f"good{i}" for i in range(len(good)))] * 2
    threads = [threading.Thread(target=send, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(good)):
        np.testing.assert_allclose(outcome[f"good{i}"], expected[i:i + 1], atol=1e-5)
    for key, (_, _, words) in bad.items():
        exc = outcome[key]
        assert isinstance(exc, Exception) and exc.status() == "400", (key, exc)
        assert words in exc.message() and "\n" not in exc.message(), (key, exc.message())


def test_triton_repo_writes_the_three_towers(clip_export, tmp_path):
    from turbo_export.serve.triton_repo import plan_repository, write_repository

    out = str(tmp_path / "repo")
    write_repository(plan_repository(clip_export, max_batch=4, kind="cpu"), out)
    assert sorted(os.listdir(out)) == ["baseline", "text", "turbo"]
    config, _ = read_config(os.path.join(out, "text", "config.pbtxt"))
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("input_ids", [16]), ("attention_mask", [16])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("text_embeds", [16])]


def test_siglip_scores_are_sigmoids():
    """SigLIP scores each label on its own: sigmoid(scale * cosine + bias), not a softmax over the labels."""
    from turbo_export.serve.handlers_zero_shot import ZeroShotHandler

    handler = ZeroShotHandler.__new__(ZeroShotHandler)
    handler.spec, handler.labels, handler.scale, handler.bias = {"top_k": 5}, ["x", "y"], 10.0, -2.0
    handler.label_embeds = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    got = handler.classify(np.array([[3.0, 0.0]], np.float32), {})
    np.testing.assert_allclose(got["scores"], [[1 / (1 + np.exp(-8.0)), 1 / (1 + np.exp(2.0))]], rtol=1e-6)
    assert got["labels"].tolist() == [[b"x", b"y"]] and got["class_ids"].tolist() == [[0, 1]]


def test_export_without_logit_scale_reads_it_from_the_model(clip_export, tmp_path):
    """An export written before report.json recorded the logit scale: `serve` reads it from the model."""
    import shutil

    from turbo_export.serve.server import ServeOptions, bindings_for

    folder = tmp_path / "old"
    shutil.copytree(clip_export, folder)
    report = json.loads((folder / "report.json").read_text())
    scale = report["zero_shot"].pop("logit_scale")
    (folder / "report.json").write_text(json.dumps(report))
    bindings = bindings_for(str(folder), ServeOptions(), str(tmp_path / "work"))
    spec = next(b.handler for b in bindings if b.name == "clip-classify-turbo")
    assert spec["logit_scale"] == pytest.approx(scale) and spec["logit_bias"] is None
