"""The adaptive selector: local or distributed, at which CR, for a batch size and bandwidth.

Exact map hits use the measurement; other points are predicted by the latency model. Prism CRs
whose agreement with the local model (measured at profile time) is below ``min_agreement`` are
never chosen. ``decide`` also says why every other candidate lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engines.chain_key import ChainKey
from ...engines.perfmap import PerfMap, PerfPoint
from ...errors import PrismError, UsageError
from ...runtime.api import Executor
from .latency_model import LatencyModel


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

    def explain(self) -> str:
        lines = [f"chosen: {self.choice.label} ({self.best.source}: {self.best.per_sample_ms:.2f} ms/sample"
                 + (f", {self.best.energy_per_sample_j:.4f} J/sample" if self.best.energy_per_sample_j is not None
                    else ", energy n/a") + f"; objective {self.objective})"]
        for c in self.candidates:
            if c is self.best:
                continue
            value = "n/a" if c.per_sample_ms is None else f"{c.per_sample_ms:.2f} ms/sample"
            lines.append(f"  {c.choice.label}: {c.rejected or 'slower' if self.objective == 'latency' else c.rejected or 'more energy'}"
                         f" ({value}, {c.source})")
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
            return Candidate(key, hit.latency["per_sample_ms"], hit.energy_per_sample_j, "measured")
        predicted = self.model.predict_point(self._nearest(key, bandwidth), bandwidth, batch)
        return Candidate(key, predicted["total"] / batch, None, "model")

    def decide(self, batch: int, bandwidth: float | None = None) -> Decision:
        bandwidth = self.bandwidth if bandwidth is None else bandwidth
        candidates = []
        if not self.data.points:
            raise NoCandidate("the performance map has no measured points; run `prism-trt profile` to fill it")
        for choice in self.data.chains():
            candidate = self.candidate(choice, batch, bandwidth)
            if choice.mode == "prism":
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


class LiveSelector:
    """The server's ``--mode auto``: a MapSelector fed the executor's current bandwidth estimate.

    Every chain the map may choose must be loaded by the executor: checked here, at start-up,
    rather than failing every batch later."""

    def __init__(self, selector: MapSelector, executor: Executor):
        self.selector, self.executor = selector, executor
        missing = [key.label for key in selector.data.chains() if key not in executor.chains()]
        if missing:
            raise UsageError(f"the performance map measured chains that are not loaded here: {', '.join(missing)} "
                             f"(loaded: {', '.join(k.label for k in executor.chains())})")

    def choose(self, batch: int) -> ChainKey:
        bandwidth = self.executor.bandwidth_mbit or self.selector.bandwidth
        return self.selector.decide(batch, bandwidth).choice
