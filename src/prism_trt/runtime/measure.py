"""Repeated timed inferences of one (mode, CR, batch) point: latency statistics and the per-rank
phase breakdown (seed 000 Table 2), shared by `prism-trt run` and the profiler sweep."""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from pathlib import Path

import torch

from ..core.chain_key import ChainKey
from ..engines.manifest import ModelRecord
from ..errors import UsageError
from .api import Executor
from .request import InferenceRequest
from .timing import PHASES, PhaseTimes


def latency_stats(samples_ms: list[float], batch: int) -> dict:
    ordered = sorted(samples_ms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    mean = statistics.fmean(ordered)
    return {"mean_ms": mean, "p50_ms": quantile(0.5), "p90_ms": quantile(0.9),
            "stdev_ms": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            "per_sample_ms": mean / batch, "samples_ms": samples_ms}


def example_request(model: ModelRecord, batch: int, seed: int = 0, positions: int | None = None,
                    lengths: tuple[int, ...] = ()) -> InferenceRequest:
    """A deterministic random request: normal images, or ids below the vocabulary with a full mask
    of ``positions`` (default the build's sequence length), on the shortest of ``lengths`` holding it."""
    return InferenceRequest.of(model, model.modality.example_inputs(batch, seed, positions), lengths)


def measure(executor: Executor, key: ChainKey, batch: int, warmup: int = 3, repeat: int = 20, seed: int = 0,
            trace: Path | None = None, meter=None, positions: int | None = None) -> dict:
    """Run ``warmup`` + ``repeat`` batches of chain ``key``; per-rank phase means come from every
    rank that ran (rank 0 alone for the local chain). ``positions``: a text request's length (it
    runs on the shortest sequence bucket that holds it; default the longest)."""
    if not 1 <= batch <= executor.max_batch:  # before the batch is allocated: 10^5 images are gigabytes
        raise UsageError(f"--batch {batch} is outside the engines' batch range: 1 to max batch {executor.max_batch}; "
                         f"use a smaller batch, or rebuild with a larger `prism-trt build --max-batch`")
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
                   energy: float | None) -> dict:
    """:func:`measure`'s result from its timed runs (each a list of per-rank phase times)."""
    ranks = len(runs[0])
    per_rank = [PhaseTimes.mean([run[r] for run in runs if len(run) == ranks]) for r in range(ranks)]
    return {**key.to_dict(), "batch": batch, "warmup": warmup, "repeat": len(runs),
            "fell_back": fell_back, "latency": latency_stats([run[0].total for run in runs], batch),
            "energy_j": energy, "energy_per_sample_j": None if energy is None else energy / (len(runs) * batch),
            "per_rank": [t.to_dict() for t in per_rank], "phases": list(PHASES)}
