"""Per-phase timing of one inference on one rank (seed 000 Table 2 style, plus the staging split)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch

PHASES = ("request", "compute", "d2h", "h2d", "wait", "comm", "other")


@dataclass
class PhaseTimes:
    """Milliseconds per phase for one inference on one rank, and bytes moved.

    request: rank 0's broadcast of the request (images, or ids and mask) to the other ranks of a
    distributed chain (0 locally and on the workers); on slow links it can outweigh every other
    phase, so it is part of the total the profiler and the selector compare. compute: engine execution. d2h / h2d: staging copies device->host before and host->device after
    every collective (a CPU backend's host copy, possibly ~0). wait: time at a barrier before each
    collective, i.e. skew between ranks — measured only in profiling mode, else None and folded
    into comm. comm: the collective itself (pure transfer when wait is measured). other: the rest
    (Python, slicing, padding). total: wall time of the whole inference.
    """

    compute: float = 0.0
    request: float = 0.0
    d2h: float = 0.0
    h2d: float = 0.0
    wait: float | None = None
    comm: float = 0.0
    other: float = 0.0
    total: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def staging(self) -> float:
        return self.d2h + self.h2d

    def close(self, total_ms: float) -> PhaseTimes:
        """Set the total and make ``other`` the unaccounted remainder."""
        self.total = total_ms
        accounted = self.request + self.compute + self.d2h + self.h2d + (self.wait or 0.0) + self.comm
        self.other = max(0.0, total_ms - accounted)
        return self

    @classmethod
    def mean(cls, runs: list[PhaseTimes]) -> PhaseTimes:
        out = cls()
        for f in fields(cls):
            values = [getattr(r, f.name) for r in runs]
            if any(v is None for v in values):
                setattr(out, f.name, None)
            else:
                setattr(out, f.name, sum(values) / len(values) if values else 0.0)
        return out


@dataclass
class Stopwatch:
    """Accumulates wall time into the fields of a PhaseTimes."""

    times: PhaseTimes = field(default_factory=PhaseTimes)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"prism::{name}"):  # labels the --trace flame graph
                yield
        finally:
            elapsed = (time.perf_counter() - start) * 1e3
            setattr(self.times, name, (getattr(self.times, name) or 0.0) + elapsed)
