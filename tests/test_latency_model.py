"""Sampling statistics and the latency model's maths, on constructed inputs (not measurements):
every number here is made up so that the right answer is known."""

import math
from dataclasses import replace

import numpy as np
import pytest

from prism_trt.engines import ChainKey, PerfMap, PerfMapError, PerfPoint
from prism_trt.profiler.adaptive import LatencyModel, evaluate
from prism_trt.profiler.adaptive.evaluation import compute_drift, cross_report, naive_prediction, sampling_summary
from prism_trt.profiler.adaptive.latency_model import expected_wait
from prism_trt.profiler.sampling import SamplingRule, median_ci, robust_summary

LOCAL, VOLTAGE, PRISM = ChainKey.local(), ChainKey.voltage(), ChainKey.prism(5, 50, 2)
# Constructed plan: GFLOPs per sample per rank; rank 1 of prism has more work (an imbalanced plan).
GFLOPS = {LOCAL: [2.0], VOLTAGE: [1.0, 1.0], PRISM: [0.8, 0.9]}
MS_PER_GFLOP, FIXED = {LOCAL: 1.5, VOLTAGE: 2.0, PRISM: 2.5}, 5.0  # one throughput, fixed cost per chain
N, SKEW_SCALE, BARRIER_MS, JITTER = 12, 1.3, 0.02, 0.05


def constructed_point(key: ChainKey, batch: int, bandwidth: float | None) -> PerfPoint:
    compute = [MS_PER_GFLOP[key] + FIXED * batch * g for g in GFLOPS[key]]
    sigma = [JITTER * c for c in compute]
    distributed = key.mode != "local"
    n = N if distributed else 0
    nbytes = n * batch * 4096 * (4 if key.mode == "voltage" else 1)
    staging = 0.01 * n + nbytes / 4e6 if distributed else 0.0
    transfer = 0.1 * n + nbytes * 8 / (bandwidth * 1e3) if distributed else 0.0
    skew = SKEW_SCALE * expected_wait(compute, sigma, n) + BARRIER_MS * n if distributed else 0.0
    other = 0.3 + 0.05 * batch
    total = compute[0] + staging + transfer + skew + other
    ranks = [{"compute": c, "d2h": staging / 2, "h2d": staging / 2, "wait": skew if r == 0 else 0.0,
              "comm": transfer, "other": other, "total": total, "bytes_sent": nbytes / 2,
              "bytes_received": nbytes / 2, "collectives": n} for r, c in enumerate(compute)]
    samples = {**robust_summary([total, total]), "stopped": "converged", "compute_sigma_ms": sigma}
    return PerfPoint(key, batch, bandwidth if distributed else None,
                     {"mean_ms": total, "p50_ms": total, "p90_ms": total, "stdev_ms": 0.0,
                      "per_sample_ms": total / batch}, ranks, bandwidth if distributed else None,
                     samples=samples, gflops_per_rank=GFLOPS[key])


def constructed_points() -> list[PerfPoint]:
    points = [constructed_point(LOCAL, b, None) for b in (1, 2, 4, 8)]
    return points + [constructed_point(key, b, bw) for key in (VOLTAGE, PRISM) for b in (1, 2, 4, 8)
                     for bw in (200.0, 500.0, 900.0)]


def test_median_ci_uses_order_statistics():
    samples = list(range(1, 101))  # half-width z sqrt(100) / 2 = 9.8: ranks floor(40.2), ceil(60.8)
    low, high = median_ci(samples)
    assert (low, high) == (40.0, 61.0)
    assert median_ci([7.0]) == (7.0, 7.0)


def test_outliers_are_counted_and_kept():
    samples = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 30.0]
    summary = robust_summary(samples)
    assert summary["outliers"] == 1 and summary["outlier_ms"] == [30.0]
    assert summary["count"] == 8 and summary["median_ms"] == pytest.approx(10.05)
    assert summary["mad_ms"] == pytest.approx(0.15)


def test_sampling_rule_stops_for_the_right_reason():
    rule = SamplingRule(min_repeat=5, max_repeat=12, target_ci=0.02, budget_s=10.0)
    tight = [100.0 + 0.1 * i for i in range(5)]
    wide = [100.0, 140.0, 70.0, 120.0, 90.0]
    assert rule.verdict(tight[:4], 0.0) is None  # below the minimum
    assert rule.verdict(tight, 0.0) == "converged"
    assert rule.verdict(wide, 0.0) is None
    assert rule.verdict(wide, 11.0) == "time_budget"
    assert rule.verdict(wide * 3, 0.0) == "max_repeat"
    assert rule.verdict(wide[:2], 11.0) == "time_budget"  # a slow point still ends in its budget
    with pytest.raises(ValueError):
        SamplingRule(5, 4)


def test_expected_wait():
    assert expected_wait([10.0, 14.0], [0.0, 0.0], 4) == pytest.approx(4.0)  # rank 1 1 ms late per block
    assert expected_wait([14.0, 10.0], [0.0, 0.0], 4) == 0.0  # rank 0 is the slow one
    # balanced ranks, each with sigma 2 ms per inference: 4 blocks of sigma 1 -> difference sigma sqrt(2)
    assert expected_wait([10.0, 10.0], [2.0, 2.0], 4) == pytest.approx(4 * math.sqrt(2) / math.sqrt(2 * math.pi))
    assert expected_wait([10.0], [1.0], 4) == 0.0
    waits = [expected_wait([10.0, 10.0 + d], [1.0, 1.0], 6) for d in (-3, 0, 3, 6)]
    assert waits == sorted(waits)


def test_fit_recovers_the_constructed_terms():
    model = LatencyModel.fit(constructed_points())
    chains = len(model.chains)
    assert not model.per_chain_slope
    assert model.compute_coef[chains] == pytest.approx(FIXED, rel=1e-6)
    for key, fixed in MS_PER_GFLOP.items():
        assert model.compute_coef[model.chains.index(key)] == pytest.approx(fixed, rel=1e-6)
    assert np.allclose(model.skew, (SKEW_SCALE, BARRIER_MS, 0.0), rtol=1e-6, atol=1e-9)
    assert model.jitter_share == pytest.approx(JITTER)
    # an unmeasured batch and bandwidth: exact, skew included
    truth = constructed_point(PRISM, 16, 700.0)
    terms = model.predict_point(constructed_point(PRISM, 8, 500.0), 700.0, 16)
    assert terms["skew"] == pytest.approx(truth.per_rank[0]["wait"], rel=1e-6)
    assert terms["total"] == pytest.approx(truth.latency["mean_ms"], rel=1e-6)


def test_every_held_out_scheme_is_exact_on_the_constructed_map_and_the_naive_one_is_not():
    report = evaluate(constructed_points())
    assert set(report) == {"leave-one-out", "held-out batch", "held-out bandwidth"}
    assert report["leave-one-out"]["total"]["points"] == 28
    assert report["held-out bandwidth"]["total"]["points"] == 24  # local points are never held out
    for scheme in report.values():
        for term in ("compute", "transfer", "skew", "other", "total"):
            assert scheme[term]["mape_percent"] < 1e-6, (term, scheme)
        assert scheme["naive_total"]["mape_percent"] > 1.0


def test_a_model_fitted_on_one_map_predicts_another():
    points = constructed_points()
    later = [constructed_point(key, 12, 700.0) for key in (VOLTAGE, PRISM)] + [constructed_point(LOCAL, 12, None)]
    report = cross_report(points, later)
    assert report["total"]["points"] == 3 and report["total"]["mape_percent"] < 1e-6
    slower = [replace(p, latency={**p.latency, "mean_ms": 1.1 * p.latency["mean_ms"]}) for p in later]
    assert cross_report(points, slower)["total"]["mape_percent"] == pytest.approx(100 / 11)


def test_naive_baseline_takes_the_nearest_batch_and_rate():
    points = constructed_points()
    target = constructed_point(VOLTAGE, 3, 500.0)
    nearest = next(p for p in points if p.key == VOLTAGE and p.batch == 4 and p.bandwidth_mbit == 500.0)
    # 4 is nearer to 3 than 2 in ratio (4/3 < 3/2); of the three rates measured at 4, the same one
    assert naive_prediction(points, target) == pytest.approx(nearest.latency["mean_ms"] * 3 / 4)
    assert naive_prediction([p for p in points if p.key != VOLTAGE], target) is None


def _map_dict() -> dict:
    data = PerfMap.new({"manifest_sha256": "0" * 64, "backend": "onnxruntime", "device": "cpu", "world_size": 2,
                        "model": "test", "weights_sha256": "1" * 64}, {}, 2, 1, 1, 5, None)
    data.points = constructed_points()[:6]
    return data.to_dict()


def test_maps_without_samples_still_load_and_samples_round_trip(tmp_path):
    data = _map_dict()
    path = tmp_path / "map.json"
    PerfMap.from_dict(data).save(path)
    assert PerfMap.load(path).points[5].samples["stopped"] == "converged"
    for point in data["points"]:  # a map written before the samples existed
        point.pop("samples"), point.pop("gflops_per_rank")
    old = PerfMap.from_dict(data)
    assert old.points[0].samples is None and old.points[0].gflops_per_rank is None
    assert LatencyModel.fit(old.points).per_chain_slope


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(stopped="bored"), r"samples\.stopped: must be one of"),
    (lambda s: s.update(outliers=2), r"samples\.outlier_ms: expected 2 numbers"),
    (lambda s: s.update(compute_sigma_ms=[1.0, 2.0]), r"samples\.compute_sigma_ms: expected 1 numbers"),
    (lambda s: s.update(ci_rel=-0.1), r"samples\.ci_rel: must be >= 0"),
])
def test_bad_samples_are_rejected(change, message):
    data = _map_dict()
    change(data["points"][0]["samples"])
    with pytest.raises(PerfMapError, match=message):
        PerfMap.from_dict(data)


def test_sampling_summary_reports_the_noise_floor():
    points = constructed_points()[:3]
    for point, (count, stdev) in zip(points, [(4, 2.0), (16, 8.0), (25, 0.0)]):
        point.samples = {**point.samples, "count": count}
        point.latency = {**point.latency, "stdev_ms": stdev, "mean_ms": 100.0}
    summary = sampling_summary(points)
    assert summary["samples_min"] == 4 and summary["samples_median"] == 16 and summary["samples_max"] == 25
    assert summary["mean_rel_stderr_percent"] == pytest.approx(1.0)  # median of 1 %, 2 %, 0 %
    assert summary["stopped"] == {"converged": 3}
    assert sampling_summary([PerfPoint(LOCAL, 1, None, points[0].latency, points[0].per_rank)]) is None  # old map


def test_compute_drift_is_the_spread_of_one_chain_measured_at_each_rate():
    points = constructed_points()
    assert compute_drift(points) == pytest.approx(0.0, abs=1e-9)  # the constructed board never drifts
    for point in points:  # 5 of the 8 (chain, batch) groups measured 10 % slower and faster at two rates
        if point.key == PRISM or (point.key == VOLTAGE and point.batch == 1):
            point.per_rank[0] = {**point.per_rank[0], "compute": {200.0: 90.0, 500.0: 100.0, 900.0: 110.0}[
                point.bandwidth_mbit]}
    assert compute_drift(points) == pytest.approx(10.0)  # the median group's coefficient of variation
    assert compute_drift([p for p in points if p.mode == "local"]) is None


def test_model_fit_prints_every_held_out_scheme_and_the_noise(tmp_path):
    from click.testing import CliRunner

    from prism_trt.cli import main

    first, later = tmp_path / "first.json", tmp_path / "later.json"
    data = PerfMap.from_dict(_map_dict())
    data.points = constructed_points()
    data.save(first)
    data.points = [constructed_point(PRISM, 12, 700.0)]
    data.save(later)
    result = CliRunner().invoke(main, ["model", "fit", str(first), "--test", str(later)])
    assert result.exit_code == 0, result.output
    for heading in ("leave-one-out:", "held-out batch:", "held-out bandwidth:", "fitted here, tested on later.json:"):
        assert heading in result.output
    assert "28 sampled to a CI: 2-2 samples" in result.output and "0.0 % apart" in result.output
