"""Repeated timed inferences of one (mode, CR, batch) point: latency statistics and the per-rank
phase breakdown (seed 000 Table 2), shared by `prism-trt run` and the profiler sweep."""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.chain_key import ChainKey, Mode
from ..engines.json_record import Fields
from ..engines.manifest import ModelRecord
from ..engines.measured import PHASES, LatencyStats, PhaseTimes, SampleStats
from ..engines.perfmap import PerfMapError, PerfPoint
from ..errors import UsageError
from .api import Executor
from .request import InferenceRequest


def latency_stats(samples_ms: list[float], batch: int) -> LatencyStats:
    ordered = sorted(samples_ms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    mean = statistics.fmean(ordered)
    return LatencyStats(mean, quantile(0.5), quantile(0.9), statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
                        mean / batch)


@dataclass(frozen=True)
class Measurement:
    """What timing one (chain, batch) point measured: rank 0's latency over the timed runs (its
    statistics and every sample, in order), each rank's mean phases, energy when a meter could
    measure it, whether a run fell back to the local chain; the profiler adds how it sampled the
    point and each rank's GFLOPs. ``to_dict`` is the layout of ``prism-trt run --json`` and of
    the profiler's result lines; :meth:`point` makes the performance map's point of it."""

    key: ChainKey
    batch: int
    warmup: int
    fell_back: bool
    latency: LatencyStats
    samples_ms: tuple[float, ...]
    per_rank: tuple[PhaseTimes, ...]
    energy_j: float | None = None
    samples: SampleStats | None = None
    gflops_per_rank: tuple[float, ...] | None = None

    @property
    def repeat(self) -> int:
        return len(self.samples_ms)

    @property
    def energy_per_sample_j(self) -> float | None:
        return None if self.energy_j is None else self.energy_j / (self.repeat * self.batch)

    def point(self, bandwidth_mbit: float | None, measured_mbit: float | None = None) -> PerfPoint:
        """The map's point of this measurement at the link rate it ran at (none for a local chain)."""
        local = self.key.mode == Mode.LOCAL
        return PerfPoint(self.key, self.batch, None if local else bandwidth_mbit, self.latency, list(self.per_rank),
                         measured_mbit, self.energy_j, self.energy_per_sample_j, self.fell_back, self.samples,
                         None if self.gflops_per_rank is None else list(self.gflops_per_rank))

    def to_dict(self) -> dict[str, Any]:
        return {**self.key.to_dict(), "batch": self.batch, "warmup": self.warmup, "repeat": self.repeat,
                "fell_back": self.fell_back, "latency": {**self.latency.to_dict(), "samples_ms": list(self.samples_ms)},
                "energy_j": self.energy_j, "energy_per_sample_j": self.energy_per_sample_j,
                "per_rank": [t.to_dict() for t in self.per_rank], "phases": list(PHASES),
                **({"samples": self.samples.to_dict()} if self.samples is not None else {}),
                **({"gflops_per_rank": list(self.gflops_per_rank)} if self.gflops_per_rank is not None else {})}

    @classmethod
    def from_dict(cls, data: dict, where: str = "measurement") -> Measurement:
        """The record :meth:`to_dict` wrote (a profiler result line); PerfMapError names a bad field."""
        fields = Fields(data, where, PerfMapError)
        point = PerfPoint.parse(fields)
        latency = fields.nested("latency")
        samples_ms = latency.get("samples_ms", list)
        gflops = point.gflops_per_rank
        return cls(point.key, point.batch, fields.integer("warmup", minimum=0), point.fell_back, point.latency,
                   tuple(samples_ms), tuple(point.per_rank), point.energy_j, point.samples,
                   None if gflops is None else tuple(gflops))


def example_request(model: ModelRecord, batch: int, seed: int = 0, positions: int | None = None,
                    lengths: tuple[int, ...] = ()) -> InferenceRequest:
    """A deterministic random request: normal images, or ids below the vocabulary with a full mask
    of ``positions`` (default the build's sequence length), on the shortest of ``lengths`` holding it."""
    return InferenceRequest.of(model, model.modality.example_inputs(batch, seed, positions), lengths)


def check_batch(batch: int, max_batch: int) -> None:
    """A UsageError for a ``--batch`` the engines (built up to ``max_batch``) do not take."""
    if not 1 <= batch <= max_batch:
        raise UsageError(f"--batch {batch} is outside the engines' batch range: 1 to max batch {max_batch}; "
                         f"use a smaller batch, or rebuild with a larger `prism-trt build --max-batch`")


def measure(executor: Executor, key: ChainKey, batch: int, warmup: int = 3, repeat: int = 20, seed: int = 0,
            trace: Path | None = None, meter=None, positions: int | None = None) -> Measurement:
    """Run ``warmup`` + ``repeat`` batches of chain ``key``; per-rank phase means come from every
    rank that ran (rank 0 alone for the local chain). ``positions``: a text request's length (it
    runs on the shortest sequence bucket that holds it; default the longest)."""
    check_batch(batch, executor.max_batch)  # before the batch is allocated: 10^5 images are gigabytes
    images = example_request(executor.manifest.model, batch, seed, positions, executor.buckets.lengths)
    for _ in range(warmup):
        executor.infer(images, key, gather_timings=True)
    runs, fell_back = [], False
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if trace else nullcontext()
    if meter is not None:
        meter.start()
    with profiler:
        for _ in range(repeat):
            result = executor.infer(images, key, gather_timings=True)
            fell_back |= result.fell_back
            runs.append(result.per_rank or [result.timings])
    energy = meter.stop() if meter is not None else None
    if trace:
        profiler.export_chrome_trace(str(trace))
    return summarize_runs(key, batch, warmup, runs, fell_back, energy)


def summarize_runs(key: ChainKey, batch: int, warmup: int, runs: list[list[PhaseTimes]], fell_back: bool,
                   energy: float | None) -> Measurement:
    """:func:`measure`'s result from its timed runs (each a list of per-rank phase times)."""
    ranks = len(runs[0])
    per_rank = [PhaseTimes.mean([run[r] for run in runs if len(run) == ranks]) for r in range(ranks)]
    samples_ms = [run[0].total for run in runs]
    return Measurement(key, batch, warmup, fell_back, latency_stats(samples_ms, batch), tuple(samples_ms),
                       tuple(per_rank), energy)
