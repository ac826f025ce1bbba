"""The adaptive selector: local or distributed, at which CR, for a batch size and bandwidth.

Exact map hits use the measurement; other points are predicted by the latency model. Prism CRs
whose agreement with the local model (measured at profile time) is below ``min_agreement`` are
never chosen. ``decide`` also says why every other candidate lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.api import Choice
from . import perfmap
from .latency_model import LatencyModel


@dataclass
class Candidate:
    choice: Choice
    per_sample_ms: float | None
    energy_per_sample_j: float | None
    source: str  # "measured" or "model"
    rejected: str = ""


@dataclass
class Decision:
    choice: Choice
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

    def __init__(self, data: dict, objective: str = "latency", min_agreement: float = 0.99,
                 bandwidth: float | None = None):
        if objective not in ("latency", "energy"):
            raise ValueError(f"objective must be latency or energy, got {objective!r}")
        self.data, self.objective, self.min_agreement, self.bandwidth = data, objective, min_agreement, bandwidth
        self.model = LatencyModel.fit(data["points"])
        self.ranks = data["metadata"]["ranks"]

    def agreement(self, cr: float) -> float | None:
        for entry in self.data["accuracy"]:
            if entry["ranks"] == self.ranks and abs(entry["cr"] - cr) < 1e-3 * cr:
                return entry["agreement"]
        return None

    def _chains(self) -> list[Choice]:
        seen = {}
        for point in self.data["points"]:
            choice = Choice(point["mode"], point.get("cr") if point["mode"] == "prism" else None)
            seen[choice.label] = choice
        return list(seen.values())

    def _nearest(self, choice: Choice, bandwidth: float | None) -> dict:
        same = [p for p in self.data["points"] if p["mode"] == choice.mode and
                (choice.mode != "prism" or abs(p["cr"] - choice.cr) < 1e-6)]
        return min(same, key=lambda p: (abs((p.get("bandwidth_mbit") or 0) - (bandwidth or 0)), p["batch"]))

    def candidate(self, choice: Choice, batch: int, bandwidth: float | None) -> Candidate:
        hit = perfmap.find_point(self.data, choice.mode, choice.cr, batch, bandwidth)
        if hit is not None:
            return Candidate(choice, hit["latency"]["per_sample_ms"], hit.get("energy_per_sample_j"), "measured")
        predicted = self.model.predict_point(self._nearest(choice, bandwidth), bandwidth, batch)
        return Candidate(choice, predicted["total"] / batch, None, "model")

    def decide(self, batch: int, bandwidth: float | None = None) -> Decision:
        bandwidth = self.bandwidth if bandwidth is None else bandwidth
        candidates = []
        for choice in self._chains():
            candidate = self.candidate(choice, batch, bandwidth)
            if choice.mode == "prism":
                agreement = self.agreement(choice.cr)
                if agreement is None and self.min_agreement > 0:
                    candidate.rejected = "agreement with the local model was not measured"
                elif agreement is not None and agreement < self.min_agreement:
                    candidate.rejected = f"agreement {agreement:.4f} < min {self.min_agreement}"
            if self.objective == "energy" and candidate.energy_per_sample_j is None and not candidate.rejected:
                candidate.rejected = "energy not measured for this point"
            candidates.append(candidate)
        eligible = [c for c in candidates if not c.rejected]
        if not eligible:
            raise ValueError("no candidate qualifies: " + "; ".join(f"{c.choice.label}: {c.rejected}"
                                                                   for c in candidates))
        key = (lambda c: c.per_sample_ms) if self.objective == "latency" else (lambda c: c.energy_per_sample_j)
        best = min(eligible, key=key)
        return Decision(best.choice, self.objective, best, candidates)

    def choose(self, batch: int) -> Choice:
        return self.decide(batch).choice


class LiveSelector:
    """The server's ``--mode auto``: a MapSelector fed the executor's current bandwidth estimate."""

    def __init__(self, selector: MapSelector, executor):
        self.selector, self.executor = selector, executor

    def choose(self, batch: int) -> Choice:
        bandwidth = getattr(self.executor, "bandwidth_mbit", None) or self.selector.bandwidth
        return self.selector.decide(batch, bandwidth).choice
