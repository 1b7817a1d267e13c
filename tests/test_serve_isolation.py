"""Serving reliability (issue 13, class 5): a request with bad contents never fails another client's request, the
gateway answers unreadable bodies with 400 and does not stall on large ones, answers are compressed only on
request, and a single-channel classifier is served.

Unit tests (no server, fast): the integer-range inference on small hand-built graphs, the handlers' per-request
checks and their one-by-one fallback, error messages on one line, image channel conversion, the gateway's body
checks. Server tests: a tiny BLIP VQA export served at the tensor level (its question graph is dynamically
batched, its decoder takes a cache position) under 8 concurrent clients mixing valid and bad requests, and a
tiny 1-channel ViT served with its classification pipeline."""

from __future__ import annotations

import gzip
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_serve import HAVE_TRITON, needs_triton, png

from turbo_export.serve.handlers import (
    Handler,
    ModelError,
    RequestError,
    TensorHandler,
    check_integer_ranges,
    decode_image,
    describe_failure,
    integer_input_ranges,
)

# ---- integer ranges read from the graph ---------------------------------------------------------------------


def _ranges_graph(path: str) -> None:
    """Each output row from its input row only. ids [B, 3] -> Reshape -> Cast -> Gather(emb[50, 4]); pos [B, 1] ->
    Gather(pos_emb[20, 4]) and Equal(arange(7)); attention_mask [B, 3] (by its name: 0/1); other [B] (an int
    input that indexes nothing); x [B, 4] (a float input); col [B] (int32) -> Gather(table[3, 9], axis=1)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("ids", i64, ["B", 3]), helper.make_tensor_value_info("pos", i64, ["B", 1]),
              helper.make_tensor_value_info("attention_mask", i64, ["B", 3]),
              helper.make_tensor_value_info("other", i64, ["B"]), helper.make_tensor_value_info("x", f, ["B", 4]),
              helper.make_tensor_value_info("col", TensorProto.INT32, ["B"])]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 4)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((20, 4)).astype(np.float32), "pos_emb"),
             numpy_helper.from_array(np.arange(7, dtype=np.int64), "slots"),
             numpy_helper.from_array(rng.standard_normal((3, 9)).astype(np.float32), "table"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.array([-1, 12], np.int64), "rows12"),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "rows4"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]

    def row_sum(src: str, out: str) -> onnx.NodeProto:
        return helper.make_node("ReduceSum", [src, "axis1"], [out], keepdims=1)

    nodes = [helper.make_node("Reshape", ["ids", "flat"], ["ids_flat"]),
             helper.make_node("Cast", ["ids_flat"], ["ids_32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["emb", "ids_32"], ["tok"]),
             helper.make_node("Reshape", ["tok", "rows12"], ["tok_rows"]), row_sum("tok_rows", "t"),
             helper.make_node("Gather", ["pos_emb", "pos"], ["pe"]),
             helper.make_node("Reshape", ["pe", "rows4"], ["pe_rows"]), row_sum("pe_rows", "p"),
             helper.make_node("Equal", ["slots", "pos"], ["write"]),
             helper.make_node("Cast", ["write"], ["write_f"], to=f), row_sum("write_f", "w"),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f), row_sum("mask_f", "m"),
             helper.make_node("Cast", ["other"], ["other_f"], to=f),
             helper.make_node("Unsqueeze", ["other_f", "axis1"], ["o"]),
             helper.make_node("Gather", ["table", "col"], ["picked"], axis=1),
             helper.make_node("Transpose", ["picked"], ["picked_t"], perm=[1, 0]), row_sum("picked_t", "c"),
             helper.make_node("Sum", ["x", "t", "p", "w", "m", "o", "c"], ["y"])]
    graph = helper.make_graph(nodes, "ranges", inputs, [helper.make_tensor_value_info("y", f, ["B", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def ranges_onnx(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ranges") / "g.onnx")
    _ranges_graph(path)
    return path


def test_integer_ranges_read_from_the_graph(ranges_onnx):
    ranges = integer_input_ranges(ranges_onnx)
    assert {k: v[:2] for k, v in ranges.items()} == \
        {"ids": [0, 49], "pos": [0, 6], "attention_mask": [0, 1], "col": [0, 8]}
    assert "50 rows in the table 'emb'" in ranges["ids"][2]  # through Reshape and Cast
    assert "7 cache slots" in ranges["pos"][2]  # the tighter of Gather (20 rows) and Equal(arange(7))
    assert "mask" in ranges["attention_mask"][2]
    assert "9 rows" in ranges["col"][2]  # Gather on axis 1: the table's second dimension


def _feed(rows: int = 1, ids: int = 3, pos: int = 2, mask: int = 1, other: int = 10 ** 9, col: int = 4,
          x: float = 0.5) -> dict[str, np.ndarray]:
    return {"ids": np.full((rows, 3), ids, np.int64), "pos": np.full((rows, 1), pos, np.int64),
            "attention_mask": np.full((rows, 3), mask, np.int64), "other": np.full(rows, other, np.int64),
            "x": np.full((rows, 4), x, np.float32), "col": np.full(rows, col, np.int32)}


BAD_TENSOR_FEEDS = {
    # case: (feed, words in the 400)
    "id = vocabulary size": (_feed(ids=50), ["input 'ids'", "50", "0..49"]),
    "id far beyond": (_feed(ids=2 ** 62), ["input 'ids'", "0..49"]),
    "negative id": (_feed(ids=-1), ["input 'ids'", "-1", "0..49"]),
    "position past the cache": (_feed(pos=7), ["input 'pos'", "0..6", "cache slots"]),
    "negative position": (_feed(pos=-3), ["input 'pos'", "0..6"]),
    "mask 2": (_feed(mask=2), ["input 'attention_mask'", "0..1"]),
    "column past the table": (_feed(col=9), ["input 'col'", "0..8"]),
    "NaN float": (_feed(x=float("nan")), ["input 'x'", "NaN"]),
    "infinite float": (_feed(x=float("inf")), ["input 'x'", "infinity"]),
}


def _tensor_handler(path: str, ranges=None) -> TensorHandler:
    spec = {"handler": "tensor", "onnx": path, "backend": "onnxruntime", "batched": True, "name": "g"}
    if ranges is not None:
        spec["ranges"] = ranges
    return TensorHandler(spec)


def test_handler_refuses_each_bad_request_alone(ranges_onnx):
    """Bad requests of every kind mixed into one batch with valid ones: each bad one is a one-line 400 naming the
    input and the range, each valid one gets what it gets alone."""
    handler = _tensor_handler(ranges_onnx)
    assert handler.ranges == integer_input_ranges(ranges_onnx)  # read from the graph when the spec has none
    good = [_feed(rows=1 + i % 2, ids=i, pos=i % 7, col=i % 9, x=0.1 * i) for i in range(4)]
    alone = [handler.runner.run(f) for f in good]
    batch = [good[0], *(f for f, _ in BAD_TENSOR_FEEDS.values()), *good[1:]]
    results = handler.handle([dict(f) for f in batch])
    valid = [results[0], *results[-3:]]
    for got, expected in zip(valid, alone):
        assert isinstance(got, dict), got
        np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-6)
    for result, (case, (_, words)) in zip(results[1:-3], BAD_TENSOR_FEEDS.items()):
        assert isinstance(result, RequestError), (case, result)
        assert "\n" not in str(result) and all(w in str(result) for w in words), (case, str(result))


def test_failed_batch_is_rerun_one_by_one(ranges_onnx):
    """With the checks off (ranges {}), an out-of-range id reaches ONNX Runtime and fails the batch run: the
    handler runs the requests again one by one, so only the bad one fails (400: ONNX Runtime calls the input
    invalid), on one line that names the operator, without ONNX Runtime's own multi-line wrapping."""
    handler = _tensor_handler(ranges_onnx, ranges={})
    good = [_feed(ids=i) for i in range(3)]
    alone = [handler.runner.run(f)["y"] for f in good]
    results = handler.handle([good[0], _feed(ids=500), good[1], good[2]])
    for got, expected in zip([results[0], results[2], results[3]], alone):
        np.testing.assert_allclose(got["y"], expected, rtol=1e-6)
    bad = results[1]
    assert isinstance(bad, RequestError), bad
    text = str(bad)
    assert "\n" not in text and "Gather node:" in text and "idx=500" in text and "[-50,49]" in text, text
    assert "[ONNXRuntimeError]" not in text


class _Flaky(Handler):
    """Fails any run that holds a row with x == 13 (RuntimeError), or x == 14 (RequestError), else doubles x."""

    def __init__(self) -> None:
        super().__init__({"name": "flaky"})
        self.runs = 0

    def run(self, feeds):
        self.runs += 1
        x = np.concatenate([f["x"] for f in feeds])
        if (x == 13).any():
            raise RuntimeError("CUDA failure 700: an illegal memory access\n  at kernel.cu:12\n  at run()")
        if (x == 14).any():
            raise RequestError("input 'x': 14 is unlucky")
        return [{"y": f["x"] * 2} for f in feeds]


def test_model_failure_fails_only_its_request_as_one_line_500():
    handler = _Flaky()
    feeds = [{"x": np.array([float(v)])} for v in (1, 13, 2, 14, 3)]
    results = handler.handle(feeds)
    assert handler.runs == 1 + 5  # the batch, then each request alone
    assert [r["y"].tolist() for r in (results[0], results[2], results[4])] == [[2.0], [4.0], [6.0]]
    assert isinstance(results[1], ModelError) and not isinstance(results[1], RequestError)
    assert str(results[1]) == "model 'flaky' failed on this request (RuntimeError: CUDA failure 700: an illegal " \
                              "memory access at kernel.cu:12 at run())"
    assert isinstance(results[3], RequestError) and str(results[3]) == "input 'x': 14 is unlucky"
    assert handler.handle([{"x": np.array([5.0])}])[0]["y"].tolist() == [10.0]  # nothing left behind


def test_prepare_bug_fails_only_its_request():
    class Picky(_Flaky):
        def prepare(self, feed):
            if feed["x"][0] == 7:
                raise KeyError("boom")
            return feed

    results = Picky().handle([{"x": np.array([7.0])}, {"x": np.array([1.0])}])
    assert isinstance(results[0], ModelError) and "KeyError" in str(results[0])
    assert results[1]["y"].tolist() == [2.0]


def test_onnx_runtime_errors_become_one_line():
    class Fail(Exception):
        pass

    message = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node. "
               "Name:'/encoder/MatMul' Status Message: matmul_helper.h:61 Compute\n dimension mismatch\n" + "x" * 2000)
    error = describe_failure(Fail(message), "model 'turbo'")
    assert isinstance(error, ModelError) and "\n" not in str(error)
    assert str(error).startswith("model 'turbo' failed on this request (ONNX Runtime FAIL: MatMul node "
                                 "'/encoder/MatMul': matmul_helper.h:61 Compute dimension mismatch")
    assert "more characters in the server log" in str(error)
    assert describe_failure(RequestError("as is")).args == ("as is",)


def test_check_integer_ranges_ignores_empty_and_absent_inputs():
    ranges = {"ids": [0, 9, "why"], "absent": [0, 1, ""]}
    check_integer_ranges({"ids": np.zeros((0, 3), np.int64)}, ranges)
    with pytest.raises(RequestError, match=r"input 'ids': 10 is out of range; this model accepts 0\.\.9 \(why\)"):
        check_integer_ranges({"ids": np.array([[3, 10]], np.int32)}, ranges)


# ---- images: the model's channel count ------------------------------------------------------------------------


def _image(mode: str, size=(20, 12), seed: int = 0) -> bytes:
    from PIL import Image

    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = (np.random.default_rng(seed).random((size[1], size[0], channels)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("channels", [1, 3])
def test_decode_image_converts_to_the_model_channels(mode, channels):
    from PIL import Image

    data = _image(mode)
    x = decode_image(data, 8, [0.1307] if channels == 1 else [0.5] * 3, [0.3081] if channels == 1 else [0.5] * 3,
                     2, channels)
    assert x.shape == (channels, 8, 8) and x.dtype == np.float32
    with Image.open(io.BytesIO(data)) as img:
        ref = np.asarray(img.convert("L" if channels == 1 else "RGB").resize((8, 8), 2), np.float32) / 255.0
    ref = ref.reshape(8, 8, channels).transpose(2, 0, 1)
    mean, std = (0.1307, 0.3081) if channels == 1 else (0.5, 0.5)
    np.testing.assert_allclose(x, (ref - mean) / std, rtol=1e-6)
    # the 3-value default given to a grey model: its first value
    np.testing.assert_allclose(decode_image(data, 8, [0.5] * 3, [0.5] * 3, 2, 1)[0],
                               decode_image(data, 8, [0.5], [0.5], 2, 1)[0])


# ---- the gateway's checks of a body ---------------------------------------------------------------------------


def _tensor_json(data: str, datatype: str = "FP32", shape=(1,)) -> bytes:
    return (f'{{"inputs": [{{"name": "x", "shape": {list(shape)}, "datatype": "{datatype}", '
            f'"data": {data}}}]}}').encode()


GATEWAY_BAD = {
    # case: (body, headers, status, words in the error)
    "nested 100000 deep": (b"[" * 100000 + b"]" * 100000, {}, 400, "nested deeper than 64"),
    "nested data 70 deep": (_tensor_json("[" * 70 + "1" + "]" * 70), {}, 400, "nested deeper than 64"),
    "object nested deep": (b'{"a":' * 5000 + b"1" + b"}" * 5000, {}, 400, "nested deeper than 64"),
    "1e999": (_tensor_json("[1e999]"), {}, 400, "beyond the range of a double"),
    "-1e400": (_tensor_json("[-1e400]", "FP64"), {}, 400, "beyond the range of a double"),
    "400-digit integer": (_tensor_json("[" + "9" * 400 + "]"), {}, 400, "beyond the range of a double"),
    "5000-digit integer": (_tensor_json("[" + "9" * 5000 + "]"), {}, 400, "beyond the range of a double"),
    "1e39 for FP32": (_tensor_json("[1e39]"), {}, 400, "outside what FP32 holds"),
    "70000 for FP16": (_tensor_json("[70000]", "FP16"), {}, 400, "outside what FP16 holds"),
    "2**63 for INT64": (_tensor_json(f"[{2 ** 63}]", "INT64"), {}, 400, "outside what INT64 holds"),
    "-1 for UINT8": (_tensor_json("[-1]", "UINT8"), {}, 400, "outside what UINT8 holds"),
    "NaN": (_tensor_json("[NaN]"), {}, 400, "NaN is not a JSON number"),
    "-Infinity": (_tensor_json("[-Infinity]"), {}, 400, "-Infinity is not a JSON number"),
    "gzip header, plain body": (_tensor_json("[1]"), {"Content-Encoding": "gzip"}, 400, "not gzip data"),
    "deflate header, random body": (os.urandom(64), {"Content-Encoding": "deflate"}, 400, "not deflate data"),
    "gzip cut off": (gzip.compress(_tensor_json("[1]"))[:-6], {"Content-Encoding": "gzip"}, 400, "cut off"),
    "gzip bomb": (gzip.compress(b" " * 3_000_000), {"Content-Encoding": "gzip"}, 413, "once decompressed"),
    "unknown encoding": (_tensor_json("[1]"), {"Content-Encoding": "br"}, 415, "'br' is not supported"),
}


@pytest.mark.parametrize("case", list(GATEWAY_BAD))
def test_gateway_check_body_refuses(case):
    from turbo_export.serve.gateway import BadRequest, BodyTooLarge, UnsupportedEncoding, check_body

    body, headers, status, words = GATEWAY_BAD[case]
    kind = {400: BadRequest, 413: BodyTooLarge, 415: UnsupportedEncoding}[status]
    with pytest.raises(kind, match=words.replace("(", r"\(")) as info:
        check_body("POST", "/v2/models/m/infer", body, headers.get("Content-Encoding"), None, 2_000_000)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("body", [b'{"a": "[[[[[[\\"[[[["}', b'{"s": "\\\\", "d": [[[[1]]]]}', b"[]", b"",
                                  b'"' + b"[" * 200 + b'"'])
def test_json_depth_skips_strings(body):
    from turbo_export.serve.gateway import json_depth

    def reference(value, level=0):
        if isinstance(value, dict):
            return max([reference(v, level + 1) for v in value.values()], default=level + 1)
        if isinstance(value, list):
            return max([reference(v, level + 1) for v in value], default=level + 1)
        return level

    assert json_depth(body) == (reference(json.loads(body)) if body else 0)


def test_gateway_decodes_compressed_bodies():
    import zlib

    from turbo_export.serve.gateway import check_body

    body = _tensor_json("[1.5, 2]", shape=(2,))
    raw = zlib.compressobj(wbits=-15)
    for encoded, encoding in [(gzip.compress(body), "gzip"), (zlib.compress(body), "deflate"),
                              (raw.compress(body) + raw.flush(), "deflate"), (body, "identity"),
                              (gzip.compress(body[:10]) + gzip.compress(body[10:]), "gzip")]:
        assert check_body("POST", "/v2/models/m/infer", encoded, encoding, None, 1000) == body


# ---- a live server: BLIP VQA graphs at the tensor level, 8 clients mixing bad and valid requests -------------


@pytest.fixture(scope="module")
def vqa_export(tmp_path_factory):
    from turbo_export.export.job import RunOptions, run_export
    from turbo_export.families import get_family
    from turbo_export.families.blip import BlipOptions, build_random_blip

    out = str(tmp_path_factory.mktemp("isolation") / "vqa")
    run_export(get_family("blip"), build_random_blip("tiny", "vqa"),
               BlipOptions(task="vqa", ratio=4, min_tokens=0, batch=2, max_new_tokens=5),
               RunOptions(out_dir=out, validate=False, bench=False, progress=False, static_batch=True),
               log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def vqa_server(vqa_export):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton / tritonclient not installed (pip install 'turbo-export[serve]')")
    from turbo_export.serve.server import ServeOptions, free_port, serving

    # the tensor level only; a 5 ms queue delay so that concurrent requests are batched together
    options = ServeOptions(max_batch=8, threads=1, pipelines=False, queue_delay_us=5000)
    with serving(vqa_export, options, http_port=free_port(), grpc_port=None) as (srv, bindings):
        yield srv, {b.name: b for b in bindings}


def _post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 120):
    """(status, headers, raw answer)"""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _v2_body(feed: dict[str, np.ndarray]) -> bytes:
    kinds = {"i": "INT64", "f": "FP32"}
    return json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": kinds[v.dtype.kind],
                                   "data": v.reshape(-1).tolist()} for k, v in feed.items()]}).encode()


def _question_feed(seed: int, ids=None, mask=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = 1 + seed % 2
    feed = {"input_ids": rng.integers(0, 512, (rows, 32)).astype(np.int64),
            "attention_mask": (np.arange(32) < 5 + seed % 20).astype(np.int64)[None].repeat(rows, 0),
            "encoder_hidden_states": rng.standard_normal((rows, 57, 32)).astype(np.float32),
            "cross_bias": np.zeros((rows, 1, 1, 57), np.float32)}
    if ids is not None:
        feed["input_ids"][-1, seed % 32] = ids  # one bad token among valid ones
    if mask is not None:
        feed["attention_mask"][0, 3] = mask
    return feed


def _decoder_feed(runner, seed: int, position: int, token: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {t.name: [int(d) for d in t.shape] for t in runner.inputs}
    feed = {"input_ids": rng.integers(0, 512, shapes["input_ids"]).astype(np.int64),
            "position": np.array([position], np.int64)}
    for name in ("past_keys", "past_values", "cross_keys", "cross_values"):
        feed[name] = rng.standard_normal(shapes[name]).astype(np.float32)
    feed["cross_bias"] = np.zeros(shapes["cross_bias"], np.float32)
    if token is not None:
        feed["input_ids"][0, 0] = token
    return feed


def _padded_run(runner, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime directly: the rows of ``feed`` through a static-batch-2 graph, one row at a time."""
    rows = len(feed["input_ids"])
    outs = [runner.run({k: np.concatenate([v[i:i + 1]] * 2) for k, v in feed.items()}) for i in range(rows)]
    return {k: np.concatenate([o[k][:1] for o in outs]) for k in outs[0]}


def _load_plan(vqa_export):
    """(model, body, expected outputs or None, words of the 400 or None) x 60: 36 valid, 24 bad, interleaved."""
    from turbo_export.backends import make_runner

    question = make_runner(os.path.join(vqa_export, "turbo_question.onnx"))
    decoder = make_runner(os.path.join(vqa_export, "answer_decoder.onnx"))
    bad_question = [  # (ids, mask, words)
        (512, None, ["input 'input_ids'", "512", "0..511"]), (10 ** 6, None, ["input 'input_ids'", "0..511"]),
        (-1, None, ["input 'input_ids'", "-1", "0..511"]), (2 ** 62, None, ["input 'input_ids'", "0..511"]),
        (None, 2, ["input 'attention_mask'", "0..1"]), (None, -7, ["input 'attention_mask'", "0..1"]),
    ]
    bad_decoder = [  # (position, token, words)
        (13, None, ["input 'position'", "13", "0..12"]), (-1, None, ["input 'position'", "0..12"]),
        (64, None, ["input 'position'", "0..12"]), (0, 512, ["input 'input_ids'", "0..511"]),
    ]
    plan = []
    for i in range(60):
        if i % 5 in (1, 3):  # 24 bad: question and decoder in turn
            j = i // 5 * 2 + (i % 5 == 3)
            if j % 2 == 0:
                ids, mask, words = bad_question[j // 2 % len(bad_question)]
                plan.append(("turbo_question", _v2_body(_question_feed(i, ids, mask)), None, words))
            else:
                position, token, words = bad_decoder[j // 2 % len(bad_decoder)]
                plan.append(("answer_decoder", _v2_body(_decoder_feed(decoder, i, position, token)), None, words))
        elif i % 6 == 0:  # valid decoder steps
            feed = _decoder_feed(decoder, i, position=i % 13)
            plan.append(("answer_decoder", _v2_body(feed), decoder.run(feed), None))
        else:
            feed = _question_feed(i)
            plan.append(("turbo_question", _v2_body(feed), _padded_run(question, feed), None))
    return plan


@needs_triton
@pytest.mark.slow  # a BLIP VQA export and a server of its six graphs: about 2 minutes on the shared 2-core machine
def test_bad_requests_never_fail_their_neighbours(vqa_server, vqa_export):
    """8 clients send 60 requests at once to the dynamically batched question graph and the decoder step: 36
    valid, 24 with out-of-range token ids, masks or cache positions. Every valid one is answered with what ONNX
    Runtime computes for it alone; every bad one is a one-line 400 naming the input and the allowed range."""
    server, bindings = vqa_server
    assert {k: v[:2] for k, v in bindings["turbo_question"].handler["ranges"].items()} == \
        {"input_ids": [0, 511], "attention_mask": [0, 1]}
    assert {k: v[:2] for k, v in bindings["answer_decoder"].handler["ranges"].items()} == \
        {"input_ids": [0, 511], "position": [0, 12]}
    plan = _load_plan(vqa_export)
    url = server.url + "/v2/models/{}/infer"

    def send(item):
        model, body, _, _ = item
        try:
            return _post(url.format(model), body)
        except Exception as exc:  # noqa: BLE001 -- counted as a failed answer
            return -1, {}, repr(exc).encode()

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, plan))
    elapsed = time.monotonic() - started
    failed_valid, wrong_valid, wrong_bad = [], [], []
    for (model, _, expected, words), (status, _, raw) in zip(plan, answers):
        answer = json.loads(raw or b"{}")
        if expected is not None:
            if status != 200:
                failed_valid.append((model, status, answer))
                continue
            outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
            if not all(np.allclose(outputs[k], v, atol=1e-4, rtol=1e-4) for k, v in expected.items()):
                wrong_valid.append(model)
        elif status != 400 or "\n" in answer.get("error", "\n") or \
                not all(w in answer["error"] for w in words):
            wrong_bad.append((model, status, answer, words))
    print(f"\nmixed load: {len(plan)} requests ({sum(p[2] is not None for p in plan)} valid) in {elapsed:.1f} s; "
          f"failed valid {len(failed_valid)}, wrong valid {len(wrong_valid)}, bad not 400 {len(wrong_bad)}")
    assert not failed_valid and not wrong_valid and not wrong_bad, (failed_valid[:3], wrong_valid[:3], wrong_bad[:3])
    assert elapsed < 120
    stats = json.loads(urllib.request.urlopen(server.url + "/v2/models/turbo_question/stats", timeout=30).read())
    # the dynamic batcher did group requests (a request has at most 2 rows): bad requests had neighbours
    sizes = [int(b["batch_size"]) for b in stats["model_stats"][0].get("batch_stats", [])]
    print(f"question graph batch sizes run: {sorted(sizes)}")
    assert max(sizes) >= 3, stats


GATEWAY_LIVE = ["nested 100000 deep", "nested data 70 deep", "1e999", "5000-digit integer", "NaN",
                "gzip header, plain body", "gzip cut off", "unknown encoding"]


@needs_triton
@pytest.mark.slow
def test_gateway_unreadable_bodies_are_4xx_live(vqa_server):
    server, _ = vqa_server
    valid = _v2_body(_question_feed(1))
    for case in GATEWAY_LIVE:
        body, headers, status, words = GATEWAY_BAD[case]
        got, _, raw = _post(server.url + "/v2/models/turbo_question/infer", body, headers)
        answer = json.loads(raw)
        assert got == status and words in answer["error"] and "\n" not in answer["error"], (case, got, answer)
        assert _post(server.url + "/v2/models/turbo_question/infer", valid)[0] == 200, case


@needs_triton
@pytest.mark.slow
def test_answers_compressed_only_when_asked(vqa_server):
    server, _ = vqa_server
    body = _v2_body(_question_feed(2))
    url = server.url + "/v2/models/turbo_question/infer"
    status, headers, raw = _post(url, body)  # urllib sends no Accept-Encoding, like plain curl
    assert status == 200 and "Content-Encoding" not in headers
    plain = json.loads(raw)
    status, headers, raw = _post(url, body, {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert json.loads(gzip.decompress(raw)) == plain
    status, headers, raw = _post(url, gzip.compress(body), {"Content-Encoding": "gzip"})  # compressed request
    assert status == 200 and "Content-Encoding" not in headers and json.loads(raw) == plain


@needs_triton
@pytest.mark.slow
def test_large_body_does_not_stall_other_clients(vqa_server):
    """A 30 MB body (2.5 M numbers; malformed at the end, so the gateway parses all of it and answers 400) is
    parsed in the gateway's thread pool: small requests sent meanwhile are answered in a fraction of its time."""
    server, _ = vqa_server
    url = server.url + "/v2/models/turbo_question/infer"
    numbers = b",".join([b"0.123456789"] * 2_500_000)
    big = b'{"inputs": [{"name": "encoder_hidden_states", "shape": [1, 57, 32], "datatype": "FP32", "data": [' + \
        numbers + b"]}]}"
    small = _v2_body(_question_feed(3))
    assert _post(url, small)[0] == 200  # warm
    done, big_answer = threading.Event(), {}

    def send_big():
        started = time.monotonic()
        big_answer["status"], _, raw = _post(url, big)
        big_answer["seconds"], big_answer["error"] = time.monotonic() - started, json.loads(raw).get("error", "")
        done.set()

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(0.3)
    latencies = []
    while not done.is_set():
        started = time.monotonic()
        assert _post(url, small)[0] == 200
        if not done.is_set():
            latencies.append(time.monotonic() - started)
    thread.join()
    print(f"\nlarge body: {big_answer['seconds']:.2f} s to its 400; {len(latencies)} small requests meanwhile, "
          f"latency median {np.median(latencies or [0]):.3f} s, max {max(latencies or [0]):.3f} s")
    assert big_answer["status"] == 400 and "2500000 elements" in big_answer["error"], big_answer
    assert len(latencies) >= 3, (big_answer, latencies)
    assert max(latencies) < 0.5 * big_answer["seconds"], (big_answer, latencies)


# ---- a live server: a single-channel ViT classifier -----------------------------------------------------------


@pytest.fixture(scope="module")
def grey_vit_export(tmp_path_factory):
    """A tiny random ViT for 1-channel 28 px images, saved as a checkpoint folder with MNIST's processor (as
    ../shared/weights/vit-mnist is), exported like any local checkpoint."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from turbo_export.export.job import RunOptions, run_export
    from turbo_export.families import get_family
    from turbo_export.families.vit import VitOptions

    root = tmp_path_factory.mktemp("grey")
    checkpoint = str(root / "vit-grey")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=4, num_channels=1, id2label={i: str(i) for i in range(10)},
                       label2id={str(i): i for i in range(10)})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(checkpoint)
    ViTImageProcessor(image_mean=[0.1307], image_std=[0.3081], do_resize=False,
                      size={"height": 28, "width": 28}).save_pretrained(checkpoint)
    out = str(root / "export")
    vit = get_family("vit")
    run_export(vit, vit.load(checkpoint), VitOptions(ratio=4, batch=2), RunOptions(out_dir=out, validate=False,
                                                                                  bench=False), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def grey_server(grey_vit_export):
    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton / tritonclient not installed (pip install 'turbo-export[serve]')")
    from turbo_export.serve.server import ServeOptions, free_port, serving

    with serving(grey_vit_export, ServeOptions(max_batch=4, threads=1), http_port=free_port(),
                 grpc_port=None) as (srv, bindings):
        yield srv, {b.name: b for b in bindings}


def _post_images(url: str, images: list[bytes]):
    header = json.dumps({"inputs": [{"name": "image", "shape": [len(images), 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": sum(len(d) + 4 for d in images)}}]}).encode()
    payload = b"".join(len(d).to_bytes(4, "little") + d for d in images)
    return _post(url, header + payload, {"Inference-Header-Content-Length": str(len(header)),
                                         "Content-Type": "application/octet-stream"})


@needs_triton
@pytest.mark.slow  # a ViT export and a server: about a minute
def test_single_channel_classifier_is_served(grey_server, grey_vit_export):
    """Grey, RGB and RGBA images to a 1-channel ViT: 200, the classes ONNX Runtime gives the L-converted images
    normalised with the checkpoint's own mean and std."""
    from turbo_export.backends import make_runner

    server, bindings = grey_server
    spec = bindings["vit-classify-turbo"].handler
    assert spec["preprocess"]["mean"] == pytest.approx([0.1307]) and spec["preprocess"]["size"] == 28
    images = [_image("L", (28, 28), 1), _image("RGB", (40, 30), 2), _image("RGBA", (28, 28), 3), png(4)]
    status, _, raw = _post_images(server.url + "/v2/models/vit-classify-turbo/infer", images)
    assert status == 200, raw[:300]
    header = json.loads(raw)  # no binary outputs asked for: JSON
    outputs = {o["name"]: o["data"] for o in header["outputs"]}
    runner = make_runner(os.path.join(grey_vit_export, "turbo.onnx"))
    x = np.stack([decode_image(d, 28, [0.1307], [0.3081], 2, 1) for d in images])
    logits = np.concatenate([runner.run({"pixel_values": np.concatenate([x[i:i + 1]] * 2)})["logits"][:1]
                             for i in range(len(x))]).astype(np.float64)
    ids = np.argsort(-logits, -1, kind="stable")[:, :5]
    assert np.array(outputs["class_ids"]).reshape(ids.shape).tolist() == ids.tolist()
    assert outputs["labels"][:5] == [str(i) for i in ids[0]]  # the checkpoint's id2label
    # the tensor level takes the 1-channel pixels as they are
    body = json.dumps({"inputs": [{"name": "pixel_values", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": x[:1].reshape(-1).tolist()}]}).encode()
    status, _, raw = _post(server.url + "/v2/models/turbo/infer", body)
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(raw)["outputs"][0]["data"]), logits[0], atol=1e-4)
