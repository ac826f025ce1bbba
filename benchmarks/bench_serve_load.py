"""Bounded load on `prism-trt serve` (2 ranks, prism mode, loopback): 4 clients for a fixed time,
p50/p99 latency and throughput, and the error count (goal: 0). Not a test: numbers vary by host.

Uses the shared MNIST checkpoint when present, else a random-weight vit_tiny.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from prism_trt.data import data_dir  # noqa: E402
from prism_trt.engines import BuildOptions, get_backend  # noqa: E402
from prism_trt.export.build import Builder, config_plans  # noqa: E402
from prism_trt.model import load_model  # noqa: E402
from prism_trt.runtime.group import free_port  # noqa: E402
from prism_trt.serve.client import wait_until_ready  # noqa: E402

DURATION_S, CLIENTS, MAX_REQUESTS, CR = 40.0, 4, 20000, 5.0


def main() -> int:
    checkpoint = data_dir() / "mnist" / "vit_mnist.pt"
    model = load_model(checkpoint=checkpoint) if checkpoint.is_file() else load_model("vit_tiny_patch16_224")
    source = {"checkpoint": str(checkpoint)} if checkpoint.is_file() else {"timm": "vit_tiny_patch16_224"}
    spec = model.spec
    engines = RESULTS / "engines" / f"{spec.name}-serve"
    Builder(model, source, get_backend("onnxruntime", threads=1), BuildOptions(max_batch=16),
            exporter="torchscript").build(engines, 2, config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, [CR], []),
                                          progress=False)
    master, port = free_port(), free_port()
    argv = [sys.executable, "-m", "prism_trt.cli", "serve", "--engines", str(engines), "--world-size", "2",
            "--master-port", str(master), "--threads", "1", "--mode", "prism", "--cr", str(CR), "--port", str(port)]
    ranks = [subprocess.Popen(argv + ["--rank", str(r)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for r in (1, 0)]
    url = f"http://127.0.0.1:{port}"
    latencies, errors, lock = [], [], threading.Lock()
    try:
        if not wait_until_ready(url, ranks):
            raise RuntimeError("the server did not become ready within 120 s")
        image = torch.randn(1, spec.in_chans, *spec.img_size).flatten().tolist()
        body = {"inputs": [{"name": "input", "shape": [1, spec.in_chans, *spec.img_size], "datatype": "FP32",
                            "data": image}]}
        stop_at = time.monotonic() + DURATION_S

        def client() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while time.monotonic() < stop_at and len(latencies) + len(errors) < MAX_REQUESTS:
                    start = time.perf_counter()
                    response = http.post(f"/v2/models/{spec.name}/infer", json=body)
                    with lock:
                        if response.status_code == 200:
                            latencies.append((time.perf_counter() - start) * 1e3)
                        else:
                            errors.append(response.status_code)

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=DURATION_S + 60)
        elapsed = time.monotonic() - began
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        ranks[1].send_signal(signal.SIGTERM)
        for process in ranks:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    batch_lines = [line for line in metrics.splitlines() if line.startswith("prism_batch_size_sum") or
                   line.startswith("prism_batch_size_count")]
    payload = {"model": spec.name, "mode": f"prism CR {CR}", "ranks": 2, "clients": CLIENTS, "duration_s": elapsed,
               "requests": len(latencies), "errors": len(errors), "p50_ms": p50, "p99_ms": p99,
               "throughput_rps": len(latencies) / elapsed, "batch_metrics": batch_lines}
    path = write_result("serve_load", payload)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(ordered, bins=60)
    ax.axvline(p50, color="black", linestyle="--", label=f"p50 {p50:.1f} ms")
    ax.axvline(p99, color="red", linestyle="--", label=f"p99 {p99:.1f} ms")
    ax.set(xlabel="request latency (ms)", ylabel="requests", title=f"{spec.name}, 2 ranks prism, {CLIENTS} clients")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_load.png", dpi=120)
    print(f"{len(latencies)} requests in {elapsed:.1f} s ({payload['throughput_rps']:.1f} req/s), "
          f"{len(errors)} errors, p50 {p50:.1f} ms, p99 {p99:.1f} ms; {batch_lines} -> {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
