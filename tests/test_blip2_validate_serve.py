"""BLIP-2 exports (random:tiny-blip2, kind "vision-language-llm") through `validate` and `serve`: validate reports the
caption and retrieval figures end to end, the served pipelines and graphs answer what the ONNX pipelines compute,
a bad request gets 400 without failing concurrent good ones, and triton-repo writes every graph."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from test_serve import HAVE_TRITON, http, needs_triton, png, tensor_body

from turbo_export.cli import main

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")
TASKS = {"caption": {"max_new_tokens": 4}, "retrieval": {"text_len": 8}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from turbo_export.export.job import RunOptions, run_export
    from turbo_export.families import get_family
    from turbo_export.families.blip2 import Blip2Options, build_random_blip2

    out = {}
    for task, extra in TASKS.items():
        out[task] = str(tmp_path_factory.mktemp("blip2") / task)
        run_export(get_family("blip2"), build_random_blip2("tiny-blip2", task),
                   Blip2Options(task=task, ratio=8, min_tokens=0, batch=2, **extra),
                   RunOptions(out_dir=out[task], validate=False, bench=False, progress=False), log=lambda m: None)
    return out


def _validate(*args: str):
    return CliRunner().invoke(main, ["validate", *args])


def test_validate_caption_and_retrieval(exports, tmp_path):
    result = _validate(exports["caption"], "--data", DIGITS, "--limit", "5", "--json", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output + result.stderr
    assert "captions, Turbo against the unaccelerated ones: BLEU-4" in result.output
    caption = json.loads((tmp_path / "c.json").read_text())
    assert caption["family"] == "blip2" and caption["task"] == "caption" and caption["images"] == 5
    p = caption["onnx"]
    assert p["count"] == 5 and 0 <= p["token_agreement"] <= 1 and 0 <= p["exact_match"] <= 1 and 0 <= p["bleu4"] <= 1
    assert len(p["examples"]) == 5 and "note" in caption

    texts = tmp_path / "texts.txt"
    texts.write_text("a dog\na red car\na cat on a bed\n")
    result = _validate(exports["retrieval"], "--data", DIGITS, "--limit", "6", "--texts", str(texts),
                       "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output + result.stderr
    assert "ITC recall agreement" in result.output and "ITM (match probability)" in result.output
    retrieval = json.loads((tmp_path / "r.json").read_text())
    p = retrieval["onnx"]
    assert retrieval["texts"] == 3 and retrieval["texts_source"] == "--texts" and p["images"] == 6
    for key in ("image_to_text_recall@1_agreement", "text_to_image_recall@5_agreement", "itm_top1_agreement"):
        assert 0 <= p[key] <= 1, key
    assert -1 <= p["itc_rank_correlation"] <= 1 and p["itm_max_abs_diff"] < 1


def test_validate_bad_input_is_one_line_exit_2(exports, tmp_path):
    texts = tmp_path / "long.txt"
    texts.write_text("word " * 20 + "\n")
    cases = [([exports["caption"], "--data", DIGITS, "--question", "what?"], "--question is for vqa exports"),
             ([exports["caption"], "--data", DIGITS, "--texts", str(texts)], "is a caption export"),
             ([exports["retrieval"], "--data", DIGITS, "--texts", str(texts)], "longer than the export's text length"),
             ([exports["retrieval"]], "--data is required")]
    for args, words in cases:
        result = _validate(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_triton_repo_writes_every_graph(exports, tmp_path):
    from turbo_export.serve.triton_repo import plan_repository, write_repository

    out = str(tmp_path / "repo")
    write_repository(plan_repository(exports["retrieval"], max_batch=4, kind="cpu"), out)
    assert sorted(os.listdir(out)) == ["baseline_itm", "baseline_vision", "text_itc", "turbo_itm", "turbo_vision"]


# ---- serving ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(exports):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton / tritonclient not installed (pip install 'turbo-export[serve]')")
    from contextlib import ExitStack

    from turbo_export.serve.server import ServeOptions, free_port, serving

    with ExitStack() as stack:
        yield {task: stack.enter_context(serving(exports[task], ServeOptions(max_batch=8, threads=1),
                                                 http_port=free_port(), grpc_port=None)) for task in TASKS}


def _client(server):
    import tritonclient.http as httpclient

    return httpclient, httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def _bytes(httpclient, name: str, values: list[bytes]):
    tensor = httpclient.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=np.object_))
    return tensor


def _direct(folder: str, task: str, flavour: str):
    """The flavour's pipeline over the export's graphs, its spec's tokenizer and preprocessing."""
    from turbo_export.backends import make_runner
    from turbo_export.families import get_family
    from turbo_export.pipelines.blip2 import blip2_pipelines

    report = json.load(open(os.path.join(folder, "report.json")))
    runners = {n: make_runner(os.path.join(folder, f)) for n, f in report["files"].items()}
    processing = get_family("blip2").processing(report["model"], task)
    return blip2_pipelines(runners, task, processing.ids, processing.image_token)[flavour], processing, runners


def _pixels(images: list[bytes]) -> np.ndarray:
    from turbo_export.serve.handlers import decode_image

    return np.stack([decode_image(b, 32, [0.5] * 3, [0.5] * 3) for b in images])


@needs_triton
@pytest.mark.parametrize("flavour", ["turbo", "baseline"])
def test_served_models_equal_the_pipelines_and_graphs(servers, exports, flavour):
    images = [png(30 + i, size=(48, 40)) for i in range(3)]
    x = _pixels(images)
    pipeline, processing, runners = _direct(exports["caption"], "caption", flavour)
    httpclient, client = _client(servers["caption"][0])
    got = client.infer(f"blip2-caption-{flavour}", [_bytes(httpclient, "image", images)]).as_numpy("text")
    tokens = pipeline.generate(x, 4)  # a dynamic-batch export: all rows at once
    assert [t[0].decode() for t in got] == [processing.tokenizer.decode(t[processing.queries:]) for t in tokens]
    status, answer = http(servers["caption"][0], f"/v2/models/{flavour}/infer", tensor_body(x))  # the image graph
    assert status == 200, answer
    expected = runners[f"{flavour}_vision"].run({"pixel_values": x})
    for out in answer["outputs"]:
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), expected[out["name"]], atol=1e-5)

    pipeline, processing, _ = _direct(exports["retrieval"], "retrieval", flavour)
    texts = ["a dog", "a red car on the street", "a cat"]
    httpclient, client = _client(servers["retrieval"][0])
    got = client.infer(f"blip2-retrieval-{flavour}", [_bytes(httpclient, "image", images),
                                                       _bytes(httpclient, "text", [t.encode() for t in texts])])
    enc = processing.tokenizer(texts, padding="max_length", max_length=8, return_tensors="np")
    scores = pipeline.scores(x, enc["input_ids"], enc["attention_mask"])  # every image x every text: the diagonal
    np.testing.assert_allclose(got.as_numpy("itm_score")[:, 0], np.diag(scores.itm), atol=1e-5)
    np.testing.assert_allclose(got.as_numpy("itc_score")[:, 0], np.diag(scores.itc), atol=1e-5)


@needs_triton
def test_bad_requests_are_400_and_never_fail_concurrent_good_ones(servers, exports):
    import tritonclient.utils

    good = [png(40 + i) for i in range(3)]
    pipeline, processing, _ = _direct(exports["retrieval"], "retrieval", "turbo")
    enc = processing.tokenizer(["a dog"] * 3, padding="max_length", max_length=8, return_tensors="np")
    expected = np.diag(pipeline.scores(_pixels(good), enc["input_ids"], enc["attention_mask"]).itm)
    bad = {"corrupt image": ([b"corrupt"], [b"a dog"], "image"), "long text": ([good[0]], [b"word " * 20], "longer"),
           "empty text": ([good[0]], [b"  "], "empty text")}
    outcome: dict[str, object] = {}

    def send(key: str) -> None:
        httpclient, client = _client(servers["retrieval"][0])
        images, texts = ([good[int(key[4:])]], [b"a dog"]) if key.startswith("good") else bad[key][:2]
        try:
            out = client.infer("blip2-retrieval-turbo", [_bytes(httpclient, "image", images),
                                                          _bytes(httpclient, "text", texts)])
            outcome[key] = out.as_numpy("itm_score")[0, 0]
        except tritonclient.utils.InferenceServerException as exc:
            outcome[key] = exc

    threads = [threading.Thread(target=send, args=(k,)) for k in [*bad, *(f"good{i}" for i in range(3))] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        np.testing.assert_allclose(outcome[f"good{i}"], expected[i], atol=1e-5)
    for key, (_, _, words) in bad.items():
        exc = outcome[key]
        assert isinstance(exc, Exception) and exc.status() == "400", (key, exc)
        assert words in exc.message() and "\n" not in exc.message(), (key, exc.message())
