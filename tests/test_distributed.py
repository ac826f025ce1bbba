"""The distributed runtime with real processes and a real GLOO group over loopback.

Rank 0 runs in the test process (DistributedExecutor); workers are real `prism-trt run`
subprocesses. Every wait is bounded: the collective timeout is short and subprocesses are
waited for with a timeout and killed on failure.
"""

import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from conftest import ONE_THREAD, assert_close, build_engines

from prism_trt.core import make_partition_plan, make_segment_plan, simulate
from prism_trt.engines import ChainKey
from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.options import micro_batches_for

TIMEOUT_S = 20.0
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def engines(mnist_model, tmp_path_factory):
    """MNIST engines for P = 2 and 3 (local, voltage, prism CR 5)."""
    root = tmp_path_factory.mktemp("dist")
    for ranks in (2, 3):
        build_engines(mnist_model, root / f"p{ranks}", ranks, [5.0], source={"checkpoint": "vit_mnist.pt"},
                      max_batch=16)
    return root


def start_workers(directory, ranks: int, port: int, extra=()) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(directory),
                              "--rank", str(rank), "--world-size", str(ranks), "--master-port", str(port),
                              "--threads", "1", "--timeout", str(TIMEOUT_S), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for rank in range(1, ranks)]


@contextmanager
def rank0_with_workers(directory, ranks: int = 2):
    """Rank 0's real DistributedExecutor over ``directory`` with P-1 `prism-trt run` worker
    processes on loopback; torn down however the body ends, and the workers must exit cleanly."""
    port = free_port()
    workers = start_workers(directory, ranks, port)
    executor = None
    try:
        executor = DistributedExecutor(directory / "rank0", GroupConfig(0, ranks, "127.0.0.1", port, TIMEOUT_S),
                                       options=ONE_THREAD)
        yield executor
    finally:
        if executor is not None:
            executor.close()
        results = finish(workers)
    assert all(code == 0 for code, _ in results), results


def finish(workers: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for worker in workers:
        try:
            out, _ = worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, _ = worker.communicate()
        results.append((worker.returncode, out))
    return results


@pytest.fixture
def cluster(engines):
    """Start P-1 workers and rank 0; always tear down, even when the test fails."""
    made = []

    def make(ranks: int, **kwargs):
        port = free_port()
        workers = start_workers(engines / f"p{ranks}", ranks, port)
        group = GroupConfig(0, ranks, "127.0.0.1", port, TIMEOUT_S)
        executor = DistributedExecutor(engines / f"p{ranks}" / "rank0", group, RuntimeOptions(threads=1, **kwargs))
        made.append((executor, workers))
        return executor, workers

    yield make
    for executor, workers in made:
        executor.close()
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.communicate()


@pytest.mark.parametrize("ranks", [2, 3])
def test_voltage_and_prism_equal_reference(mnist_model, mnist_dir, cluster, ranks):
    from prism_trt.data import MnistTestSet

    executor, workers = cluster(ranks)
    images, _ = next(MnistTestSet(mnist_dir, limit=12).batches(12))
    with torch.no_grad():
        reference = mnist_model(images)
    voltage = executor.infer(executor.request(images), ChainKey.voltage())
    assert not voltage.fell_back and voltage.choice.mode == "voltage"
    assert_close(voltage.logits, reference)
    plan = make_segment_plan(make_partition_plan(50, 1, ranks), cr=5.0)
    prism = executor.infer(executor.request(images), executor.key_for("prism", 5.0), gather_timings=True)
    assert_close(prism.logits, simulate(mnist_model, images, plan))
    # every rank reports its breakdown; bytes follow the plan (B * L_p * D * 4 per block)
    assert len(prism.per_rank) == ranks
    for rank, times in enumerate(prism.per_rank):
        assert times.collectives == mnist_model.spec.depth * micro_batches_for(executor.micro_batches, 12)
        assert times.bytes_sent == mnist_model.spec.depth * 12 * plan.counts[rank] * 64 * 4
        assert times.compute > 0 and times.total >= times.compute
    # only rank 0 broadcasts the request; its time is in rank 0's total, accounted, not "other"
    rank0 = prism.per_rank[0]
    assert rank0.request > 0 and all(t.request == 0 for t in prism.per_rank[1:])
    parts = rank0.request + rank0.compute + rank0.staging + (rank0.wait or 0) + rank0.comm + rank0.other
    assert parts == pytest.approx(rank0.total, rel=1e-9, abs=1e-9)
    assert prism.timings.request == rank0.request
    local = executor.infer(executor.request(images), ChainKey.local())
    assert_close(local.logits, reference)
    executor.close()
    for code, out in finish(workers):
        assert code == 0, out
        assert "stopped by rank 0" in out


def test_profile_barrier_is_followed_by_workers(mnist_model, cluster):
    executor, workers = cluster(2, profile_barrier=True)
    images = torch.randn(3, 1, 28, 28)
    result = executor.infer(executor.request(images), executor.key_for("prism", 5.0), gather_timings=True)
    assert all(t.wait is not None and t.wait >= 0 for t in result.per_rank)
    plan = make_segment_plan(make_partition_plan(50, 1, 2), cr=5.0)
    assert_close(result.logits, simulate(mnist_model, images, plan))


def test_dead_worker_falls_back_to_local(mnist_model, cluster):
    executor, workers = cluster(2)
    images = torch.randn(4, 1, 28, 28)
    assert not executor.infer(executor.request(images), executor.key_for("prism", 5.0)).fell_back
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(timeout=30)
    result = executor.infer(executor.request(images), executor.key_for("prism", 5.0))
    with torch.no_grad():
        expected = mnist_model(images)
    assert result.fell_back and result.choice.mode == "local"
    assert_close(result.logits, expected)
    health = executor.health()
    assert health.live and health.degraded and "failed" in health.reason
    # later batches go straight to the local chain
    again = executor.infer(executor.request(images), ChainKey.voltage())
    assert again.fell_back
    assert_close(again.logits, expected)


def test_unbuilt_cr_is_an_error_not_a_fallback(cluster):
    from prism_trt.engines import ManifestError
    from prism_trt.errors import UsageError

    executor, _ = cluster(2)
    with pytest.raises(UsageError, match=r"no prism-cr8\.33 chain is loaded here \(loaded: local, voltage, prism-cr5"):
        executor.key_for("prism", 9.9)  # 50 tokens over 2 ranks: CR 9.9 is L = 3, i.e. CR 8.33
    with pytest.raises(ManifestError, match=r"no prism-cr8\.33 engines in this directory"):
        executor.infer(executor.request(torch.randn(1, 1, 28, 28)), ChainKey.for_cr(9.9, 50, 2))
    assert not executor.health().degraded


def test_wrong_rank_directory_is_refused(engines):
    from prism_trt.runtime.distributed_rank import DistributedRank

    with pytest.raises(ValueError, match="holds engines for rank 1 of 2, this process is rank 0 of 2"):
        DistributedRank(engines / "p2" / "rank1", 0, 2)


def test_run_cli_two_ranks(engines, tmp_path):
    port = free_port()
    workers = start_workers(engines / "p2", 2, port)
    out_json = tmp_path / "run.json"
    rank0 = subprocess.run([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines / "p2"),
                            "--rank", "0", "--world-size", "2", "--master-port", str(port), "--mode", "prism",
                            "--cr", "5", "--batch", "4", "--repeat", "3", "--warmup", "1", "--threads", "1",
                            "--timeout", str(TIMEOUT_S), "--json-out", str(out_json)],
                           capture_output=True, text=True, timeout=180)
    assert rank0.returncode == 0, rank0.stderr
    assert "rank1" in rank0.stdout and "compute ms" in rank0.stdout
    for code, out in finish(workers):
        assert code == 0, out
    import json

    result = json.loads(out_json.read_text())
    assert result["batch"] == 4 and len(result["per_rank"]) == 2 and not result["fell_back"]
    assert len(result["latency"]["samples_ms"]) == 3


def test_torchrun_launch(engines, tmp_path):
    """torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the same command runs every rank."""
    out_json = tmp_path / "torchrun.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                             "-m", "prism_trt.cli", "run", "--engines", str(engines / "p2"), "--mode", "voltage",
                             "--batch", "2", "--repeat", "2", "--warmup", "0", "--threads", "1",
                             "--timeout", str(TIMEOUT_S), "--json-out", str(out_json)],
                            capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped by rank 0" in result.stdout + result.stderr
    import json

    assert len(json.loads(out_json.read_text())["per_rank"]) == 2


def test_steady_state_allocates_nothing(cluster):
    executor, _ = cluster(2)
    images = torch.randn(5, 1, 28, 28)
    executor.infer(executor.request(images), executor.key_for("prism", 5.0))
    staging = {route.config.name: route.staging for route in executor.rank.routes}
    before = {name: s.allocations for name, s in staging.items()}
    buffers = {name: id(s.buffers((name, 5), 5).send) for name, s in staging.items() if name.startswith("prism")}
    for _ in range(4):
        executor.infer(executor.request(images), executor.key_for("prism", 5.0))
    assert {name: s.allocations for name, s in staging.items()} == before
    assert buffers == {name: id(s.buffers((name, 5), 5).send) for name, s in staging.items()
                       if name.startswith("prism")}


def test_group_config_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("PRISM_TRT_CLUSTER_TOKEN", "s3cret")
    config = GroupConfig.from_env_or_flags(timeout_s=5)
    assert (config.rank, config.world_size, config.master_addr, config.master_port) == (2, 3, "10.0.0.1", 29555)
    assert config.token == "s3cret"
    assert GroupConfig.from_env_or_flags(rank=1).rank == 1  # flags win
    monkeypatch.setenv("WORLD_SIZE", "three")
    with pytest.raises(ValueError, match="WORLD_SIZE='three' is not a valid value"):
        GroupConfig.from_env_or_flags()
    with pytest.raises(ValueError, match="rank 3 is not in"):
        GroupConfig(3, 3)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    import ipaddress

    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(words if width == 32 else words[:4])))
    return found


def test_the_rendezvous_listens_only_on_the_master_address():
    """torch's own rendezvous (init_process_group tcp://) listens on every interface."""
    from prism_trt.runtime.rendezvous import ADOPTS_BOUND_SOCKET, Rendezvous

    if not ADOPTS_BOUND_SOCKET:
        pytest.skip(f"torch {torch.__version__}'s TCPStore cannot serve from a bound socket; it listens everywhere")
    port = free_port()
    rendezvous = Rendezvous(GroupConfig(0, 2, "127.0.0.1", port, 5.0))
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
        assert os.environ.get("GLOO_SOCKET_IFNAME") == "lo"  # GLOO's sockets too: the route to rank 0
    finally:
        rendezvous.close()
    assert listening_addresses(port) == set()


def test_ranks_with_the_same_token_form_the_group(engines):
    port = free_port()
    workers = start_workers(engines / "p2", 2, port, extra=("--cluster-token", "correct horse"))
    executor = DistributedExecutor(engines / "p2" / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S,
                                                                       token="correct horse"), ONE_THREAD)
    try:
        result = executor.infer(executor.request(torch.randn(2, 1, 28, 28)), executor.key_for("prism", 5.0))
        assert result.choice.mode == "prism" and not result.fell_back
    finally:
        executor.close()
    assert [code for code, _ in finish(workers)] == [0]


def test_a_worker_with_a_wrong_token_is_refused(engines):
    from prism_trt.runtime import ClusterError

    port = free_port()
    workers = start_workers(engines / "p2", 2, port, extra=("--cluster-token", "guessed"))
    try:
        with pytest.raises(ClusterError,
                           match=r"rank\(s\) \[1\] did not join .*rank 1 presented a wrong cluster token"):
            DistributedExecutor(engines / "p2" / "rank0", GroupConfig(0, 2, "127.0.0.1", port, 15.0,
                                                                     token="correct horse"), ONE_THREAD)
    finally:
        [(code, out)] = finish(workers)
    assert code == 1 and "its cluster token does not match rank 0's" in out and "Traceback" not in out


@pytest.mark.parametrize("env, flags, message", [
    ({"PRISM_TRT_CLUSTER_TOKEN": ""}, [], "the cluster token is empty"),
    ({}, ["--cluster-token", " "], "the cluster token is empty"),
    ({}, ["--master-addr", "192.0.2.7"], "reachable from the network, so every rank needs the same secret"),
])
def test_group_security_mistakes_are_usage_errors(engines, monkeypatch, env, flags, message):
    from click.testing import CliRunner

    from prism_trt.cli import main

    monkeypatch.delenv("PRISM_TRT_CLUSTER_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["run", "--engines", str(engines / "p2"), "--rank", "1", "--world-size", "2",
                                       *flags], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_junk_in_the_rendezvous_store_is_refused_not_fatal():
    """Anyone who reaches the store can write a join request: junk is refused and rank 0 goes on."""
    import datetime

    import torch.distributed as dist

    from prism_trt.runtime.group import ClusterError
    from prism_trt.runtime.rendezvous import Rendezvous

    port = free_port()
    rendezvous = Rendezvous(GroupConfig(0, 2, "127.0.0.1", port, 5.0, token="correct horse"))
    try:
        intruder = dist.PrefixStore("prism-trt/", dist.TCPStore("127.0.0.1", port, None, False,
                                                                datetime.timedelta(seconds=5)))
        challenge = intruder.get("challenge").decode()
        for junk in (b"\xff not json", b'{"nonce": 1}',
                     f'{{"nonce": "n", "challenge": "{challenge}", "proof": "\u00e9\u00e9"}}'.encode()):
            intruder.set("join/1", junk)
            assert not rendezvous.all_waiting()
        with pytest.raises(ClusterError, match=r"rank 1 presented a wrong cluster token"):
            rendezvous.form(timeout_s=0.5)
    finally:
        rendezvous.close()
