"""The HTTP front of ``turbo-export serve``: an aiohttp application on the public port that checks each request
body against the KServe v2 schema and forwards every request, unchanged, to tritonserver's HTTP port on 127.0.0.1.

Why it exists: tritonserver 2.51 (the one nvidia-pytriton bundles) answers a body it cannot parse -- not JSON,
``inputs`` that is not a list, ``data`` that does not fill ``shape`` -- with HTTP 500, because its HTTP front end
reports JSON parse failures as INTERNAL errors (upstream triton-inference-server/server#8762; the fix, PR #8773,
is not in any release). A malformed request is the client's error, so the gateway answers it with 400 and a
clear message before Triton sees it. Everything else -- health, metadata, inference, Triton's own 4xx answers --
passes through untouched; gRPC and metrics go to tritonserver directly.

A body that cannot be read is the client's error too: a ``Content-Encoding`` it does not have (400), JSON nested
deeper than any KServe request needs (checked on the raw bytes before parsing, so the parser never recurses that
deep), numbers beyond a double or beyond the tensor's datatype, NaN / Infinity (not JSON). Large bodies are
checked in a thread pool, so one client's 100 MB body does not stall the others' requests. Answers are
compressed only for clients that ask (``Accept-Encoding``): tritonserver compresses whenever the forwarded request
allows it, so the gateway forwards the client's own Accept-Encoding, or ``identity`` when it sent none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import re
import threading
from typing import Any

from turbo_export.errors import TurboExportError

DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "BYTES"}
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension: JSON header, then raw tensors
# hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp recomputes for the forwarded body
REQUEST_HEADERS_DROPPED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                           "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}
RESPONSE_HEADERS_DROPPED = {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "trailer"}
# JSON nesting a request may have: {"inputs": [{"data": [...]}]} is 3 levels, plus one per tensor dimension
MAX_JSON_DEPTH = 64
# bodies up to this size are checked on the event loop (a few ms); larger ones in the thread pool
INLINE_CHECK_BYTES = 256 * 1024
CHECK_THREADS = 4
SCAN_CHUNK = 1 << 20  # bytes / elements the checks handle per C call: the event loop gets the GIL in between
# what each numeric datatype can hold (the JSON number must fit, or Triton converts it to inf / wraps it)
FLOAT_LIMITS = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "BF16": 3.3895313892515355e38,
                "FP64": 1.7976931348623157e308}
INT_LIMITS = {f"{'U' if unsigned else ''}INT{bits}": (0, 2 ** bits - 1) if unsigned else
              (-2 ** (bits - 1), 2 ** (bits - 1) - 1) for bits in (8, 16, 32, 64) for unsigned in (False, True)}
# what json_depth keeps of a body: brackets and the quotes around strings (then it drops the strings)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')
_JSON_STRINGS = re.compile(rb'"[^"]*"')


class BadRequest(ValueError):
    """The request body breaks the KServe v2 schema; the message says where."""


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _count_elements(data: Any, datatype: str, where: str) -> int:
    """Elements of a (possibly nested) JSON ``data`` array, checking each is of the datatype's JSON kind and, for
    numbers, within what the datatype holds. Each list's leaves are checked in bulk (type set, min, max)."""
    lo = hi = None
    if datatype == "BYTES":
        kinds, kind = {str}, "strings"
    elif datatype == "BOOL":
        kinds, kind = {bool}, "true/false"
    else:
        kinds, kind = {int, float}, "numbers"
        lo, hi = (-FLOAT_LIMITS[datatype], FLOAT_LIMITS[datatype]) if datatype in FLOAT_LIMITS else \
            INT_LIMITS.get(datatype, (None, None))
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        leaves = item if type(item) is list else [item]
        if any(type(v) is list for v in leaves):
            stack.extend(v for v in leaves if type(v) is list)
            leaves = [v for v in leaves if type(v) is not list]
        if len(leaves) > SCAN_CHUNK // 8:
            stack.extend(leaves[i:i + SCAN_CHUNK // 8] for i in range(0, len(leaves), SCAN_CHUNK // 8))
            continue
        if not leaves:
            continue
        if not set(map(type, leaves)) <= kinds:
            bad = next(v for v in leaves if type(v) not in kinds)
            raise BadRequest(f"{where}.data: expected {kind} for datatype {datatype}, got {json.dumps(bad)[:40]}")
        if lo is not None:
            smallest, largest = min(leaves), max(leaves)
            if smallest < lo or largest > hi:
                bad = smallest if smallest < lo else largest
                raise BadRequest(f"{where}.data: {_number(bad)} is outside what {datatype} holds "
                                 f"([{_number(lo)}, {_number(hi)}])")
        count += len(leaves)
    return count


def _number(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def json_depth(body: bytes) -> int:
    """The bracket nesting depth of a JSON text, found without parsing it (so without recursion): escaped
    backslashes and quotes dropped, then everything but brackets and quotes, then the strings; what is left is
    brackets, counted with numpy in chunks. Linear time, C speed."""
    import numpy as np

    kept, start = [], 0
    while start < len(body):  # in chunks of about 1 MB (short holds of the GIL), never ending in a backslash
        end = min(start + SCAN_CHUNK, len(body))
        while end < len(body) and body[end - 1] == 0x5C:
            end += 1
        chunk = body[start:end].replace(b"\\\\", b"").replace(b'\\"', b"")
        kept.append(chunk.translate(None, _NOT_STRUCTURE))
        start = end
    text = _JSON_STRINGS.sub(b"", b"".join(kept))
    depth = peak = 0
    for start in range(0, len(text), SCAN_CHUNK):
        chunk = np.frombuffer(text, np.uint8, count=min(SCAN_CHUNK, len(text) - start), offset=start)
        steps = np.where((chunk == 0x5B) | (chunk == 0x7B), 1, -1).astype(np.int64)  # [ { open, ] } close
        levels = depth + np.cumsum(steps)
        peak = max(peak, int(levels.max()))
        depth = int(levels[-1])
    return peak


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the number {text[:24]} is beyond the range of a double (about 1.8e308)")
    return value


def _parse_int(text: str) -> int:
    if len(text) > 310:  # 309 digits and a sign: beyond that no datatype (not even FP64) holds it
        raise BadRequest(f"the number {text[:12]}...({len(text)} digits) is beyond the range of a double "
                         "(about 1.8e308)")
    return int(text)


def _parse_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number; send finite numbers")


def check_json_body(body: bytes, what: str = "request") -> dict[str, Any]:
    """The body parsed as a JSON object, or BadRequest (also for nesting deeper than MAX_JSON_DEPTH, numbers
    beyond a double, NaN / Infinity)."""
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(f"{what} body is nested deeper than {MAX_JSON_DEPTH} levels; a KServe v2 request needs "
                         "3 plus one per tensor dimension")
    try:
        value = json.loads(body, parse_float=_parse_float, parse_int=_parse_int, parse_constant=_parse_constant)
    except BadRequest as exc:
        raise BadRequest(f"{what} body: {exc}") from None
    except RecursionError:  # not reached after the depth check; kept as the last line of defence
        raise BadRequest(f"{what} body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"{what} body is not valid JSON: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    if not _is_object(value):
        raise BadRequest(f"{what} body must be a JSON object, got {type(value).__name__}")
    return value


def check_infer_request(body: bytes, header_length: str | None) -> None:
    """Raise BadRequest where an inference request breaks the KServe v2 schema (JSON, or a JSON header followed by
    binary tensors). What the schema cannot say -- unknown model, input names, shapes, dtypes of the model --
    Triton checks and answers with 4xx itself."""
    binary_bytes = 0
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} header must be an integer, got '{header_length}'") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} header is {n}; expected 1..{len(body)} (the body's length)")
        body, binary_bytes = body[:n], len(body) - n
    request = check_json_body(body, "inference request")
    if "id" in request and not isinstance(request["id"], str):
        raise BadRequest("'id' must be a string")
    if "parameters" in request and not _is_object(request["parameters"]):
        raise BadRequest("'parameters' must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list):
        got = "nothing" if inputs is None else json.dumps(inputs)[:40]
        raise BadRequest(f"'inputs' must be a list of tensors, got {got}")
    binary_needed = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not _is_object(tensor):
            raise BadRequest(f"{where} must be a JSON object with name, shape, datatype and data")
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{where}.name must be a non-empty string")
        where = f"input '{name}'"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got {json.dumps(shape)}")
        if datatype not in DATATYPES:
            raise BadRequest(f"{where}: 'datatype' must be one of {', '.join(sorted(DATATYPES))}, "
                             f"got {json.dumps(datatype)}")
        parameters = tensor.get("parameters", {})
        if not _is_object(parameters):
            raise BadRequest(f"{where}: 'parameters' must be a JSON object")
        if "shared_memory_region" in parameters:
            continue  # data lives in a registered shared-memory region; Triton checks it
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"{where}: 'binary_data_size' must be a non-negative integer, got {json.dumps(size)}")
            binary_needed += size
            continue
        if "data" not in tensor:
            raise BadRequest(f"{where}: no 'data' (and no binary_data_size parameter)")
        count, expected = _count_elements(tensor["data"], datatype, where), math.prod(shape)
        if count != expected:
            raise BadRequest(f"{where}: 'data' has {count} elements; shape {shape} needs {expected}")
    if binary_needed > binary_bytes:
        raise BadRequest(f"the binary_data_size parameters add up to {binary_needed} bytes but the body has "
                         f"{binary_bytes} bytes after the JSON header")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list) or not all(_is_object(o) and isinstance(o.get("name"), str) for o in outputs):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")


def is_infer_path(path: str) -> bool:
    """/v2/models/{name}[/versions/{version}]/infer"""
    parts = path.strip("/").split("/")
    return len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] == "infer" and \
        (len(parts) == 4 or parts[3] == "versions")


def error_response(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


class BodyTooLarge(ValueError):
    """The (decompressed) body is over the server's limit: 413."""


class UnsupportedEncoding(ValueError):
    """A Content-Encoding the gateway cannot decode: 415."""


ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits: gzip wrapper, zlib wrapper


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body with its Content-Encoding (gzip, deflate, identity; several in the order applied) undone, at most
    ``limit`` bytes: BadRequest for data that is not what the header says, BodyTooLarge, UnsupportedEncoding."""
    import zlib

    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding not in ENCODINGS:
            raise UnsupportedEncoding(f"Content-Encoding '{coding}' is not supported; send gzip, deflate or an "
                                      "uncompressed body")
        out, rest = [], body
        try:
            while True:  # gzip allows several members one after the other
                wbits = ENCODINGS[coding]
                if coding == "deflate" and rest[:1] and (rest[0] & 0x0F) != 8:
                    wbits = -15  # "deflate" sent raw, without the zlib wrapper (as some clients do)
                stream = zlib.decompressobj(wbits)
                room = limit + 1 - sum(map(len, out))  # > 0 here; max_length 0 would mean "no limit"
                out.append(stream.decompress(rest, room))
                if len(out[-1]) >= room:
                    raise BodyTooLarge(f"request body is over the server's limit of {limit} bytes once "
                                       "decompressed (turbo-export serve --max-request-mb)")
                if not stream.eof:
                    raise BadRequest(f"request body: the {coding} data ends before its stream does (cut off?)")
                rest = stream.unused_data
                if coding == "deflate" or not rest.strip(b"\0"):
                    break
        except zlib.error as exc:
            raise BadRequest(f"request body: Content-Encoding says {coding} but the body is not {coding} data "
                             f"({exc}); compress it as the header says, or leave the header out") from None
        body = b"".join(out)
    return body


def check_body(method: str, path: str, body: bytes, content_encoding: str | None, header_length: str | None,
               limit: int) -> bytes:
    """The body decoded (Content-Encoding) and checked: a POST to an inference path against the KServe v2 schema,
    a POST to another path as a JSON object unless it is binary; raises BadRequest, BodyTooLarge or
    UnsupportedEncoding."""
    body = decode_body(body, content_encoding, limit)
    if method == "POST" and body:
        if is_infer_path(path):
            check_infer_request(body, header_length)
        elif header_length is None:
            check_json_body(body)
    return body


def make_app(upstream: str, max_body_bytes: int):
    """The aiohttp application: check, then forward to ``upstream`` (tritonserver's HTTP address). Run it with
    ``auto_decompress=False`` (AppRunner keyword): the gateway decodes compressed bodies itself, so a body that
    is not what its Content-Encoding says is a 400, not an error inside aiohttp's parser."""
    import aiohttp
    from aiohttp import web

    sessions: list[aiohttp.ClientSession] = []  # one, made on the server's event loop
    pools: list[concurrent.futures.ThreadPoolExecutor] = []

    async def on_startup(app: web.Application) -> None:
        # auto_decompress=False: Triton's (possibly compressed) answer goes back byte for byte
        sessions.append(aiohttp.ClientSession(
            upstream, auto_decompress=False, connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)))
        pools.append(concurrent.futures.ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="turbo-gateway-check"))

    async def on_cleanup(app: web.Application) -> None:
        await sessions[0].close()
        pools[0].shutdown(wait=False, cancel_futures=True)

    async def forward(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body is over the server's limit of {max_body_bytes} bytes "
                                       "(turbo-export serve --max-request-mb)")
        except (web.RequestPayloadError, aiohttp.ClientPayloadError) as exc:
            response = error_response(400, f"request body: cannot be read ({' '.join(str(exc).split())})")
            response.force_close()
            return response
        encoding = request.headers.get("Content-Encoding")
        if body:
            args = (request.method, request.path, body, encoding, request.headers.get(HEADER_LENGTH), max_body_bytes)
            try:
                if len(body) <= INLINE_CHECK_BYTES and not encoding:
                    body = check_body(*args)
                else:  # decoded and parsed off the event loop: other clients' requests go on meanwhile
                    body = await asyncio.get_running_loop().run_in_executor(pools[0], check_body, *args)
            except BadRequest as exc:
                return error_response(400, str(exc))
            except BodyTooLarge as exc:
                return error_response(413, str(exc))
            except UnsupportedEncoding as exc:
                return error_response(415, str(exc))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in REQUEST_HEADERS_DROPPED}
        if not any(k.lower() == "accept-encoding" for k in headers):
            # aiohttp's client would send "gzip, deflate" and tritonserver would compress the answer for a client
            # that never asked (plain curl shows binary): ask for what the client asked, nothing
            headers["Accept-Encoding"] = "identity"
        try:
            async with sessions[0].request(request.method, request.rel_url, headers=headers,
                                              data=body or None) as answer:
                payload = await answer.read()
                out_headers = {k: v for k, v in answer.headers.items()
                               if k.lower() not in RESPONSE_HEADERS_DROPPED}
                return web.Response(status=answer.status, body=payload, headers=out_headers)
        except aiohttp.ClientError as exc:
            return error_response(503, f"tritonserver is not reachable ({type(exc).__name__}: {exc})")

    app = web.Application(client_max_size=max_body_bytes)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


class Gateway:
    """The application on ``host:port`` in a thread of its own (its own event loop): start(), stop()."""

    def __init__(self, upstream: str, host: str, port: int, max_body_bytes: int, drain_seconds: float = 10.0) -> None:
        self.upstream, self.host, self.port = upstream, host, port
        self.max_body_bytes, self.drain_seconds = max_body_bytes, drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            from aiohttp import web

            runner = web.AppRunner(make_app(self.upstream, self.max_body_bytes), access_log=None,
                                   auto_decompress=False)
            await runner.setup()
            try:
                await web.TCPSite(runner, self.host, self.port, shutdown_timeout=self.drain_seconds).start()
            except OSError as exc:
                failure.append(exc)
                await runner.cleanup()
                started.set()
                return
            self._stopped = asyncio.Event()
            started.set()
            await self._stopped.wait()
            await runner.cleanup()  # stops listening, lets in-flight requests finish (up to drain_seconds)

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            except BaseException as exc:  # surfaced by start()
                failure.append(exc)
                started.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="turbo-export-gateway", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TurboExportError(f"serve: the HTTP front did not start on {self.host}:{self.port} in {timeout:.0f} s")
        if failure and isinstance(failure[0], OSError):
            raise TurboExportError(f"serve: cannot listen on {self.host}:{self.port} "
                                   f"({type(failure[0]).__name__}: {failure[0]}); choose another --port") from None
        if failure:
            raise TurboExportError(f"serve: the HTTP front failed to start "
                                   f"({type(failure[0]).__name__}: {failure[0]})") from failure[0]

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout)
