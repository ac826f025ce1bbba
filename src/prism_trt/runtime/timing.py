"""Per-phase timing of one inference on one rank (seed 000 Table 2 style, plus the staging split):
the :class:`Stopwatch` that fills a :class:`~prism_trt.engines.measured.PhaseTimes` (the record and
its phase names live with the performance map that stores them).

On a GPU the device's phases (compute and the staging copies) are timed with CUDA events on the
compute stream, not by synchronising the host after each: the events are read once, in
:meth:`Stopwatch.resolve`, after the batch. The host's own phases (the collectives, a barrier's
wait) and every phase on a CPU are timed with the host clock.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..engines.device import compute_stream
from ..engines.measured import PHASES, PhaseTimes

__all__ = ["DEVICE_PHASES", "PHASES", "PhaseTimes", "Stopwatch"]

#: the phases whose work runs on the device (timed with CUDA events there)
DEVICE_PHASES = frozenset({"compute", "d2h", "h2d"})


@dataclass
class Stopwatch:
    """Accumulates time into the fields of a PhaseTimes.

    stream: the CUDA stream the device phases run on (None: host clock for every phase); see
    :meth:`on`. Read ``times`` after :meth:`resolve`.
    """

    times: PhaseTimes = field(default_factory=PhaseTimes)
    stream: torch.cuda.Stream | None = None
    _events: list = field(default_factory=list, repr=False)

    @classmethod
    def on(cls, device: str | torch.device) -> Stopwatch:
        """A stopwatch for work on ``device``: CUDA events on its compute stream on a GPU."""
        return cls(stream=compute_stream(torch.device(device)))

    @contextmanager
    def phase(self, name: str):
        if self.stream is not None and name in DEVICE_PHASES:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            try:
                with torch.profiler.record_function(f"prism::{name}"):
                    yield
            finally:
                end.record(self.stream)
                self._events.append((name, start, end))
            return
        start_s = time.perf_counter()
        try:
            with torch.profiler.record_function(f"prism::{name}"):  # labels the --trace flame graph
                yield
        finally:
            self._add(name, (time.perf_counter() - start_s) * 1e3)

    def _add(self, name: str, elapsed_ms: float) -> None:
        setattr(self.times, name, (getattr(self.times, name) or 0.0) + elapsed_ms)

    def resolve(self) -> PhaseTimes:
        """Waits for the device phases' events (the one synchronisation timing needs), adds their
        times, and returns ``times``."""
        for name, start, end in self._events:
            end.synchronize()
            self._add(name, start.elapsed_time(end))
        self._events.clear()
        return self.times
