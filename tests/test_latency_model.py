"""Sampling statistics and the latency model's maths, on constructed inputs (not measurements):
every number here is made up so that the right answer is known. The transfer across architectures
also runs on two real loopback sweeps, where only what is fitted and kept is asserted."""

import math
from dataclasses import replace

import numpy as np
import pytest

from prism_trt.engines import ChainKey, PerfMap, PerfMapError, PerfPoint
from prism_trt.engines.measured import LatencyStats, PhaseTimes, SampleStats
from prism_trt.profiler.adaptive import LatencyModel, evaluate
from prism_trt.profiler.adaptive.evaluation import compute_drift, cross_report, naive_prediction, sampling_summary
from prism_trt.profiler.adaptive.latency_model import expected_wait
from prism_trt.profiler.sampling import SamplingRule, median_ci, robust_summary

LOCAL, VOLTAGE, PRISM = ChainKey.local(), ChainKey.voltage(), ChainKey.prism(5, 50, 2)
# Constructed plan: GFLOPs per sample per rank; rank 1 of prism has more work (an imbalanced plan).
GFLOPS = {LOCAL: [2.0], VOLTAGE: [1.0, 1.0], PRISM: [0.8, 0.9]}
MS_PER_GFLOP, FIXED = {LOCAL: 1.5, VOLTAGE: 2.0, PRISM: 2.5}, 5.0  # one throughput, fixed cost per chain
N, SKEW_SCALE, BARRIER_MS, JITTER = 12, 1.3, 0.02, 0.05
REQUEST_MS = 0.2  # the request broadcast's fixed cost


def constructed_point(key: ChainKey, batch: int, bandwidth: float | None, scale: float = 1.0,
                      request: tuple[float, float] = (0.0, 0.0)) -> PerfPoint:
    """``scale``: another architecture's compute (every rank, fixed cost and throughput alike);
    ``request``: (bytes per sample, cap) of the request broadcast: what the socket buffers take
    (up to cap) costs rank 0 nothing at once and is waited for at the first barrier; the rest
    blocks the broadcast itself."""
    compute = [scale * (MS_PER_GFLOP[key] + FIXED * batch * g) for g in GFLOPS[key]]
    sigma = [JITTER * c for c in compute]
    distributed = key.mode != "local"
    n = N if distributed else 0
    nbytes = n * batch * 4096 * (4 if key.mode == "voltage" else 1)
    staging = 0.01 * n + nbytes / 4e6 if distributed else 0.0
    transfer = 0.1 * n + nbytes * 8 / (bandwidth * 1e3) if distributed else 0.0
    lag = min(batch * request[0], request[1]) * 8 / (bandwidth * 1e3) if distributed else 0.0
    broadcast = REQUEST_MS + max(0.0, batch * request[0] - request[1]) * 8 / (bandwidth * 1e3) if distributed else 0.0
    skew = SKEW_SCALE * expected_wait(compute, sigma, n) + BARRIER_MS * n + lag if distributed else 0.0
    other = 0.3 + 0.05 * batch
    total = broadcast + compute[0] + staging + transfer + skew + other
    ranks = [{"compute": c, "d2h": staging / 2, "h2d": staging / 2, "wait": skew if r == 0 else 0.0,
              "comm": transfer, "other": other, "total": total, "bytes_sent": nbytes / 2,
              "bytes_received": nbytes / 2, "collectives": n, "request": broadcast if r == 0 else 0.0}
             for r, c in enumerate(compute)]
    summary = robust_summary([total, total])
    samples = SampleStats(**{**summary, "outlier_ms": tuple(summary["outlier_ms"])}, stopped="converged",
                          compute_sigma_ms=tuple(sigma))
    return PerfPoint(key, batch, bandwidth if distributed else None,
                     LatencyStats(total, total, total, 0.0, total / batch), [PhaseTimes(**r) for r in ranks],
                     bandwidth if distributed else None,
                     samples=samples, gflops_per_rank=GFLOPS[key])


def constructed_points(scale: float = 1.0, request: tuple[float, float] = (0.0, 0.0)) -> list[PerfPoint]:
    points = [constructed_point(LOCAL, b, None, scale, request) for b in (1, 2, 4, 8)]
    return points + [constructed_point(key, b, bw, scale, request) for key in (VOLTAGE, PRISM) for b in (1, 2, 4, 8)
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
    assert terms["skew"] == pytest.approx(truth.per_rank[0].wait, rel=1e-6)
    assert terms["total"] == pytest.approx(truth.latency.mean_ms, rel=1e-6)


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
    slower = [replace(p, latency=replace(p.latency, mean_ms=1.1 * p.latency.mean_ms)) for p in later]
    assert cross_report(points, slower)["total"]["mape_percent"] == pytest.approx(100 / 11)


def test_naive_baseline_takes_the_nearest_batch_and_rate():
    points = constructed_points()
    target = constructed_point(VOLTAGE, 3, 500.0)
    nearest = next(p for p in points if p.key == VOLTAGE and p.batch == 4 and p.bandwidth_mbit == 500.0)
    # 4 is nearer to 3 than 2 in ratio (4/3 < 3/2); of the three rates measured at 4, the same one
    assert naive_prediction(points, target) == pytest.approx(nearest.latency.mean_ms * 3 / 4)
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
    assert PerfMap.load(path).points[5].samples.stopped == "converged"
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
        point.samples = replace(point.samples, count=count)
        point.latency = replace(point.latency, stdev_ms=stdev, mean_ms=100.0)
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
            point.per_rank[0] = replace(point.per_rank[0], compute={200.0: 90.0, 500.0: 100.0, 900.0: 110.0}[
                point.bandwidth_mbit])
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


def test_request_lag_is_fitted_with_its_cap_and_carried_by_its_size():
    """Rank 0 waits at the first barrier for the buffered tail of the request broadcast: with its
    size known the lag is the buffered bytes' time (r = 1), only the cap is fitted; unknown, r
    converts units and the map still predicts itself exactly."""
    request = (1000.0, 2000.0)  # bytes per sample, what the buffers hold: batches 2-8 hit the cap
    points = constructed_points(request=request)
    known = LatencyModel.fit(points, request_bytes=request[0])
    assert known.request_lag == 1.0 and known.request_cap == pytest.approx(request[1], rel=1e-6)
    assert np.allclose(known.skew, (SKEW_SCALE, BARRIER_MS, 0.0), rtol=1e-6, atol=1e-9)
    # the broadcast blocks only for what the buffers do not take: the same knee, the bytes' time
    assert known.request_knee == pytest.approx(request[1], rel=1e-6)
    assert np.allclose(known.request, (REQUEST_MS, 0.0, 1.0), rtol=1e-6, atol=1e-9)
    unknown = LatencyModel.fit(points)
    truth = constructed_point(PRISM, 16, 700.0, request=request)
    for model in (known, unknown):
        terms = model.predict_point(constructed_point(PRISM, 8, 500.0, request=request), 700.0, 16)
        assert terms["total"] == pytest.approx(truth.latency.mean_ms, rel=1e-6)
    # another architecture with 1/100 of the request: the known size carries the lag over
    small = constructed_point(PRISM, 16, 700.0, request=(10.0, request[1]))
    transferred = known.with_compute(constructed_points(), request_bytes=10.0).predict_point(small)
    assert transferred["skew"] == pytest.approx(small.per_rank[0].wait, rel=1e-6)
    assert transferred["request"] == pytest.approx(REQUEST_MS, rel=1e-6)  # 160 bytes never outgrow the buffers


@pytest.mark.parametrize("local_only", [False, True])
def test_transfer_refits_only_compute(local_only):
    """B computes 3x slower than A (fixed costs and throughput alike) on the same link: re-fitting
    compute alone (every rank's, or local only) predicts B exactly; the naive baseline does not."""
    from prism_trt.profiler.adaptive.evaluation import transfer_report

    source, target = constructed_points(), constructed_points(scale=3.0)
    model = LatencyModel.fit(source).with_compute(target, local_only)
    fitted = LatencyModel.fit(source)
    assert np.array_equal(model.transfer, fitted.transfer) and np.array_equal(model.skew, fitted.skew)
    assert model.compute_coef[-2] == pytest.approx(3 * FIXED, rel=1e-6)
    report = transfer_report(source, target, local_only, detail=True)
    assert report["total"]["points"] == 24 and len(report["predictions"]) == 24  # B's distributed points
    for term in ("compute", "transfer", "skew", "total"):
        assert report[term]["mape_percent"] < 1e-6, term
    assert report["naive_total"]["mape_percent"] > 1.0


def test_naive_transfer_scales_the_nearest_point_by_the_local_ratio():
    from prism_trt.profiler.adaptive.evaluation import naive_transfer

    source, target = constructed_points(), constructed_points(scale=2.0)
    point = constructed_point(PRISM, 4, 500.0, 2.0)
    nearest = next(p for p in source if p.key == PRISM and p.batch == 4 and p.bandwidth_mbit == 500.0)
    local = {b: next(p.latency.per_sample_ms for p in pts if p.mode == "local" and p.batch == 4)
             for b, pts in (("a", source), ("b", target))}
    assert naive_transfer(source, target, point) == pytest.approx(nearest.latency.mean_ms * local["b"] / local["a"])
    assert naive_transfer(source, [p for p in target if p.mode != "local"], point) is None


# -- real sweeps -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_architectures(tmp_path_factory):
    """Two architectures (17 tokens of width 32 on 2 blocks; 37 tokens of width 64 on 3 blocks),
    built and swept on loopback: local, voltage and one prism chain at batches 1, 2 and 4."""
    from conftest import build_engines, random_model, small_spec

    from prism_trt.profiler.sweep import Launcher, SweepPlan, profile

    maps = {}
    for name, spec in (("a", small_spec(img=32, depth=2)), ("b", small_spec(img=48, dim=64, depth=3, heads=4))):
        engines = tmp_path_factory.mktemp(f"transfer-{name}")
        build_engines(random_model(spec), engines, 2, [2.0], source={"timm": "test"}, max_batch=8)
        plan = SweepPlan.for_build(engines, [1, 2, 4], [2.0], [None], warmup=1, repeat=3)
        maps[name] = profile(engines, engines / "map.json", plan, Launcher(2), threads=1, timeout=60,
                             progress=False, accuracy=[])
    return maps


@pytest.mark.timeout(300)
def test_transfer_on_real_loopback_sweeps(two_architectures, tmp_path):
    """The transfer study's code path on measured maps: what is predicted, what is re-fitted and
    what is kept (the figures themselves depend on the machine and are not asserted)."""
    from prism_trt.profiler.adaptive.evaluation import transfer_report
    from prism_trt.profiler.adaptive.plots import error_per_term, prediction_vs_measured

    a, b = two_architectures["a"].points, two_architectures["b"].points
    assert len(a) == len(b) == 9 and all(p.gflops_per_rank for p in a + b)
    fitted = LatencyModel.fit(a)
    for local_only in (False, True):
        model = fitted.with_compute(b, local_only)
        assert set(model.chains) == {p.key for p in b}  # B's own chains (B's prism has another CR)
        assert np.array_equal(model.staging, fitted.staging) and np.array_equal(model.skew, fitted.skew)
        assert model.burst_ms == fitted.burst_ms and np.array_equal(model.other[True], fitted.other[True])
    # every rank's compute of B decides the per-rank transfer: the same fit as B's own compute
    own = LatencyModel.fit(b)
    assert np.allclose(fitted.with_compute(b).compute_coef, own.compute_coef)
    assert fitted.with_compute(b).jitter_share == own.jitter_share
    reports = {}
    for local_only in (False, True):
        report = transfer_report(a, b, local_only, (3 * 32 * 32 * 4, 3 * 48 * 48 * 4), detail=True)
        assert report["total"]["points"] == 6 and report["naive_total"]["points"] == 6
        for term in ("compute", "staging", "transfer", "skew", "other", "total"):
            assert report[term]["mape_percent"] is None or math.isfinite(report[term]["mape_percent"])
        assert all(r["mode"] != "local" and r["predicted"]["total"] > 0 for r in report["predictions"])
        reports["local" if local_only else "per-rank"] = report
    prediction_vs_measured(reports["per-rank"]["predictions"], tmp_path / "pvm.png", "a -> b")
    error_per_term(reports, tmp_path / "terms.png", "a -> b")
    assert (tmp_path / "pvm.png").stat().st_size > 0 and (tmp_path / "terms.png").stat().st_size > 0


def test_model_fit_reports_a_transfer(tmp_path):
    from click.testing import CliRunner

    from prism_trt.cli import main

    here, there = tmp_path / "a.json", tmp_path / "b.json"
    data = PerfMap.from_dict(_map_dict())
    data.points = constructed_points()
    data.save(here)
    data.points = constructed_points(scale=2.0)
    data.save(there)
    for extra in ([], ["--local-compute"], ["--request-bytes", "1000", "10"]):
        result = CliRunner().invoke(main, ["model", "fit", str(here), "--compute-from", str(there), *extra])
        assert result.exit_code == 0, result.output
        assert "compute from b.json, tested on its distributed points:" in result.output


def test_request_knee_never_fits_a_negative_rate():
    """Requests that never outgrow the buffers (the MNIST ViT's) measure a flat broadcast with noise;
    a knee placed to fit a dip would predict a link that pays back time: refused, flat instead."""
    points = constructed_points()
    for point in points:
        if point.mode != "local" and point.batch == 8 and point.bandwidth == 200.0:
            point.per_rank[0].request = 0.1  # a dip at the largest batch on the slowest link
    model = LatencyModel.fit(points, request_bytes=1000.0)
    assert model.request[2] >= 0
    unconstrained = np.linalg.lstsq(
        np.array([model._request_row(p.batch, 8 / (p.bandwidth * 1e3), 4000.0) for p in points if p.mode != "local"]),
        np.array([p.per_rank[0].request for p in points if p.mode != "local"]), rcond=None)[0]
    assert unconstrained[2] < 0  # what the knee search would have taken without the check


def test_the_request_term_follows_the_bytes_rank_0_sent():
    """Each point counts the request bytes rank 0 sent (the other ranks' shares): fitted without a
    size per sample, the request and its buffered tail follow those bytes, and a request a quarter
    the size (raw pixels instead of float32) is predicted from its own count by the same link."""
    request = (1000.0, 2000.0)  # bytes per sample, what the buffers hold
    points = constructed_points(request=request)
    for point in points:
        if point.mode != "local":
            point.per_rank[0].request_bytes = int(point.batch * request[0])
    model = LatencyModel.fit(points)
    assert model.request_lag == 1.0 and model.request_bytes == request[0]
    assert model.request_cap == pytest.approx(request[1], rel=1e-6)
    assert model.request_knee == pytest.approx(request[1], rel=1e-6)
    like, truth = (constructed_point(PRISM, batch, rate, request=request) for batch, rate in ((8, 500.0), (16, 700.0)))
    like.per_rank[0].request_bytes = int(8 * request[0])
    assert model.predict_point(like, 700.0, 16)["total"] == pytest.approx(truth.latency.mean_ms, rel=1e-6)
    small = constructed_point(PRISM, 16, 700.0, request=(request[0] / 4, request[1]))
    small.per_rank[0].request_bytes = int(16 * request[0] / 4)
    terms = model.predict_point(small)
    assert terms["request"] == pytest.approx(small.per_rank[0].request, rel=1e-6)
    assert terms["skew"] == pytest.approx(small.per_rank[0].wait, rel=1e-6)
    assert terms["total"] == pytest.approx(small.latency.mean_ms, rel=1e-6)
