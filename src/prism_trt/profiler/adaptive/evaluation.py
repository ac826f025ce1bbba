"""How well the latency model predicts points it was not fitted on.

Three ways to hold points out of the fit, each reported per term and for the total, next to a naive
baseline under the same split:

* ``leave-one-out``: every point predicted by a model fitted on all the others;
* ``held-out batch``: for every batch size, all its points predicted from the other batch sizes;
* ``held-out bandwidth``: for every link rate, its distributed points predicted from the other rates
  (local points do not depend on the link and stay in the fit).

A fourth, across architectures (:func:`transfer_report`): the link, staging, skew and other terms
fitted on architecture A's map, compute alone re-fitted on architecture B's (its ranks' compute
phases, or only its local points), B's distributed points predicted — next to a naive transfer
baseline (A's nearest measured point scaled by B's local latency over A's at that batch).

Per term, MAPE is over the points where the term was measured non-zero; a term that is nearly zero
(staging on a CPU backend) can have a large MAPE and still no weight in the total, so each term also
gets its mean absolute error as a share of the mean total latency (``error_share_percent``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ...core.chain_key import Mode
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
        rates = sorted({p.bandwidth_mbit for p in points if p.mode != Mode.LOCAL and p.bandwidth_mbit})
        for rate in rates:
            held = [p.mode != Mode.LOCAL and p.bandwidth_mbit == rate for p in points]
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
    return nearest.latency.mean_ms * point.batch / nearest.batch


def held_out_report(points: list[PerfPoint], scheme: str, request_bytes: float | None = None,
                    detail: bool = False) -> dict:
    """{term or "total" or "naive_total": {"mape_percent", "error_share_percent", "points"}} under
    ``scheme`` (and, with ``detail``, "predictions": one record per predicted point)."""
    return _report(((lambda t=training: LatencyModel.fit(t, request_bytes), training, test)
                    for training, test in _folds(points, scheme)), naive_prediction, detail)


def leave_one_out(points: list[PerfPoint]) -> dict:
    """MAPE per term and for the total, each point predicted by a model fitted without it."""
    return held_out_report(points, "leave-one-out")


def naive_total_mape(points: list[PerfPoint]) -> float | None:
    """The baseline's leave-one-out MAPE (see :func:`naive_prediction`)."""
    return held_out_report(points, "leave-one-out")["naive_total"]["mape_percent"]


def cross_report(training: list[PerfPoint], test: list[PerfPoint], request_bytes: float | None = None,
                 detail: bool = False) -> dict:
    """:func:`held_out_report`'s figures for a model fitted on one map and tested on another (a
    later sweep of the same engines)."""
    return _report([(lambda: LatencyModel.fit(training, request_bytes), training, test)], naive_prediction, detail)


def naive_transfer(source: list[PerfPoint], target: list[PerfPoint], point: PerfPoint) -> float | None:
    """Transfer baseline: A's nearest measured point of the same mode (nearest CR, batch ratio,
    link rate), scaled by the batch ratio and by B's local latency over A's (per sample, nearest
    batch): "B is that much slower or faster than A"; None without local points on both sides."""
    same = [p for p in source if p.mode == point.mode]
    local_a, local_b = ([p for p in pts if p.mode == Mode.LOCAL] for pts in (source, target))
    if not same or not local_a or not local_b:
        return None

    def per_sample(points: list[PerfPoint]) -> float:
        nearest = min(points, key=lambda p: abs(math.log(p.batch / point.batch)))
        return nearest.latency.per_sample_ms

    nearest = min(same, key=lambda p: (abs(math.log((p.key.cr or 1.0) / (point.key.cr or 1.0))),
                                       abs(math.log(p.batch / point.batch)),
                                       abs((p.bandwidth or 0.0) - (point.bandwidth or 0.0))))
    scale = per_sample(local_b) / per_sample(local_a)
    return nearest.latency.mean_ms * point.batch / nearest.batch * scale


def transfer_report(source: list[PerfPoint], target: list[PerfPoint], local_only: bool = False,
                    request_bytes: tuple[float | None, float | None] = (None, None), detail: bool = False) -> dict:
    """Fit on architecture A's map (``source``), re-fit only compute on B's (``target``: its ranks'
    measured compute, or with ``local_only`` its local points alone), report on B's distributed
    points per term and total next to :func:`naive_transfer`. ``request_bytes``: A's and B's request
    bytes per sample (None for both: the same input size)."""
    def fit() -> LatencyModel:
        return LatencyModel.fit(source, request_bytes[0]).with_compute(target, local_only, request_bytes[1])

    test = [p for p in target if p.mode != Mode.LOCAL]
    return _report([(fit, source, test)], lambda training, point: naive_transfer(training, target, point), detail)


def _report(folds: Iterable[tuple[Callable[[], LatencyModel], list[PerfPoint], list[PerfPoint]]],
            baseline: Callable[[list[PerfPoint], PerfPoint], float | None], detail: bool = False) -> dict:
    names = (*TERMS, "total")
    actual: dict[str, list[float]] = {name: [] for name in names}
    predicted: dict[str, list[float]] = {name: [] for name in names}
    naive_actual, naive, records = [], [], []
    for fit, training, test in folds:
        if not training:
            continue
        model = fit()
        for point in test:
            try:
                terms = model.predict_point(point)
            except KeyError:
                continue  # the only measurements of its chain are held out: nothing to predict from
            measured = measured_terms(point)
            for name in names:
                actual[name].append(measured[name])
                predicted[name].append(terms[name])
            guess = baseline(training, point)
            if guess is not None:
                naive_actual.append(measured["total"])
                naive.append(guess)
            if detail:
                records.append({"chain": point.key.label, "mode": point.mode, "batch": point.batch,
                                "bandwidth_mbit": point.bandwidth_mbit, "measured": measured, "predicted": terms,
                                "naive_total": guess})
    mean_total = sum(actual["total"]) / len(actual["total"]) if actual["total"] else 0.0

    def share(a: list[float], p: list[float]) -> float | None:
        return None if not a or mean_total <= 0 else 100.0 * sum(abs(x - y) for x, y in zip(a, p)) / len(a) / mean_total

    report: dict = {name: {"mape_percent": mape(actual[name], predicted[name]),
                           "error_share_percent": share(actual[name], predicted[name]), "points": len(actual[name])}
                    for name in names}
    report["naive_total"] = {"mape_percent": mape(naive_actual, naive),
                             "error_share_percent": share(naive_actual, naive), "points": len(naive)}
    if detail:
        report["predictions"] = records
    return report


def evaluate(points: list[PerfPoint], request_bytes: float | None = None, detail: bool = False) -> dict[str, dict]:
    """:func:`held_out_report` under every scheme."""
    return {scheme: held_out_report(points, scheme, request_bytes, detail) for scheme in SCHEMES}


def sampling_summary(points: list[PerfPoint]) -> dict | None:
    """How the map's points were sampled, and the noise the model is judged against: the median
    relative CI half-width of the points' medians, and the median relative standard error of their
    means (the total the model predicts is the mean: no model can be expected to beat this)."""
    sampled = [p for p in points if p.samples is not None]
    if not sampled:
        return None
    counts = sorted(p.samples.count for p in sampled)
    reasons = [p.samples.stopped for p in sampled]
    mean_error = [p.latency.stdev_ms / math.sqrt(p.samples.count) / p.latency.mean_ms for p in sampled]
    ci = [p.samples.ci_rel for p in sampled]
    return {"points": len(sampled), "samples_min": counts[0], "samples_median": counts[len(counts) // 2],
            "samples_max": counts[-1], "outliers_kept": sum(p.samples.outliers for p in sampled),
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
        if point.mode != Mode.LOCAL and point.bandwidth_mbit:
            groups.setdefault((point.key, point.batch), []).append(point.per_rank[0].compute)
    spreads = [float(np.std(values, ddof=1) / np.mean(values)) for values in groups.values() if len(values) > 1]
    return 100 * float(np.median(spreads)) if spreads else None
