"""Latency model in the style of seed 004, with the skew between ranks as a term of its own.

Rank 0's request latency is modelled as the sum of five terms, each fitted by least squares on its
own measured phase (ms):

    compute_r(chain, B) = a_chain + s * B * G_r            G_r: GFLOPs per sample of rank r's plan
    staging(bytes, n)   = s0 * n + bytes / copy_bw          D2H + H2D: per-collective cost + bytes
    transfer(bytes, n)  = t0 * n + bytes * (t1 + 8 / (goodput * k))   per-collective latency + bytes
    skew                = k_s * n * E[max(0, D + sigma Z)] + w0 * n   wait for the slowest rank
    other(B)            = o0 + o1 * B                       per mode group (local / distributed)

``s`` is the inverse of the measured throughput (ms per GFLOP), shared by every chain and rank: a
rank on one core runs a block at the same rate whatever the plan, so the plan's FLOPs carry the
compute across chains, batches and ranks; ``a_chain`` is the chain's fixed cost. A map without
FLOPs (written before issue 13) falls back to G_r = 1 with a slope per chain.

Skew: before each of the n collectives rank 0 waits for the slowest rank. Per block the slowest
other rank r arrives D = (compute_r - compute_0) / n later on average, with a spread sigma =
sqrt(sigma_0^2 + sigma_r^2) / sqrt(n) from the ranks' measured compute jitter (per-inference sigma
from the MAD); the expected wait of a normal difference is sigma phi(D/sigma) + D Phi(D/sigma).
The plan's imbalance (D) and the jitter (sigma) are both predicted for an unmeasured point: D from
the compute model, sigma as the fitted share of compute (median jitter / compute of the sweep).

bytes is what rank 0 sends + receives, goodput the measured link rate (Mbit/s; the configured
rate when unmeasured). Loopback points (no rate) fit t1 alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...engines.chain_key import ChainKey
from ...engines.perfmap import PerfPoint

TERMS = ("compute", "staging", "transfer", "skew", "other")
DEFAULT_JITTER_SHARE = 0.02  # compute jitter / compute when a map has no samples to measure it


def _inv_bw(bandwidth: float | None) -> float:
    """ms per byte at ``bandwidth`` Mbit/s (0 on unshaped loopback)."""
    return 0.0 if not bandwidth else 8.0 / (float(bandwidth) * 1e3)


def _gflops(point: PerfPoint) -> list[float]:
    return point.gflops_per_rank or [1.0] * len(point.per_rank)


def _jitter(point: PerfPoint) -> list[float] | None:
    """Each rank's per-inference compute sigma (ms): measured, else None."""
    return None if point.samples is None else list(point.samples["compute_sigma_ms"])


def measured_terms(point: PerfPoint) -> dict[str, float]:
    """Rank 0's measured phases grouped as the model's terms, and the total (mean latency)."""
    rank0 = point.per_rank[0]
    return {"compute": rank0["compute"], "staging": (rank0["d2h"] or 0.0) + (rank0["h2d"] or 0.0),
            "transfer": rank0["comm"] or 0.0, "skew": rank0.get("wait") or 0.0, "other": rank0["other"] or 0.0,
            "total": point.latency["mean_ms"]}


def _plan(point: PerfPoint) -> dict:
    rank0 = point.per_rank[0]
    return {"n": rank0.get("collectives", 0) or 0,
            "bytes": (rank0.get("bytes_sent", 0) or 0) + (rank0.get("bytes_received", 0) or 0)}


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
            wait = spread * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) + delta * 0.5 * (1 + math.erf(z / math.sqrt(2)))
        worst = max(worst, wait)
    return collectives * worst


def _lstsq(rows: list[list[float]], targets: list[float], width: int) -> np.ndarray:
    if not rows:
        return np.zeros(width)
    coef, *_ = np.linalg.lstsq(np.asarray(rows, dtype=float), np.asarray(targets, dtype=float), rcond=None)
    return coef


def _staging_row(plan: dict, inv_bw: float) -> list[float]:
    return [plan["n"], plan["bytes"]]


def _transfer_row(plan: dict, inv_bw: float) -> list[float]:
    return [plan["n"], plan["n"] * inv_bw, plan["bytes"], plan["bytes"] * inv_bw]


@dataclass
class LatencyModel:
    chains: list[ChainKey]  # order of the compute intercepts
    compute_coef: np.ndarray  # [a_chain..., s] or, without FLOPs, [a_chain..., s_chain...]
    per_chain_slope: bool
    staging: np.ndarray
    transfer: np.ndarray
    skew: np.ndarray  # (k_s, w0)
    other: dict[bool, np.ndarray]  # distributed? -> (o0, o1)
    jitter_share: float

    # -- fitting -----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, points: list[PerfPoint]) -> LatencyModel:
        chains = list(dict.fromkeys(p.key for p in points))
        per_chain_slope = any(p.gflops_per_rank is None for p in points)
        model = cls(chains, np.zeros(0), per_chain_slope, np.zeros(2), np.zeros(4), np.zeros(3), {}, 0.0)
        rows, targets = [], []
        for point in points:
            for rank, timings in enumerate(point.per_rank):
                rows.append(model._compute_row(point.key, point.batch, _gflops(point)[rank]))
                targets.append(timings["compute"])
        model.compute_coef = _lstsq(rows, targets, len(rows[0]) if rows else 0)
        shares = [sigma / timings["compute"] for p in points if _jitter(p) is not None
                  for sigma, timings in zip(_jitter(p), p.per_rank) if timings["compute"] > 0]
        model.jitter_share = float(np.median(shares)) if shares else DEFAULT_JITTER_SHARE
        distributed = [p for p in points if p.mode != "local"]
        plans = [(_plan(p), _inv_bw(p.bandwidth), measured_terms(p)) for p in distributed]
        model.staging = _lstsq([_staging_row(f, b) for f, b, _ in plans], [t["staging"] for *_, t in plans], 2)
        model.transfer = _lstsq([_transfer_row(f, b) for f, b, _ in plans], [t["transfer"] for *_, t in plans], 4)
        model.skew = _lstsq([model._skew_row(p, measured=True) for p in distributed],
                            [measured_terms(p)["skew"] for p in distributed], 3)
        for group in (False, True):
            members = [p for p in points if (p.mode != "local") == group]
            model.other[group] = _lstsq([[1.0, p.batch] for p in members],
                                        [measured_terms(p)["other"] for p in members], 2)
        return model

    def _compute_row(self, key: ChainKey, batch: int, gflops: float) -> list[float]:
        onehot = [1.0 if key == chain else 0.0 for chain in self.chains]
        if self.per_chain_slope:  # fitted without FLOPs: the same for a point that has them
            return onehot + [w * batch for w in onehot]
        return onehot + [batch * gflops]

    def _skew_row(self, point: PerfPoint, measured: bool) -> list[float]:
        """[expected wait, n, n / goodput]: from the point's measured compute and jitter (fitting),
        or from the model's (predicting)."""
        n = _plan(point)["n"]
        if measured:
            compute = [t["compute"] for t in point.per_rank]
            sigma = _jitter(point) or [self.jitter_share * c for c in compute]
        else:
            compute = self.rank_compute(point.key, point.batch, _gflops(point))
            sigma = [self.jitter_share * c for c in compute]
        return [expected_wait(compute, sigma, n), n, n * _inv_bw(point.bandwidth)]

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
        distributed = point.mode != "local"
        inv_bw = _inv_bw(bandwidth)
        terms["staging"] = float(np.dot(self.staging, _staging_row(plan, inv_bw))) if distributed else 0.0
        terms["transfer"] = float(np.dot(self.transfer, _transfer_row(plan, inv_bw))) if distributed else 0.0
        terms["skew"] = float(np.dot(self.skew, self._skew_row(like, measured=False))) if distributed else 0.0
        terms["other"] = float(np.dot(self.other.get(distributed, np.zeros(2)), [1.0, batch]))
        terms = {name: max(0.0, value) for name, value in terms.items()}
        terms["total"] = sum(terms[t] for t in TERMS)
        return terms


def mape(actual: list[float], predicted: list[float]) -> float | None:
    pairs = [(a, p) for a, p in zip(actual, predicted) if a > 0]
    return None if not pairs else 100.0 * sum(abs(a - p) / a for a, p in pairs) / len(pairs)


def leave_one_out(points: list[PerfPoint]) -> dict:
    """MAPE per term and for the total, each point predicted by a model fitted without it."""
    from .evaluation import held_out_report

    return held_out_report(points, "leave-one-out")


def naive_total_mape(points: list[PerfPoint]) -> float | None:
    """The baseline's leave-one-out MAPE (see :func:`.evaluation.naive_prediction`)."""
    from .evaluation import held_out_report

    return held_out_report(points, "leave-one-out")["naive_total"]["mape_percent"]
