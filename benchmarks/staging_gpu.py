"""GPU staging throughput (run where an NVIDIA GPU is present; exits with a message elsewhere).

Measures D2H + H2D of the staging buffers for the segment-means and Voltage shapes of ViT-B/16
(P=2) against a plain pinned-memory copy of the same size (the peak), and the per-block chain on
the onnxruntime CUDA EP against torch CUDA eager. Goal: staging >= 80 % of the pinned peak.
"""

from __future__ import annotations

import sys
import time

import torch
from common import write_result

from prism_trt.core import make_partition_plan, make_segment_plan, voltage_plan
from prism_trt.runtime.staging import TorchCudaStaging

BATCHES, REPEAT = (1, 8, 32), 50


def timed(fn, repeat: int = REPEAT) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def measure_shape(label: str, counts: list[int], batch: int) -> dict:
    """Staging round trip for one shape vs a plain pinned copy of the same bytes."""
    staging = TorchCudaStaging(counts, 0, 768, "cuda")
    buffers = staging.buffers((label, batch), batch)
    means = torch.randn(batch, counts[0], 768, device="cuda")
    nbytes = means.numel() * 4 + buffers.remote.numel() * 4
    pinned = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    device = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")

    def stage():
        staging.to_host(means, buffers)
        staging.to_device(buffers)

    def peak():
        pinned.copy_(device, non_blocking=True)
        device.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    t_stage, t_peak = timed(stage), timed(peak)
    return {"shape": label, "batch": batch, "bytes": nbytes, "staging_ms": t_stage * 1e3, "peak_ms": t_peak * 1e3,
            "staging_gbps": 2 * nbytes / t_stage / 1e9, "peak_gbps": 2 * nbytes / t_peak / 1e9,
            "fraction_of_peak": t_peak / t_stage}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here: GPU staging measurements skipped (run on a machine with an NVIDIA GPU)")
        return 0
    name = torch.cuda.get_device_name(0)
    partition = make_partition_plan(197, 1, 2)
    plans = {"prism CR 9.9": make_segment_plan(partition, cr=9.9), "voltage": voltage_plan(partition)}
    rows = []
    for label, plan in plans.items():
        for batch in BATCHES:
            rows.append(measure_shape(label, list(plan.counts), batch))
            print(rows[-1])
    path = write_result("staging_gpu", {"gpu": name, "rows": rows, "goal": "staging >= 0.8 of pinned peak"})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
