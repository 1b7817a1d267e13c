"""Serve an export folder with Triton Inference Server over the KServe v2 / Open Inference Protocol.

The engine is the real `tritonserver` that the `nvidia-pytriton` wheel bundles (2.51, Python backend only): this
module writes a Triton model repository of Python-backend models (one `config.pbtxt` + `1/model.py` per served
model, the handlers in `handlers.py`) and runs that server as a child process. PyTriton's own Python layer
is not used: its proxy answers every error of a batch with HTTP 500 for all requests of the batch, where a
Python-backend model of our own can answer a bad request with 400 and leave the others alone.

Served models (each in a Turbo and an unaccelerated flavour, so users can A/B): the exported graphs at the tensor
level and the pipelines of the family's kind, chosen by `serve.pipelines.PIPELINES` (keyed by the family's ``kind``).

HTTP goes through a gateway (`serve/gateway.py`) that answers malformed request bodies with 400 where
tritonserver 2.51 would answer 500, and forwards everything else; gRPC and metrics are tritonserver's own.

Batching: Triton's dynamic batcher groups requests of any size up to ``--max-batch`` rows; the handler runs a
dynamic-batch export's group as one batch (no padding rows), a static-batch export's in chunks of B (the last
padded) and splits the answers back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from turbo_export.errors import TurboExportError
from turbo_export.serve.pipelines import (  # noqa: F401  (SD_DEFAULT_*, FLAVOURS: re-exported for callers)
    DEFAULT_MAX_REQUEST_MB,
    FLAVOURS,
    PIPELINES,
    SD_DEFAULT_GUIDANCE,
    SD_DEFAULT_STEPS,
    Binding,
    ServeOptions,
)
from turbo_export.serve.triton_repo import ModelConfig, to_pbtxt

SERVE_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(SERVE_DIR)  # turbo_export/


def check_serve_options(options: ServeOptions, ports: dict[str, int | None] | None = None) -> None:
    """Every number of ``options`` (and the ports: None or 0 is off, where a port may be off) in its range."""
    from turbo_export.limits import (
        MAX_BATCH,
        MAX_INSTANCES,
        MAX_PORT,
        MAX_REQUEST_MB,
        MAX_THREADS,
        check_range,
    )

    check_range("max-batch", options.max_batch, 1, MAX_BATCH)
    check_range("max-request-mb", options.max_request_mb, 0.0, MAX_REQUEST_MB, integer=False, low_open=True)
    check_range("queue-delay-us", options.queue_delay_us, 0, 10 ** 7)
    check_range("instances", options.instances, 1, MAX_INSTANCES)
    check_range("threads", options.threads, 0, MAX_THREADS)
    check_range("top-k", options.top_k, 1, 10 ** 6)
    for name, port in (ports or {}).items():
        if port is not None:
            check_range(name, port, 1 if name == "port" else 0, MAX_PORT)


def tritonserver_unavailable_reason() -> str | None:
    try:
        from pytriton.utils.distribution import get_root_module_path  # noqa: F401
    except Exception as exc:
        return (f"the nvidia-pytriton package (which bundles tritonserver) cannot be imported "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]}); pip install 'turbo-export[serve]'")
    return None


def bindings_for(export_dir: str, options: ServeOptions, work_dir: str) -> list[Binding]:
    from turbo_export.evaluate.common import read_export
    from turbo_export.families import get_family

    # report.json and every graph it names checked once, before the server starts (one line naming the file)
    report = read_export(export_dir, tuple(PIPELINES), command="serve")
    family = get_family(report["family"])
    check_serve_options(options)
    from turbo_export.backends import require_backend

    require_backend(options.backend)
    bindings = PIPELINES[family.kind](export_dir, report, options, work_dir)
    numpy_major = int(__import__("numpy").__version__.split(".")[0])
    if numpy_major >= 2 and any(t.dtype == "bytes" for b in bindings for t in b.inputs + b.outputs):
        # tritonserver 2.51's Python-backend stub decodes BYTES tensors with numpy 1's C ABI: under numpy 2 a
        # BYTES input crashes the stub. Numeric tensors go through DLPack and work with either numpy.
        skipped = [b.name for b in bindings if any(t.dtype == "bytes" for t in b.inputs + b.outputs)]
        print(f"turbo-export serve: note: numpy {__import__('numpy').__version__} here; the pipeline models "
              f"({', '.join(skipped)}) take text/image bytes, which tritonserver 2.51's Python backend only "
              "handles with numpy < 2; serving the tensor-level models only", file=sys.stderr)
        bindings = [b for b in bindings if b.name not in skipped]
    limit = int(options.max_request_mb * 1024 * 1024)
    for b in bindings:
        b.handler.update(backend=options.backend, threads=options.threads, max_request_bytes=limit)
    return bindings


# ---- the model repository of the server --------------------------------------------------------------------------


def write_serving_repo(bindings: list[Binding], repo: str, options: ServeOptions) -> None:
    template = os.path.join(SERVE_DIR, "triton_python_model.py")
    sys_path = [p for p in sys.path if p and os.path.isdir(p)]
    for b in bindings:
        spec = {**b.handler,
                "inputs": [{"name": t.name, "dtype": t.dtype} for t in b.inputs],
                "outputs": [{"name": t.name, "dtype": t.dtype} for t in b.outputs]}
        config = ModelConfig(name=b.name, inputs=b.inputs, outputs=b.outputs, backend="python",
                             max_batch_size=b.max_batch, dynamic_batching=b.max_batch > 0,
                             max_queue_delay_us=options.queue_delay_us, instance_kind="KIND_CPU",
                             instance_count=options.instances, parameters={"turbo_export": json.dumps(spec)})
        os.makedirs(os.path.join(repo, b.name, "1"), exist_ok=True)
        with open(os.path.join(repo, b.name, "config.pbtxt"), "w") as f:
            f.write(to_pbtxt(config))
        shutil.copyfile(template, os.path.join(repo, b.name, "1", "model.py"))
        with open(os.path.join(repo, b.name, "1", "sys_path.json"), "w") as f:
            json.dump([os.path.dirname(PACKAGE_DIR), *sys_path], f)  # this turbo_export first


# ---- the server process --------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _server_env() -> dict[str, str]:
    """The stub links libpython; put the running interpreter's first, or it may load the system's (another
    3.11.x, whose standard library does not match: `'_thread.RLock' object has no attribute '_recursion_count'`)."""
    from pytriton.utils.distribution import get_libs_path

    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [libdir, str(get_libs_path()), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _backend_dir(work_dir: str) -> str:
    """tritonserver's Python backend with the stub built for this interpreter's Python version."""
    from pytriton.utils.distribution import get_root_module_path, get_stub_path

    dist = get_root_module_path() / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        stub = get_stub_path(version)
    except Exception:
        raise TurboExportError(f"serve: nvidia-pytriton has no Python-backend stub for Python {version}") from None
    backend = os.path.join(work_dir, "backends", "python")
    os.makedirs(backend, exist_ok=True)
    for name in os.listdir(dist / "backends" / "python"):
        if name.endswith((".so", ".py")):
            os.symlink(dist / "backends" / "python" / name, os.path.join(backend, name))
    shutil.copy(stub, os.path.join(backend, "triton_python_backend_stub"))
    return os.path.join(work_dir, "backends")


class TritonServer:
    """tritonserver on a model repository, as a child process: start(), wait_ready(), stop() (SIGTERM, then
    Triton drains in-flight requests for up to ``exit_timeout`` seconds). HTTP listens on ``host``; gRPC and
    metrics on ``public_host`` (default: ``host``)."""

    def __init__(self, repo: str, work_dir: str, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int | None = 8001, metrics_port: int | None = None, log_path: str | None = None,
                 exit_timeout: int = 10, verbose: bool = False, public_host: str | None = None) -> None:
        from pytriton.utils.distribution import get_root_module_path

        self.binary = str(get_root_module_path() / "tritonserver" / "bin" / "tritonserver")
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.args = [self.binary, f"--model-repository={repo}", f"--backend-directory={_backend_dir(work_dir)}",
                     f"--http-address={host}", f"--http-port={http_port}", f"--exit-timeout-secs={exit_timeout}",
                     "--strict-readiness=true", "--exit-on-error=true", f"--log-verbose={int(verbose)}"]
        if grpc_port:
            self.args += ["--allow-grpc=true", f"--grpc-address={public_host or host}", f"--grpc-port={grpc_port}"]
        else:
            self.args.append("--allow-grpc=false")
        if metrics_port:
            self.args += ["--allow-metrics=true", f"--metrics-address={public_host or host}",
                          f"--metrics-port={metrics_port}"]
        else:
            self.args.append("--allow-metrics=false")
        self.log_path = log_path or os.path.join(work_dir, "tritonserver.log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, env=_server_env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TurboExportError(f"serve: tritonserver exited with code {self.process.returncode} while "
                                       f"loading the models; last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise TurboExportError(f"serve: tritonserver not ready after {timeout:.0f} s; see {self.log_path}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@dataclass
class Endpoint:
    """Where a running `serve` answers: ``url`` (KServe v2 over HTTP, through the gateway), ``grpc`` (host:port of
    tritonserver's gRPC, or None) and the tritonserver child process behind them."""

    url: str
    grpc: str | None
    server: TritonServer


def gateway_body_limit(options: ServeOptions) -> int:
    """Bytes a request body may have at the HTTP front: JSON spells a float in up to ~20 characters where the
    models' limit counts 4 bytes, so the front is generous and the models refuse oversized tensors with 400."""
    return int(options.max_request_mb * 1024 * 1024) * 8 + 1024 * 1024


@contextlib.contextmanager
def serving(export_dir: str, options: ServeOptions, host: str = "127.0.0.1", http_port: int = 8000,
            grpc_port: int | None = 8001, metrics_port: int | None = None, ready_timeout: float = 300.0,
            log_path: str | None = None) -> Iterator[tuple[Endpoint, list[Binding]]]:
    """Write the serving repository, start tritonserver (HTTP on a private 127.0.0.1 port, gRPC on
    ``host:grpc_port``) and the HTTP gateway on ``host:http_port``; yield once every model is ready; stop both
    on exit, the gateway first so no new request reaches a stopping server."""
    from turbo_export.serve.gateway import Gateway

    check_serve_options(options, {"port": http_port, "grpc-port": grpc_port, "metrics-port": metrics_port})
    work_dir = tempfile.mkdtemp(prefix="turbo-serve-")
    server = gateway = None
    try:
        bindings = bindings_for(export_dir, options, work_dir)
        reason = tritonserver_unavailable_reason()
        if reason:
            raise TurboExportError(f"serve: {reason}")
        repo = os.path.join(work_dir, "models")
        write_serving_repo(bindings, repo, options)
        server = TritonServer(repo, work_dir, "127.0.0.1", free_port(), grpc_port, metrics_port, log_path=log_path,
                              public_host=host)
        server.start()
        server.wait_ready(ready_timeout)
        gateway = Gateway(server.url, host, http_port, gateway_body_limit(options))
        gateway.start()
        yield Endpoint(gateway.url, f"{host}:{grpc_port}" if grpc_port else None, server), bindings
    finally:
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def serve_forever(export_dir: str, options: ServeOptions, host: str, http_port: int, grpc_port: int | None,
                  metrics_port: int | None, on_ready: Callable[[Endpoint, list[Binding]], None]) -> int:
    """Serve until SIGTERM / SIGINT (then stop the gateway and tritonserver cleanly); returns tritonserver's exit
    code."""
    stop = {"signal": None}

    def handler(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with serving(export_dir, options, host, http_port, grpc_port, metrics_port) as (endpoint, bindings):
            on_ready(endpoint, bindings)
            process = endpoint.server.process
            while stop["signal"] is None:
                if process is not None and process.poll() is not None:
                    raise TurboExportError(f"serve: tritonserver exited with code {process.returncode}:\n"
                                           f"{endpoint.server.log_tail()}")
                time.sleep(0.2)
        return int(endpoint.server.process.returncode or 0) if endpoint.server.process else 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
