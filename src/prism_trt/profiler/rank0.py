"""Rank 0's side of a sweep: measure a list of points on a live group and stream each result as
one JSON line (the driver merges them into the map). Runs where rank 0 runs — on loopback, or
inside rank 0's network namespace on the testbed — through the hidden ``prism-trt sweep-rank0``
command that :mod:`.sweep` starts."""

from __future__ import annotations

import json
from pathlib import Path

from ..engines.chain_key import ChainKey
from ..engines.manifest import Manifest, rank_directory
from ..runtime import GroupConfig, open_executor
from ..runtime.measure import measure
from .energy import detect_meter


def measure_points(engines: Path, group: GroupConfig, points: list[tuple[ChainKey, int]], out: Path,
                   threads: int = 1, warmup: int = 3, repeat: int = 20, energy: str | None = None) -> int:
    """Join the group as rank 0, measure ``points`` (chain, batch) in order with a barrier before
    every collective, append each result to ``out`` as it lands; returns the number measured."""
    device = Manifest.read(rank_directory(engines)).backend.compute_device
    meter, meter_note = detect_meter(energy, device)
    executor = open_executor(engines, group, threads, profile_barrier=True)
    try:
        for key, batch in points:
            result = measure(executor, key, batch, warmup, repeat, meter=meter)
            result["energy_meter"] = meter.name
            result["energy_note"] = meter_note
            with open(out, "a") as stream:
                stream.write(json.dumps(result) + "\n")
    finally:
        executor.close()
        meter.close()
    return len(points)
