"""What a served model does with a batch of requests; runs inside Triton's Python-backend stub process.

A handler takes the requests Triton's dynamic batcher grouped (each a dict of numpy inputs, batch axis first) and
returns, per request, a dict of outputs or a `RequestError` (answered with HTTP 400 / gRPC INVALID_ARGUMENT, the
other requests of the batch unaffected). Only numpy, onnxruntime and PIL are imported at module level; the BLIP
and SD handlers import transformers / torch / diffusers when they are built.

Isolation: a request with bad contents never fails another. Each request is checked on its own before the batch is
run: floats finite, every integer input within what the graph accepts (`integer_input_ranges`: the rows of the
embedding table a Gather indexes, the slots of a KV cache a position selects, 0/1 for masks). If a batch run fails
anyway, its requests are run again one by one, so only the one that fails alone gets an error: 400 when the runtime
says its inputs are invalid, else 500 (`ModelError`), either as one line that says what failed.

Batching: requests of any size up to the model's max_batch_size are concatenated and split back; a dynamic-batch
graph runs them as one batch (no padding rows), a static-batch graph of batch B in chunks of B (``backends.batching``:
the last chunk padded, its padding rows dropped).

A new pipeline = one handler class registered in HANDLERS (here, or in a module of its own named in HANDLER_MODULES)
and one bindings function in `serve.pipelines.PIPELINES`.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from turbo_export.backends.batching import run_in_batches, static_batch
from turbo_export.serve.request_checks import (
    ModelError,
    RequestError,
    check_integer_ranges,
    describe_failure,
    integer_input_ranges,
    one_line,
)

Feed = dict[str, np.ndarray]


def request_bytes(feed: Feed) -> int:
    total = 0
    for value in feed.values():
        if value.dtype == np.object_:
            total += sum(len(v) if isinstance(v, (bytes, str)) else 0 for v in value.reshape(-1))
        else:
            total += value.nbytes
    return total


def open_runner(path: str, backend: str, threads: int = 0) -> Any:
    from turbo_export.backends import make_runner

    kwargs = {"intra_op_threads": threads} if backend == "onnxruntime" and threads else {}
    return make_runner(path, backend, **kwargs)


def split_rows(outputs: dict[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    result, start = [], 0
    for n in counts:
        result.append({k: v[start:start + n] for k, v in outputs.items()})
        start += n
    return result


class Handler:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.max_request_bytes = int(spec.get("max_request_bytes", 0))
        self.name = f"model '{spec['name']}'" if spec.get("name") else "the model"  # the stub sets the name

    def handle(self, feeds: list[Feed]) -> list[dict[str, np.ndarray] | RequestError | ModelError]:
        """Per request: its outputs, or RequestError / ModelError. Each request is checked alone (`prepare`)
        before the batch runs; a batch that fails anyway is run again request by request, so a request that
        breaks the model fails alone and its neighbours get their answers."""
        results: list[Any] = [None] * len(feeds)
        valid: list[int] = []
        for i, feed in enumerate(feeds):
            size = request_bytes(feed)
            if self.max_request_bytes and size > self.max_request_bytes:
                results[i] = RequestError(f"payload: the request's inputs are {size} bytes, over this server's limit "
                                          f"of {self.max_request_bytes} bytes")
                continue
            try:
                feeds[i] = self.prepare(feed)
                valid.append(i)
            except Exception as exc:  # RequestError, or a bug met by this request only
                results[i] = describe_failure(exc, self.name)
        if not valid:
            return results
        try:
            outputs = self.run([feeds[i] for i in valid])
        except Exception as exc:
            if len(valid) == 1:
                results[valid[0]] = describe_failure(exc, self.name)
                return results
            print(f"turbo-export: {self.name}: a batch of {len(valid)} requests failed ({type(exc).__name__}); "
                  "running them one by one", file=sys.stderr, flush=True)
            for i in valid:
                try:
                    results[i] = self.run([feeds[i]])[0]
                except Exception as alone:
                    results[i] = describe_failure(alone, self.name)
            return results
        for i, out in zip(valid, outputs):
            results[i] = out
        return results

    def prepare(self, feed: Feed) -> Feed:
        """Check and decode one request (raise RequestError); the default passes it through."""
        return feed

    def run(self, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError


class TensorHandler(Handler):
    """An exported graph as it is: its ONNX inputs in, its ONNX outputs out."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.runner = open_runner(spec["onnx"], spec["backend"], spec.get("threads", 0))
        self.batch = static_batch(self.runner)
        self.batched = spec.get("batched", True)  # False: served with its full shapes (max_batch_size 0)
        self.check_finite = spec.get("check_finite", True)
        ranges = spec.get("ranges")  # server.py reads them from the graph when it writes the spec
        if ranges is None:
            try:
                ranges = integer_input_ranges(spec["onnx"])
            except Exception as exc:  # a graph onnx cannot read here: ONNX Runtime's own checks remain
                print(f"turbo-export: {self.name}: cannot read the integer input ranges of {spec['onnx']} "
                      f"({type(exc).__name__}: {one_line(str(exc), 200)})", file=sys.stderr, flush=True)
                ranges = {}
        self.ranges: dict[str, Sequence[Any]] = dict(ranges)

    def prepare(self, feed: Feed) -> Feed:
        if self.check_finite:
            for name, value in feed.items():
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise RequestError(f"input '{name}': contains NaN or infinity")
        check_integer_ranges(feed, self.ranges)
        return feed

    def run(self, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
        if not self.batched:
            return [self.runner.run(f) for f in feeds]
        counts = [len(next(iter(f.values()))) for f in feeds]
        merged = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        return split_rows(run_in_batches(self.runner.run, self.batch, merged), counts)


IMAGE_MODES = {1: "L", 3: "RGB"}


def decode_image(data: Any, size: int, mean: Sequence[float], std: Sequence[float], resample: int = 2,
                 channels: int = 3) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> normalised [channels, size, size] float32, or RequestError. Any
    image mode is converted to the model's: L (grey) for 1 channel, RGB for 3."""
    from PIL import Image, UnidentifiedImageError

    if channels not in IMAGE_MODES:
        raise ModelError(f"input 'image': the model takes {channels}-channel images; only 1 (grey) and 3 (RGB) "
                         "are served")
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RequestError("input 'image': expected the bytes of an encoded image (PNG, JPEG, ...), got nothing")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            converted = img.convert(IMAGE_MODES[channels]).resize((size, size), resample)
    except UnidentifiedImageError:
        raise RequestError(f"input 'image': {len(data)} bytes that are not an image PIL can read (PNG, JPEG, "
                           "WebP, ...)") from None
    except Image.DecompressionBombError as exc:
        raise RequestError(f"input 'image': {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise RequestError(f"input 'image': corrupt image ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'unreadable data'})") from None
    x = np.asarray(converted, np.float32).reshape(size, size, channels) / 255.0
    x = (x - per_channel(mean, channels)) / per_channel(std, channels)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def per_channel(values: Sequence[float], channels: int) -> np.ndarray:
    """Normalisation constants for ``channels``: one value for all, or the first ``channels`` (a grey model
    given the 3-value default)."""
    array = np.asarray(values, np.float32).reshape(-1)
    return array[:channels] if len(array) >= channels else np.broadcast_to(array[:1], (channels,))


def image_channels(runner: Any, name: str = "pixel_values") -> int:
    """The channel count a graph's image input takes ([B, C, H, W]); 3 where the graph does not say."""
    info = next((t for t in runner.inputs if t.name == name), None)
    dims = info.shape if info is not None else ()
    return int(dims[1]) if len(dims) == 4 and isinstance(dims[1], int) and dims[1] > 0 else 3


def _one(feed: Feed, name: str) -> list[Any]:
    """A BYTES input as a flat list (one element per row)."""
    return list(feed[name].reshape(len(feed[name]), -1)[:, 0])


class ImagePipelineHandler(Handler):
    channels = 3  # the image graph's, set by the subclass from its runner

    def decode_images(self, feed: Feed) -> np.ndarray:
        pre = self.spec["preprocess"]
        channels = int(pre.get("channels", self.channels))
        return np.stack([decode_image(d, pre["size"], pre["mean"], pre["std"], pre.get("resample", 2), channels)
                         for d in _one(feed, "image")])


class VitClassifyHandler(ImagePipelineHandler):
    """image bytes -> top-k labels, scores (softmax) and class ids."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.runner = open_runner(spec["onnx"], spec["backend"], spec.get("threads", 0))
        self.batch = static_batch(self.runner)
        self.channels = image_channels(self.runner)
        self.labels = spec["labels"]
        self.top_k = int(spec["top_k"])

    def prepare(self, feed: Feed) -> Feed:
        return {"pixel_values": self.decode_images(feed)}

    def run(self, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
        counts = [len(f["pixel_values"]) for f in feeds]
        pixels = {"pixel_values": np.concatenate([f["pixel_values"] for f in feeds])}
        logits = run_in_batches(self.runner.run, self.batch, pixels)["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ids = np.argsort(-probs, axis=-1, kind="stable")[:, :self.top_k]
        scores = np.take_along_axis(probs, ids, -1).astype(np.float32)
        labels = np.array([[self.labels[j].encode() for j in row] for row in ids], dtype=np.object_)
        return split_rows({"labels": labels, "scores": scores, "class_ids": ids.astype(np.int64)}, counts)


class BlipHandler(ImagePipelineHandler):
    """BLIP caption (image bytes -> text) and VQA (image bytes + question -> answer) over the exported graphs."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        from transformers import BertTokenizer

        from turbo_export.pipelines.blip import CaptionPipeline, TokenIds, VqaPipeline

        folder, flavour, backend = spec["export_dir"], spec["flavour"], spec["backend"]

        def runner(name: str) -> Any:
            return open_runner(os.path.join(folder, f"{name}.onnx"), backend, spec.get("threads", 0))

        ids = TokenIds(**spec["token_ids"])
        self.tokenizer = BertTokenizer.from_pretrained(spec["tokenizer_dir"])
        self.task = spec["task"]
        size_aware = bool(spec.get("size_aware")) and flavour == "turbo"
        if self.task == "caption":
            self.pipeline = CaptionPipeline(runner(f"{flavour}_vision"), runner(f"{flavour}_cross_kv"),
                                            runner("decoder"), ids, size_aware=size_aware)
        else:
            self.pipeline = VqaPipeline(runner(f"{flavour}_vision"), runner(f"{flavour}_question"),
                                        runner("answer_cross_kv"), runner("answer_decoder"), ids,
                                        size_aware=size_aware)
        self.batch = static_batch(self.pipeline.vision)
        self.channels = image_channels(self.pipeline.vision)
        self.text_len = int(spec.get("text_len", 0))

    def prepare(self, feed: Feed) -> Feed:
        out = {"pixel_values": self.decode_images(feed)}
        if self.task == "vqa":
            questions = [q.decode("utf-8", "replace") if isinstance(q, bytes) else str(q)
                         for q in _one(feed, "question")]
            if any(not q.strip() for q in questions):
                raise RequestError("input 'question': empty; ask a question about the image")
            enc = self.tokenizer(questions)["input_ids"]
            too_long = [len(t) for t in enc if len(t) > self.text_len]
            if too_long:
                raise RequestError(f"input 'question': {too_long[0]} tokens, longer than the exported "
                                   f"{self.text_len}-token question graph")
            enc = self.tokenizer(questions, padding="max_length", max_length=self.text_len, return_tensors="np")
            out["input_ids"] = enc["input_ids"].astype(np.int64)
            out["attention_mask"] = enc["attention_mask"].astype(np.int64)
        return out

    def run(self, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
        counts = [len(f["pixel_values"]) for f in feeds]
        merged = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}

        def generate(chunk: Feed) -> np.ndarray:
            if self.task == "caption":
                return self.pipeline.generate(chunk["pixel_values"], self.spec["max_new_tokens"],
                                              self.spec["num_beams"])
            return self.pipeline.generate(chunk["pixel_values"], chunk["input_ids"], chunk["attention_mask"],
                                          self.spec["max_new_tokens"], self.spec["num_beams"])

        texts = [self.tokenizer.decode(t, skip_special_tokens=True).encode()
                 for t in run_in_batches(generate, self.batch, merged)]
        name = "text" if self.task == "caption" else "answer"
        return split_rows({name: np.array(texts, dtype=np.object_).reshape(-1, 1)}, counts)


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class SdGenerateHandler(Handler):
    """Stable Diffusion text-to-image: prompt + seed (+ steps, guidance) -> PNG bytes, one image per row.

    runtime/sd.py's pipeline as `sd-generate` runs it: PyTorch text encoder and VAE, a diffusers scheduler, the
    exported UNet through a Runner. The UNet's batch B images per call all get the row's prompt; the first is
    answered (B = 1, the export default, wastes nothing)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import torch

        from turbo_export.models.sd_presets import load_sd
        from turbo_export.pipelines.sd import generate

        threads = int(spec.get("threads", 0))
        if threads:
            torch.set_num_threads(threads)
        self.runner = open_runner(spec["onnx"], spec["backend"], threads)
        self.components = load_sd(spec["model"], with_unet=False)
        self.generate = generate
        self.text_len = int(spec["text_len"])
        self.max_steps = int(spec["max_steps"])

    def prepare(self, feed: Feed) -> Feed:
        prompts = []
        for p in _one(feed, "prompt"):
            try:
                text = p.decode("utf-8") if isinstance(p, bytes) else str(p)
            except UnicodeDecodeError:
                raise RequestError("input 'prompt': not UTF-8 text") from None
            if not text.strip():
                raise RequestError("input 'prompt': empty; describe the image to generate")
            tokens = self.components.prompt_tokens(text)
            if tokens > self.text_len:
                raise RequestError(f"input 'prompt': {tokens} tokens, longer than the text encoder's "
                                   f"{self.text_len}; shorten the prompt")
            prompts.append(text)
        rows = len(prompts)

        def column(name: str, default: float, dtype: Any) -> np.ndarray:
            if name not in feed:
                return np.full(rows, default, dtype)
            value = feed[name].reshape(-1)
            if len(value) != rows:
                raise RequestError(f"input '{name}': {len(value)} values for {rows} prompts; give one per prompt")
            return value.astype(dtype)

        seeds = column("seed", 0, np.int64)
        steps = column("steps", self.spec["default_steps"], np.int64)
        bad = [int(s) for s in steps if not 1 <= s <= self.max_steps]
        if bad:
            raise RequestError(f"input 'steps': must be in 1..{self.max_steps}, got {bad[0]}")
        guidance = column("guidance", self.spec["default_guidance"], np.float64)
        if not np.isfinite(guidance).all():
            raise RequestError("input 'guidance': contains NaN or infinity; give a finite scale (e.g. 7.5)")
        return {"prompt": np.array(prompts, dtype=np.object_), "seed": seeds, "steps": steps, "guidance": guidance}

    def run(self, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
        results = []
        for f in feeds:
            images = []
            for prompt, seed, steps, guidance in zip(f["prompt"], f["seed"], f["steps"], f["guidance"]):
                generation = self.generate(self.runner, self.components, str(prompt), steps=int(steps),
                                           seed=int(seed), guidance=float(guidance), progress=False)
                images.append(encode_png(generation.images[0]))
            results.append({"image": np.array(images, dtype=np.object_).reshape(-1, 1)})
        return results


HANDLERS: dict[str, Callable[[dict[str, Any]], Handler]] = {
    "tensor": TensorHandler,
    "vit-classify": VitClassifyHandler,
    "blip": BlipHandler,
    "sd-generate": SdGenerateHandler,
}


# handlers kept in their own module (they import this one): imported when a model of theirs is built
HANDLER_MODULES = {"zero-shot": "turbo_export.serve.handlers_zero_shot", "blip2": "turbo_export.serve.handlers_blip2"}


def make_handler(spec: dict[str, Any]) -> Handler:
    if spec["handler"] not in HANDLERS and spec["handler"] in HANDLER_MODULES:
        import importlib

        importlib.import_module(HANDLER_MODULES[spec["handler"]])  # registers itself in HANDLERS
    return HANDLERS[spec["handler"]](spec)
