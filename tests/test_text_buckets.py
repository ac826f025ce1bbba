"""Sequence buckets: one text build of several lengths (`--seq-len 8,16`), served as one model.

Built once per family by the CLI (P = 2, local, voltage and prism CR 2; N = 16 in rank0/, N = 8 in
rank0/seq8/). A request of n positions must run on the shortest bucket that holds it and answer
exactly what the torch reference computes on that bucket's plan (padding is exact), through the
local and the distributed executors and a real `prism-trt serve`."""

import concurrent.futures
import json

import httpx
import pytest
import torch
from click.testing import CliRunner
from conftest import ONE_THREAD, TEXT_SIZE, assert_close
from serving import running
from test_distributed import rank0_with_workers
from test_serve_cluster import _output, _stop
from test_text_serve import triton_infer, two_rank_serve

from prism_trt.cli import main
from prism_trt.core import make_segment_plan, voltage_plan
from prism_trt.core.text_rank import simulate_text, text_partition
from prism_trt.engines import ChainKey
from prism_trt.engines.buckets import BucketSet, bucket_directory
from prism_trt.engines.manifest import Manifest, ManifestError
from prism_trt.engines.stage_spec import ATTENTION_MASK, INPUT_IDS
from prism_trt.errors import UsageError
from prism_trt.runtime.api import FixedSelector
from prism_trt.runtime.local import LocalExecutor
from prism_trt.serve import create_app

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")
pytestmark = pytest.mark.timeout(300)
LENGTHS = (8, 16)
SIZES = [f"--{key.replace('_', '-')}={value}" for key, value in TEXT_SIZE.items()]


def build(out, name: str, *extra: str):
    return CliRunner().invoke(main, ["build", "--model", name, *SIZES, "--seq-len", ",".join(map(str, LENGTHS)),
                                     "--ranks", "2", "--exporter", "torchscript", "--opt-batch", "2", "--max-batch",
                                     "4", "--threads", "1", "--out", str(out), "-q", *extra])


@pytest.fixture(scope="module", params=["gpt2", "bert-base-uncased"])
def bucket_build(request, tmp_path_factory):
    """(name, build directory, the same PrismText)."""
    from prism_trt.model.text_adapters import load_text_model, size_overrides

    out = tmp_path_factory.mktemp(f"buckets-{request.param}")
    result = build(out, request.param, "--cr", "2")
    assert result.exit_code == 0, result.output
    assert "seq8/prism-cr2" in result.output  # the build's table names the shorter bucket's chains
    return request.param, out, load_text_model(request.param, **size_overrides(request.param, **TEXT_SIZE))


def requests(seed: int, lengths: tuple[int, ...], positions: int):
    """ids and right-padded masks of ``positions`` columns, rows valid up to ``lengths``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT_SIZE["vocab_size"], (len(lengths), positions), generator=generator)
    mask = (torch.arange(positions)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def bucket_reference(model, mode: str, ids, mask):
    """What the bucket that holds ``ids`` computes: the request right-padded to that N, at CR 2."""
    positions = ids.shape[1]
    length = next(n for n in LENGTHS if n >= positions)
    ids, mask = (torch.nn.functional.pad(t, (0, length - positions)) for t in (ids, mask))
    if mode == "local":
        out = model(ids, mask)
    else:
        partition = text_partition(model.spec, length, 2)
        plan = voltage_plan(partition) if mode == "voltage" else make_segment_plan(partition, cr=2.0)
        out = simulate_text(model, plan, ids, mask)
    return out[:, :positions] if model.spec.causal else out


def test_layout_and_manifests(bucket_build):
    _, out, _ = bucket_build
    for rank in range(2):
        primary = Manifest.load(out / f"rank{rank}")
        assert primary.num_tokens == 16 and primary.sequence_buckets == (8,)
        buckets = BucketSet.read(out / f"rank{rank}", primary)
        assert buckets.lengths == LENGTHS and buckets.for_length(1).length == 8
        assert buckets.for_length(8).length == 8 and buckets.for_length(9).length == 16
        short = buckets.for_length(5).manifest
        assert short.num_tokens == 8 and short.sequence_buckets == ()
        # the same chains in build order; prism CR 2 is L = 4 at N = 16 and L = 2 at N = 8
        assert [c.mode for c in short.configs] == [c.mode for c in primary.configs]
        if rank == 0:
            assert buckets.chain(ChainKey.prism(4, 16, 2), buckets.for_length(5)).key == ChainKey.prism(2, 8, 2)
    assert json.loads((out / "build.json").read_text())["sequence_buckets"] == [8]
    with pytest.raises(UsageError, match="longest sequence 16"):
        buckets.for_length(17)


def test_local_executor_runs_each_length_on_its_bucket(bucket_build):
    name, out, model = bucket_build
    executor = LocalExecutor(out / "rank0", options=ONE_THREAD)
    try:
        assert executor.buckets.lengths == LENGTHS
        for positions, bucket in ((3, 8), (8, 8), (12, 16), (16, 16)):
            ids, mask = requests(positions, (positions, max(1, positions - 2)), positions)
            request = executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask})
            result = executor.infer(request, ChainKey.local())
            assert result.sequence_length == bucket
            assert_close(request.trim(result.logits), bucket_reference(model, "local", ids, mask),
                         name=f"{name} n={positions}")
    finally:
        executor.close()


def test_two_ranks_run_each_length_on_its_bucket(bucket_build):
    name, out, model = bucket_build
    with rank0_with_workers(out) as executor:
        assert executor.chains() == [ChainKey.local(), ChainKey.voltage(), ChainKey.prism(4, 16, 2)]
        for positions, bucket in ((5, 8), (13, 16), (8, 8), (2, 8)):
            ids, mask = requests(positions, (positions, 1, max(1, positions // 2))[:3], positions)
            for mode in ("voltage", "prism", "local"):
                key = executor.key_for(mode, 2.0 if mode == "prism" else None)
                request = executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask})
                result = executor.infer(request, key)
                assert not result.fell_back and result.choice == key and result.sequence_length == bucket
                assert_close(request.trim(result.logits), bucket_reference(model, mode, ids, mask),
                             name=f"{name} {mode} n={positions}")


def test_server_batches_each_bucket_apart(bucket_build):
    """Requests of both buckets at once: each answered exactly, none merged with the other bucket
    (a merged batch would fail and be rerun one request at a time: the isolation counter)."""
    name, out, model = bucket_build
    executor = LocalExecutor(out / "rank0", options=ONE_THREAD)
    try:
        with running(create_app(executor, FixedSelector(ChainKey.local()), max_wait_ms=200)) as url:
            metadata = httpx.get(f"{url}/v2/models/{name}").json()["parameters"]
            assert metadata["sequence_buckets"] == "8,16" and metadata["max_sequence_length"] == 16
            cases = [requests(seed, (positions,), positions) for seed, positions in enumerate((4, 14, 6, 16, 7, 11))]
            with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
                answers = list(pool.map(lambda case: triton_infer(url, name, case[0].numpy(), case[1].numpy(), True),
                                        cases))
            for (ids, mask), answer in zip(cases, answers):
                assert_close(answer.as_numpy("logits"), bucket_reference(model, "local", ids, mask))
            metrics = httpx.get(f"{url}/metrics").text
            assert "prism_batch_isolations_total 0" in metrics, metrics
    finally:
        executor.close()


def test_two_rank_serve_over_buckets(bucket_build):
    name, out, model = bucket_build
    if name != "gpt2":
        pytest.skip("one family is enough for the process-level check")
    with two_rank_serve(out) as (url, server, worker):
        for positions in (6, 15):
            ids, mask = requests(positions, (positions, 3), positions)
            result = triton_infer(url, name, ids.numpy(), mask.numpy(), True)
            assert result.get_response()["parameters"]["choice"] == "prism-cr2"
            assert_close(result.as_numpy("logits"), bucket_reference(model, "prism", ids, mask))
        _stop(server)
        assert "stopped by rank 0" in _output(worker, 60) and worker.returncode == 0


def test_crs_that_collapse_in_a_short_bucket_are_refused(tmp_path):
    """At N = 8, P = 2 the CRs 4 and 3 both give L = 1; at N = 16 they give L = 2 and 3: the
    buckets would hold different chains, so the build says why instead of mapping them wrongly."""
    result = build(tmp_path, "gpt2", "--cr", "4", "--cr", "3")
    assert result.exit_code == 2 and "different chains per --seq-len" in result.output, result.output
    assert not (tmp_path / "rank0").exists()


def test_a_changed_or_missing_bucket_is_refused(bucket_build, tmp_path):
    import shutil

    _, out, _ = bucket_build
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    short = bucket_directory(copy / "rank0", 8)
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64  # another model's engines, digest made to match
    (short / "manifest.json").write_text(json.dumps(Manifest.from_dict(manifest).to_dict()))
    with pytest.raises(ManifestError, match="weights"):
        LocalExecutor(copy / "rank0", options=ONE_THREAD)
    shutil.rmtree(short)
    with pytest.raises(ManifestError, match="seq8"):
        LocalExecutor(copy / "rank0", options=ONE_THREAD)


def test_run_measures_a_bucket(bucket_build, tmp_path):
    """`prism-trt run --seq-len n` on one board times the bucket that holds n."""
    _, out, _ = bucket_build
    report = tmp_path / "run.json"
    result = CliRunner().invoke(main, ["run", "--engines", str(out), "--mode", "local", "--seq-len", "5", "--batch",
                                       "2", "--repeat", "2", "--warmup", "0", "--threads", "1",
                                       "--json-out", str(report)])
    assert result.exit_code == 0 and "(n=5, bucket N=8)" in result.output, result.output
    assert json.loads(report.read_text())["latency"]["mean_ms"] > 0
    too_long = CliRunner().invoke(main, ["run", "--engines", str(out), "--mode", "local", "--seq-len", "17", "--batch",
                                         "2"])
    assert too_long.exit_code != 0 and "longest sequence 16" in too_long.output, too_long.output


def test_online_selector_learns_only_from_the_mapped_bucket(bucket_build, tmp_path):
    """`serve --mode auto` on a bucketed text build: the perf map is measured on the longest bucket,
    so only batches that ran there refine it; a short request's cheaper batch is not learnt from."""
    name, out, _ = bucket_build
    if name != "gpt2":
        pytest.skip("one family is enough for the selector")
    from prism_trt.engines import AccuracyEntry, PerfMap
    from prism_trt.profiler.adaptive import MapSelector
    from prism_trt.profiler.adaptive.selector import OnlineSelector
    from prism_trt.profiler.sweep import Launcher, SweepPlan, profile

    plan = SweepPlan.for_build(out, [1, 2], [2.0], [None], warmup=1, repeat=3)
    path = tmp_path / "perfmap.json"
    profile(out, path, plan, Launcher(2), threads=1, timeout=60, progress=False,
            accuracy=[AccuracyEntry(plan.prism[0], 2, 1.0, calibration="test")])
    data = PerfMap.load(path)
    assert all(p.gflops_per_rank and len(p.gflops_per_rank) == len(p.per_rank) for p in data.points)
    with rank0_with_workers(out) as executor:
        selector = OnlineSelector(MapSelector(data), executor)
        for positions, learnt in ((16, True), (5, False), (12, True), (8, False)):
            ids, mask = requests(positions, (positions, 2), positions)
            result = executor.infer(executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask}), selector.choose(2))
            before = selector.observed
            observation = selector.observe(2, result)
            assert (observation is not None) == learnt and selector.observed == before + learnt, positions
