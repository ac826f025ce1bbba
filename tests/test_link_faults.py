"""Link faults against a real 2-rank `prism-trt serve` in the tc testbed's namespaces, under a bounded
load sent from inside rank 0's namespace: the worker's link taken down for 2 s, then its rate dropped to
10 Mbit/s and restored. Every request must be answered exactly once and correctly (locally while the
link is down), readiness must go degraded and come back, and `--mode auto` must leave prism while the
link is down and be back on it within 5 s of the link's return. Skipped where no testbed can be built;
the full figures (2, 5 and 30 s outages, loss bursts) come from benchmarks/link_faults.py."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_close, build_engines, random_model, small_spec

from prism_trt.core import make_partition_plan, make_segment_plan, simulate
from prism_trt.engines.perfmap import engines_fingerprint
from prism_trt.profiler.testbed import Testbed
from prism_trt.profiler.testbed.faults import LoadRun, ServedCluster, fault_report, set_link
from prism_trt.runtime.group import free_port

pytestmark = pytest.mark.timeout(240)

RATE, SLOW = "100mbit", "10mbit"
TIMEOUT_S = 1.5  # the collective timeout: small, so a 2 s outage fails the batch in flight
OUTAGE_S, SLOW_S = 2.0, 3.0
TOKENS = 17  # 4 x 4 patches and the class token


@pytest.fixture(scope="module")
def model():
    return random_model(small_spec(img=32, depth=2))


@pytest.fixture(scope="module")
def engines(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fault-engines")
    build_engines(model, out, 2, [2.0], source={"timm": "vit_tiny_patch16_224"}, max_batch=8)
    return out


def _prism_first_map(engines, path):
    """A constructed map (not a measurement) bound to ``engines`` in which local is 20 x slower than in
    the profiler tests' synthetic map: prism is the choice at any rate, so every answer off prism is the
    link's doing."""
    from test_profiler import synthetic_map

    data = synthetic_map()
    data.metadata["engines"] = engines_fingerprint(engines)
    slower = []
    for point in data.points:
        if point.key.mode == "local":
            latency = point.latency
            point = replace(point, latency=type(latency)(*(20 * value for value in (
                latency.mean_ms, latency.p50_ms, latency.p90_ms, latency.stdev_ms, latency.per_sample_ms))),
                per_rank=[replace(times, compute=20 * times.compute, total=20 * times.total)
                          for times in point.per_rank])
        slower.append(point)
    data.points = slower
    data.save(path)
    return path


def test_link_down_and_rate_drop_under_load(testbed_name, engines, model, tmp_path):
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        local = model(images).numpy()
    perfmap = _prism_first_map(engines, tmp_path / "perfmap.json")
    port, master = free_port(), free_port()
    common = ["--engines", str(engines), "--threads", "1", "--timeout", str(TIMEOUT_S)]
    rank0 = ["--mode", "auto", "--map", str(perfmap), "--no-online", "--port", str(port), "--max-wait-ms", "2",
             "--link-probe", "0.5"]
    with Testbed(2, RATE, name=testbed_name) as bed, \
            ServedCluster(bed, common, rank0, tmp_path / "logs", {"PRISM_TRT_CLUSTER_TOKEN": secrets.token_hex(16)},
                          master_port=master) as cluster:
        load = LoadRun(bed, port, "tiny-test", [image.flatten().tolist() for image in images], [1, 3, 32, 32],
                       tmp_path / "load", clients=2, limit=4000, limit_s=100)
        try:
            def prism_since(since: float, count: int = 1):
                return lambda events: sum(1 for e in events if e["kind"] == "answer" and e["sent"] >= since
                                          and e.get("mode") == "prism" and not e.get("fell_back")) >= count

            assert load.wait_for(prism_since(0.0, 20), 90), cluster.log(0)[-3000:]
            down = set_link(bed, 1, up=False)
            time.sleep(OUTAGE_S)
            back = set_link(bed, 1, up=True)
            assert load.wait_for(prism_since(back, 5), 30), cluster.log(0)[-3000:]
            slow = time.monotonic()
            bed.set_bandwidth(SLOW)
            time.sleep(SLOW_S)
            bed.set_bandwidth(RATE)
            fast = time.monotonic()
            assert load.wait_for(prism_since(fast, 5), 30), cluster.log(0)[-3000:]
        finally:
            events = load.stop()
        end = time.monotonic()
        assert all(cluster.alive().values()), cluster.log(1)[-3000:]
    outage = fault_report("link down", events, down, back, slow)
    rate = fault_report("rate drop", events, slow, fast, end)
    print(outage.to_dict(), rate.to_dict())  # the figures, in the test's output
    assert outage.requests > 0 and outage.errors == 0 and outage.lost == 0 and outage.duplicated == 0
    assert outage.unknown_ids == 0
    assert outage.degrade_s is not None and outage.degrade_s < OUTAGE_S, outage  # degraded while down...
    assert outage.ready_s is not None, outage  # ...and ready again after
    assert outage.recover_s is not None and outage.recover_s <= 5.0, outage  # back on prism within 5 s
    assert outage.fell_back > 0 and set(outage.modes) == {"prism", "local"}, outage
    assert outage.max_fault_ms < (TIMEOUT_S + 2.0) * 1e3, outage  # the fallback's latency + the timeout, and slack
    answers = {e["id"]: e for e in events if e["kind"] == "answer"}
    plans = {}
    for index, answer in answers.items():
        got = np.asarray(answer["logits"], dtype=np.float32)
        if answer["mode"] == "local":
            want = local[index % len(images)]
        else:
            segments = answer["segments"]
            if segments not in plans:
                plan = make_segment_plan(make_partition_plan(TOKENS, 1, 2), segments=segments)
                plans[segments] = simulate(model, images, plan).numpy()
            want = plans[segments][index % len(images)]
        assert_close(got, want, name=f"request {index} ({answer['choice']})")
