"""Performance map, latency model, selector, and a small real sweep."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_engines, random_model, small_spec

from prism_trt.engines import AccuracyEntry, ChainKey, Manifest, PerfMap, PerfMapError, PerfPoint
from prism_trt.engines.measured import LatencyStats, PhaseTimes
from prism_trt.profiler.adaptive import LatencyModel, MapSelector, NoCandidate, leave_one_out
from prism_trt.profiler.sweep import Launcher, SweepPlan, profile
from prism_trt.runtime import ClusterError

LOCAL, VOLTAGE, PRISM5 = ChainKey.local(), ChainKey.voltage(), ChainKey.prism(5, 50, 2)  # 50 tokens, 2 ranks: CR 5
# Known parameters of a constructed (not measured) setup the model must recover; no FLOPs in the
# points, so compute is linear in batch per chain. Rank 0's skew is a constant wait per collective.
TRUE = {"compute": {LOCAL: (2.0, 10.0), VOLTAGE: (3.0, 6.0), PRISM5: (3.0, 5.0)},
        "staging": (0.05, 2e-6), "comm": (0.2, 1e-6, 1.5), "skew": 0.04, "other": (0.5, 0.02)}
ENTRY_BYTES = 64 * 4  # D * fp32


def synthetic_point(key, batch, bandwidth, depth=6, energy_per_ms=None) -> PerfPoint:
    mode = key.mode
    sent = {"local": 0, "voltage": 25, "prism": 6}[mode]
    n = 0 if mode == "local" else depth
    nbytes = n * batch * ENTRY_BYTES * (sent + sent)
    inv_bw = 0.0 if not bandwidth else 8.0 / (bandwidth * 1e3)
    c0, c1 = TRUE["compute"][key]
    compute = c0 + c1 * batch
    staging = 0.0 if not n else TRUE["staging"][0] * n + TRUE["staging"][1] * nbytes
    a, b, g = TRUE["comm"]
    comm = 0.0 if not n else a * n + nbytes * (b + g * inv_bw)
    r0, r1 = TRUE["other"]
    other, wait = (0.0, 0.0) if not n else (r0 + r1 * batch, TRUE["skew"] * n)
    total = compute + staging + comm + wait + other
    energy = None if energy_per_ms is None else energy_per_ms[mode] * total
    return PerfPoint(key, batch, None if mode == "local" else bandwidth,
                     LatencyStats(total, total, total, 0.0, total / batch),
                     [PhaseTimes(compute=compute, d2h=staging / 2, h2d=staging / 2, wait=wait, comm=comm, other=other,
                                 total=total, bytes_sent=nbytes / 2, bytes_received=nbytes / 2, collectives=n)],
                     energy_j=energy, energy_per_sample_j=None if energy is None else energy / batch)


def synthetic_map(energy_per_ms=None, agreement=1.0) -> PerfMap:
    data = PerfMap.new({"manifest_sha256": "0" * 64, "backend": "onnxruntime", "device": "cpu", "world_size": 2,
                        "model": "test", "weights_sha256": "1" * 64}, {}, 2, 1, 1, 5, None)
    for batch in (1, 2, 4, 8, 16):
        data.points.append(synthetic_point(LOCAL, batch, None, energy_per_ms=energy_per_ms))
        for bandwidth in (200.0, 500.0, 900.0):
            for key in (VOLTAGE, PRISM5):
                data.points.append(synthetic_point(key, batch, bandwidth, energy_per_ms=energy_per_ms))
    data.accuracy = [AccuracyEntry(PRISM5, 2, agreement)]
    return data


def test_map_round_trip(tmp_path):
    data = synthetic_map()
    path = tmp_path / "map.json"
    data.save(path)
    assert PerfMap.load(path) == data
    assert json.loads(path.read_text())["points"][4] == {**PRISM5.to_dict(),
                                                         **json.loads(path.read_text())["points"][4]}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema="other"), "not a prism-trt performance map"),
    (lambda d: d.update(schema_version=7), "schema version 7"),
    (lambda d: d["metadata"].pop("engines"), "required field 'engines' is missing"),
    (lambda d: d["points"][3].update(mode="turbo"), r"points\[3\]: mode must be one of"),
    (lambda d: d["points"][0].update(batch=0), r"points\[0\]\.batch: must be >= 1"),
    (lambda d: d["points"][2]["latency"].update(mean_ms=-1.0), r"points\[2\]\.latency\.mean_ms: must be >= 0"),
    (lambda d: d["points"][2]["latency"].update(p50_ms=float("nan")),
     r"points\[2\]\.latency\.p50_ms: must be a finite number"),
    (lambda d: d["points"][1].pop("per_rank"), r"points\[1\]: required field 'per_rank'"),
    (lambda d: d["points"][1].update(per_rank=[{}]), r"points\[1\]\.per_rank\[0\]: required field 'compute'"),
    (lambda d: d["points"][4].update(cr="high"), r"points\[4\]\.cr: expected"),
    (lambda d: d["points"][4].update(segments=0), r"points\[4\]\.segments: must be >= 1"),
    (lambda d: d["accuracy"][0].update(cr=-2.0), r"accuracy\[0\]\.cr: must be >= 1"),
    (lambda d: d["points"][1].update(cr="abc"), r"points\[1\]\.cr: expected"),  # a voltage point
    (lambda d: d["points"][1]["latency"].update(mean_ms=10**400), r"latency\.mean_ms: must be a finite number"),
    (lambda d: d["points"].append(dict(d["points"][4])), r"points: the same \(chain, batch, bandwidth\)"),
])
def test_bad_maps_are_rejected(tmp_path, change, message):
    data = synthetic_map().to_dict()
    assert data["points"][4]["mode"] == "prism"
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PerfMapError, match=message):
        PerfMap.load(path)


def test_unreadable_maps_name_the_file(tmp_path):
    binary = tmp_path / "map.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(PerfMapError, match=f"{binary}: not a text file"):
        PerfMap.load(binary)
    with pytest.raises(PerfMapError, match="missing; make a performance map"):
        PerfMap.load(tmp_path / "absent.json")


def test_empty_map_says_why_nothing_qualifies():
    empty = synthetic_map()
    empty.points = []
    with pytest.raises(NoCandidate, match="no measured points"):
        MapSelector(empty, "latency", 0.0).decide(4, 500.0)


def test_fit_recovers_known_parameters():
    model = LatencyModel.fit(synthetic_map().points)
    chains = len(model.chains)
    for chain, (c0, c1) in TRUE["compute"].items():
        index = model.chains.index(chain)
        assert model.compute_coef[[index, chains + index]] == pytest.approx((c0, c1), rel=1e-6, abs=1e-9)
    assert np.allclose(model.staging, TRUE["staging"], rtol=1e-4, atol=1e-12)
    a, b, g = TRUE["comm"]
    assert np.allclose(model.transfer, (a, 0.0, b, g), rtol=1e-4, atol=1e-9)
    assert np.allclose(model.skew, (0.0, TRUE["skew"], 0.0), rtol=1e-4, atol=1e-9)  # one rank listed: no imbalance
    assert np.allclose(model.other[True], TRUE["other"], rtol=1e-4, atol=1e-12)
    report = leave_one_out(synthetic_map().points)
    assert report["total"]["mape_percent"] < 1e-6


def test_selector_picks_measured_best_and_obeys_objective():
    # one board alone draws half the power of two: local can cost less energy while prism is faster
    data = synthetic_map(energy_per_ms={"local": 0.0006, "voltage": 0.0012, "prism": 0.0012})
    latency = MapSelector(data, "latency", 0.0)
    energy = MapSelector(data, "energy", 0.0)
    for batch in (1, 2, 4, 8, 16):
        for bandwidth in (200.0, 500.0, 900.0):
            points = [p for p in data.points if p.batch == batch and p.bandwidth_mbit in (None, bandwidth)]
            fastest = min(points, key=lambda p: p.latency.per_sample_ms)
            frugal = min(points, key=lambda p: p.energy_per_sample_j)
            assert latency.decide(batch, bandwidth).choice == fastest.key
            assert latency.decide(batch, bandwidth).best.source == "measured"
            assert energy.decide(batch, bandwidth).choice == frugal.key
    assert any(latency.decide(b, 900.0).choice.mode != energy.decide(b, 900.0).choice.mode for b in (1, 2, 4, 8, 16))


def test_selector_predicts_unmeasured_points():
    data = synthetic_map()
    decision = MapSelector(data, "latency", 0.0).decide(12, 700.0)
    assert decision.best.source == "model"
    truth = {key: synthetic_point(key, 12, 700.0).latency.per_sample_ms for key in (LOCAL, VOLTAGE, PRISM5)}
    assert decision.choice == min(truth, key=truth.get)
    assert decision.best.per_sample_ms == pytest.approx(truth[decision.choice], rel=1e-6)


def test_accuracy_floor_rejects_lossy_cr():
    data = synthetic_map(agreement=0.93)
    decision = MapSelector(data, "latency", 0.99).decide(16, 900.0)
    assert decision.choice.mode != "prism"
    assert "agreement 0.9300 < min 0.99" in decision.explain()
    assert MapSelector(data, "latency", 0.0).decide(16, 900.0).choice.mode == "prism"


def test_energy_objective_without_energy_is_an_error():
    with pytest.raises(NoCandidate, match="energy not measured"):
        MapSelector(synthetic_map(), "energy", 0.0).decide(4, 500.0)


@pytest.fixture(scope="module")
def small_engines(tmp_path_factory):
    model = random_model(small_spec(img=32, depth=2))
    out = tmp_path_factory.mktemp("sweep-engines")
    # 17 tokens over 2 ranks: ceil(N/P) = 9, so `--cr 2` builds L = round(4.5) = 5 segments, CR 1.8
    build_engines(model, out, 2, [2.0], source={"timm": "vit_tiny_patch16_224"}, max_batch=8)
    return out


@pytest.mark.timeout(300)
def test_small_real_sweep_end_to_end(small_engines, tmp_path):
    out = tmp_path / "perfmap.json"
    plan = SweepPlan.for_build(small_engines, [1, 4], [2.0], [None], warmup=1, repeat=3)
    built = Manifest.read(small_engines / "rank0").config(plan.prism[0])
    assert plan.prism == [ChainKey.prism(5, 17, 2)] and built.name == "prism-cr1.8"
    data = profile(small_engines, out, plan, Launcher(2), threads=1, timeout=60, progress=False, accuracy=[])
    keys = {(p.key, p.batch) for p in data.points}
    assert keys == {(k, b) for k in (LOCAL, VOLTAGE, built.key) for b in (1, 4)}
    for point in data.points:
        ranks = 1 if point.mode == "local" else 2
        assert len(point.per_rank) == ranks and point.latency.mean_ms > 0 and not point.fell_back
        assert point.energy_per_sample_j is None or point.energy_per_sample_j > 0
    loaded = PerfMap.load(out, engines_dir=small_engines)
    assert len(loaded.points) == 6
    # resumable: a second run measures nothing new and keeps the map
    before = out.read_text()
    profile(small_engines, out, plan, Launcher(2), threads=1, timeout=60, progress=False, accuracy=[])
    assert json.loads(out.read_text())["points"] == json.loads(before)["points"]
    # ... but only with the same repeat count: mixing 3- and 5-run means would corrupt the map
    with pytest.raises(PerfMapError, match="--repeat 3"):
        profile(small_engines, out, SweepPlan(plan.batches, plan.prism, [None], warmup=1, repeat=5), Launcher(2),
                threads=1, timeout=60, progress=False)


def test_requested_cr_and_built_cr_are_one_chain(small_engines, tmp_path):
    """`build --cr 2` builds CR 1.8 here (L = 5); profiling `--cr 2` must measure that chain, and
    the agreement calibrated for it must reach the selector (it used to be "not measured": points
    were stored at CR 2.0, the agreement at 1.8, and the two never matched)."""
    manifest = Manifest.read(small_engines / "rank0")
    built = manifest.config(manifest.key_for("prism", 2.0))
    accuracy = [AccuracyEntry(built.key, 2, 0.955), AccuracyEntry(VOLTAGE, 2, 1.0)]
    plan = SweepPlan.for_build(small_engines, [2], [2.0], [None], warmup=0, repeat=1)
    data = profile(small_engines, tmp_path / "map.json", plan, Launcher(2), threads=1, timeout=60, progress=False,
                   accuracy=accuracy)
    prism = [p for p in data.points if p.mode == "prism"]
    assert [p.key.label for p in prism] == [built.name] and prism[0].key.cr == pytest.approx(1.8)
    assert data.agreement(prism[0].key) == 0.955
    decision = MapSelector(data, "latency", 0.9).decide(2)
    candidate = next(c for c in decision.candidates if c.choice.mode == "prism")
    assert candidate.rejected == "", decision.explain()
    assert "rejected" not in decision.explain() and "not measured" not in decision.explain()
    assert MapSelector(data, "latency", 0.96).decide(2).choice.mode != "prism"  # the floor still applies


def test_map_for_other_engines_is_refused(small_engines, tmp_path):
    data = synthetic_map()
    path = tmp_path / "other.json"
    data.save(path)
    with pytest.raises(PerfMapError, match="measured with other engines"):
        PerfMap.load(path, engines_dir=small_engines)
    assert PerfMap.load(path, engines_dir=small_engines, strict=False).points


def test_select_and_model_cli(tmp_path):
    path = tmp_path / "map.json"
    synthetic_map(agreement=0.93).save(path)
    cli = [sys.executable, "-m", "prism_trt.cli"]
    chosen = subprocess.run(cli + ["select", "--map", str(path), "--batch", "16", "--bandwidth", "900"],
                            capture_output=True, text=True, timeout=120)
    assert chosen.returncode == 0, chosen.stderr
    assert "chosen:" in chosen.stdout and "agreement 0.9300 < min 0.99" in chosen.stdout
    fitted = subprocess.run(cli + ["model", "fit", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(fitted.stdout)["leave-one-out"]["total"]["mape_percent"] < 1e-6
    plots = subprocess.run(cli + ["plot", str(path), "--out", str(tmp_path / "plots")], capture_output=True,
                           text=True, timeout=120)
    assert plots.returncode == 0, plots.stderr
    assert (tmp_path / "plots" / "decision_map.png").stat().st_size > 0
    assert (tmp_path / "plots" / "vs_bandwidth_b16.png").stat().st_size > 0


@pytest.mark.timeout(400)
def test_small_sweep_on_the_testbed(small_engines, tmp_path, testbed_name):
    """2 batch sizes x 1 CR x 1 shaped bandwidth, ranks in tc-shaped network namespaces."""
    from prism_trt.profiler.testbed import Testbed

    out = tmp_path / "perfmap.json"
    with Testbed(2, "300mbit", cpus_per_rank=1, name=testbed_name) as testbed:
        launcher = Launcher.on_testbed(testbed)
        plan = SweepPlan.for_build(small_engines, [1, 4], [2.0], [300.0], warmup=1, repeat=3)
        data = profile(small_engines, out, plan, launcher, threads=1, timeout=60, progress=False, accuracy=[])
    shaped = [p for p in data.points if p.mode != "local"]
    assert len(shaped) == 4 and all(p.bandwidth_mbit == 300.0 for p in shaped)
    assert all(150 < p.measured_mbit < 330 for p in shaped)  # tbf at 300 Mbit/s, TCP goodput
    assert not any(p.fell_back for p in data.points)


@pytest.mark.timeout(120)
def test_a_failing_rank_0_is_reported_with_its_log(small_engines, tmp_path):
    """Rank 0 dies at start: the sweep says so with the end of rank 0's log, and the worker (left
    waiting to join) is bounded by the group timeout instead of hanging the sweep."""
    def wrap(rank, argv):
        return [sys.executable, "-c", "import sys; print('rank 0 could not start: boom'); sys.exit(3)"] if rank == 0 \
            else argv

    launcher = Launcher(2, wrap=wrap)
    plan = SweepPlan.for_build(small_engines, [1], [2.0], [None], warmup=0, repeat=1)
    with pytest.raises(ClusterError, match=r"(?s)rank 0 of the sweep failed \(exit 3\).*could not start: boom"):
        profile(small_engines, tmp_path / "map.json", plan, launcher, threads=1, timeout=5, progress=False)


class _ScriptedExecutor:
    """Stands in for a group: records the order of requests and answers with constructed phase
    times (not measurements) — steady for the local chain, widely spread for the others."""

    def __init__(self, manifest):
        self.manifest, self.calls = manifest, []
        self.spread = np.random.default_rng(0)

    def infer(self, request, key, gather_timings=False):
        from types import SimpleNamespace

        from prism_trt.engines.measured import PhaseTimes

        self.calls.append(key)
        total = 10.0 if key.mode == "local" else float(self.spread.uniform(5.0, 20.0))
        ranks = 1 if key.mode == "local" else 2
        return SimpleNamespace(fell_back=False, timings=None,
                               per_rank=[PhaseTimes(compute=total * 0.8, total=total) for _ in range(ranks)])


def test_points_of_a_batch_are_timed_interleaved_until_each_is_tight(small_engines):
    import threading

    from prism_trt.profiler.energy import detect_meter
    from prism_trt.profiler.rank0 import measure_group
    from prism_trt.profiler.sampling import SamplingRule

    manifest = Manifest.read(small_engines / "rank0")
    executor = _ScriptedExecutor(manifest)
    prism = manifest.key_for("prism", 2.0)
    group = [(LOCAL, 2), (VOLTAGE, 2), (prism, 2)]
    meter, _ = detect_meter(None, "cpu")
    results = measure_group(executor, group, warmup=1, rule=SamplingRule(4, 9, 0.02, 1e6), meter=meter,
                            stop=threading.Event())
    timed = executor.calls[3:]  # after one warm-up each
    assert timed[:12] == [LOCAL, VOLTAGE, prism] * 4  # interleaved, not one chain after the other
    samples = {r.key: r.samples for r in results}
    assert samples[LOCAL].count == 4 and samples[LOCAL].stopped == "converged"
    assert samples[VOLTAGE].count == 9 and samples[VOLTAGE].stopped == "max_repeat"
    assert all(r.repeat == r.samples.count for r in results)
    assert len(results[2].gflops_per_rank) == 2 and results[0].gflops_per_rank[0] > results[2].gflops_per_rank[0]
    stopped = threading.Event()
    stopped.set()
    assert measure_group(executor, group, 0, SamplingRule(4, 9), meter, stopped) == []  # nothing half-sampled


@pytest.mark.timeout(300)
def test_small_real_sweep_samples_each_point_to_its_ci(small_engines, tmp_path):
    """A real loopback sweep with the adaptive rule: every point carries its sample statistics,
    the model fits it and reports every held-out scheme."""
    from prism_trt.profiler.adaptive import evaluate
    from prism_trt.profiler.adaptive.evaluation import sampling_summary
    from prism_trt.profiler.sampling import SamplingRule

    rule = SamplingRule(3, 8, 0.02, 5.0)
    plan = SweepPlan.for_build(small_engines, [1, 2], [2.0], [None], warmup=1, repeat=3, sampling=rule)
    data = profile(small_engines, tmp_path / "map.json", plan, Launcher(2), threads=1, timeout=60, progress=False,
                   accuracy=[])
    assert len(data.points) == 6 and data.metadata["sampling"] == rule.to_dict()
    for point in data.points:
        samples = point.samples
        assert 3 <= samples.count <= 8 and samples.outliers == len(samples.outlier_ms)
        assert samples.ci_low_ms <= samples.median_ms <= samples.ci_high_ms
        assert samples.stopped != "max_repeat" or samples.ci_rel > 0.02
        assert len(point.gflops_per_rank) == len(point.per_rank)
    noise = sampling_summary(data.points)
    assert noise["points"] == 6 and sum(noise["stopped"].values()) == 6 and noise["samples_min"] >= 3
    report = evaluate(PerfMap.load(tmp_path / "map.json").points)
    assert report["leave-one-out"]["total"]["points"] == 6
    assert report["held-out batch"]["total"]["points"] == 6 and report["held-out bandwidth"]["total"]["points"] == 0
