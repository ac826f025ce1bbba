"""Per-phase timing of one inference on one rank (seed 000 Table 2 style, plus the staging split):
the :class:`Stopwatch` that fills a :class:`~prism_trt.engines.measured.PhaseTimes` (the record and
its phase names live with the performance map that stores them)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..engines.measured import PHASES, PhaseTimes

__all__ = ["PHASES", "PhaseTimes", "Stopwatch"]


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
