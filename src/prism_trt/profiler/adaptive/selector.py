"""The adaptive selector: local or distributed, at which CR, for a batch size and bandwidth.

Exact map hits use the measurement; other points are predicted by the latency model. Prism CRs
whose agreement with the local model (measured at profile time) is below ``min_agreement`` are
never chosen. ``decide`` also says why every other candidate lost. :class:`OnlineSelector` (the
server's ``--mode auto``) refines those predictions with what the server measures (see
:mod:`.online`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...core.chain_key import ChainKey, Mode
from ...engines.measured import LatencyStats, OnlineStats
from ...engines.perfmap import PerfMap, PerfPoint
from ...errors import PrismError, UsageError
from ...runtime.api import Executor, InferenceResult, Observation
from .latency_model import LatencyModel
from .online import BandwidthTracker, ExplorationPolicy, OnlineCells, OnlineOptions, Option, templates_by_chain

log = logging.getLogger(__name__)


class NoCandidate(PrismError, ValueError):
    """Nothing in the map may be chosen for the batch (none measured, or every one rejected)."""


@dataclass
class Candidate:
    choice: ChainKey
    per_sample_ms: float | None
    energy_per_sample_j: float | None
    source: str  # "measured" or "model"
    rejected: str = ""


@dataclass
class Decision:
    choice: ChainKey
    objective: str
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    explored: bool = False  # chosen by the online selector's exploration, not as the predicted best

    def explain(self) -> str:
        lines = [f"chosen: {self.choice.label} ({self.best.source}: {self.best.per_sample_ms:.2f} ms/sample"
                 + (f", {self.best.energy_per_sample_j:.4f} J/sample" if self.best.energy_per_sample_j is not None
                    else ", energy n/a") + f"; objective {self.objective})"]
        for c in self.candidates:
            if c is self.best:
                continue
            value = "n/a" if c.per_sample_ms is None else f"{c.per_sample_ms:.2f} ms/sample"
            lost = c.rejected or ("slower" if self.objective == "latency" else "more energy")
            lines.append(f"  {c.choice.label}: {lost} ({value}, {c.source})")
        return "\n".join(lines)


class MapSelector:
    """Implements the runtime's Selector interface (``choose(batch)``) from a performance map."""

    def __init__(self, data: PerfMap, objective: str = "latency", min_agreement: float = 0.99,
                 bandwidth: float | None = None):
        if objective not in ("latency", "energy"):
            raise UsageError(f"objective must be latency or energy, got {objective!r}")
        self.data, self.objective, self.min_agreement, self.bandwidth = data, objective, min_agreement, bandwidth
        self.model = LatencyModel.fit(data.points)

    def _nearest(self, key: ChainKey, bandwidth: float | None) -> PerfPoint:
        same = [p for p in self.data.points if p.key == key]
        return min(same, key=lambda p: (abs((p.bandwidth_mbit or 0) - (bandwidth or 0)), p.batch))

    def candidate(self, key: ChainKey, batch: int, bandwidth: float | None) -> Candidate:
        hit = self.data.find(key, batch, bandwidth)
        if hit is not None:
            return Candidate(key, hit.latency.per_sample_ms, hit.energy_per_sample_j, "measured")
        predicted = self.model.predict_point(self._nearest(key, bandwidth), bandwidth, batch)
        return Candidate(key, predicted["total"] / batch, None, "model")

    def decide(self, batch: int, bandwidth: float | None = None) -> Decision:
        bandwidth = self.bandwidth if bandwidth is None else bandwidth
        candidates = []
        if not self.data.points:
            raise NoCandidate("the performance map has no measured points; run `prism-trt profile` to fill it")
        for choice in self.data.chains():
            candidate = self.candidate(choice, batch, bandwidth)
            if choice.mode == Mode.PRISM:
                agreement = self.data.agreement(choice)
                if agreement is None and self.min_agreement > 0:
                    candidate.rejected = "agreement with the local model was not measured"
                elif agreement is not None and agreement < self.min_agreement:
                    candidate.rejected = f"agreement {agreement:.4f} < min {self.min_agreement}"
            if self.objective == "energy" and candidate.energy_per_sample_j is None and not candidate.rejected:
                candidate.rejected = "energy not measured for this point"
            candidates.append(candidate)
        eligible = [c for c in candidates if not c.rejected]
        if not eligible:
            raise NoCandidate("no candidate qualifies: " + "; ".join(f"{c.choice.label}: {c.rejected}"
                                                                   for c in candidates))
        key = (lambda c: c.per_sample_ms) if self.objective == "latency" else (lambda c: c.energy_per_sample_j)
        best = min(eligible, key=key)
        return Decision(best.choice, self.objective, best, candidates)

    def choose(self, batch: int) -> ChainKey:
        return self.decide(batch).choice


def check_loaded(data: PerfMap, executor: Executor) -> None:
    """Every chain the map may choose must be loaded by the executor: checked at start-up rather
    than failing every batch later."""
    missing = [key.label for key in data.chains() if key not in executor.chains()]
    if missing:
        raise UsageError(f"the performance map measured chains that are not loaded here: {', '.join(missing)} "
                         f"(loaded: {', '.join(k.label for k in executor.chains())})")


class LiveSelector:
    """The server's ``--mode auto --no-online``: a MapSelector fed the executor's bandwidth estimate."""

    def __init__(self, selector: MapSelector, executor: Executor):
        self.selector, self.executor = selector, executor
        check_loaded(selector.data, executor)

    def choose(self, batch: int) -> ChainKey:
        bandwidth = self.executor.bandwidth_mbit or self.selector.bandwidth
        return self.selector.decide(batch, bandwidth).choice


@dataclass(frozen=True)
class _Chosen:
    choice: ChainKey
    batch: int
    predicted_ms: float | None
    explored: bool


class OnlineSelector:
    """The server's ``--mode auto``: the map's choice, refined online (see :mod:`.online`).

    Per batch: predict every chain at the live link-rate estimate (the map's measurement when it
    has one in that rate's bucket, else the latency model), blend in what this bucket has observed,
    drop what the agreement floor rejects, pick the fastest, and now and then explore. ``observe``
    folds the batch's measured phases into its cell and the bandwidth estimate. ``choose`` and
    ``observe`` run on the server's inference thread; ``save`` may run on another, hence the lock.
    """

    def __init__(self, selector: MapSelector, executor: Executor, options: OnlineOptions | None = None,
                 save_path: Path | None = None, save_every: int = 0):
        if selector.objective != "latency":
            raise UsageError("online refinement learns latency only; use --no-online with --objective energy")
        if save_every < 0:
            raise UsageError(f"save_every must be >= 0 batches, got {save_every}")
        check_loaded(selector.data, executor)
        self.executor, self.selector, self.options = executor, selector, options or OnlineOptions()
        rates = [p.bandwidth for p in selector.data.points if p.mode != Mode.LOCAL and p.bandwidth]
        self.cells = OnlineCells(self.options, max(rates, default=None))
        self.tracker = None if not rates else BandwidthTracker(
            selector.model, templates_by_chain(selector.data.points), rates, self.options.bandwidth_window,
            selector.bandwidth, self.options.bucket_ratio)
        self.policy = ExplorationPolicy(self.options.explore_fraction, self.options.explore_budget)
        self.save_path, self.save_every = save_path, save_every
        # The map was measured on the rank directory's own (longest) sequence length: a batch that
        # ran on a shorter sequence bucket costs less and would teach the cells a wrong latency.
        self.sequence_length = executor.manifest.model.sequence_length
        self.observed = 0
        self.probes_folded = 0  # the count of the newest link probe reading folded into the tracker
        self._chosen: _Chosen | None = None
        self._lock = threading.Lock()

    @property
    def bandwidth_mbit(self) -> float | None:
        """The live link-rate estimate (the map's measured-goodput scale), None without a network."""
        return None if self.tracker is None else self.tracker.estimate

    def _map_point(self, key: ChainKey, batch: int, bandwidth: float | None) -> PerfPoint | None:
        """The map's measurement of ``key`` at ``batch`` in the bucket of ``bandwidth`` (nearest rate)."""
        bucket = self.cells.bucket(key, bandwidth)
        same = [p for p in self.selector.data.points
                if p.key == key and p.batch == batch and self.cells.bucket(key, p.bandwidth) == bucket]
        return min(same, key=lambda p: abs(math.log((p.bandwidth or 1.0) / (bandwidth or 1.0))), default=None)

    def _fold_link_probe(self) -> None:
        """The executor's newest link probe reading, if not yet seen, joins the tracker's window."""
        probe = self.executor.link_probe
        if probe is not None and self.tracker is not None and probe.count > self.probes_folded:
            self.probes_folded = probe.count
            self.tracker.observe_rate(probe.mbit)

    def decide(self, batch: int) -> Decision:
        """Choose for ``batch`` (and count it for exploration); candidates carry the refined predictions."""
        self._fold_link_probe()
        bandwidth = self.bandwidth_mbit
        # the MapSelector applies the agreement floor and gives the model's prediction at the live rate
        base = self.selector.decide(batch, bandwidth)
        for candidate in base.candidates:
            point = self._map_point(candidate.choice, batch, bandwidth)
            if point is not None:
                candidate.per_sample_ms, candidate.source = point.latency.per_sample_ms, "measured"
            refined, source = self.cells.refine(candidate.per_sample_ms, candidate.choice, batch, bandwidth)
            candidate.per_sample_ms = refined
            candidate.source = candidate.source if source == "prior" else source
        eligible = [c for c in base.candidates if not c.rejected and c.per_sample_ms is not None]
        best = min(eligible, key=lambda c: c.per_sample_ms)
        options = {c.choice: Option(c.choice, c.per_sample_ms, self.cells.count(c.choice, batch, bandwidth))
                   for c in eligible}
        explore = self.policy.pick(options[best.choice], list(options.values()))
        chosen = best if explore is None else next(c for c in eligible if c.choice == explore.choice)
        return Decision(chosen.choice, "latency", chosen, base.candidates, explored=explore is not None)

    def choose(self, batch: int) -> ChainKey:
        with self._lock:
            decision = self.decide(batch)
            self._chosen = _Chosen(decision.choice, batch, decision.best.per_sample_ms, decision.explored)
        return decision.choice

    def observe(self, batch: int, result: InferenceResult) -> Observation | None:
        """Fold one served batch in; what it made of it, for the metrics (None: nothing measured)."""
        timings = result.timings
        if batch < 1 or not timings.total > 0:
            return None
        with self._lock:
            chosen, self._chosen = self._chosen, None
            if result.sequence_length != self.sequence_length:  # a shorter sequence bucket: not the map's cost
                return None
            ran = result.choice  # local after a fallback: a real local measurement all the same
            if ran.mode != Mode.LOCAL and not result.fell_back and self.tracker is not None:
                self.tracker.update(ran, batch, timings)
            bandwidth = self.bandwidth_mbit
            self.cells.observe(ran, batch, bandwidth, timings)
            self.observed += 1
            matched = chosen is not None and chosen.choice == ran and chosen.batch == batch
            observation = Observation(ran.label, timings.total / batch, chosen.predicted_ms if matched else None,
                                      matched and chosen.explored, bandwidth)
            due = bool(self.save_path and self.save_every and self.observed % self.save_every == 0)
        if due:
            self.save()
        return observation

    def refined_map(self) -> PerfMap:
        """The map with every cell that has at least ``min_count`` observations as an online point:
        it replaces the map's point in the same bucket, or joins it at the live rate. Same engines
        binding (metadata) as the map it refines."""
        with self._lock:
            data = self.selector.data
            refined = PerfMap({**data.metadata, "refined_online": {
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "batches_observed": self.observed,
                "batches_explored": self.policy.explored, "bandwidth_estimate_mbit": self.bandwidth_mbit}},
                list(data.accuracy), list(data.points))
            templates = {p.key: p for p in data.points}
            for (chain, batch, _), cell in self.cells.cells():
                if cell.count < self.options.min_count:
                    continue
                replaced = self._map_point(chain, batch, cell.bandwidth_mbit)
                total = cell.median_ms * batch
                gflops = templates[chain].gflops_per_rank if chain in templates else None
                rate = cell.bandwidth_mbit
                label = replaced.bandwidth_mbit if replaced is not None else (round(rate, 1) if rate else None)
                refined.upsert(PerfPoint(
                    chain, batch, label,
                    LatencyStats(total, total, cell.p90_ms * batch, cell.stdev_ms * batch, cell.median_ms),
                    # rank 0's phases only: the server does not gather the other ranks'
                    [replace(cell.phases)],
                    measured_mbit=None if chain.mode == Mode.LOCAL else rate,
                    gflops_per_rank=gflops[:1] if gflops else None,
                    online=OnlineStats(cell.count, cell.half_width_ms, time.strftime("%Y-%m-%dT%H:%M:%S%z"))))
        return refined

    def save(self, path: Path | None = None) -> Path | None:
        """Write the refined map (checked, atomically) to ``path`` or the configured ``save_path``."""
        target = path or self.save_path
        if target is None:
            return None
        self.refined_map().save(Path(target))
        log.info("refined performance map written to %s (%d batches observed)", target, self.observed)
        return Path(target)
