"""Bounded load on `prism-trt serve` (2 ranks, prism mode, loopback): N clients for a fixed time,
p50/p99 latency and throughput, and the error count (goal: 0). Not a test: numbers vary by host.

Uses the shared MNIST checkpoint when present, else a random-weight vit_tiny. Clients:
  --client json            httpx posting the OIP JSON body (the default, what `make bench` runs)
  --client triton-binary   tritonclient with its default calls: binary input and outputs
  --client triton-json     tritonclient with binary_data=False
e.g. `python bench_serve_load.py --client triton-binary --clients 8 --duration 60`.
"""

from __future__ import annotations

import argparse
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


def _sender(kind: str, url: str, name: str, classes: int, image: torch.Tensor):
    """(send one request -> True when answered correctly shaped, close) for one client thread."""
    if kind == "json":
        http = httpx.Client(base_url=url, timeout=30)
        body = {"inputs": [{"name": "input", "shape": list(image.shape), "datatype": "FP32",
                            "data": image.flatten().tolist()}]}
        return (lambda: http.post(f"/v2/models/{name}/infer", json=body).status_code == 200), http.close
    import tritonclient.http as triton

    binary = kind == "triton-binary"
    client = triton.InferenceServerClient(url.removeprefix("http://"), connection_timeout=30, network_timeout=30)
    request = triton.InferInput("input", list(image.shape), "FP32")
    request.set_data_from_numpy(image.numpy(), binary_data=binary)
    outputs = [triton.InferRequestedOutput(output, binary_data=binary) for output in ("logits", "label")]

    def send() -> bool:
        result = client.infer(name, [request], outputs=outputs)
        return result.as_numpy("logits").shape == (image.shape[0], classes)

    return send, client.close


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", choices=["json", "triton-binary", "triton-json"], default="json")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=MAX_REQUESTS)
    args = parser.parse_args()
    checkpoint = data_dir() / "mnist" / "vit_mnist.pt"
    model = load_model(checkpoint=checkpoint) if checkpoint.is_file() else load_model("vit_tiny_patch16_224")
    source = {"checkpoint": str(checkpoint)} if checkpoint.is_file() else {"timm": "vit_tiny_patch16_224"}
    spec = model.spec
    engines = RESULTS / "engines" / f"{spec.name}-serve"
    Builder(model, source, get_backend("onnxruntime", threads=1), BuildOptions(max_batch=16),
            exporter="torchscript").build(engines, 2,
                                          config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, [CR], []),
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
        image = torch.randn(1, spec.in_chans, *spec.img_size)
        stop_at = time.monotonic() + args.duration

        def client() -> None:
            send, close = _sender(args.client, url, spec.name, spec.num_classes, image)
            try:
                while time.monotonic() < stop_at and len(latencies) + len(errors) < args.max_requests:
                    start = time.perf_counter()
                    try:
                        answered = send()
                    except Exception as exc:  # an error answer (tritonclient raises) or a dropped connection
                        answered = repr(exc)[:200]
                    with lock:
                        if answered is True:
                            latencies.append((time.perf_counter() - start) * 1e3)
                        else:
                            errors.append(answered)
            finally:
                close()

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.duration + 60)
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
    payload = {"model": spec.name, "mode": f"prism CR {CR}", "ranks": 2, "client": args.client, "clients": args.clients,
               "duration_s": elapsed, "requests": len(latencies), "errors": len(errors), "error_samples": errors[:5],
               "p50_ms": p50, "p99_ms": p99,
               "throughput_rps": len(latencies) / elapsed, "batch_metrics": batch_lines}
    name = "serve_load" if args.client == "json" else f"serve_load_{args.client}"
    path = write_result(name, payload)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(ordered, bins=60)
    ax.axvline(p50, color="black", linestyle="--", label=f"p50 {p50:.1f} ms")
    ax.axvline(p99, color="red", linestyle="--", label=f"p99 {p99:.1f} ms")
    ax.set(xlabel="request latency (ms)", ylabel="requests",
           title=f"{spec.name}, 2 ranks prism, {args.clients} {args.client} clients")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    print(f"{len(latencies)} requests in {elapsed:.1f} s ({payload['throughput_rps']:.1f} req/s), "
          f"{len(errors)} errors, p50 {p50:.1f} ms, p99 {p99:.1f} ms; {batch_lines} -> {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
