"""The link probe on the heartbeat: a real 2-rank GLOO group on loopback, rank 0's executor in this
process and a worker process. Readings are bounded waits on real collectives; what is asserted is
their structure and what the executor and the online selector make of them, never a rate."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_engines, random_model, small_spec

from prism_trt.engines.perfmap import engines_fingerprint
from prism_trt.profiler.adaptive import MapSelector
from prism_trt.profiler.adaptive.online import OnlineOptions
from prism_trt.profiler.adaptive.selector import OnlineSelector
from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.link_probe import FIRST_BYTES, MAX_BYTES, MIN_BYTES, TARGET_MS, LinkProbe, payload_bytes

pytestmark = pytest.mark.timeout(180)

PROBE_S = 0.3
TIMEOUT_S = 30.0


def test_payload_follows_the_last_reading_within_its_bounds():
    assert payload_bytes(None) == FIRST_BYTES

    def after(mbit: float) -> int:
        return payload_bytes(LinkProbe(mbit, 1, 0.1, 1.0, 1, 0.0))

    assert after(100.0) == int(100e6 / 8 * TARGET_MS / 1e3)  # TARGET_MS of link time at 100 Mbit/s
    assert after(1.0) == MIN_BYTES and after(1e6) == MAX_BYTES


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-engines")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 2, [2.0], source={"timm": "vit_tiny_patch16_224"},
                  max_batch=8)
    return out


@pytest.fixture(scope="module")
def cluster(engines):
    """Rank 0's DistributedExecutor probing every PROBE_S, with one worker process on loopback."""
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines),
                               "--rank", "1", "--world-size", "2", "--master-port", str(port), "--threads", "1",
                               "--timeout", str(TIMEOUT_S)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    executor = DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S),
                                   RuntimeOptions(threads=1, link_probe_s=PROBE_S))
    yield executor
    executor.close()
    try:
        worker.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.communicate()


def _reading_after(executor: DistributedExecutor, count: int, timeout_s: float = 20.0) -> LinkProbe:
    """The first reading numbered above ``count`` (a bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = executor.link_probe
        if probe is not None and probe.count > count:
            return probe
        time.sleep(0.05)
    pytest.fail(f"no link probe reading after #{count} within {timeout_s} s (health: {executor.health()})")


def test_an_idle_executor_probes_the_link_and_keeps_its_rate(cluster):
    first = _reading_after(cluster, 0)
    second = _reading_after(cluster, first.count)
    for reading in (first, second):
        assert reading.mbit > 0 and reading.payload_ms > reading.empty_ms > 0
        assert reading.mbit == pytest.approx(reading.payload_bytes * 8 / ((reading.payload_ms - reading.empty_ms)
                                                                        * 1e3))
    assert second.payload_bytes == payload_bytes(first)  # sized by the reading before it
    assert second.at - first.at >= PROBE_S * 0.9  # one every PROBE_S while nothing else crosses the link
    assert cluster.bandwidth_mbit == cluster.link_probe.mbit
    assert not cluster.health().degraded


def test_distributed_batches_hold_the_probe_off(cluster):
    voltage = next(key for key in cluster.chains() if key.mode == "voltage")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = _reading_after(cluster, 0).count
    busy_until = time.monotonic() + 3 * PROBE_S
    batches = 0
    while time.monotonic() < busy_until:  # back to back: the link is never idle for PROBE_S
        result = cluster.infer(cluster.request(images), voltage)
        assert result.choice == voltage and not result.fell_back
        batches += 1
    assert batches >= 2
    assert cluster.link_probe.count <= before + 1  # at most one that had started before the first batch
    assert _reading_after(cluster, cluster.link_probe.count).count > before  # idle again: probing resumes


def test_the_online_selector_folds_each_new_reading_into_its_link_estimate(cluster, engines):
    from test_profiler import synthetic_map

    data = synthetic_map()  # measured at 200, 500 and 900 Mbit/s: local, voltage and prism at 5 segments
    data.metadata["engines"] = engines_fingerprint(engines)
    selector = OnlineSelector(MapSelector(data, "latency", 0.0), cluster, OnlineOptions(explore_fraction=0.0))
    tracker = selector.tracker
    for _ in range(tracker.implied.maxlen):  # as if the last distributed batches had crossed a slow link
        tracker.observe_rate(tracker.floor)
    assert selector.bandwidth_mbit == tracker.floor
    reading = _reading_after(cluster, selector.probes_folded)
    selector.decide(1)
    assert selector.probes_folded >= reading.count
    assert selector.bandwidth_mbit == pytest.approx(min(tracker.ceiling, max(tracker.floor, reading.mbit)))
    for _ in range(3):  # a reading is folded once, not once per batch: only a new one moves the tracker
        folded, updates = selector.probes_folded, tracker.updates
        selector.decide(1)
        assert tracker.updates - updates == (selector.probes_folded != folded)
