"""Online refinement (issue 13, item 4): the estimator, the bandwidth tracker and the exploration
policy on given numbers (maths only, not measurements), then the OnlineSelector fed real batches:
a real loopback sweep makes the map, a real 2-rank DistributedExecutor runs the batches, and the
server's batcher shows a selector every result. Structure is asserted, never timings."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from conftest import ONE_THREAD, build_engines, loopback_cluster, random_model, small_spec

from prism_trt.engines import AccuracyEntry, ChainKey, PerfMap
from prism_trt.engines.measured import PhaseTimes
from prism_trt.errors import UsageError
from prism_trt.profiler.adaptive import LatencyModel, MapSelector
from prism_trt.profiler.adaptive.online import (
    BandwidthTracker,
    EwMedian,
    ExplorationPolicy,
    OnlineCells,
    OnlineOptions,
    Option,
    templates_by_chain,
    weighted_median,
)
from prism_trt.profiler.adaptive.selector import OnlineSelector
from prism_trt.profiler.sweep import Launcher, SweepPlan, profile
from prism_trt.runtime.api import Observation
from prism_trt.runtime.group import free_port
from prism_trt.runtime.local import LocalExecutor
from prism_trt.serve.batcher import Batcher
from prism_trt.serve.metrics import sample_sum

pytestmark = pytest.mark.timeout(240)

LOCAL, VOLTAGE = ChainKey.local(), ChainKey.voltage()
TIMEOUT_S = 30.0


# -- the maths, on given numbers -------------------------------------------------------------------------


def test_weighted_median_and_the_ew_median_shrug_off_an_outlier():
    assert weighted_median([3.0, 1.0, 2.0], [1, 1, 1]) == 2.0
    assert weighted_median([1.0, 10.0], [1, 3]) == 10.0
    median = EwMedian(half_life=4, window=16)
    for value in [10.0] * 8 + [500.0]:  # one batch stuck behind a busy core
        median.add(value)
    value, half_width = median.estimate()
    assert value == 10.0 and half_width == 0.0 and median.count == 9
    for value in [20.0] * 12:  # the cell really got slower: the newest observations win
        median.add(value)
    assert median.estimate()[0] == 20.0


def test_cells_never_mix_bandwidth_buckets_and_blend_toward_the_prior():
    cells = OnlineCells(OnlineOptions(min_count=4, bucket_ratio=1.5), anchor=900.0)
    prism = ChainKey.prism(5, 17, 2)
    assert cells.bucket(prism, 200.0) != cells.bucket(prism, 900.0)
    assert cells.bucket(LOCAL, 200.0) is None and cells.bucket(prism, None) is None
    cells.observe(prism, 4, 190.0, PhaseTimes(total=400.0))
    assert cells.count(prism, 4, 200.0) == 1 and cells.count(prism, 4, 900.0) == 0
    assert cells.refine(50.0, prism, 4, 900.0) == (50.0, "prior")
    blended, source = cells.refine(50.0, prism, 4, 200.0)  # 1 of 4 observations: a quarter of the way
    assert blended == pytest.approx(0.25 * 100.0 + 0.75 * 50.0) and source == "prior+online(1)"
    for _ in range(3):
        cells.observe(prism, 4, 205.0, PhaseTimes(total=400.0))
    assert cells.refine(50.0, prism, 4, 200.0) == (100.0, "online")


def test_exploration_policy_caps_the_share_and_respects_the_budget():
    policy = ExplorationPolicy(fraction=0.1, budget=0.2)
    best = Option(LOCAL, 10.0, 50)
    others = [best, Option(VOLTAGE, 11.9, 3), Option(ChainKey.prism(5, 17, 2), 12.5, 0)]  # prism is over budget
    picked = []
    for batch in range(1, 101):
        choice = policy.pick(best, others)
        assert policy.explored <= 0.1 * batch
        picked.append(choice)
    assert policy.explored == 10 and {c.choice for c in picked if c} == {VOLTAGE}
    assert ExplorationPolicy(0.0, 1.0).pick(best, others) is None
    with pytest.raises(UsageError, match="explore fraction"):
        OnlineOptions(explore_fraction=0.9)


def test_bandwidth_tracker_inverts_the_models_network_time():
    # a constructed map (the profiler tests' known parameters), not a measurement
    from test_profiler import synthetic_map

    data = synthetic_map()
    model = LatencyModel.fit(data.points)
    tracker = BandwidthTracker(model, templates_by_chain(data.points), [200.0, 900.0], window=3, initial=None)
    assert tracker.estimate == 900.0  # optimistic until a distributed batch says otherwise

    def network(rate: float, wait_scale: float = 1.0) -> PhaseTimes:
        rank0 = next(p for p in data.points if p.key == VOLTAGE and p.batch == 16 and p.bandwidth_mbit == rate
                     ).per_rank[0]
        return PhaseTimes(comm=rank0.comm, wait=rank0.wait * wait_scale, total=1.0)

    assert tracker.update(VOLTAGE, 16, network(900.0)) == pytest.approx(900.0, rel=0.1)
    slow = [tracker.update(VOLTAGE, 16, network(200.0)) for _ in range(3)]
    assert slow == [pytest.approx(200.0, rel=0.1)] * 3
    assert tracker.estimate == pytest.approx(200.0, rel=0.1)  # the 900 left the window of 3
    assert tracker.update(VOLTAGE, 16, network(200.0, wait_scale=30.0)) < 200.0  # a long wait reads slower...
    assert tracker.estimate == pytest.approx(200.0, rel=0.1)  # ...but cannot drag the estimate down
    tracker.update(VOLTAGE, 16, network(900.0))  # one batch on a faster link lifts it at once
    assert tracker.estimate == pytest.approx(900.0, rel=0.1)
    assert tracker.update(LOCAL, 16, PhaseTimes(comm=1.0, total=1.0)) is None  # nothing crossed a network


# -- real batches ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("online-engines")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 2, [2.0], source={"timm": "vit_tiny_patch16_224"},
                  max_batch=8)
    return out


@pytest.fixture(scope="module")
def loopback_map(small_engines, tmp_path_factory):
    """A real sweep on loopback: batches 1 and 4, local, voltage and prism CR 1.8."""
    plan = SweepPlan.for_build(small_engines, [1, 4], [2.0], [None], warmup=1, repeat=3)
    path = tmp_path_factory.mktemp("online-map") / "perfmap.json"
    profile(small_engines, path, plan, Launcher(2), threads=1, timeout=60, progress=False,
            accuracy=[AccuracyEntry(plan.prism[0], 2, 1.0, calibration="test")])
    return path


@pytest.fixture(scope="module")
def cluster(small_engines):
    """Rank 0's real DistributedExecutor with one worker process on loopback."""
    with loopback_cluster(small_engines, TIMEOUT_S, ONE_THREAD) as (executor, _):
        yield executor


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _serve(selector: OnlineSelector, executor, batch: int, count: int, seed: int = 0) -> list[Observation]:
    """What the server does per batch: choose, run, observe."""
    observations = []
    for index in range(count):
        choice = selector.choose(batch)
        observations.append(selector.observe(batch, executor.infer(executor.request(_images(batch, seed + index)),
                                                                   choice)))
    return observations


def test_cells_fill_from_real_batches_and_estimates_move_to_what_was_measured(loopback_map, cluster):
    data = PerfMap.load(loopback_map)
    selector = OnlineSelector(MapSelector(data, "latency", 0.0), cluster, OnlineOptions(min_count=3,
                                                                                         explore_fraction=0.0))
    assert selector.bandwidth_mbit is None  # a loopback map: no link rate to track
    measured: dict[ChainKey, list[float]] = {}
    for key in data.chains():  # every chain, as exploration or a changing link would run them
        for seed in range(4):
            result = cluster.infer(cluster.request(_images(4, seed)), key)
            assert result.choice == key and not result.fell_back
            observation = selector.observe(4, result)
            assert observation.mode == key.label and observation.predicted_ms is None  # nothing chose it
            measured.setdefault(key, []).append(result.timings.total / 4)
    decision = selector.decide(4)
    for candidate in decision.candidates:
        values = measured[candidate.choice]
        assert candidate.source == "online" and selector.cells.count(candidate.choice, 4, None) == 4
        assert min(values) <= candidate.per_sample_ms <= max(values)
    assert decision.choice == min(decision.candidates, key=lambda c: c.per_sample_ms).choice
    # a batch size the map never measured: the model's prediction, then the cell's once it fills
    before = {c.choice: c.source for c in selector.decide(2).candidates}
    assert set(before.values()) == {"model"}
    observations = _serve(selector, cluster, 2, 4)
    assert all(o.predicted_ms is not None and o.relative_error is not None for o in observations)
    assert sum(selector.cells.count(key, 2, None) for key in data.chains()) == 4


def test_exploration_is_capped_and_never_runs_a_rejected_cr(loopback_map, cluster):
    data = PerfMap.load(loopback_map)
    prism = next(k for k in data.chains() if k.mode == "prism")
    data.accuracy = [AccuracyEntry(prism, 2, 0.5, calibration="test: below the floor")]
    options = OnlineOptions(explore_fraction=0.25, explore_budget=100.0)  # every eligible mode is within budget
    selector = OnlineSelector(MapSelector(data, "latency", 0.99), cluster, options)
    ran, explored = [], 0
    for batch_index, observation in enumerate(_serve(selector, cluster, 1, 16), 1):
        explored += observation.explored
        ran.append(observation.mode)
        assert explored <= options.explore_fraction * batch_index
    assert prism.label not in ran
    assert explored == selector.policy.explored == 4  # 16 x 0.25, and there was always an eligible other mode


def test_the_refined_map_saves_loads_and_stays_bound_to_its_engines(loopback_map, cluster, small_engines, tmp_path):
    data = PerfMap.load(loopback_map)
    saved = tmp_path / "refined.json"
    selector = OnlineSelector(MapSelector(data, "latency", 0.0), cluster, OnlineOptions(min_count=2,
                                                                                         explore_fraction=0.0),
                              save_path=saved, save_every=3)
    _serve(selector, cluster, 4, 3)
    assert saved.exists()  # written by the third observation
    refined = PerfMap.load(saved, engines_dir=small_engines)  # strict: same manifest
    assert refined.metadata["engines"] == data.metadata["engines"]
    online = [p for p in refined.points if p.online is not None]
    assert len(online) == 1 and online[0].batch == 4 and online[0].online.observations == 3
    assert len(refined.points) == len(data.points)  # it replaced the map's cell, it did not add one
    untouched = {p.cell: p.to_dict() for p in data.points if p.cell != online[0].cell}
    assert {p.cell: p.to_dict() for p in refined.points if p.cell != online[0].cell} == untouched
    assert MapSelector(refined, "latency", 0.0).decide(4).best.source == "measured"  # it fits and selects


def test_an_energy_objective_or_a_missing_chain_is_refused(loopback_map, small_engines):
    data = PerfMap.load(loopback_map)
    local = LocalExecutor(small_engines / "rank0", options=ONE_THREAD)
    try:
        with pytest.raises(UsageError, match="latency only"):
            OnlineSelector(MapSelector(data, "energy", 0.0), local)
        with pytest.raises(UsageError, match="not loaded here"):
            OnlineSelector(MapSelector(data, "latency", 0.0), local)
    finally:
        local.close()


# -- the server's batcher shows the selector every batch ----------------------------------------------------


class _Learning:
    def __init__(self, fail: bool):
        self.fail, self.seen = fail, []

    def choose(self, batch: int) -> ChainKey:
        return LOCAL

    def observe(self, batch: int, result) -> Observation:
        self.seen.append((batch, result.choice))
        if self.fail:
            raise RuntimeError("a bug in learning")
        return Observation(result.choice.label, result.timings.total / batch, predicted_ms=result.timings.total,
                           explored=True, bandwidth_mbit=123.0)


@pytest.mark.parametrize("fail", [False, True])
def test_the_batcher_hands_over_results_and_survives_an_observer_that_raises(small_engines, fail):
    executor = LocalExecutor(small_engines / "rank0", options=ONE_THREAD)
    selector = _Learning(fail)

    async def serve_two() -> list:
        batcher = Batcher(executor, selector, max_wait_s=0.0)
        try:
            return [await asyncio.wait_for(batcher.submit(executor.request(_images(2, seed))), 60)
                    for seed in range(2)], batcher
        finally:
            await batcher.stop()

    try:
        outcomes, batcher = asyncio.run(serve_two())
    finally:
        executor.close()
    assert [tuple(o.logits.shape) for o in outcomes] == [(2, 5)] * 2 and selector.seen == [(2, LOCAL)] * 2
    metrics = batcher.metrics
    assert sample_sum(metrics.observer_errors) == (2 if fail else 0)
    assert sample_sum(metrics.explored, mode="local") == (0 if fail else 2)
    count = sample_sum(metrics.prediction_error, "_count", mode="local")
    assert count == (0 if fail else 2)
    if not fail:
        assert sample_sum(metrics.bandwidth_estimate) == 123.0
        # predicted batch, measured sample
        assert math.isclose(sample_sum(metrics.last_prediction_error, mode="local"), 1.0)


@pytest.mark.parametrize("args,message", [
    (["--save-map", "refined.json"], "--save-map needs --mode auto"),
    (["--mode", "auto", "--map", "{map}", "--no-online", "--save-map", "refined.json"], "--save-map needs --mode auto"),
    (["--mode", "auto", "--map", "{map}", "--objective", "energy"], "add --no-online"),
    (["--mode", "auto", "--map", "{map}", "--explore-fraction", "0.9"], "Invalid value for '--explore-fraction'"),
], ids=["fixed_mode", "no_online", "energy", "fraction_over_cap"])
def test_serve_refuses_online_options_that_do_not_fit(tmp_path, args, message):
    """Refused before any engine is loaded (the engine directory is empty)."""
    from click.testing import CliRunner

    from prism_trt.cli import main

    perfmap = tmp_path / "perfmap.json"
    perfmap.write_text("{}")
    argv = ["serve", "--engines", str(tmp_path), *[a.format(map=perfmap) for a in args]]
    result = CliRunner().invoke(main, argv, env={"PRISM_TRT_TOKEN": None})
    assert result.exit_code == 2, result.output
    assert message in result.output and "manifest.json" not in result.output


# -- --mode auto's map is checked before rank 0 joins the group ---------------------------------------------


@pytest.mark.parametrize("case,message", [
    ("other_engines", "was measured with other engines"),
    ("chain_not_built", "measured chains these engines do not hold: prism-cr"),
    ("not_json", "not valid JSON"),
    ("no_points", "has no measured points"),
])
def test_serve_refuses_a_bad_map_before_joining(small_engines, tmp_path, case, message):
    """No worker runs and the join timeout is a minute: the refusal must come at once, as one
    Error: line, from the map alone."""
    import time
    from dataclasses import replace

    from click.testing import CliRunner
    from test_profiler import synthetic_map

    from prism_trt.cli import main
    from prism_trt.engines.perfmap import engines_fingerprint

    data = synthetic_map()  # local, voltage and prism at 5 segments, as these engines hold
    if case != "other_engines":
        data.metadata["engines"] = engines_fingerprint(small_engines)
    if case == "chain_not_built":  # prism at 7 segments was never built here
        unbuilt = ChainKey.prism(7, 17, 2)
        data.points = [replace(p, key=unbuilt) if p.key.mode == "prism" else p for p in data.points]
    if case == "no_points":
        data.points, data.accuracy = [], []
    perfmap = tmp_path / "perfmap.json"
    data.save(perfmap)
    if case == "not_json":
        perfmap.write_text('{"schema": "prism-trt/perfmap", ')
    argv = ["serve", "--engines", str(small_engines), "--rank", "0", "--world-size", "2", "--master-port",
            str(free_port()), "--timeout", "60", "--mode", "auto", "--map", str(perfmap)]
    started = time.monotonic()
    result = CliRunner().invoke(main, argv, env={"PRISM_TRT_TOKEN": None})
    assert time.monotonic() - started < 20, "refused only after waiting for the workers"
    assert result.exit_code in (1, 2), result.output
    assert "Error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output and "did not join" not in result.output
