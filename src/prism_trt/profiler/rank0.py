"""Rank 0's side of a sweep: measure a list of points on a live group and stream each result as
one JSON line (the driver merges them into the map). Runs where rank 0 runs — on loopback, or
inside rank 0's network namespace on the testbed — through the hidden ``prism-trt sweep-rank0``
command that :mod:`.sweep` starts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..engines.chain_key import ChainKey
from ..engines.manifest import Manifest, rank_directory
from ..runtime import GroupConfig, open_executor
from ..runtime.measure import measure
from .energy import detect_meter


def measure_points(engines: Path, group: GroupConfig, points: list[tuple[ChainKey, int]], out: Path,
                   threads: int = 1, warmup: int = 3, repeat: int = 20, energy: str | None = None,
                   stop: threading.Event | None = None) -> int:
    """Join the group as rank 0, measure ``points`` (chain, batch) in order with a barrier before
    every collective, append each result to ``out`` as it lands; returns the number measured.

    Once ``stop`` is set, no new point is started: the one in progress is finished and written,
    then the workers are told to stop as at the end of the list."""
    stop = stop if stop is not None else threading.Event()
    device = Manifest.read(rank_directory(engines)).backend.compute_device
    meter, meter_note = detect_meter(energy, device)
    executor = open_executor(engines, group, threads, profile_barrier=True)
    measured = 0
    try:
        for key, batch in points:
            if stop.is_set():
                break
            result = measure(executor, key, batch, warmup, repeat, meter=meter)
            if stop.is_set() and result["fell_back"]:
                # Stopped under this point and it fell back to local: a worker was most likely
                # stopped under it too (the whole session got the signal), so it is not the point
                # asked for. A fallback without a stop is a real measurement and is kept.
                break
            result["energy_meter"] = meter.name
            result["energy_note"] = meter_note
            # One write of one whole line: the driver takes only complete lines as points.
            with open(out, "a") as stream:
                stream.write(json.dumps(result) + "\n")
            measured += 1
    finally:
        executor.close()
        meter.close()
    return measured
