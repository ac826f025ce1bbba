"""How well the latency model predicts points it was not fitted on.

Three ways to hold points out of the fit, each reported per term and for the total, next to a naive
baseline under the same split:

* ``leave-one-out``: every point predicted by a model fitted on all the others;
* ``held-out batch``: for every batch size, all its points predicted from the other batch sizes;
* ``held-out bandwidth``: for every link rate, its distributed points predicted from the other rates
  (local points do not depend on the link and stay in the fit).

Per term, MAPE is over the points where the term was measured non-zero; a term that is nearly zero
(staging on a CPU backend) can have a large MAPE and still no weight in the total, so each term also
gets its mean absolute error as a share of the mean total latency (``error_share_percent``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ...engines.perfmap import PerfPoint
from .latency_model import TERMS, LatencyModel, mape, measured_terms

SCHEMES = ("leave-one-out", "held-out batch", "held-out bandwidth")


def _folds(points: list[PerfPoint], scheme: str) -> Iterator[tuple[list[PerfPoint], list[PerfPoint]]]:
    """(training, test) pairs of ``scheme``."""
    if scheme == "leave-one-out":
        for index, point in enumerate(points):
            yield points[:index] + points[index + 1:], [point]
    elif scheme == "held-out batch":
        for batch in sorted({p.batch for p in points}):
            yield [p for p in points if p.batch != batch], [p for p in points if p.batch == batch]
    elif scheme == "held-out bandwidth":
        rates = sorted({p.bandwidth_mbit for p in points if p.mode != "local" and p.bandwidth_mbit})
        for rate in rates:
            held = [p.mode != "local" and p.bandwidth_mbit == rate for p in points]
            yield [p for p, out in zip(points, held) if not out], [p for p, out in zip(points, held) if out]
    else:
        raise ValueError(f"unknown scheme {scheme!r}, expected one of {', '.join(SCHEMES)}")


def naive_prediction(training: list[PerfPoint], point: PerfPoint) -> float | None:
    """Baseline: the nearest measured point of the same chain (closest batch ratio, then closest
    link rate), its latency scaled by the batch ratio; None without one."""
    same = [p for p in training if p.key == point.key]
    if not same:
        return None
    nearest = min(same, key=lambda p: (abs(math.log(p.batch / point.batch)),
                                       abs((p.bandwidth or 0.0) - (point.bandwidth or 0.0))))
    return nearest.latency["mean_ms"] * point.batch / nearest.batch


def held_out_report(points: list[PerfPoint], scheme: str) -> dict:
    """{term or "total" or "naive_total": {"mape_percent", "error_share_percent", "points"}} under ``scheme``."""
    return _report(_folds(points, scheme))


def cross_report(training: list[PerfPoint], test: list[PerfPoint]) -> dict:
    """:func:`held_out_report`'s figures for a model fitted on one map and tested on another (a
    later sweep of the same engines, or another model's once its compute is re-measured)."""
    return _report([(training, test)])


def _report(folds) -> dict:
    names = (*TERMS, "total")
    actual: dict[str, list[float]] = {name: [] for name in names}
    predicted: dict[str, list[float]] = {name: [] for name in names}
    naive_actual, naive = [], []
    for training, test in folds:
        if not training:
            continue
        model = LatencyModel.fit(training)
        for point in test:
            try:
                terms = model.predict_point(point)
            except KeyError:
                continue  # the only measurements of its chain are held out: nothing to predict from
            measured = measured_terms(point)
            for name in names:
                actual[name].append(measured[name])
                predicted[name].append(terms[name])
            baseline = naive_prediction(training, point)
            if baseline is not None:
                naive_actual.append(measured["total"])
                naive.append(baseline)
    mean_total = sum(actual["total"]) / len(actual["total"]) if actual["total"] else 0.0

    def share(a: list[float], p: list[float]) -> float | None:
        return None if not a or mean_total <= 0 else 100.0 * sum(abs(x - y) for x, y in zip(a, p)) / len(a) / mean_total

    report = {name: {"mape_percent": mape(actual[name], predicted[name]),
                     "error_share_percent": share(actual[name], predicted[name]), "points": len(actual[name])}
              for name in names}
    report["naive_total"] = {"mape_percent": mape(naive_actual, naive),
                             "error_share_percent": share(naive_actual, naive), "points": len(naive)}
    return report


def evaluate(points: list[PerfPoint]) -> dict[str, dict]:
    """:func:`held_out_report` under every scheme."""
    return {scheme: held_out_report(points, scheme) for scheme in SCHEMES}


def sampling_summary(points: list[PerfPoint]) -> dict | None:
    """How the map's points were sampled, and the noise the model is judged against: the median
    relative CI half-width of the points' medians, and the median relative standard error of their
    means (the total the model predicts is the mean: no model can be expected to beat this)."""
    sampled = [p for p in points if p.samples is not None]
    if not sampled:
        return None
    counts = sorted(p.samples["count"] for p in sampled)
    reasons = [p.samples["stopped"] for p in sampled]
    mean_error = [p.latency["stdev_ms"] / math.sqrt(p.samples["count"]) / p.latency["mean_ms"] for p in sampled]
    ci = [p.samples["ci_rel"] for p in sampled]
    return {"points": len(sampled), "samples_min": counts[0], "samples_median": counts[len(counts) // 2],
            "samples_max": counts[-1], "outliers_kept": sum(p.samples["outliers"] for p in sampled),
            "stopped": {reason: reasons.count(reason) for reason in sorted(set(reasons))},
            "median_ci_rel_percent": 100 * float(np.median(ci)), "max_median_ci_rel_percent": 100 * max(ci),
            "mean_rel_stderr_percent": 100 * float(np.median(mean_error))}


def compute_drift(points: list[PerfPoint]) -> float | None:
    """Rank 0's compute does not depend on the link, yet each (chain, batch) of a shaped sweep is
    measured once per link rate, minutes apart: the median coefficient of variation (%) of those
    measurements is how much the board itself drifted (load, clocks) over the sweep — a floor
    under the compute term's error that no model of the point can go below. None without repeats."""
    groups: dict[tuple, list[float]] = {}
    for point in points:
        if point.mode != "local" and point.bandwidth_mbit:
            groups.setdefault((point.key, point.batch), []).append(point.per_rank[0]["compute"])
    spreads = [float(np.std(values, ddof=1) / np.mean(values)) for values in groups.values() if len(values) > 1]
    return 100 * float(np.median(spreads)) if spreads else None
