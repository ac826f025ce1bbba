"""Staging vs the pinned-memcpy peak, for both GPU staging kinds (torch, pycuda).

For the exchanged shapes of ViT-B/16 on two ranks (prism CR 9.9: 11 / 10 means a rank, and
Voltage: 99 / 98 tokens, D = 768) at batches 1-32, times rank 0's staging round trip (pack,
device -> host, host -> device, unpack: what runs around every all-gather) against a plain
device -> host + host -> device copy of the same bytes (the padded slots each way) between
page-locked and device memory, made with the same library (the peak). Goal: staging >= 80 % of the peak at batch >= 8.

Writes ``results/staging_gpu.json`` and ``results/staging_gpu.png``. Without a GPU, ``--dry-run``
(or no CUDA device) runs the same loop with the CPU's host staging against a host memcpy, so the
script is exercised everywhere; its figures say nothing about a GPU. ``measure_staging`` is the
entry point other benchmarks (bench_gpu.py) import.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import matplotlib
import torch
from common import RESULTS, write_result

from prism_trt.core import make_partition_plan, make_segment_plan, voltage_plan
from prism_trt.runtime.options import ExchangeDtype, StagingKind
from prism_trt.runtime.staging import HostStaging, Staging
from prism_trt.runtime.staging_choice import make_staging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BATCHES, REPEAT, DIM, GOAL = (1, 2, 4, 8, 16, 32), 50, 768, 0.8


def shapes() -> dict[str, list[int]]:
    """Entries each rank exchanges per block: ViT-B/16 (N = 197), P = 2."""
    partition = make_partition_plan(197, 1, 2)
    return {"prism CR 9.9": list(make_segment_plan(partition, cr=9.9).counts),
            "voltage": list(voltage_plan(partition).counts)}


def _timed(fn: Callable[[], None], synchronize: Callable[[], None], repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs, each ended by ``synchronize``."""
    for _ in range(min(5, repeat)):
        fn()
    synchronize()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _peak(staging: Staging, d2h_bytes: int, h2d_bytes: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """A device -> host copy of ``d2h_bytes`` and a host -> device copy of ``h2d_bytes``, each one
    contiguous copy between page-locked and device memory, with the staging's own library."""
    elements = max(d2h_bytes, h2d_bytes, 4) // 4
    if staging.name == "pycuda":
        driver, stream = staging.driver, staging.stream
        with staging.in_context():
            host = driver.pagelocked_empty(elements, "float32")
            device = driver.mem_alloc(elements * 4)

        def copy() -> None:
            with staging.in_context():
                driver.memcpy_dtoh_async(host[: d2h_bytes // 4], device, stream)
                driver.memcpy_htod_async(device, host[: h2d_bytes // 4], stream)
        return copy, staging.synchronize
    host = torch.empty(elements, dtype=torch.float32)
    if staging.device.type == "cuda":
        host = host.pin_memory()
    device = torch.empty(elements, dtype=torch.float32, device=staging.device)

    def copy_torch() -> None:
        host[: d2h_bytes // 4].copy_(device[: d2h_bytes // 4], non_blocking=True)
        device[: h2d_bytes // 4].copy_(host[: h2d_bytes // 4], non_blocking=True)
    sync = (lambda: torch.cuda.synchronize(staging.device)) if staging.device.type == "cuda" else (lambda: None)
    return copy_torch, sync


def measure_one(staging: Staging, label: str, batch: int, repeat: int) -> dict:
    buffers = staging.buffers((label, batch), batch)
    layout, itemsize = staging.layout, staging.itemsize
    means = torch.randn(batch, layout.counts[layout.rank], layout.dim, device=staging.device)
    d2h_bytes, h2d_bytes = layout.d2h_bytes(batch, itemsize), layout.h2d_bytes(batch, itemsize)
    nbytes = d2h_bytes + h2d_bytes

    def stage() -> None:
        staging.to_host(means, buffers)
        staging.to_device(buffers)

    t_stage = _timed(stage, staging.synchronize, repeat)
    t_peak = _timed(*_peak(staging, d2h_bytes, h2d_bytes), repeat)
    return {"kind": staging.name, "shape": label, "batch": batch, "bytes": nbytes, "staging_ms": t_stage * 1e3,
            "peak_ms": t_peak * 1e3, "staging_gbps": nbytes / t_stage / 1e9, "peak_gbps": nbytes / t_peak / 1e9,
            "fraction_of_peak": t_peak / t_stage}


def measure_staging(kinds=(StagingKind.TORCH, StagingKind.PYCUDA), batches=BATCHES, device: str = "cuda:0",
                    exchange_dtype: ExchangeDtype = ExchangeDtype.FP32, repeat: int = REPEAT,
                    dry_run: bool = False) -> list[dict]:
    """One row per (kind, shape, batch): staging and peak times, their bandwidths and the fraction.
    A kind that cannot run here (pycuda not installed) gives one row with ``unavailable`` saying why.
    ``dry_run``: the CPU's host staging against a host memcpy (exercises the script, not a GPU)."""
    rows = []
    for kind in ([None] if dry_run else kinds):
        for label, counts in shapes().items():
            try:
                staging = (HostStaging(counts, 0, DIM, "cpu", exchange_dtype=exchange_dtype) if kind is None
                           else make_staging(counts, 0, DIM, device, kind=kind, exchange_dtype=exchange_dtype))
            except Exception as error:  # an optional library missing: say so in the result, keep going
                rows.append({"kind": str(kind), "shape": label, "unavailable": f"{type(error).__name__}: {error}"})
                continue
            for batch in batches:
                rows.append(measure_one(staging, label, batch, repeat))
                print(rows[-1])
    return rows


def plot(rows: list[dict], title: str, path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    series = sorted({(r["kind"], r["shape"]) for r in rows if "fraction_of_peak" in r})
    for kind, shape in series:
        points = [(r["batch"], r["fraction_of_peak"]) for r in rows if (r.get("kind"), r.get("shape")) == (kind, shape)
                  and "fraction_of_peak" in r]
        ax.plot(*zip(*points), marker="o", label=f"{kind}, {shape}")
    ax.axhline(GOAL, color="grey", linestyle="--", label=f"goal {GOAL:.0%}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("staging / pinned-memcpy peak")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU host staging only (no GPU needed)")
    parser.add_argument("--exchange-dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--repeat", type=int, default=REPEAT)
    args = parser.parse_args(argv)
    dry_run = args.dry_run or not torch.cuda.is_available()
    if dry_run and not args.dry_run:
        print("no CUDA device visible to torch: CPU dry run (host staging vs host memcpy; no GPU figure)")
    rows = measure_staging(exchange_dtype=ExchangeDtype(args.exchange_dtype), repeat=args.repeat, dry_run=dry_run)
    where = "CPU dry run" if dry_run else torch.cuda.get_device_name(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "staging_gpu.png"
    plot(rows, f"staging vs pinned peak, ViT-B/16 P=2, {args.exchange_dtype} ({where})", png)
    path = write_result("staging_gpu", {"device": where, "dry_run": dry_run, "exchange_dtype": args.exchange_dtype,
                                        "goal": f"staging >= {GOAL} of the pinned peak at batch >= 8", "rows": rows})
    print(f"-> {path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
