"""The HTTP front of ``turbo-export serve``: an aiohttp application on the public port that checks each request
body against the KServe v2 schema and forwards every request, unchanged, to tritonserver's HTTP port on 127.0.0.1.

Why it exists: tritonserver 2.51 (the one nvidia-pytriton bundles) answers a body it cannot parse -- not JSON,
``inputs`` that is not a list, ``data`` that does not fill ``shape`` -- with HTTP 500, because its HTTP front end
reports JSON parse failures as INTERNAL errors (upstream triton-inference-server/server#8762; the fix, PR #8773,
is not in any release). A malformed request is the client's error, so the gateway answers it with 400 and a
clear message before Triton sees it. Everything else -- health, metadata, inference, Triton's own 4xx answers --
passes through untouched; gRPC and metrics go to tritonserver directly.
"""

from __future__ import annotations

import asyncio
import json
import math
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


class BadRequest(ValueError):
    """The request body breaks the KServe v2 schema; the message says where."""


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _count_elements(data: Any, datatype: str, where: str) -> int:
    """Elements of a (possibly nested) JSON ``data`` array, checking each is of the datatype's JSON kind."""
    if datatype == "BYTES":
        ok = lambda v: isinstance(v, str)  # noqa: E731
        kind = "strings"
    elif datatype == "BOOL":
        ok = lambda v: isinstance(v, bool)  # noqa: E731
        kind = "true/false"
    else:
        ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        kind = "numbers"
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif ok(item):
            count += 1
        else:
            raise BadRequest(f"{where}.data: expected {kind} for datatype {datatype}, got {json.dumps(item)[:40]}")
    return count


def check_json_body(body: bytes, what: str = "request") -> dict[str, Any]:
    """The body parsed as a JSON object, or BadRequest."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"{what} body is not valid JSON: {exc}") from None
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


def make_app(upstream: str, max_body_bytes: int):
    """The aiohttp application: check, then forward to ``upstream`` (tritonserver's HTTP address)."""
    import aiohttp
    from aiohttp import web

    sessions: list[aiohttp.ClientSession] = []  # one, made on the server's event loop

    async def on_startup(app: web.Application) -> None:
        # auto_decompress=False: Triton's (possibly compressed) answer goes back byte for byte
        sessions.append(aiohttp.ClientSession(
            upstream, auto_decompress=False, connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)))

    async def on_cleanup(app: web.Application) -> None:
        await sessions[0].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()  # decompressed by aiohttp when Content-Encoding is gzip/deflate
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body is over the server's limit of {max_body_bytes} bytes "
                                       "(turbo-export serve --max-request-mb)")
        if request.method == "POST" and body:
            try:
                if is_infer_path(request.path):
                    check_infer_request(body, request.headers.get(HEADER_LENGTH))
                elif HEADER_LENGTH not in request.headers:
                    check_json_body(body)
            except BadRequest as exc:
                return error_response(400, str(exc))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in REQUEST_HEADERS_DROPPED}
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

            runner = web.AppRunner(make_app(self.upstream, self.max_body_bytes), access_log=None)
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
