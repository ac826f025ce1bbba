"""The link probe on the heartbeat: a real 2-rank GLOO group on loopback, rank 0's executor in this
process and a worker process. Readings are bounded waits on real collectives; what is asserted is
their structure and what the executor and the online selector make of them, never a rate."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_engines, loopback_cluster, random_model, small_spec

from prism_trt.engines.perfmap import engines_fingerprint
from prism_trt.profiler.adaptive import MapSelector
from prism_trt.profiler.adaptive.online import OnlineOptions
from prism_trt.profiler.adaptive.selector import OnlineSelector
from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import free_port
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
def group(engines):
    """(rank 0's DistributedExecutor probing every PROBE_S, its one worker process on loopback)."""
    with loopback_cluster(engines, TIMEOUT_S, RuntimeOptions(threads=1, link_probe_s=PROBE_S)) as pair:
        yield pair


@pytest.fixture(scope="module")
def cluster(group):
    return group[0]


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


def test_a_local_batch_never_waits_for_a_probe_stuck_on_the_link(group):
    """A frozen worker holds a probe in its collective (as a link that went down would): local batches
    go on meanwhile, and the probe completes once the worker answers again."""
    import signal

    executor, worker = group
    local = next(key for key in executor.chains() if key.mode == "local")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = _reading_after(executor, 0).count
    worker.send_signal(signal.SIGSTOP)
    try:
        time.sleep(4 * PROBE_S)  # the next probe has begun and waits for the worker
        started = time.monotonic()
        results = [executor.infer(executor.request(images), local) for _ in range(3)]
        waited = time.monotonic() - started
    finally:
        worker.send_signal(signal.SIGCONT)
    assert waited < 2.0, f"local batches waited {waited:.1f} s for the stuck probe"
    assert all(r.choice == local and not r.fell_back for r in results)
    assert _reading_after(executor, before).count > before  # the held probe finished and probing goes on
    assert not executor.health().degraded


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


# -- a bandwidth step on the testbed: the probe's readings and the selector's estimate follow the link -------

_PROBING_RANK0 = r"""
import json, sys, time
from pathlib import Path
from prism_trt.engines import PerfMap
from prism_trt.profiler.adaptive import MapSelector
from prism_trt.profiler.adaptive.online import OnlineOptions
from prism_trt.profiler.adaptive.selector import OnlineSelector
from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig
engines, perfmap, address, port, token, seconds, probe_s = sys.argv[1:8]
executor = DistributedExecutor(Path(engines) / "rank0", GroupConfig(0, 2, address, int(port), 30.0, token=token),
                               RuntimeOptions(threads=1, link_probe_s=float(probe_s)))
selector = OnlineSelector(MapSelector(PerfMap.load(Path(perfmap)), "latency", 0.0), executor,
                          OnlineOptions(explore_fraction=0.0))
print(json.dumps({"ready": time.monotonic()}), flush=True)
seen, end = 0, time.monotonic() + float(seconds)
while time.monotonic() < end:
    probe = executor.link_probe
    if probe is not None and probe.count > seen:
        seen = probe.count
        selector.decide(1)
        print(json.dumps({"at": probe.at, "mbit": probe.mbit, "bytes": probe.payload_bytes,
                          "estimate": selector.bandwidth_mbit}), flush=True)
    time.sleep(0.02)
executor.close()
"""


def test_a_bandwidth_step_both_ways_is_followed_by_the_probe_on_the_testbed(testbed_name, engines, tmp_path):
    """No batch runs, as in a server that went local: the readings, and the selector's estimate, follow
    100 -> 10 -> 100 Mbit/s within a few probes."""
    import json
    import secrets
    import select

    from test_profiler import VOLTAGE, synthetic_point

    from prism_trt.engines import AccuracyEntry, ChainKey, PerfMap
    from prism_trt.profiler.testbed import Testbed

    prism = ChainKey.prism(5, 17, 2)  # the engines' prism chain
    data = PerfMap.new(engines_fingerprint(engines), {}, 2, 1, 1, 5, None)
    for batch in (1, 4):
        data.points.append(synthetic_point(ChainKey.local(), batch, None))
        for rate in (10.0, 100.0):  # a constructed map measured at the two rates of the step
            data.points += [synthetic_point(VOLTAGE, batch, rate), synthetic_point(prism, batch, rate)]
    data.accuracy = [AccuracyEntry(prism, 2, 1.0)]
    data.save(tmp_path / "perfmap.json")
    token, port, probe_s, phase_s = secrets.token_hex(16), free_port(), 0.25, 3.0
    env = {"PRISM_TRT_CLUSTER_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    with Testbed(2, "100mbit", name=testbed_name) as bed:
        worker = subprocess.Popen(bed.command(1, [sys.executable, "-m", "prism_trt.cli", "run", "--engines",
                                                  str(engines), "--rank", "1", "--world-size", "2", "--master-addr",
                                                  bed.address(0), "--master-port", str(port), "--threads", "1"], env),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
        rank0 = subprocess.Popen(bed.command(0, [sys.executable, "-c", _PROBING_RANK0, str(engines),
                                                 str(tmp_path / "perfmap.json"), bed.address(0), str(port), token,
                                                 str(4 * phase_s + 30), str(probe_s)], env),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        lines: list[dict] = []

        def read_until(deadline: float, until_ready: bool = False) -> None:
            while time.monotonic() < deadline and rank0.poll() is None:
                if until_ready and any("ready" in line for line in lines):
                    return
                ready, _, _ = select.select([rank0.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if ready:
                    line = rank0.stdout.readline()
                    if line:
                        lines.append(json.loads(line))

        try:
            read_until(time.monotonic() + 60, until_ready=True)  # the group forms
            assert any("ready" in line for line in lines), rank0.stderr.read()[-3000:] if rank0.poll() else lines
            steps = [(time.monotonic(), 100.0)]
            read_until(steps[0][0] + phase_s)
            for rate in (10.0, 100.0):
                bed.set_bandwidth(f"{rate:g}mbit")
                steps.append((time.monotonic(), rate))
                read_until(steps[-1][0] + phase_s)
        finally:
            for process in (rank0, worker):
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=30)
    readings = [line for line in lines if "mbit" in line]
    for (start, rate), end in zip(steps, [s for s, _ in steps[1:]] + [math.inf]):
        # a reading is the link's own once the probe began after the step: leave one probe's time
        phase = [r for r in readings if start + 0.6 <= r["at"] < end]
        assert len(phase) >= 2, (rate, readings)
        print(f"{rate:g} Mbit/s: readings {[round(r['mbit'], 1) for r in phase]}, "
              f"estimates {[round(r['estimate'], 1) for r in phase]}")
        # the tc rate is a ceiling on goodput; a reading is off by more only when a core was busy
        assert rate * 0.6 <= statistics.median(r["mbit"] for r in phase) <= rate * 1.2, (rate, phase)
        # a single small payload may pass inside the shaper's burst (tbf's bucket) and read above the
        # rate: most readings, not every one, stay within a factor of the rate
        within = [rate / 3 <= r["mbit"] <= rate * 2 for r in phase]
        assert sum(within) * 2 > len(within), (rate, phase)
        if rate == 10.0:  # the step down: once the window holds only slow readings, the estimate is slow
            assert phase[-1]["estimate"] <= rate * 2, phase
        elif start != steps[0][0]:  # the step up: the highest-of-window estimate lifts at the first reading
            assert phase[0]["estimate"] >= rate / 2, phase
