"""Load test of `turbo-export serve`: requests/s and p50/p99 latency of the Turbo and unaccelerated tensor-level
models at several concurrencies, and every answer checked against the runner's output for the same input.

    python scripts/load_test.py EXPORT_DIR --concurrency 1,4,16 --duration 20 [--url 127.0.0.1:8000]

Without --url it starts tritonserver on the export itself (tensor-level models only). Turbo and baseline are
measured alternately, in two rounds of duration/2 each per concurrency, so drift on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from turbo_export.backends import make_runner  # noqa: E402
from turbo_export.backends.batching import run_in_batches, static_batch  # noqa: E402

MODELS = ("turbo", "baseline")


def expected_outputs(export_dir: str, inputs: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    out = {}
    for name in MODELS:
        runner = make_runner(os.path.join(export_dir, f"{name}.onnx"))
        # a static-batch graph runs a shorter request padded, as the server does
        out[name] = [run_in_batches(runner.run, static_batch(runner), {"pixel_values": x})["logits"] for x in inputs]
    return out


def run_phase(url: str, model: str, inputs: list[np.ndarray], expected: list[np.ndarray], concurrency: int,
              duration: float, atol: float) -> dict:
    import tritonclient.http as httpclient

    latencies: list[float] = []
    counts = {"ok": 0, "wrong": 0, "failed": 0}
    lock = threading.Lock()
    start_barrier = threading.Barrier(concurrency + 1)
    state = {"deadline": 0.0}

    def client(k: int) -> None:
        conn = httpclient.InferenceServerClient(url, connection_timeout=60, network_timeout=120)
        mine, j = [], k
        local = {"ok": 0, "wrong": 0, "failed": 0}
        start_barrier.wait()
        while time.perf_counter() < state["deadline"]:
            i = j % len(inputs)
            j += concurrency
            inp = httpclient.InferInput("pixel_values", list(inputs[i].shape), "FP32")
            inp.set_data_from_numpy(inputs[i], binary_data=True)
            t0 = time.perf_counter()
            try:
                got = conn.infer(model, [inp]).as_numpy("logits")
                verdict = "ok" if got.shape == expected[i].shape and np.allclose(got, expected[i], atol=atol) \
                    else "wrong"
            except Exception:
                verdict = "failed"
            mine.append(time.perf_counter() - t0)
            local[verdict] += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for key, v in local.items():
                counts[key] += v

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    state["deadline"] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"latencies": latencies, "elapsed": elapsed, **counts}


def summarize(phases: list[dict], rows: int) -> dict:
    lat = np.array([x for p in phases for x in p["latencies"]]) * 1e3
    elapsed = sum(p["elapsed"] for p in phases)
    total = sum(p["ok"] + p["wrong"] + p["failed"] for p in phases)
    return {"requests": int(total), "requests_per_s": total / elapsed, "images_per_s": total * rows / elapsed,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "wrong": int(sum(p["wrong"] for p in phases)), "failed": int(sum(p["failed"] for p in phases))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--url", default=None, help="host:port of a running `turbo-export serve` (default: start one)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per model per concurrency")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per model")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1,
                        help="images per request (default 1: single-image clients; the server batches them)")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    with open(os.path.join(args.export_dir, "report.json")) as f:
        report = json.load(f)
    rows = args.rows
    size, channels = int(report["image_size"]), 3
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((rows, channels, size, size)).astype(np.float32) for _ in range(8)]
    expected = expected_outputs(args.export_dir, inputs)
    levels = [int(c) for c in args.concurrency.split(",")]

    def measure(url: str) -> dict:
        for model in MODELS:  # warm-up (first runs, connections), not counted
            run_phase(url, model, inputs, expected[model], 2, args.warmup, args.atol)
        results = {}
        for c in levels:
            phases = {m: [] for m in MODELS}
            for _ in range(2):
                for model in MODELS:
                    phases[model].append(run_phase(url, model, inputs, expected[model], c, args.duration / 2,
                                                   args.atol))
            results[c] = {m: summarize(p, rows) for m, p in phases.items()}
            for m in MODELS:
                r = results[c][m]
                print(f"concurrency {c:3d}  {m:8s}  {r['requests_per_s']:7.2f} req/s  p50 {r['p50_ms']:8.1f} ms  "
                      f"p99 {r['p99_ms']:8.1f} ms  requests {r['requests']:5d}  wrong {r['wrong']}  "
                      f"failed {r['failed']}", flush=True)
            print(f"concurrency {c:3d}  turbo/baseline throughput "
                  f"{results[c]['turbo']['requests_per_s'] / results[c]['baseline']['requests_per_s']:.2f}x",
                  flush=True)
        return results

    setup = {"export_dir": os.path.abspath(args.export_dir), "model": report["model"], "ratio": report["ratio"],
             "rows_per_request": rows, "export_batch": report["batch"], "batch_dim": report.get("batch_dim"),
             "duration_s_per_model": args.duration, "max_batch": args.max_batch,
             "instances": args.instances, "threads": args.threads, "cpu_count": os.cpu_count(),
             "load_average_at_start": os.getloadavg()}  # other processes on the machine skew every figure
    print(json.dumps(setup), flush=True)
    if args.url:
        results = measure(args.url)
    else:
        from turbo_export.serve.server import ServeOptions, free_port, serving

        options = ServeOptions(max_batch=args.max_batch, instances=args.instances, threads=args.threads,
                               pipelines=False, max_request_mb=64)
        with serving(args.export_dir, options, http_port=free_port(), grpc_port=None) as (server, _):
            results = measure(server.url.removeprefix("http://"))
    setup["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {setup['load_average_at_start']}, at end {setup['load_average_at_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
