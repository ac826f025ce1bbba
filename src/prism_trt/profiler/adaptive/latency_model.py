"""Latency model in the style of seed 004: fitted per term from a performance map.

    compute(mode, B)   = c0 + c1 * B                        per (mode, CR) chain, linear correction
    staging(bytes, n)  = s0 * n + s1 * bytes                 D2H + H2D, linear in bytes
    comm(bytes, n, bw) = a * n + bytes * (b + g * 8 / bw)    first-packet latency + per-byte cost
    rest(B)            = r0 + r1 * B                         wait (skew) + other

with n the collectives per inference, bytes what rank 0 sends + receives, bw in bit/ms (Mbit/s *
1e3). n is fixed by the model depth, so it cannot be told apart from a constant in ``rest``. Loopback points (no configured bandwidth) fit b alone. Rank 0's timings are modelled: its
total is the request latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...engines.chain_key import ChainKey
from ...engines.perfmap import PerfPoint

TERMS = ("compute", "staging", "comm", "rest")


def _features(point: PerfPoint) -> dict:
    rank0 = point.per_rank[0]
    bandwidth = point.bandwidth
    return {"batch": point.batch, "n": rank0.get("collectives", 0) or 0,
            "bytes": (rank0.get("bytes_sent", 0) or 0) + (rank0.get("bytes_received", 0) or 0),
            "inv_bw": 0.0 if not bandwidth else 8.0 / (float(bandwidth) * 1e3),
            "compute": rank0["compute"], "staging": (rank0["d2h"] or 0) + (rank0["h2d"] or 0),
            "comm": rank0["comm"] or 0.0, "rest": (rank0.get("wait") or 0.0) + (rank0["other"] or 0.0),
            "total": point.latency["mean_ms"]}


def _design(term: str, f: dict) -> list[float]:
    if term == "staging":
        return [f["n"], f["bytes"]]
    if term == "comm":
        return [f["n"], f["bytes"], f["bytes"] * f["inv_bw"]]
    return [1.0, f["batch"]]  # rest


def _lstsq(rows: list[list[float]], targets: list[float]) -> np.ndarray:
    a, y = np.asarray(rows, dtype=float), np.asarray(targets, dtype=float)
    if not len(a):
        return np.zeros(a.shape[1] if a.ndim == 2 else 0)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coef


@dataclass
class LatencyModel:
    compute: dict[ChainKey, tuple]  # chain -> (c0, c1)
    shared: dict  # term -> coefficients

    @classmethod
    def fit(cls, points: list[PerfPoint]) -> LatencyModel:
        features = [(p.key, _features(p)) for p in points]
        compute = {}
        for chain in {c for c, _ in features}:
            rows = [[1.0, f["batch"]] for c, f in features if c == chain]
            targets = [f["compute"] for c, f in features if c == chain]
            if len(rows) == 1:
                compute[chain] = (0.0, targets[0] / rows[0][1])  # one batch size: proportional
            else:
                compute[chain] = tuple(_lstsq(rows, targets))
        distributed = [f for c, f in features if c.mode != "local"]
        shared = {term: _lstsq([_design(term, f) for f in distributed], [f[term] for f in distributed])
                  for term in ("staging", "comm", "rest")}
        return cls(compute, shared)

    def predict_terms(self, key: ChainKey, batch: int, bytes_: float, collectives: int,
                      bandwidth: float | None) -> dict:
        if key not in self.compute:
            raise KeyError(f"no measurements of the {key.label} chain to predict from")
        c0, c1 = self.compute[key]
        terms = {"compute": max(0.0, c0 + c1 * batch)}
        if key.mode == "local":
            terms.update(staging=0.0, comm=0.0, rest=0.0)
        else:
            f = {"batch": batch, "n": collectives, "bytes": bytes_,
                 "inv_bw": 0.0 if not bandwidth else 8.0 / (float(bandwidth) * 1e3)}
            for term in ("staging", "comm", "rest"):
                terms[term] = max(0.0, float(np.dot(self.shared[term], _design(term, f))))
        terms["total"] = sum(terms[t] for t in TERMS)
        return terms

    def predict_point(self, point: PerfPoint, bandwidth: float | None = None, batch: int | None = None) -> dict:
        """Predict a point like ``point`` at another batch / bandwidth (bytes scale with batch)."""
        f = _features(point)
        scale = (batch or point.batch) / point.batch
        bw = bandwidth if bandwidth is not None else point.bandwidth
        return self.predict_terms(point.key, batch or point.batch, f["bytes"] * scale, f["n"], bw)


def mape(actual: list[float], predicted: list[float]) -> float | None:
    pairs = [(a, p) for a, p in zip(actual, predicted) if a > 0]
    return None if not pairs else 100.0 * sum(abs(a - p) / a for a, p in pairs) / len(pairs)


def leave_one_out(points: list[PerfPoint]) -> dict:
    """MAPE per term and for the total, each point predicted by a model fitted without it."""
    actual = {t: [] for t in (*TERMS, "total")}
    predicted = {t: [] for t in (*TERMS, "total")}
    for index, point in enumerate(points):
        rest = points[:index] + points[index + 1:]
        try:
            model = LatencyModel.fit(rest)
            terms = model.predict_point(point)
        except KeyError:
            continue  # the only measurement of its chain: nothing to predict from
        f = _features(point)
        for term in TERMS:
            actual[term].append(f[term])
            predicted[term].append(terms[term])
        actual["total"].append(f["total"])
        predicted["total"].append(terms["total"])
    return {term: {"mape_percent": mape(actual[term], predicted[term]), "points": len(actual[term])}
            for term in actual}


def naive_total_mape(points: list[PerfPoint]) -> float | None:
    """Baseline: latency proportional to FLOP-free batch scaling of the nearest same-chain point."""
    actual, predicted = [], []
    for index, point in enumerate(points):
        others = [p for j, p in enumerate(points) if j != index and p.key == point.key]
        if not others:
            continue
        nearest = min(others, key=lambda p: abs(p.batch - point.batch))
        actual.append(point.latency["mean_ms"])
        predicted.append(nearest.latency["mean_ms"] * point.batch / nearest.batch)
    return mape(actual, predicted)
