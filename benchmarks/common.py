"""Helpers shared by the benchmark scripts: timing, result files, environment description."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import prism_trt

RESULTS = Path(__file__).resolve().parent / "results"


def time_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> dict:
    """Median / mean / stdev wall time in ms of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "mean_ms": statistics.fmean(samples),
            "stdev_ms": statistics.stdev(samples) if len(samples) > 1 else 0.0, "samples_ms": samples}


def environment() -> dict:
    return {"prism_trt": prism_trt.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


def testbed_available() -> bool:
    """Whether the network-namespace testbed can run here; says why not (the profile_* studies need it)."""
    from prism_trt.profiler.testbed import root_available

    ok, why = root_available()
    if not ok:
        print(f"testbed unavailable ({why}); this benchmark needs root, ip and tc")
    return ok
