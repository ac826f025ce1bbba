"""Latency model in the style of seed 004, with the skew between ranks as a term of its own.

Rank 0's request latency is modelled as the sum of six terms, each fitted by least squares on its
own measured phase (ms):

    request(B)          = p0 + p1 * B + p2 * max(0, R - k) / goodput     sending the ranks their shares

    compute_r(chain, B) = a_chain + s_group * B * G_r      G_r: GFLOPs per sample of rank r's plan
    staging(bytes, n)   = s0 * n + bytes / copy_bw         D2H + H2D: per-collective cost + bytes
    transfer(bytes, n)  = t0 * n + t1 * n / goodput + t2 * bytes
                          + t3 * n * max(0, (bytes / n) * 8 / goodput - tau)
    skew                = k_s * n * E[max(0, D + sigma Z)] + w0 * n + w1 * n / goodput
                          + r * min(B * q, cap) * 8 / goodput                wait for the slowest rank
    other(B)            = o0 + o1 * B                      per mode group (local / distributed)

Compute: ``s_group`` is the inverse of the measured throughput (ms per GFLOP), one for rank 0
alone (local) and one for the ranks of a distributed chain, which compute at the same time and
share the host's cores, caches and memory bandwidth (measured on the 2-core testbed: ~12 ms/GFLOP
alone, ~17-20 with both ranks busy). Within a group the plan's FLOPs carry the compute across
chains, batches and ranks; ``a_chain`` is the chain's fixed cost. A map without FLOPs (written
before they were recorded) falls back to G_r = 1 with a slope per chain.

Transfer: a shaper (tbf) or a switch lets a burst of each collective through at line rate, so
the first ``tau`` ms worth of bytes of a collective cost nothing; ``tau`` is searched on a grid
(0 recovers the plain linear model). Without it, small collectives (Prism's means) were predicted
to cost bytes / goodput they never paid.

Skew: before each of the n collectives rank 0 waits for the slowest rank. Per block the slowest
other rank r arrives D = (compute_r - compute_0) / n later on average, with a spread sigma =
sqrt(sigma_0^2 + sigma_r^2) / sqrt(n) from the ranks' measured compute jitter (per-inference sigma
from the MAD); the expected wait of a normal difference is sigma phi(D/sigma) + D Phi(D/sigma).
The plan's imbalance (D) and the jitter (sigma) are both predicted for an unmeasured point: D from
the compute model, sigma as the fitted share of compute (median jitter / compute of the sweep).
Request: R is the request's bytes rank 0 sent the other ranks for the point (each rank's own
share, counted as it ran: PhaseTimes.request_bytes; for a map measured before the count, B * q
with q the request bytes per sample). Sending returns once the bytes are in the socket buffers, so
it costs almost nothing until the request outgrows them (``k`` bytes, searched on a grid): beyond
that, the excess at the goodput (measured on the testbed when the whole batch was broadcast: ~1 ms
up to 4 images of 588 KB, then 52 ms at 16 images and 900 Mbit/s, 272 ms at 200).

What the buffers held is still on its way when rank 0 reaches the first barrier, so it lands in
skew: the worker is still receiving the last ``min(R, cap)`` bytes (cap: what the buffers hold,
searched on a grid). With R known in bytes (counted, or q from the engines:
:func:`request_bytes_per_sample`) that wait is the bytes' time at the goodput; unknown, q is one
unit per sample, exact within one model and wrong across input sizes.

bytes is what rank 0 sends + receives, goodput the measured link rate (Mbit/s; the configured
rate when unmeasured). Loopback points (no rate) fit the rate-free coefficients alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ...core.chain_key import ChainKey, Mode
from ...engines.perfmap import PerfPoint
from ...errors import UsageError

if TYPE_CHECKING:
    from ...engines.manifest import Manifest

TERMS = ("request", "compute", "staging", "transfer", "skew", "other")
DEFAULT_JITTER_SHARE = 0.02  # compute jitter / compute when a map has no samples to measure it
KNEE_STEPS = 40  # grid points for tau and cap: the SSE is flat near its minimum, finer changes nothing


def _inv_bw(bandwidth: float | None) -> float:
    """ms per byte at ``bandwidth`` Mbit/s (0 on unshaped loopback)."""
    return 0.0 if not bandwidth else 8.0 / (float(bandwidth) * 1e3)


def _gflops(point: PerfPoint) -> list[float]:
    return point.gflops_per_rank or [1.0] * len(point.per_rank)


def _jitter(point: PerfPoint) -> list[float] | None:
    """Each rank's per-inference compute sigma (ms): measured, else None."""
    return None if point.samples is None else list(point.samples.compute_sigma_ms)


def request_bytes_per_sample(manifest: Manifest) -> float:
    """Bytes per sample of a whole request (images, or ids and mask) of a build, as its inputs are
    declared: what rank 0 broadcast to every worker before each rank was sent only its share, so
    the request size of a map measured before the shares were counted."""
    return float(sum(math.prod(t.concrete(1)) * np.dtype(t.dtype).itemsize for t in manifest.model.request_inputs()))


def request_load(point: PerfPoint, per_sample: float) -> float:
    """R: the request bytes rank 0 sent the other ranks for ``point``, as counted while it ran (the
    shares it sent), else (a map measured before the count) the batch x ``per_sample``."""
    counted = point.per_rank[0].request_bytes
    return float(counted) if counted else point.batch * per_sample


def measured_terms(point: PerfPoint) -> dict[str, float]:
    """Rank 0's measured phases grouped as the model's terms, and the total (mean latency)."""
    rank0 = point.per_rank[0]
    return {"request": rank0.phase("request"), "compute": rank0.compute, "staging": rank0.staging,
            "transfer": rank0.phase("comm"), "skew": rank0.phase("wait"), "other": rank0.phase("other"),
            "total": point.latency.mean_ms}


def _plan(point: PerfPoint) -> dict:
    rank0 = point.per_rank[0]
    return {"n": rank0.collectives, "bytes": rank0.bytes_sent + rank0.bytes_received}


def expected_wait(compute: list[float], sigma: list[float], collectives: int) -> float:
    """n * E[max(0, D + sigma Z)] for rank 0 against the slowest other rank (see the module)."""
    if collectives <= 0 or len(compute) < 2:
        return 0.0
    worst = 0.0
    for rank in range(1, len(compute)):
        delta = (compute[rank] - compute[0]) / collectives
        spread = math.sqrt(sigma[0] ** 2 + sigma[rank] ** 2) / math.sqrt(collectives)
        if spread <= 0:
            wait = max(0.0, delta)
        else:
            z = delta / spread
            density = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
            wait = spread * density + delta * 0.5 * (1 + math.erf(z / math.sqrt(2)))
        worst = max(worst, wait)
    return collectives * worst


def _lstsq(rows: list[list[float]], targets: list[float], width: int) -> np.ndarray:
    if not rows:
        return np.zeros(width)
    coef, *_ = np.linalg.lstsq(np.asarray(rows, dtype=float), np.asarray(targets, dtype=float), rcond=None)
    return coef


def _knee_fit(candidates: list[float], problem: Callable[[float], tuple[list[list[float]], list[float]]],
              width: int, physical: Callable[[np.ndarray], bool] | None = None) -> tuple[float, np.ndarray]:
    """The candidate knee whose least-squares fit (``problem(knee)``: rows and targets) leaves the
    smallest squared error, and that fit. Candidates come simplest first; a later one must do
    clearly better (not by rounding) to win. ``physical``: fits it refuses (a negative rate, say)
    lose to any it accepts; the first candidate must give an accepted fit."""
    best: tuple[float, np.ndarray, float] | None = None
    for knee in candidates:
        design, targets = problem(knee)
        coef = _lstsq(design, targets, width)
        if best is not None and physical is not None and not physical(coef):
            continue
        residual = np.asarray(design, dtype=float) @ coef - np.asarray(targets, dtype=float) if design else np.zeros(0)
        sse = float(np.sum(residual ** 2))
        if best is None or sse < best[2] * (1 - 1e-9):
            best = (knee, coef, sse)
    assert best is not None
    return best[0], best[1]


def _staging_row(plan: dict) -> list[float]:
    return [plan["n"], plan["bytes"]]


def _transfer_row(plan: dict, inv_bw: float, tau: float) -> list[float]:
    n = plan["n"]
    per_collective = plan["bytes"] / n * inv_bw if n else 0.0
    return [n, n * inv_bw, plan["bytes"], n * max(0.0, per_collective - tau)]


@dataclass
class LatencyModel:
    chains: list[ChainKey]  # order of the compute intercepts
    compute_coef: np.ndarray  # [a_chain..., s_local, s_distributed] or, without FLOPs, [a_chain..., s_chain...]
    per_chain_slope: bool
    staging: np.ndarray
    transfer: np.ndarray  # (t0, t1, t2, t3) of the module's formula
    request: np.ndarray  # (p0, p1, p2): the request broadcast of a distributed chain
    skew: np.ndarray  # (k_s, w0, w1)
    other: dict[bool, np.ndarray]  # distributed? -> (o0, o1)
    jitter_share: float
    burst_ms: float = 0.0  # tau: a collective's transfer time the link lets through at line rate
    request_lag: float = 0.0  # r: share of the buffered request bytes' transfer time paid at the first barrier
    request_cap: float = math.inf  # bytes of the request broadcast the socket buffers hold
    request_bytes: float = 1.0  # q: request bytes per sample where a point has no count (1 unit when unknown)
    request_knee: float = 0.0  # k: request bytes the broadcast hands to the socket buffers without waiting

    # -- fitting -----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, points: list[PerfPoint], request_bytes: float | None = None) -> LatencyModel:
        """Fit every term on ``points``; ``request_bytes``: bytes per sample of a request, for points
        without a count of the bytes rank 0 sent (see the module). The request's size is known in
        bytes when given or when every distributed point counted it."""
        distributed = [p for p in points if p.mode != Mode.LOCAL]
        counted = [p.per_rank[0].request_bytes / p.batch for p in distributed if p.per_rank[0].request_bytes]
        known = request_bytes is not None or (bool(distributed) and len(counted) == len(distributed))
        per_sample = float(request_bytes) if request_bytes else float(np.median(counted)) if counted else 1.0
        model = cls([], np.zeros(0), False, np.zeros(2), np.zeros(4), np.zeros(3), np.zeros(3), {}, 0.0,
                    request_bytes=per_sample)
        model._fit_compute(points)
        plans = [(_plan(p), _inv_bw(p.bandwidth), measured_terms(p)) for p in distributed]
        model.staging = _lstsq([_staging_row(f) for f, _, _ in plans], [t["staging"] for *_, t in plans], 2)
        longest = max([f["bytes"] / f["n"] * b for f, b, _ in plans if f["n"]], default=0.0)
        model.burst_ms, model.transfer = _knee_fit(
            list(np.linspace(0.0, longest, KNEE_STEPS + 1)),
            lambda tau: ([_transfer_row(f, b, tau) for f, b, _ in plans], [t["transfer"] for *_, t in plans]), 4)
        requests = sorted({model._load(p) for p in distributed})
        # infinity first: no rate-dependent part at all, the fallback where requests never outgrow
        # the buffers (the MNIST ViT's 3 KB a sample) and a knee would only fit noise
        knees = [math.inf, 0.0] + (list(np.geomspace(requests[0], requests[-1], KNEE_STEPS)) if requests else [])
        model.request_knee, model.request = _knee_fit(
            knees, lambda knee: ([model._request_row(p.batch, _inv_bw(p.bandwidth), knee, model._load(p))
                                  for p in distributed], [measured_terms(p)["request"] for p in distributed]), 3,
            physical=lambda coef: coef[2] >= 0)
        model._fit_skew(distributed, fixed_lag=known)
        for group in (False, True):
            members = [p for p in points if (p.mode != Mode.LOCAL) == group]
            model.other[group] = _lstsq([[1.0, p.batch] for p in members],
                                        [measured_terms(p)["other"] for p in members], 2)
        return model

    def _fit_skew(self, distributed: list[PerfPoint], fixed_lag: bool) -> None:
        """Fit the skew term and the request's cap. With the request's size known in bytes, the lag
        is what it says, the buffered bytes' time at the goodput (r = 1): a map whose requests are
        too small to show it (the MNIST ViT's 3 KB) then still carries it to one where they are not.
        Unknown (1 unit per sample), r converts units and is fitted."""
        requests = sorted({self._load(p) for p in distributed})
        caps = [0.0, math.inf] + (list(np.geomspace(requests[0], requests[-1], KNEE_STEPS)) if requests else [])
        waits = [measured_terms(p)["skew"] for p in distributed]

        def problem(cap: float) -> tuple[list[list[float]], list[float]]:
            rows = [self._skew_row(p, measured=True, cap=cap) for p in distributed]
            if not fixed_lag:
                return rows, waits
            return [row[:3] for row in rows], [wait - row[3] for wait, row in zip(waits, rows)]

        self.request_cap, coef = _knee_fit(caps, problem, 3 if fixed_lag else 4)
        self.skew, self.request_lag = coef[:3], 1.0 if fixed_lag else float(coef[3])

    def _fit_compute(self, points: list[PerfPoint]) -> None:
        """Fit the compute term (every rank's compute phase) and the jitter share on ``points``."""
        self.chains = list(dict.fromkeys(p.key for p in points))
        self.per_chain_slope = any(p.gflops_per_rank is None for p in points)
        rows, targets = [], []
        for point in points:
            for rank, timings in enumerate(point.per_rank):
                rows.append(self._compute_row(point.key, point.batch, _gflops(point)[rank]))
                targets.append(timings.compute)
        self.compute_coef = _lstsq(rows, targets, len(rows[0]) if rows else 0)
        if not self.per_chain_slope:
            groups = {p.mode != Mode.LOCAL for p in points}
            if len(groups) == 1:  # one group measured: its throughput stands for both
                slope = self.compute_coef[len(self.chains) + int(groups.pop())]
                self.compute_coef[len(self.chains):] = slope
        shares = [sigma / timings.compute for p in points if _jitter(p) is not None
                  for sigma, timings in zip(_jitter(p), p.per_rank) if timings.compute > 0]
        self.jitter_share = float(np.median(shares)) if shares else DEFAULT_JITTER_SHARE

    def with_compute(self, points: list[PerfPoint], local_only: bool = False,
                     request_bytes: float | None = None) -> LatencyModel:
        """This model for another architecture: compute (and its jitter) re-fitted on that one's
        ``points``, staging, transfer, skew and other kept (they depend on the link, the plan's
        bytes and collectives, which each point carries).

        ``local_only``: only the local points' compute is used; each distributed chain then gets
        the local fit scaled by this model's distributed / local ratios (throughput and fixed cost
        of the same mode at the nearest CR); the distributed points only name the chains.
        ``request_bytes``: the other architecture's request bytes per sample (None: the same); give
        it when this model was fitted with its own, so both lags are in bytes."""
        other = replace(self, chains=[], compute_coef=np.zeros(0), other=dict(self.other),
                        request_bytes=float(request_bytes) if request_bytes else self.request_bytes)
        if not local_only:
            other._fit_compute(points)
            return other
        local = [p for p in points if p.mode == Mode.LOCAL]
        if not local or self.per_chain_slope or any(p.gflops_per_rank is None for p in points):
            raise UsageError("a compute transfer from local points needs local points and FLOPs in both maps")
        other._fit_compute(local)
        a_local, s_local = other.compute_coef[:2]
        mine = {key: self.compute_coef[i] for i, key in enumerate(self.chains)}
        s_ratio = self.compute_coef[-1] / self.compute_coef[-2] if self.compute_coef[-2] > 0 else 1.0
        chains, intercepts = [ChainKey.local()], [a_local]
        for key in dict.fromkeys(p.key for p in points if p.mode != Mode.LOCAL):
            same = [k for k in self.chains if k.mode == key.mode]
            if not same:
                raise UsageError(f"no {key.mode} chain in the fitted map to transfer the {key.label} chain from")
            nearest = min(same, key=lambda k: abs(math.log((k.cr or 1.0) / (key.cr or 1.0))))
            # A fitted local intercept <= 0 (compute superlinear in batch) gives no ratio to carry:
            # the chain then takes B's local fixed cost as it is.
            a_ratio = mine[nearest] / mine[ChainKey.local()] if mine.get(ChainKey.local(), 0) > 0 else 1.0
            chains.append(key)
            intercepts.append(a_local * a_ratio)
        other.chains = chains
        other.compute_coef = np.array(intercepts + [s_local, s_local * s_ratio])
        return other

    def _load(self, point: PerfPoint) -> float:
        return request_load(point, self.request_bytes)

    def _request_row(self, batch: int, inv_bw: float, knee: float | None = None, load: float | None = None
                     ) -> list[float]:
        """[1, B, max(0, R - k) / goodput]: a fixed cost, a per-sample copy, the bytes beyond the
        socket buffers at the link's rate (R: ``load``, the request bytes sent; B q when not given)."""
        knee = self.request_knee if knee is None else knee
        load = batch * self.request_bytes if load is None else load
        return [1.0, float(batch), max(0.0, load - knee) * inv_bw]

    def _compute_row(self, key: ChainKey, batch: int, gflops: float) -> list[float]:
        onehot = [1.0 if key == chain else 0.0 for chain in self.chains]
        if self.per_chain_slope:  # fitted without FLOPs: the same for a point that has them
            return onehot + [w * batch for w in onehot]
        distributed = key.mode != Mode.LOCAL
        return onehot + [0.0 if distributed else batch * gflops, batch * gflops if distributed else 0.0]

    def _skew_row(self, point: PerfPoint, measured: bool, cap: float | None = None, load: float | None = None
                  ) -> list[float]:
        """[expected wait, n, n / goodput, buffered request / goodput]: from the point's measured
        compute and jitter (fitting), or from the model's (predicting); ``load``: the request bytes
        sent (default the point's)."""
        n = _plan(point)["n"]
        if measured:
            compute = [t.compute for t in point.per_rank]
            sigma = _jitter(point) or [self.jitter_share * c for c in compute]
        else:
            compute = self.rank_compute(point.key, point.batch, _gflops(point))
            sigma = [self.jitter_share * c for c in compute]
        inv_bw = _inv_bw(point.bandwidth)
        load = self._load(point) if load is None else load
        buffered = min(load, self.request_cap if cap is None else cap)
        return [expected_wait(compute, sigma, n), n, n * inv_bw, buffered * inv_bw if n else 0.0]

    # -- predicting --------------------------------------------------------------------------------
    def rank_compute(self, key: ChainKey, batch: int, gflops: list[float]) -> list[float]:
        """Every rank's predicted compute (ms) for chain ``key`` at ``batch``."""
        if key not in self.chains:
            raise KeyError(f"no measurements of the {key.label} chain to predict from")
        return [max(0.0, float(np.dot(self.compute_coef, self._compute_row(key, batch, g)))) for g in gflops]

    def predict_point(self, point: PerfPoint, bandwidth: float | None = None, batch: int | None = None) -> dict:
        """Predict a point like ``point`` (its chain and plan) at another batch / bandwidth; bytes
        scale with the batch."""
        batch = batch or point.batch
        bandwidth = bandwidth if bandwidth is not None else point.bandwidth
        plan = _plan(point)
        plan["bytes"] *= batch / point.batch
        like = PerfPoint(point.key, batch, bandwidth, point.latency, point.per_rank,
                         gflops_per_rank=point.gflops_per_rank)
        terms = {"compute": self.rank_compute(point.key, batch, _gflops(point))[0]}
        distributed = point.mode != Mode.LOCAL
        inv_bw = _inv_bw(bandwidth)
        load = self._load(point) * batch / point.batch  # the shares scale with the batch
        terms["request"] = float(np.dot(self.request, self._request_row(batch, inv_bw, load=load))) if distributed \
            else 0.0
        terms["staging"] = float(np.dot(self.staging, _staging_row(plan))) if distributed else 0.0
        terms["transfer"] = (float(np.dot(self.transfer, _transfer_row(plan, inv_bw, self.burst_ms)))
                             if distributed else 0.0)
        skew = np.append(self.skew, self.request_lag)
        terms["skew"] = float(np.dot(skew, self._skew_row(like, measured=False, load=load))) if distributed else 0.0
        terms["other"] = float(np.dot(self.other.get(distributed, np.zeros(2)), [1.0, batch]))
        terms = {name: max(0.0, value) for name, value in terms.items()}
        terms["total"] = sum(terms[t] for t in TERMS)
        return terms


def mape(actual: list[float], predicted: list[float]) -> float | None:
    pairs = [(a, p) for a, p in zip(actual, predicted) if a > 0]
    return None if not pairs else 100.0 * sum(abs(a - p) / a for a, p in pairs) / len(pairs)

