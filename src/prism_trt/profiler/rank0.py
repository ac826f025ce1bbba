"""Rank 0's side of a sweep: measure a list of points on a live group and stream each result as
one JSON line (the driver merges them into the map). Runs where rank 0 runs — on loopback, or
inside rank 0's network namespace on the testbed — through the hidden ``prism-trt sweep-rank0``
command that :mod:`.sweep` starts.

Points of one batch size (local, voltage and every prism chain) are timed interleaved — one
inference of each in turn — so drift on the board (another process, thermal state, the link)
lands on all the chains the selector compares, instead of on whichever ran last. Each point is
sampled until its median is known well enough (:class:`.sampling.SamplingRule`).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..core.accounting import plan_cost
from ..core.chain_key import ChainKey
from ..engines.manifest import Manifest, ModelRecord, rank_directory
from ..engines.measured import PhaseTimes, SampleStats
from ..engines.modality import PIXELS_DTYPE
from ..runtime import GroupConfig, InferenceRequest, RuntimeOptions, open_executor
from ..runtime.measure import Measurement, example_request, summarize_runs
from .energy import detect_meter
from .sampling import MAD_TO_SIGMA, SamplingRule, mad, robust_summary


def chain_gflops(manifest: Manifest, key: ChainKey) -> list[float]:
    """GFLOPs per sample of each rank of chain ``key``: the ViT's patches and tokens, or a text
    build's positions at its sequence length (the longest bucket's; a text model's causal mask
    counted as the engines run it: attention over the attended ranks' means)."""
    return [rank.gflops for rank in plan_cost(manifest.spec, manifest.config(key).plan, key.mode).per_rank]


def _sample_stats(runs: list[list[PhaseTimes]], stopped: str) -> SampleStats:
    """How a point was sampled: rank 0's latency summary, why sampling stopped, and every rank's
    compute jitter (sigma estimated from the MAD)."""
    ranks = len(runs[0])
    jitter = [MAD_TO_SIGMA * mad([run[r].compute for run in runs if len(run) == ranks]) for r in range(ranks)]
    summary = robust_summary([run[0].total for run in runs])
    return SampleStats(**{**summary, "outlier_ms": tuple(summary["outlier_ms"])}, stopped=stopped,
                       compute_sigma_ms=tuple(jitter))


def sweep_request(model: ModelRecord, batch: int) -> InferenceRequest:
    """The request a sweep times: the example request, except that an input the model also takes
    as raw UINT8 pixels is sent as such (random pixels: what a camera sends, so one byte a value
    crosses the link, each worker receiving only its share)."""
    request = example_request(model, batch)
    tensors, narrowed = dict(request.tensors), False
    generator = torch.Generator().manual_seed(batch)
    for spec in model.request_inputs():
        if spec.dtype != PIXELS_DTYPE and PIXELS_DTYPE in model.modality.dtypes(spec):
            shape = tuple(tensors[spec.name].shape)
            tensors[spec.name] = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
            narrowed = True
    return InferenceRequest.create(model.modality, tensors) if narrowed else request


def measure_group(executor, group: list[tuple[ChainKey, int]], warmup: int, rule: SamplingRule, meter,
                  stop: threading.Event) -> list[Measurement]:
    """Time the points of ``group`` interleaved until each is done by ``rule``; one measurement
    each, with how it was sampled and each rank's GFLOPs. After
    ``stop``, only points with at least ``rule.min_repeat`` samples are returned."""
    requests = {batch: sweep_request(executor.manifest.model, batch) for _, batch in group}
    for (key, batch), _ in itertools.product(group, range(warmup)):
        executor.infer(requests[batch], key, gather_timings=True)
    runs: list[list[list[PhaseTimes]]] = [[] for _ in group]
    energy: list[float | None] = [0.0 for _ in group]
    fell_back = [False for _ in group]
    stopped: list[str | None] = [None for _ in group]
    started = time.monotonic()
    while not stop.is_set() and any(s is None for s in stopped):
        for index, (key, batch) in enumerate(group):
            if stopped[index] is not None:
                continue
            meter.start()
            result = executor.infer(requests[batch], key, gather_timings=True)
            joules = meter.stop()
            energy[index] = None if joules is None or energy[index] is None else energy[index] + joules
            fell_back[index] |= result.fell_back
            runs[index].append(result.per_rank or [result.timings])
            # The budget is the group's: each point gets its share of the time the group has run.
            elapsed = (time.monotonic() - started) / len(group)
            stopped[index] = rule.verdict([run[0].total for run in runs[index]], elapsed)
    results = []
    for index, (key, batch) in enumerate(group):
        if stopped[index] is None and len(runs[index]) < rule.min_repeat:
            continue  # stopped early: fewer samples than asked for is not the point asked for
        measured = summarize_runs(key, batch, warmup, runs[index], fell_back[index], energy[index])
        results.append(replace(measured, samples=_sample_stats(runs[index], stopped[index] or "stopped"),
                               gflops_per_rank=tuple(chain_gflops(executor.manifest, key))))
    return results


def measure_points(engines: Path, group: GroupConfig, points: list[tuple[ChainKey, int]], out: Path,
                   threads: int = 1, warmup: int = 3, rule: SamplingRule | None = None, energy: str | None = None,
                   stop: threading.Event | None = None) -> int:
    """Join the group as rank 0, measure ``points`` (chain, batch) with a barrier before every
    collective, the points of each batch size interleaved (consecutive points of one batch form a
    group); append each result to ``out`` as its group lands; returns the number measured.

    Once ``stop`` is set, no new group is started; the one in progress stops sampling, its points
    with enough samples are written, then the workers are told to stop as at the end of the list."""
    stop = stop if stop is not None else threading.Event()
    rule = rule or SamplingRule()
    device = Manifest.read(rank_directory(engines)).backend.compute_device
    meter, meter_note = detect_meter(energy, device)
    executor = open_executor(engines, group, RuntimeOptions(threads=threads, profile_barrier=True))
    measured = 0
    try:
        for _, batch_points in itertools.groupby(points, key=lambda point: point[1]):
            if stop.is_set():
                break
            for result in measure_group(executor, list(batch_points), warmup, rule, meter, stop):
                if stop.is_set() and result.fell_back:
                    # Stopped under this point and it fell back to local: a worker was most likely
                    # stopped under it too (the whole session got the signal), so it is not the
                    # point asked for. A fallback without a stop is a real measurement and is kept.
                    continue
                line = {**result.to_dict(), "energy_meter": meter.name, "energy_note": meter_note}
                # One write of one whole line: the driver takes only complete lines as points.
                with open(out, "a") as stream:
                    stream.write(json.dumps(line) + "\n")
                measured += 1
    finally:
        executor.close()
        meter.close()
    return measured
