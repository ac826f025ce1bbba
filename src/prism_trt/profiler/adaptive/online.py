"""Online refinement of the performance map while ``serve --mode auto`` runs.

Three parts, each usable alone:

* :class:`OnlineCells` — per (chain, batch, bandwidth bucket) cell, an exponentially weighted
  median of the per-sample latencies the server measured, with a confidence bound from their
  spread. A median rather than a mean: one batch that waited on a busy core must not move the
  estimate much. Cells are keyed by a geometric bucket of the live bandwidth estimate, so what was
  observed at 200 Mbit/s never stands in for 900 Mbit/s; local cells ignore the network.
  Below ``min_count`` observations a cell only shrinks the prior (the map or the latency model)
  toward what it saw; from ``min_count`` on, the observations alone decide.
* :class:`BandwidthTracker` — the live link-rate estimate, in the map's scale. The executor's own
  estimate (bytes / time in the all-gathers) is not a link rate: small all-gathers are latency
  bound and skew sits in them, so it reads 20-2000 Mbit/s on a 900 Mbit/s link depending on chain
  and batch. Instead each distributed batch's measured network time (request broadcast + comm +
  wait) is matched against the latency model's request + transfer + skew terms for that chain and
  batch over a grid of rates.
  Waiting for a slower rank only ever adds time (the server runs without a barrier, so its comm
  holds that wait), so the estimate is the *highest* rate implied by the last few distributed
  batches: a loaded core cannot drag it down, a slower link does within ``bandwidth_window``
  batches, and a single explored batch on a faster link lifts it at once. While no distributed
  batch runs, the readings of rank 0's link probe (:mod:`prism_trt.runtime.link_probe`, a timed
  payload on the heartbeat) take their place in the same window: a server that went local on a
  slow link sees the link recover at the next probe.
* :class:`ExplorationPolicy` — now and then run an eligible candidate that is rarely chosen, if
  its predicted latency is within ``(1 + budget)`` of the best; a deterministic counter keeps the
  explored batches at most ``fraction`` of all batches, at every point in time. Exploration is
  what notices that a link got faster again while the selector runs locally (a local batch
  crosses no network, so it says nothing about the link) where no link probe runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ...core.chain_key import ChainKey, Mode
from ...engines.measured import PhaseTimes
from ...engines.perfmap import PerfPoint
from ...errors import UsageError
from .latency_model import LatencyModel


@dataclass(frozen=True)
class OnlineOptions:
    """Knobs of online refinement (the CLI's ``--explore-*`` flags set the last two)."""

    half_life: float = 8.0  # observations after which an old one weighs half as much as the newest
    window: int = 32  # observations kept per cell (older ones weigh < 1/16 at the default half-life)
    min_count: int = 3  # observations before a cell's estimate replaces the map/model prediction
    bucket_ratio: float = 1.5  # bandwidth buckets span a factor r, one centred on the map's top rate
    bandwidth_window: int = 5  # distributed batches whose implied rates the estimate takes the highest of
    explore_fraction: float = 0.05  # hard cap on the share of batches that explore
    explore_budget: float = 0.25  # explore only candidates predicted within (1 + budget) x the best

    def __post_init__(self) -> None:
        checks = [(self.half_life > 0, "half_life must be > 0"), (self.window >= 1, "window must be >= 1"),
                  (self.min_count >= 1, "min_count must be >= 1"),
                  (self.bucket_ratio > 1, "bucket_ratio must be > 1"),
                  (self.bandwidth_window >= 1, "bandwidth_window must be >= 1"),
                  (0 <= self.explore_fraction <= 0.5, "explore fraction must lie in [0, 0.5]"),
                  (self.explore_budget >= 0, "explore budget must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"online refinement: {message}")


def weighted_median(values: Iterable[float], weights: Iterable[float]) -> float:
    """The smallest value whose cumulative weight reaches half the total."""
    pairs = sorted(zip(values, weights))
    if not pairs:
        raise ValueError("weighted_median of nothing")
    half, running = sum(w for _, w in pairs) / 2, 0.0
    for value, weight in pairs:
        running += weight
        if running >= half:
            return value
    return pairs[-1][0]


@dataclass(frozen=True)
class CellEstimate:
    median_ms: float  # per sample
    half_width_ms: float  # ~95 % bound on the median from the weighted MAD and the effective count
    p90_ms: float  # per sample, of the observations kept (unweighted)
    stdev_ms: float  # per sample, of the observations kept (unweighted)
    count: int  # observations ever made in the cell
    phases: PhaseTimes  # the newest observation's rank-0 phases (ms, whole batch), for the saved map
    bandwidth_mbit: float | None  # the live estimate when the newest observation was made


class EwMedian:
    """Exponentially weighted median of the last ``window`` observations."""

    def __init__(self, half_life: float, window: int):
        self.decay = 0.5 ** (1.0 / half_life)
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.count += 1

    def estimate(self) -> tuple[float, float]:
        """(median, half-width of its ~95 % confidence bound)."""
        weights = [self.decay ** age for age in range(len(self.values) - 1, -1, -1)]
        median = weighted_median(self.values, weights)
        mad = weighted_median([abs(v - median) for v in self.values], weights)
        effective = sum(weights) ** 2 / sum(w * w for w in weights)
        # 1.4826 MAD estimates sigma for normal data; the median's standard error is ~1.25 sigma / sqrt(n)
        return median, 1.96 * 1.25 * 1.4826 * mad / math.sqrt(effective)


CellKey = tuple[ChainKey, int, int | None]


class OnlineCells:
    """The online estimates, per (chain, batch, bandwidth bucket). Buckets are centred on
    ``anchor`` x r^k (the map's top rate), so a rate the map measured sits mid-bucket and a live
    estimate a few percent off it still lands with it."""

    def __init__(self, options: OnlineOptions, anchor: float | None = None):
        self.options, self.anchor = options, anchor or 1.0
        self._cells: dict[CellKey, tuple[EwMedian, PhaseTimes, float | None]] = {}

    def bucket(self, key: ChainKey, bandwidth: float | None) -> int | None:
        """Local chains and unknown rates have no bucket; others round(log_r(bandwidth / anchor))."""
        if key.mode == Mode.LOCAL or not bandwidth:
            return None
        return round(math.log(bandwidth / self.anchor) / math.log(self.options.bucket_ratio))

    def key(self, chain: ChainKey, batch: int, bandwidth: float | None) -> CellKey:
        return chain, int(batch), self.bucket(chain, bandwidth)

    def observe(self, chain: ChainKey, batch: int, bandwidth: float | None, timings: PhaseTimes) -> None:
        cell = self.key(chain, batch, bandwidth)
        median = self._cells.get(cell, (EwMedian(self.options.half_life, self.options.window),))[0]
        median.add(timings.total / batch)
        self._cells[cell] = (median, timings, bandwidth)

    def estimate(self, chain: ChainKey, batch: int, bandwidth: float | None) -> CellEstimate | None:
        return self._estimate(self.key(chain, batch, bandwidth))

    def _estimate(self, cell: CellKey) -> CellEstimate | None:
        found = self._cells.get(cell)
        if found is None:
            return None
        median, phases, rate = found
        value, half_width = median.estimate()
        kept = np.asarray(median.values)
        return CellEstimate(value, half_width, float(np.percentile(kept, 90)), float(kept.std(ddof=1)) if kept.size > 1
                            else 0.0, median.count, phases, rate)

    def count(self, chain: ChainKey, batch: int, bandwidth: float | None) -> int:
        found = self._cells.get(self.key(chain, batch, bandwidth))
        return 0 if found is None else found[0].count

    def refine(self, prior_ms: float | None, chain: ChainKey, batch: int, bandwidth: float | None
               ) -> tuple[float | None, str]:
        """The cell's estimate blended with the prior: weight count / min_count on the observations,
        all of it from ``min_count`` on. Returns (per-sample ms, source)."""
        cell = self.estimate(chain, batch, bandwidth)
        if cell is None:
            return prior_ms, "prior"
        share = min(1.0, cell.count / self.options.min_count)
        if prior_ms is None or share >= 1.0:
            return cell.median_ms, "online"
        return share * cell.median_ms + (1 - share) * prior_ms, f"prior+online({cell.count})"

    def cells(self) -> list[tuple[CellKey, CellEstimate]]:
        """Every cell observed so far, with its estimate."""
        return [(cell, self._estimate(cell)) for cell in self._cells]


class BandwidthTracker:
    """The link rate (the map's measured-goodput scale, Mbit/s) that explains the network time of
    the distributed batches, through the latency model; see the module docstring."""

    GRID_POINTS = 64
    MIN_SENSITIVITY = 1.2  # a chain/batch whose network time varies less than this over the map's rates is ignored

    def __init__(self, model: LatencyModel, templates: dict[ChainKey, PerfPoint], rates: list[float],
                 window: int, initial: float | None, widen: float = 1.5):
        if not rates:
            raise UsageError("the performance map has no distributed point with a link rate to track bandwidth from")
        self.model, self.templates = model, templates
        self.low, self.high = min(rates), max(rates)
        self.grid = np.geomspace(self.low / 4, self.high * 4, self.GRID_POINTS)
        # beyond the profiled rates the model extrapolates: hold the estimate within one bucket of them
        self.floor, self.ceiling = self.low / widen, self.high * widen
        self.implied: deque[float] = deque(maxlen=window)
        self.initial = initial if initial is not None else self.high  # optimistic: the first batches tell
        self.updates = 0
        self._curves: dict[tuple[ChainKey, int], np.ndarray | None] = {}

    @property
    def estimate(self) -> float:
        return max(self.implied) if self.implied else self.initial

    def _curve(self, chain: ChainKey, batch: int) -> np.ndarray | None:
        """Predicted request + transfer + skew (ms) over the grid; None when it barely depends on the rate."""
        cached = (chain, batch)
        if cached not in self._curves:
            template = self.templates[chain]
            curve = np.array([self.network_ms(template, rate, batch) for rate in self.grid])
            inside = curve[(self.grid >= self.low) & (self.grid <= self.high)]
            sensitive = inside.size > 1 and inside.min() > 0 and inside.max() / inside.min() >= self.MIN_SENSITIVITY
            self._curves[cached] = curve if sensitive else None
        return self._curves[cached]

    def network_ms(self, template: PerfPoint, rate: float, batch: int) -> float:
        terms = self.model.predict_point(template, rate, batch)
        return terms["request"] + terms["transfer"] + terms["skew"]

    def update(self, chain: ChainKey, batch: int, timings: PhaseTimes) -> float | None:
        """Fold one distributed batch in; returns the rate it implied (None: it could not tell)."""
        # without a barrier, comm holds the skew too; the request broadcast (the batch's bytes at the
        # link's rate) is the clearest reading of the three, even on a single explored batch
        observed = timings.request + timings.comm + (timings.wait or 0.0)
        curve = None if chain not in self.templates or observed <= 0 else self._curve(chain, batch)
        if curve is None:
            return None
        valid = curve > 0
        misfit = np.where(valid, np.abs(np.log(np.where(valid, curve, 1.0)) - math.log(observed)), np.inf)
        return self.observe_rate(float(self.grid[int(np.argmin(misfit))]))

    def observe_rate(self, mbit: float) -> float:
        """Fold in a rate read directly off the link (a probe's goodput, Mbit/s); returns it as kept."""
        implied = min(self.ceiling, max(self.floor, float(mbit)))
        self.implied.append(implied)
        self.updates += 1
        return implied


@dataclass(frozen=True)
class Option:
    """What the exploration policy needs to know about one candidate."""

    choice: ChainKey
    per_sample_ms: float
    observations: int  # in the cell it would run in now


class ExplorationPolicy:
    """Deterministic, bounded exploration; see the module docstring. ``pick`` is asked once per
    batch; ``explored <= fraction x batches`` holds after every batch."""

    def __init__(self, fraction: float, budget: float):
        self.fraction, self.budget = fraction, budget
        self.batches = 0
        self.explored = 0

    def pick(self, best: Option, others: list[Option]) -> Option | None:
        """Count one batch; return the candidate to explore instead of ``best``, or None.

        ``others`` must hold only eligible candidates (the agreement floor already applied).
        Among those within budget, the one observed least here is explored, then the fastest."""
        self.batches += 1
        if self.explored + 1 > self.fraction * self.batches:
            return None
        limit = (1 + self.budget) * best.per_sample_ms
        within = [o for o in others if o.choice != best.choice and o.per_sample_ms <= limit]
        if not within:
            return None
        self.explored += 1
        return min(within, key=lambda o: (o.observations, o.per_sample_ms))


def templates_by_chain(points: list[PerfPoint]) -> dict[ChainKey, PerfPoint]:
    """One measured point per distributed chain (its plan: collectives, bytes per sample, FLOPs),
    the largest batch at the highest rate, to predict that chain anywhere."""
    best: dict[ChainKey, PerfPoint] = {}
    for point in points:
        if point.mode != Mode.LOCAL and (point.key not in best
                                         or _template_rank(point) > _template_rank(best[point.key])):
            best[point.key] = point
    return best


def _template_rank(point: PerfPoint) -> tuple[int, float]:
    return point.batch, point.bandwidth or 0.0
