"""`turbo-export serve` and `turbo-export triton-repo`."""

from __future__ import annotations

import click

from turbo_export.cli.common import quiet_option, user_errors
from turbo_export.errors import TurboExportError


@click.command("serve")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port (KServe v2).")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="gRPC port (0: off).")
@click.option("--metrics-port", type=int, default=0, show_default=True,
              help="Prometheus metrics port (0: off).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Rows Triton's dynamic batcher groups into one call (run in chunks of the export's batch).")
@click.option("--max-request-mb", type=float, default=16.0, show_default=True,
              help="Requests whose inputs are larger are refused with HTTP 400.")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Model instances (processes) per served model.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0: its default).")
@click.option("--no-pipelines", is_flag=True, help="Serve only the tensor-level models.")
@quiet_option
@user_errors
def serve(export_dir: str, host: str, port: int, grpc_port: int, metrics_port: int, backend: str, max_batch: int,
          max_request_mb: float, instances: int, threads: int, no_pipelines: bool) -> None:
    """Serve EXPORT_DIR's Turbo and unaccelerated models with Triton Inference Server (KServe v2, HTTP + gRPC)."""
    from turbo_export.serve.server import ServeOptions, serve_forever

    options = ServeOptions(backend=backend, max_batch=max_batch, max_request_mb=max_request_mb, instances=instances,
                           threads=threads, pipelines=not no_pipelines)

    def ready(endpoint, bindings) -> None:
        click.echo(f"serving {export_dir} with tritonserver on {endpoint.url} (KServe v2"
                   f"{f', gRPC {host}:{grpc_port}' if grpc_port else ''}); SIGTERM or Ctrl+C stops it", err=True)
        for b in bindings:
            ins = ", ".join(f"{t.name} {t.datatype}{list(t.dims)}" for t in b.inputs)
            outs = ", ".join(f"{t.name} {t.datatype}{list(t.dims)}" for t in b.outputs)
            click.echo(f"  {b.name:24} POST /v2/models/{b.name}/infer  ({ins}) -> ({outs})"
                       f"{f'  max batch {b.max_batch}' if b.max_batch else ''}", err=True)

    code = serve_forever(export_dir, options, host, port, grpc_port or None, metrics_port or None, ready)
    click.echo(f"tritonserver stopped (exit code {code})", err=True)


@click.command("triton-repo")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=str, help="Repository folder to write.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime_onnx (copies the ONNX files) or tensorrt_plan (copies the export's engines).")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="max_batch_size for graphs with a dynamic batch dimension.")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Instances per model per GPU (instance_group count).")
@click.option("--kind", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Instance kind: auto = KIND_GPU when --gpus is given or this machine has a GPU (nvidia-smi / torch), "
                   "else KIND_CPU.")
@click.option("--gpus", default="", help="Comma-separated GPU ids for instance_group (default: all).")
@click.option("--model", "names", multiple=True, help="Only these graphs (repeatable; default: all of the folder).")
@quiet_option
@user_errors
def triton_repo(export_dir: str, out_dir: str, backend: str, max_batch: int, instances: int, kind: str, gpus: str,
                names: tuple[str, ...]) -> None:
    """Write a Triton model repository (config.pbtxt + version folders) for EXPORT_DIR's graphs."""
    from turbo_export.files import check_writable_target
    from turbo_export.serve.triton_repo import plan_repository, run_hints, write_repository

    try:
        gpu_ids = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise TurboExportError(f"gpus: expected comma-separated integers, got '{gpus}'") from None
    check_writable_target(out_dir, "out", folder=True)  # before reading the graphs (write_repository checks too)
    models = plan_repository(export_dir, backend, max_batch, instances, kind, gpu_ids, names=names or None)
    folders = write_repository(models, out_dir)
    for m, folder in zip(models, folders):
        c = m.config
        batching = f"max_batch_size {c.max_batch_size}, dynamic batching" if c.dynamic_batching else \
            "static batch (max_batch_size 0)"
        plugin = f"; custom nodes {', '.join(sorted(m.custom_ops))}: see PLUGINS.md" if m.custom_ops else ""
        click.echo(f"{folder}: {c.platform}, {batching}, {c.instance_count} x {c.instance_kind}{plugin}")
    click.echo("")
    for line in run_hints(export_dir, out_dir, models):
        click.echo(line)
