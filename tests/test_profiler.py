"""Performance map, latency model, selector, and a small real sweep."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_engines, random_model, small_spec

from prism_trt.profiler import perfmap
from prism_trt.profiler.latency_model import LatencyModel, leave_one_out
from prism_trt.profiler.selector import MapSelector
from prism_trt.profiler.sweep import Launcher, SweepPlan, profile

# Known parameters of a synthetic setup the model must recover.
TRUE = {"compute": {("local", None): (2.0, 10.0), ("voltage", None): (3.0, 6.0), ("prism", 5.0): (3.0, 5.0)},
        "staging": (0.05, 2e-6), "comm": (0.2, 1e-6, 1.5), "rest": (0.5, 0.02)}
ENTRY_BYTES = 64 * 4  # D * fp32


def synthetic_point(mode, cr, batch, bandwidth, depth=6, energy_per_ms=None):
    sent = {"local": 0, "voltage": 25, "prism": 6}[mode]
    n = 0 if mode == "local" else depth
    nbytes = n * batch * ENTRY_BYTES * (sent + sent)
    inv_bw = 0.0 if not bandwidth else 8.0 / (bandwidth * 1e3)
    c0, c1 = TRUE["compute"][(mode, cr)]
    compute = c0 + c1 * batch
    staging = 0.0 if not n else TRUE["staging"][0] * n + TRUE["staging"][1] * nbytes
    a, b, g = TRUE["comm"]
    comm = 0.0 if not n else a * n + nbytes * (b + g * inv_bw)
    r0, r1 = TRUE["rest"]
    rest = 0.0 if not n else r0 + r1 * batch
    total = compute + staging + comm + rest
    energy = None if energy_per_ms is None else energy_per_ms[mode] * total
    return {"mode": mode, "cr": cr, "batch": batch, "bandwidth_mbit": None if mode == "local" else bandwidth,
            "measured_mbit": None,
            "latency": {"mean_ms": total, "p50_ms": total, "p90_ms": total, "stdev_ms": 0.0,
                        "per_sample_ms": total / batch},
            "per_rank": [{"compute": compute, "d2h": staging / 2, "h2d": staging / 2, "wait": rest / 2,
                          "comm": comm, "other": rest / 2, "total": total, "bytes_sent": nbytes / 2,
                          "bytes_received": nbytes / 2, "collectives": n}],
            "energy_j": None if energy is None else energy, "fell_back": False,
            "energy_per_sample_j": None if energy is None else energy / batch}


def synthetic_map(energy_per_ms=None, agreement=1.0):
    data = perfmap.new_map({"manifest_sha256": "0" * 64, "backend": "onnxruntime", "device": "cpu", "world_size": 2,
                            "model": "test", "weights_sha256": "1" * 64}, {}, 2, 1, 1, 5, None)
    for batch in (1, 2, 4, 8, 16):
        data["points"].append(synthetic_point("local", None, batch, None, energy_per_ms=energy_per_ms))
        for bandwidth in (200.0, 500.0, 900.0):
            for mode, cr in (("voltage", None), ("prism", 5.0)):
                data["points"].append(synthetic_point(mode, cr, batch, bandwidth, energy_per_ms=energy_per_ms))
    data["accuracy"] = [{"ranks": 2, "cr": 5.0, "segments": 5, "agreement": agreement, "accuracy": None}]
    return data


def test_map_round_trip(tmp_path):
    data = synthetic_map()
    path = tmp_path / "map.json"
    perfmap.save(path, data)
    assert perfmap.load(path) == json.loads(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema="other"), "not a prism-trt performance map"),
    (lambda d: d.update(schema_version=7), "schema version 7"),
    (lambda d: d["metadata"].pop("engines"), "required field 'engines' is missing"),
    (lambda d: d["points"][3].update(mode="turbo"), r"points\[3\]\.mode: expected one of"),
    (lambda d: d["points"][0].update(batch=0), r"points\[0\]\.batch: must be >= 1"),
    (lambda d: d["points"][2]["latency"].update(mean_ms=-1.0), r"points\[2\]\.latency\.mean_ms: negative"),
    (lambda d: d["points"][1].pop("per_rank"), r"points\[1\]: required field 'per_rank'"),
    (lambda d: d["points"][4].update(cr="high"), r"points\[4\]\.cr: expected"),
])
def test_bad_maps_are_rejected(tmp_path, change, message):
    data = synthetic_map()
    assert data["points"][4]["mode"] == "prism"
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(perfmap.PerfMapError, match=message):
        perfmap.load(path)


def test_fit_recovers_known_parameters():
    model = LatencyModel.fit(synthetic_map()["points"])
    for chain, (c0, c1) in TRUE["compute"].items():
        assert model.compute[chain] == pytest.approx((c0, c1), rel=1e-6, abs=1e-9)
    assert np.allclose(model.shared["staging"], TRUE["staging"], rtol=1e-4, atol=1e-12)
    assert np.allclose(model.shared["comm"], TRUE["comm"], rtol=1e-4, atol=1e-12)
    assert np.allclose(model.shared["rest"], TRUE["rest"], rtol=1e-4, atol=1e-12)
    report = leave_one_out(synthetic_map()["points"])
    assert report["total"]["mape_percent"] < 1e-6


def test_selector_picks_measured_best_and_obeys_objective():
    # one board alone draws half the power of two: local can cost less energy while prism is faster
    data = synthetic_map(energy_per_ms={"local": 0.0006, "voltage": 0.0012, "prism": 0.0012})
    latency = MapSelector(data, "latency", 0.0)
    energy = MapSelector(data, "energy", 0.0)
    for batch in (1, 2, 4, 8, 16):
        for bandwidth in (200.0, 500.0, 900.0):
            points = [p for p in data["points"] if p["batch"] == batch and p["bandwidth_mbit"] in (None, bandwidth)]
            fastest = min(points, key=lambda p: p["latency"]["per_sample_ms"])
            frugal = min(points, key=lambda p: p["energy_per_sample_j"])
            assert latency.decide(batch, bandwidth).choice.mode == fastest["mode"]
            assert latency.decide(batch, bandwidth).best.source == "measured"
            assert energy.decide(batch, bandwidth).choice.mode == frugal["mode"]
    assert any(latency.decide(b, 900.0).choice.mode != energy.decide(b, 900.0).choice.mode for b in (1, 2, 4, 8, 16))


def test_selector_predicts_unmeasured_points():
    data = synthetic_map()
    decision = MapSelector(data, "latency", 0.0).decide(12, 700.0)
    assert decision.best.source == "model"
    truth = {m: synthetic_point(m, cr, 12, 700.0)["latency"]["per_sample_ms"]
             for m, cr in (("local", None), ("voltage", None), ("prism", 5.0))}
    assert decision.choice.mode == min(truth, key=truth.get)
    assert decision.best.per_sample_ms == pytest.approx(truth[decision.choice.mode], rel=1e-6)


def test_accuracy_floor_rejects_lossy_cr():
    data = synthetic_map(agreement=0.93)
    decision = MapSelector(data, "latency", 0.99).decide(16, 900.0)
    assert decision.choice.mode != "prism"
    assert "agreement 0.9300 < min 0.99" in decision.explain()
    assert MapSelector(data, "latency", 0.0).decide(16, 900.0).choice.mode == "prism"


def test_energy_objective_without_energy_is_an_error():
    with pytest.raises(ValueError, match="energy not measured"):
        MapSelector(synthetic_map(), "energy", 0.0).decide(4, 500.0)


@pytest.fixture(scope="module")
def small_engines(tmp_path_factory):
    model = random_model(small_spec(img=32, depth=2))
    out = tmp_path_factory.mktemp("sweep-engines")
    build_engines(model, out, 2, [3.0], source={"timm": "vit_tiny_patch16_224"}, max_batch=8)
    return out


@pytest.mark.timeout(300)
def test_small_real_sweep_end_to_end(small_engines, tmp_path):
    out = tmp_path / "perfmap.json"
    plan = SweepPlan([1, 4], [3.0], [None], warmup=1, repeat=3)
    data = profile(small_engines, out, plan, Launcher(2), threads=1, timeout=60, progress=False, accuracy=[])
    keys = {(p["mode"], p["batch"]) for p in data["points"]}
    assert keys == {(m, b) for m in ("local", "voltage", "prism") for b in (1, 4)}
    for point in data["points"]:
        ranks = 1 if point["mode"] == "local" else 2
        assert len(point["per_rank"]) == ranks and point["latency"]["mean_ms"] > 0 and not point["fell_back"]
        assert point["energy_per_sample_j"] is None or point["energy_per_sample_j"] > 0
    loaded = perfmap.load(out, engines_dir=small_engines)
    assert len(loaded["points"]) == 6
    # resumable: a second run measures nothing new and keeps the map
    before = out.read_text()
    profile(small_engines, out, plan, Launcher(2), threads=1, timeout=60, progress=False, accuracy=[])
    assert json.loads(out.read_text())["points"] == json.loads(before)["points"]


def test_map_for_other_engines_is_refused(small_engines, tmp_path):
    data = synthetic_map()
    path = tmp_path / "other.json"
    perfmap.save(path, data)
    with pytest.raises(perfmap.PerfMapError, match="measured with other engines"):
        perfmap.load(path, engines_dir=small_engines)
    assert perfmap.load(path, engines_dir=small_engines, strict=False)["points"]


def test_select_and_model_cli(tmp_path):
    path = tmp_path / "map.json"
    perfmap.save(path, synthetic_map(agreement=0.93))
    cli = [sys.executable, "-m", "prism_trt.cli"]
    chosen = subprocess.run(cli + ["select", "--map", str(path), "--batch", "16", "--bandwidth", "900"],
                            capture_output=True, text=True, timeout=120)
    assert chosen.returncode == 0, chosen.stderr
    assert "chosen:" in chosen.stdout and "agreement 0.9300 < min 0.99" in chosen.stdout
    fitted = subprocess.run(cli + ["model", "fit", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(fitted.stdout)["total"]["mape_percent"] < 1e-6
    plots = subprocess.run(cli + ["plot", str(path), "--out", str(tmp_path / "plots")], capture_output=True,
                           text=True, timeout=120)
    assert plots.returncode == 0, plots.stderr
    assert (tmp_path / "plots" / "decision_map.png").stat().st_size > 0
    assert (tmp_path / "plots" / "vs_bandwidth_b16.png").stat().st_size > 0


@pytest.mark.timeout(400)
def test_small_sweep_on_the_testbed(small_engines, tmp_path):
    """2 batch sizes x 1 CR x 1 shaped bandwidth, ranks in tc-shaped network namespaces."""
    from prism_trt.profiler.testbed import Testbed, testbed_support

    ok, why = testbed_support()
    if not ok:
        pytest.skip(f"no network testbed here: {why}")
    out = tmp_path / "perfmap.json"
    with Testbed(2, "300mbit", cpus_per_rank=1) as testbed:
        launcher = Launcher.on_testbed(testbed)
        data = profile(small_engines, out, SweepPlan([1, 4], [3.0], [300.0], warmup=1, repeat=3), launcher,
                       threads=1, timeout=60, progress=False, accuracy=[])
    shaped = [p for p in data["points"] if p["mode"] != "local"]
    assert len(shaped) == 4 and all(p["bandwidth_mbit"] == 300.0 for p in shaped)
    assert all(150 < p["measured_mbit"] < 330 for p in shaped)  # tbf at 300 Mbit/s, TCP goodput
    assert not any(p["fell_back"] for p in data["points"])
