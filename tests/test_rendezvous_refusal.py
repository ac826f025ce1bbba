"""Start-up with a worker that presents a wrong cluster token: rank 0 refuses it and keeps waiting
for the right one (anyone who reaches the rendezvous port must not be able to stop a cluster from
starting), real worker processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ONE_THREAD, build_engines, random_model, small_spec

from prism_trt.runtime import ClusterError
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port

TOKEN = "correct horse"
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("refusal")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 2, [2.0], max_batch=8, source={"timm": "test"})
    return out


def worker(engines, port: int, token: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines), "--rank", "1",
                             "--world-size", "2", "--master-port", str(port), "--threads", "1", "--timeout",
                             str(TIMEOUT_S), "--cluster-token", token],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_rank_0_refuses_a_wrong_token_and_forms_the_group_with_the_right_one(engines):
    port = free_port()
    formed: list = []

    def rank0() -> None:
        try:
            formed.append(DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S,
                                                                             token=TOKEN), ONE_THREAD))
        except Exception as error:  # noqa: BLE001  (the test reports it)
            formed.append(error)

    thread = threading.Thread(target=rank0)
    thread.start()
    intruder = worker(engines, port, "guessed")
    try:
        out, _ = intruder.communicate(timeout=TIMEOUT_S)
        assert intruder.returncode == 1 and "its cluster token does not match rank 0's" in out, out
        assert "Traceback" not in out
        assert thread.is_alive(), f"rank 0 stopped after refusing the intruder: {formed}"
        right = worker(engines, port, TOKEN)
        thread.join(TIMEOUT_S)
        [executor] = formed
        assert isinstance(executor, DistributedExecutor), executor
        try:
            result = executor.infer(executor.request(torch.randn(2, 3, 32, 32)), executor.key_for("prism", 2.0))
            assert result.choice.mode == "prism" and not result.fell_back
        finally:
            executor.close()
        out, _ = right.communicate(timeout=TIMEOUT_S)
        assert right.returncode == 0, out
    finally:
        for process in (intruder, locals().get("right")):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
        thread.join(TIMEOUT_S)


def test_with_no_right_worker_rank_0_times_out_naming_the_refusal(engines):
    port = free_port()
    intruder = worker(engines, port, "guessed")
    try:
        with pytest.raises(ClusterError, match=r"rank\(s\) \[1\] did not join .* within 15 s "
                                               r"\(rank 1 presented a wrong cluster token\)"):
            DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, 15.0, token=TOKEN), ONE_THREAD)
    finally:
        out, _ = intruder.communicate(timeout=TIMEOUT_S)
    assert intruder.returncode == 1 and "its cluster token does not match rank 0's" in out


@pytest.mark.parametrize("command", ["serve", "run"])
def test_an_unbuilt_cr_is_refused_before_waiting_for_the_workers(engines, command):
    """No worker is started: rank 0 must say what is wrong with its own options at once."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", command, "--engines", str(engines), "--rank", "0",
                             "--world-size", "2", "--master-port", str(free_port()), "--timeout", "40",
                             "--mode", "prism", "--cr", "7"], capture_output=True, text=True, timeout=300)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    assert "no prism-cr" in result.stderr and "built: local, voltage" in result.stderr, result.stderr
    assert "did not join" not in result.stderr
    assert time.monotonic() - started < 35, "rank 0 waited for the workers before checking --cr"
