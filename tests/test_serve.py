"""Serving: tritonserver (from nvidia-pytriton) on 127.0.0.1 with a tiny ViT classifier export, queried with
tritonclient and plain HTTP; errors, a bounded load test, SIGTERM; Triton model repositories read back with
Triton's own ModelConfig protobuf schema."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from turbo_export.errors import TurboExportError
from turbo_export.serve.triton_repo import onnx_signature, plan_repository, write_repository

HAVE_TRITON = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="nvidia-pytriton / tritonclient not installed "
                                                          "(pip install 'turbo-export[serve]')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_MB = 0.06  # 3 rows of 3x32x32 float32 (37 KB) pass, 8 rows (98 KB) are over the limit


def _tiny_vit_export(tmp_path_factory, name: str, static_batch: bool) -> str:
    from turbo_export.export.job import RunOptions, run_export
    from turbo_export.families import get_family
    from turbo_export.families.vit import VitOptions

    out = str(tmp_path_factory.mktemp("serve") / name)
    vit = get_family("vit")
    run_export(vit, vit.load("random:tiny"), VitOptions(ratio=4, batch=2),
               RunOptions(out_dir=out, validate=False, bench=False, static_batch=static_batch), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    return _tiny_vit_export(tmp_path_factory, "vit", static_batch=False)


@pytest.fixture(scope="module")
def vit_static_export(tmp_path_factory):
    """The same export with --static-batch (batch 2): graphs that take exactly 2 rows."""
    return _tiny_vit_export(tmp_path_factory, "vit-static", static_batch=True)


@pytest.fixture(scope="module")
def server(vit_export):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton / tritonclient not installed (pip install 'turbo-export[serve]')")
    from turbo_export.serve.server import ServeOptions, free_port, serving

    options = ServeOptions(max_batch=8, max_request_mb=LIMIT_MB, threads=1)
    with serving(vit_export, options, http_port=free_port(), grpc_port=free_port()) as (srv, bindings):
        yield srv


@pytest.fixture(scope="module")
def runners(vit_export):
    from turbo_export.backends import make_runner

    return {n: make_runner(os.path.join(vit_export, f"{n}.onnx")) for n in ("turbo", "baseline")}


def reference(runner, x: np.ndarray) -> np.ndarray:
    """The runner's logits for any number of rows (its static batch is 2)."""
    rows = [runner.run({"pixel_values": np.concatenate([x[i:i + 1], x[i:i + 1]])})["logits"][:1] for i in range(len(x))]
    return np.concatenate(rows)


def http(server, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            text = r.read()
            return r.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def tensor_body(x: np.ndarray, name: str = "pixel_values", datatype: str = "FP32", shape=None) -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(shape or x.shape), "datatype": datatype,
                                   "data": x.reshape(-1).tolist()}]}).encode()


def png(seed: int = 0, size=(40, 30)) -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def pixels(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 32, 32)).astype(np.float32)


# ---- health, metadata, correctness ----------------------------------------------------------------------------


@needs_triton
def test_health_and_metadata(server, vit_export):
    assert http(server, "/v2/health/live")[0] == 200
    assert http(server, "/v2/health/ready")[0] == 200
    inputs, outputs, _ = onnx_signature(os.path.join(vit_export, "turbo.onnx"))
    for name in ("turbo", "baseline"):
        status, meta = http(server, f"/v2/models/{name}")
        assert status == 200
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == \
            [(t.name, "FP32", [-1, *t.dims[1:]]) for t in inputs]
        assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [(t.name, [-1, *t.dims[1:]]) for t in outputs]
    status, meta = http(server, "/v2/models/vit-classify-turbo")
    assert status == 200 and [i["name"] for i in meta["inputs"]] == ["image"]
    assert http(server, "/v2/models/vit-classify-baseline/ready")[0] == 200


@needs_triton
@pytest.mark.parametrize("name", ["turbo", "baseline"])
@pytest.mark.parametrize("rows", [1, 3])
def test_infer_equals_runner(server, runners, name, rows):
    import tritonclient.http as httpclient

    x = pixels(rows, seed=rows)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer(name, [inp]).as_numpy("logits")
    np.testing.assert_allclose(got, reference(runners[name], x), atol=1e-5, rtol=0)


@needs_triton
def test_compressed_request_and_answer_pass_the_gateway(server, runners):
    """gzip both ways: the gateway checks the decompressed body and hands Triton's compressed answer back as is."""
    import tritonclient.http as httpclient

    x = pixels(2, seed=5)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    got = client.infer("turbo", [inp], request_compression_algorithm="gzip",
                       response_compression_algorithm="gzip").as_numpy("logits")
    np.testing.assert_allclose(got, reference(runners["turbo"], x), atol=1e-5, rtol=0)


@needs_triton
def test_grpc_infer_equals_runner(server, runners):
    import tritonclient.grpc as grpcclient

    x = pixels(2, seed=7)
    client = grpcclient.InferenceServerClient(server.grpc)
    assert client.is_server_ready()
    inp = grpcclient.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("turbo", [inp]).as_numpy("logits")
    np.testing.assert_allclose(got, reference(runners["turbo"], x), atol=1e-5, rtol=0)


@needs_triton
def test_turbo_and_baseline_differ(server):
    """Turbo merges tokens: its logits are close to, but not the same as, the unaccelerated model's."""
    x = pixels(1, seed=3)
    outs = {n: np.array(http(server, f"/v2/models/{n}/infer", tensor_body(x))[1]["outputs"][0]["data"])
            for n in ("turbo", "baseline")}
    assert not np.array_equal(outs["turbo"], outs["baseline"])


@needs_triton
@pytest.mark.parametrize("flavour", ["turbo", "baseline"])
def test_vit_classify_pipeline(server, runners, flavour):
    import tritonclient.http as httpclient

    from turbo_export.serve.handlers import decode_image

    images = [png(1), png(2, size=(64, 20))]
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("image", [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
    result = client.infer(f"vit-classify-{flavour}", [inp])
    x = np.stack([decode_image(b, 32, [0.5] * 3, [0.5] * 3) for b in images])
    logits = reference(runners[flavour], x).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, -1, kind="stable")[:, :5]
    np.testing.assert_array_equal(result.as_numpy("class_ids"), ids)
    np.testing.assert_allclose(result.as_numpy("scores"), np.take_along_axis(probs, ids, -1), atol=1e-5)
    assert [[s.decode() for s in row] for row in result.as_numpy("labels")] == \
        [[f"LABEL_{i}" for i in row] for row in ids]


# ---- errors: 4xx with a clear body, and the server keeps serving ---------------------------------------------


def post_image(server, model: str, data: bytes) -> tuple[int, dict]:
    """Image bytes through the v2 binary tensor extension (JSON header + raw BYTES element: length + data)."""
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data) + 4}}]}).encode()
    payload = len(data).to_bytes(4, "little") + data
    request = urllib.request.Request(f"{server.url}/v2/models/{model}/infer", data=header + payload, method="POST",
                                     headers={"Inference-Header-Content-Length": str(len(header)),
                                              "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


ERRORS = {
    # case: (path, body, expected status, words in the error)
    "unknown model": ("/v2/models/nope/infer", tensor_body(pixels(1)), 404, ["unknown model", "nope"]),
    "wrong input name": ("/v2/models/turbo/infer", tensor_body(pixels(1), name="image"), 400,
                         ["unexpected inference input", "image"]),
    "wrong shape": ("/v2/models/turbo/infer", tensor_body(np.zeros((1, 3, 16, 16), np.float32)), 400,
                    ["unexpected shape", "pixel_values"]),
    "wrong dtype": ("/v2/models/turbo/infer", tensor_body(pixels(1).astype(np.int64), datatype="INT64"), 400,
                    ["data-type", "INT64", "FP32"]),
    "batch over max": ("/v2/models/baseline/infer", tensor_body(np.zeros((9, 3, 32, 32), np.float32)), 400,
                       ["batch-size must be <= 8"]),
    "payload over limit": ("/v2/models/turbo/infer", tensor_body(pixels(8)), 400, ["payload", "limit"]),
    "not finite": ("/v2/models/turbo/infer", tensor_body(np.full((1, 3, 32, 32), np.nan, np.float32)), 400,
                   ["NaN"]),
    "missing inputs": ("/v2/models/turbo/infer", b'{"inputs": []}', 400, ["expected 1 inputs"]),
}


@needs_triton
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_request_is_4xx_and_server_keeps_serving(server, runners, case):
    path, body, status, words = ERRORS[case]
    got, answer = http(server, path, body)
    assert got == status, answer
    assert all(w in answer["error"] for w in words), answer["error"]
    x = pixels(1, seed=11)
    ok, out = http(server, "/v2/models/turbo/infer", tensor_body(x))
    assert ok == 200
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(1, -1), reference(runners["turbo"], x),
                               atol=1e-5)


def binary_body(x: np.ndarray, claimed_bytes: int | None = None) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "pixel_values", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": claimed_bytes or x.nbytes}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


MALFORMED = {
    # bodies tritonserver 2.51 itself answers with 500 (upstream triton-inference-server/server#8762), and others
    # that break the KServe v2 schema: the gateway answers 400 before Triton sees them
    "not JSON": (b"{not json", {}, "not valid JSON"),
    "JSON but not an object": (b"[1, 2]", {}, "must be a JSON object"),
    "inputs not a list": (b'{"inputs": 5}', {}, "'inputs' must be a list"),
    "no inputs": (b'{"outputs": []}', {}, "'inputs' must be a list"),
    "data does not fill the shape": (tensor_body(np.zeros(5, np.float32), shape=[1, 3, 32, 32]), {},
                                     "'data' has 5 elements; shape [1, 3, 32, 32] needs 3072"),
    "strings for FP32": (json.dumps({"inputs": [{"name": "pixel_values", "shape": [1], "datatype": "FP32",
                                                 "data": ["a"]}]}).encode(), {}, "expected numbers"),
    "negative dimension": (tensor_body(pixels(1), shape=[-1, 3, 32, 32]), {}, "non-negative integers"),
    "unknown datatype": (tensor_body(pixels(1), datatype="FLOAT"), {}, "'datatype' must be one of"),
    "binary data shorter than declared": (*binary_body(pixels(1), claimed_bytes=pixels(1).nbytes * 2),
                                          "add up to 24576 bytes but the body has 12288"),
    "header length past the body": (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"},
                                    "expected 1..14"),
}


def post(server, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}") if "json" in r.headers.get("Content-Type", "") else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def assert_still_serving(server, runners, seed: int) -> None:
    x = pixels(1, seed=seed)
    ok, out = http(server, "/v2/models/turbo/infer", tensor_body(x))
    assert ok == 200
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(1, -1), reference(runners["turbo"], x),
                               atol=1e-5)


BINARY_HEADER = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}'


@pytest.mark.parametrize("body, header_length", [
    (b'{"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [3, 4]]}]}', None),
    (b'{"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}], "id": "7"}', None),
    (b'{"inputs": [{"name": "b", "shape": [1], "datatype": "BOOL", "data": [true]}], "outputs": [{"name": "y"}]}',
     None),
    (b'{"inputs": [{"name": "x", "shape": [0], "datatype": "INT64", "data": []}]}', None),
    (BINARY_HEADER + b"\0\0\0\0", str(len(BINARY_HEADER))),
    (b'{"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]}',
     None),
])
def test_gateway_accepts_valid_requests(body, header_length):
    from turbo_export.serve.gateway import check_infer_request

    check_infer_request(body, header_length)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_gateway_check_names_the_problem(case):
    from turbo_export.serve.gateway import BadRequest, check_infer_request

    body, headers, words = MALFORMED[case]
    with pytest.raises(BadRequest, match=re.escape(words)):
        check_infer_request(body, headers.get("Inference-Header-Content-Length"))


@pytest.mark.parametrize("path, expected", [("/v2/models/turbo/infer", True), ("/v2/models/m/versions/1/infer", True),
                                            ("/v2/models/turbo", False), ("/v2/models/m/versions/1/ready", False),
                                            ("/v2/repository/index", False), ("/v2/models/infer", False)])
def test_gateway_infer_paths(path, expected):
    from turbo_export.serve.gateway import is_infer_path

    assert is_infer_path(path) is expected


@needs_triton
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_body_is_400(server, runners, case):
    body, headers, words = MALFORMED[case]
    status, answer = post(server, "/v2/models/turbo/infer", body, headers)
    assert status == 400 and words in answer["error"], answer
    assert_still_serving(server, runners, seed=12)


@needs_triton
def test_binary_request_passes_the_gateway(server, runners):
    x = pixels(1, seed=13)
    body, headers = binary_body(x)
    request = urllib.request.Request(server.url + "/v2/models/turbo/infer", data=body, method="POST",
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=60) as r:
        answer = r.read()
        length = int(r.headers.get("Inference-Header-Content-Length", len(answer)))
    out = json.loads(answer[:length])["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"]).reshape(1, -1), reference(runners["turbo"], x), atol=1e-5)


@needs_triton
def test_body_over_the_gateway_limit_is_413(server, runners):
    from turbo_export.serve.server import ServeOptions, gateway_body_limit

    limit = gateway_body_limit(ServeOptions(max_request_mb=LIMIT_MB))
    status, answer = post(server, "/v2/models/turbo/infer", b" " * (limit + 1), {})
    assert status == 413 and "--max-request-mb" in answer["error"], answer
    assert_still_serving(server, runners, seed=14)


@needs_triton
@pytest.mark.parametrize("case", ["garbage", "truncated png", "empty", "too large"])
def test_bad_image_is_400(server, case):
    data = {"garbage": b"definitely not an image", "truncated png": png(5)[:60], "empty": b"",
            "too large": png(6, size=(200, 200))}[case]
    status, answer = post_image(server, "vit-classify-turbo", data)
    assert status == 400, answer
    expected = {"garbage": "not an image", "truncated png": "image", "empty": "image",
                "too large": "payload"}[case]
    assert expected in answer["error"], answer["error"]
    assert post_image(server, "vit-classify-turbo", png(1))[0] == 200


@needs_triton
def test_bad_request_does_not_fail_its_batch_neighbours(server, runners):
    """Good and corrupt requests sent together (batched together by Triton): only the corrupt ones fail."""
    results: dict[int, int] = {}

    def send(i: int) -> None:
        data = png(i) if i % 2 == 0 else b"corrupt"
        results[i] = post_image(server, "vit-classify-baseline", data)[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: 200 if i % 2 == 0 else 400 for i in range(12)}


# ---- load ----------------------------------------------------------------------------------------------------


@needs_triton
def test_bounded_load_all_answers_correct(server, runners):
    """8 clients for 3 s, alternating Turbo and baseline, 1-3 rows per request: every answer is right."""
    inputs = [pixels(1 + i % 3, seed=100 + i) for i in range(6)]
    expected = {(n, i): reference(runners[n], x) for n in ("turbo", "baseline") for i, x in enumerate(inputs)}
    bodies = [tensor_body(x) for x in inputs]
    counts = {"ok": 0, "wrong": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + 3.0

    def client(k: int) -> None:
        j = k
        while time.monotonic() < deadline:
            name, i = ("turbo", "baseline")[j % 2], j % len(inputs)
            j += 1
            try:
                status, out = http(server, f"/v2/models/{name}/infer", bodies[i])
            except Exception:
                status, out = -1, {}
            if status != 200:
                verdict = "failed"
            else:
                got = np.array(out["outputs"][0]["data"]).reshape(expected[name, i].shape)
                verdict = "ok" if np.allclose(got, expected[name, i], atol=1e-5) else "wrong"
            with lock:
                counts[verdict] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts["wrong"] == 0 and counts["failed"] == 0, counts
    assert counts["ok"] >= 8, counts


# ---- the CLI process: start, serve, SIGTERM --------------------------------------------------------------------


@needs_triton
def test_cli_serve_stops_cleanly_on_sigterm(vit_export):
    from turbo_export.serve.server import free_port

    port, grpc = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "turbo_export", "serve", vit_export, "--port", str(port),
                             "--grpc-port", str(grpc), "--no-pipelines"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        else:
            pytest.fail("turbo-export serve not ready in 240 s")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "tritonserver stopped (exit code 0)" in err
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=2)


def cli(args: list[str]):
    from click.testing import CliRunner

    from turbo_export.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.parametrize("args, words", [
    (["serve", "MISSING"], "does not exist"),
    (["serve", "EMPTY"], "no report.json"),
    (["serve", "EXPORT", "--max-batch", "0"], "max-batch: must be >= 1"),
    (["serve", "EXPORT", "--backend", "tensorrt"], "backend tensorrt:"),
])
def test_cli_serve_bad_arguments_one_line_exit_2(vit_export, tmp_path, args, words):
    paths = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path), "EXPORT": vit_export}
    result = cli([paths.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0 and words in result.stderr, result.stderr


# ---- Triton model repository -----------------------------------------------------------------------------------


def model_config_pb2():
    """tritonclient's ModelConfig protobuf module, loaded without tritonclient.grpc's grpc import."""
    tritonclient = pytest.importorskip("tritonclient")
    path = os.path.join(os.path.dirname(tritonclient.__file__), "grpc", "model_config_pb2.py")
    spec = importlib.util.spec_from_file_location("_turbo_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_config(path: str):
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    with open(path) as f:
        return text_format.Parse(f.read(), pb2.ModelConfig()), pb2


def test_triton_repo_dynamic_batch_export(vit_export, tmp_path):
    out = str(tmp_path / "repo")
    write_repository(plan_repository(vit_export, "onnxruntime", max_batch=16, instances=1, kind="cpu"), out)
    for name in ("baseline", "turbo"):
        config, pb2 = read_config(os.path.join(out, name, "config.pbtxt"))
        assert config.max_batch_size == 16 and config.HasField("dynamic_batching")  # the symbolic batch
        assert [(i.name, list(i.dims)) for i in config.input] == [("pixel_values", [3, 32, 32])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10])]


def test_triton_repo_static_batch_export(vit_static_export, tmp_path):
    vit_export = vit_static_export
    out = str(tmp_path / "repo")
    models = plan_repository(vit_export, "onnxruntime", max_batch=16, instances=2, kind="gpu", gpus=[0, 1])
    write_repository(models, out)
    assert sorted(os.listdir(out)) == ["baseline", "turbo"]
    for name in ("baseline", "turbo"):
        config, pb2 = read_config(os.path.join(out, name, "config.pbtxt"))
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")  # static batch 2
        assert [(i.name, pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == \
            [("pixel_values", "TYPE_FP32", [2, 3, 32, 32])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [2, 10])]
        group = config.instance_group[0]
        assert (group.count, pb2.ModelInstanceGroup.Kind.Name(group.kind), list(group.gpus)) == \
            (2, "KIND_GPU", [0, 1])
        with open(os.path.join(out, name, "1", "model.onnx"), "rb") as a, \
                open(os.path.join(vit_export, f"{name}.onnx"), "rb") as b:
            assert a.read() == b.read()
        assert not os.path.exists(os.path.join(out, name, "PLUGINS.md"))
    with pytest.raises(TurboExportError, match="already has model folder"):
        write_repository(models, out)


def _tiny_onnx(path: str, batch: int | str, custom: bool = False) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    nodes = [helper.make_node("TurboMerge", ["x"], ["y"], domain="turbo", r=1)] if custom else \
        [helper.make_node("Relu", ["x"], ["y"])]
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("turbo", 1)] if custom else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets, ir_version=10)
    onnx.save(model, path)


def test_triton_repo_dynamic_batch_and_plugin_note(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    _tiny_onnx(str(export / "baseline.onnx"), "batch")
    _tiny_onnx(str(export / "turbo.onnx"), "batch", custom=True)
    (export / "report.json").write_text(json.dumps({"family": "vit", "files": {"baseline": "baseline.onnx",
                                                                               "turbo": "turbo.onnx"}}))
    out = str(tmp_path / "repo")
    write_repository(plan_repository(str(export), max_batch=32, kind="cpu"), out)
    config, pb2 = read_config(os.path.join(out, "turbo", "config.pbtxt"))
    assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
    assert [list(i.dims) for i in config.input] == [[4]]
    assert pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    note = (tmp_path / "repo" / "turbo" / "PLUGINS.md").read_text()
    assert "turbo::TurboMerge" in note and "plugins=" in note
    assert "PLUGINS.md" in (tmp_path / "repo" / "turbo" / "config.pbtxt").read_text()
    assert not (tmp_path / "repo" / "baseline" / "PLUGINS.md").exists()
    with pytest.raises(TurboExportError, match="no TensorRT engine"):
        plan_repository(str(export), "tensorrt")


def test_triton_repo_cli(vit_static_export, tmp_path):
    vit_export = vit_static_export
    out = tmp_path / "repo"
    result = cli(["triton-repo", vit_export, "--out", str(out), "--model", "turbo"])
    assert result.exit_code == 0, result.stderr
    assert os.listdir(out) == ["turbo"] and "static batch" in result.output
    bad = cli(["triton-repo", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 2 and "no report.json" in bad.stderr
    bad = cli(["triton-repo", vit_export, "--out", str(tmp_path / "r2"), "--model", "nope"])
    assert bad.exit_code == 2 and "nope not in" in bad.stderr


# ---- BLIP captioning at the pipeline level ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip_server(tmp_path_factory):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton / tritonclient not installed (pip install 'turbo-export[serve]')")
    from turbo_export.export.job import RunOptions, run_export
    from turbo_export.families import get_family
    from turbo_export.families.blip import BlipOptions, build_random_blip
    from turbo_export.serve.server import ServeOptions, free_port, serving

    out = str(tmp_path_factory.mktemp("serve") / "blip")
    run_export(get_family("blip"), build_random_blip("tiny", "caption"),
               BlipOptions(task="caption", ratio=4, min_tokens=0, batch=2, max_new_tokens=5),
               RunOptions(out_dir=out, validate=False, bench=False, progress=False), log=lambda m: None)
    with serving(out, ServeOptions(max_batch=4, threads=1), http_port=free_port(), grpc_port=None) as (srv, b):
        yield srv, out, b


@needs_triton
@pytest.mark.slow  # a BLIP export and a second server: about 2 minutes on the shared 2-core machine
@pytest.mark.parametrize("flavour", ["turbo", "baseline"])
def test_blip_caption_pipeline_equals_onnx_pipeline(blip_server, flavour):
    import tritonclient.http as httpclient

    from turbo_export.backends import make_runner
    from turbo_export.pipelines.blip import CaptionPipeline, TokenIds
    from turbo_export.serve.handlers import decode_image

    server, folder, bindings = blip_server
    assert {b.name for b in bindings} >= {"turbo", "baseline", f"blip-caption-{flavour}"}
    spec = next(b.handler for b in bindings if b.name == f"blip-caption-{flavour}")
    images = [png(20 + i, size=(48, 40)) for i in range(3)]
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("image", [3, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
    texts = [t[0].decode() for t in client.infer(f"blip-caption-{flavour}", [inp]).as_numpy("text")]

    from transformers import BertTokenizer

    runner = {n: make_runner(os.path.join(folder, f"{flavour}_{n}.onnx")) for n in ("vision", "cross_kv")}
    runner["decoder"] = make_runner(os.path.join(folder, "decoder.onnx"))  # shared by both pipelines
    pipeline = CaptionPipeline(runner["vision"], runner["cross_kv"], runner["decoder"], TokenIds(**spec["token_ids"]))
    pre = spec["preprocess"]
    x = np.stack([decode_image(b, pre["size"], pre["mean"], pre["std"], pre["resample"]) for b in images])
    tokens = np.concatenate([pipeline.generate(x[:2], 5), pipeline.generate(np.concatenate([x[2:], x[2:]]), 5)[:1]])
    tokenizer = BertTokenizer.from_pretrained(spec["tokenizer_dir"])
    assert texts == [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    status, answer = post_image(server, f"blip-caption-{flavour}", b"\x89PNG broken")
    assert status == 400 and "image" in answer["error"]


# ---- Stable Diffusion: prompt + seed in, PNG out ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    pytest.importorskip("diffusers")
    out = str(tmp_path_factory.mktemp("serve") / "sd")
    result = cli(["sd-unet", "--model", "random:tiny", "--ratio", "0.5", "--no-bench", "--out", out])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def sd_server(sd_export):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton / tritonclient not installed (pip install 'turbo-export[serve]')")
    from turbo_export.serve.server import ServeOptions, free_port, serving

    with serving(sd_export, ServeOptions(max_batch=4, threads=1), http_port=free_port(), grpc_port=None) as (srv, b):
        yield srv


@pytest.fixture(scope="module")
def sd_components(sd_export):
    from turbo_export.models.sd_presets import load_sd

    return load_sd("random:tiny", with_unet=False)


def sd_inputs(prompts: list[str], seeds: list[int], steps: list[int] | None = None,
              guidance: list[float] | None = None) -> list:
    import tritonclient.http as httpclient

    values = [("prompt", np.array([[p.encode()] for p in prompts], dtype=np.object_), "BYTES"),
              ("seed", np.array([[s] for s in seeds], np.int64), "INT64")]
    if steps is not None:
        values.append(("steps", np.array([[s] for s in steps], np.int32), "INT32"))
    if guidance is not None:
        values.append(("guidance", np.array([[g] for g in guidance], np.float32), "FP32"))
    inputs = []
    for name, value, datatype in values:
        inp = httpclient.InferInput(name, list(value.shape), datatype)
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    return inputs


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


@needs_triton
@pytest.mark.slow  # the tiny SD export (about 45 s) and a server with two SD pipelines
def test_sd_metadata(sd_server, sd_export):
    inputs, outputs, _ = onnx_signature(os.path.join(sd_export, "turbo.onnx"))
    for name in ("turbo", "baseline"):  # batch 2B (guidance pairs): served with full shapes, not batched
        status, meta = http(sd_server, f"/v2/models/{name}")
        assert status == 200
        assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [(t.name, list(t.dims)) for t in inputs]
        assert [i["name"] for i in meta["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
        assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [(t.name, list(t.dims)) for t in outputs]
    status, meta = http(sd_server, "/v2/models/sd-generate-turbo")
    assert status == 200
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == \
        [("prompt", "BYTES", [-1, 1]), ("seed", "INT64", [-1, 1]), ("steps", "INT32", [-1, 1]),
         ("guidance", "FP32", [-1, 1])]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("image", "BYTES")]
    status, config = http(sd_server, "/v2/models/sd-generate-turbo/config")
    assert status == 200
    assert {i["name"]: bool(i.get("optional")) for i in config["input"]} == \
        {"prompt": False, "seed": False, "steps": True, "guidance": True}
    assert http(sd_server, "/v2/models/sd-generate-baseline/ready")[0] == 200


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["turbo", "baseline"])
def test_sd_generate_equals_onnx_pipeline(sd_server, sd_export, sd_components, flavour):
    """Two prompts in one request, 2 steps: each PNG holds the pixels runtime/sd.py's pipeline makes with the
    same ONNX UNet, prompt, seed, steps and guidance."""
    import tritonclient.http as httpclient

    from turbo_export.backends import make_runner
    from turbo_export.pipelines.sd import generate

    prompts, seeds = ["a red cube on a table", "a photograph of an astronaut riding a horse"], [3, 11]
    client = httpclient.InferenceServerClient(sd_server.url.removeprefix("http://"))
    result = client.infer(f"sd-generate-{flavour}", sd_inputs(prompts, seeds, [2, 2], [5.0, 5.0]))
    got = [decode_png(row[0]) for row in result.as_numpy("image")]
    runner = make_runner(os.path.join(sd_export, f"{flavour}.onnx"), intra_op_threads=1)
    for prompt, seed, image in zip(prompts, seeds, got):
        expected = generate(runner, sd_components, prompt, steps=2, seed=seed, guidance=5.0, progress=False)
        assert image.shape == expected.images[0].shape == (64, 64, 3)
        np.testing.assert_array_equal(image, expected.images[0])
    assert not np.array_equal(got[0], got[1])


@needs_triton
@pytest.mark.slow
def test_sd_generate_defaults_when_optional_inputs_left_out(sd_server, sd_export, sd_components):
    import tritonclient.http as httpclient

    from turbo_export.backends import make_runner
    from turbo_export.pipelines.sd import generate
    from turbo_export.serve.server import SD_DEFAULT_GUIDANCE, SD_DEFAULT_STEPS

    client = httpclient.InferenceServerClient(sd_server.url.removeprefix("http://"))
    image = decode_png(client.infer("sd-generate-turbo", sd_inputs(["a cat"], [5])).as_numpy("image")[0, 0])
    runner = make_runner(os.path.join(sd_export, "turbo.onnx"), intra_op_threads=1)
    expected = generate(runner, sd_components, "a cat", steps=SD_DEFAULT_STEPS, seed=5,
                        guidance=SD_DEFAULT_GUIDANCE, progress=False)
    np.testing.assert_array_equal(image, expected.images[0])


@needs_triton
@pytest.mark.slow
def test_sd_tensor_level_unet_equals_runner(sd_server, sd_export):
    import tritonclient.http as httpclient

    from turbo_export.backends import make_runner

    runner = make_runner(os.path.join(sd_export, "turbo.onnx"))
    # a symbolic batch (the default export): one image per call, its classifier-free guidance pair
    shapes = {t.name: [2 if d == "batch" else int(d) for d in t.shape] for t in runner.inputs}
    rng = np.random.default_rng(4)
    feed = {"sample": rng.standard_normal(shapes["sample"]).astype(np.float32),
            "timestep": np.full(shapes["timestep"], 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"]).astype(np.float32)}
    client = httpclient.InferenceServerClient(sd_server.url.removeprefix("http://"))
    inputs = []
    for name, value in feed.items():
        inp = httpclient.InferInput(name, list(value.shape), "FP32")
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    got = client.infer("turbo", inputs).as_numpy("noise_pred")
    np.testing.assert_allclose(got, runner.run(feed)["noise_pred"], atol=1e-5, rtol=0)


SD_ERRORS = {
    # case: (prompt, steps, guidance, words in the error)
    "empty prompt": ("", 2, 7.5, ["prompt", "empty"]),
    "blank prompt": ("   ", 2, 7.5, ["prompt", "empty"]),
    "too long prompt": (" ".join(["horse"] * 80), 2, 7.5, ["prompt", "82 tokens", "77"]),
    "zero steps": ("a cat", 0, 7.5, ["steps", "1..100", "got 0"]),
    "too many steps": ("a cat", 101, 7.5, ["steps", "1..100", "got 101"]),
    "nan guidance": ("a cat", 2, float("nan"), ["guidance", "NaN"]),
    "infinite guidance": ("a cat", 2, float("inf"), ["guidance", "infinity"]),
}


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("case", list(SD_ERRORS))
def test_sd_bad_request_is_400_and_server_keeps_serving(sd_server, case):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    prompt, steps, guidance, words = SD_ERRORS[case]
    client = httpclient.InferenceServerClient(sd_server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as info:
        client.infer("sd-generate-turbo", sd_inputs([prompt], [0], [steps], [guidance]))
    assert info.value.status() == "400", info.value
    message = info.value.message()
    assert "\n" not in message and all(w in message for w in words), message
    ok = client.infer("sd-generate-turbo", sd_inputs(["a cat"], [0], [1]))
    decode_png(ok.as_numpy("image")[0, 0])


def test_gateway_on_a_taken_port_is_one_clear_error():
    pytest.importorskip("aiohttp")
    import socket

    from turbo_export.serve.gateway import Gateway

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TurboExportError, match=f"cannot listen on 127.0.0.1:{port}.*choose another --port"):
            Gateway("http://127.0.0.1:9", "127.0.0.1", port, 1024).start()
