"""`prism-trt serve` on two real ranks (GLOO over loopback), driven by real HTTP clients."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import assert_close, build_engines

from prism_trt.core import make_partition_plan, make_segment_plan, simulate
from prism_trt.runtime.group import free_port
from prism_trt.serve.client import wait_until_ready

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engines(mnist_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-engines")
    # CR 2 on 50 tokens over 2 ranks is L = 13 segments, i.e. CR 1.923: the chain the key maps it to
    build_engines(mnist_model, out, 2, [5.0, 2.0], source={"checkpoint": "vit_mnist.pt"}, max_batch=16)
    return out


@pytest.fixture(scope="module")
def images(mnist_dir):
    from prism_trt.data import MnistTestSet

    batch, _ = next(MnistTestSet(mnist_dir, limit=64).batches(64))
    return batch


def _serve(engines, rank: int, master_port: int, http_port: int, cr: str = "5") -> subprocess.Popen:
    """A `prism-trt serve` rank logging to a file (a pipe nobody reads fills up under load and
    blocks the server); :func:`_output` reads it."""
    argv = [sys.executable, "-m", "prism_trt.cli", "serve", "--engines", str(engines), "--rank", str(rank),
            "--world-size", "2", "--master-port", str(master_port), "--threads", "1", "--timeout", "10",
            "--mode", "prism", "--cr", cr, "--port", str(http_port), "--max-wait-ms", "2"]
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-rank{rank}-", suffix=".log")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process.log = log  # closed (and deleted) with the Popen object
    return process


def _output(process: subprocess.Popen, timeout_s: float = 120.0) -> str:
    """What the process printed, once it exited (killed after ``timeout_s``)."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.log.seek(0)
    return process.log.read()


def _stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()



@pytest.fixture
def cluster(engines):
    """(url, rank 0, worker, restart): restart() starts the worker again with the same command."""
    master, http = free_port(), free_port()
    worker = _serve(engines, 1, master, http)
    server = _serve(engines, 0, master, http)
    url = f"http://127.0.0.1:{http}"
    started = [server, worker]

    def restart() -> subprocess.Popen:
        started.append(_serve(engines, 1, master, http))
        return started[-1]

    if not wait_until_ready(url, [server, worker]):
        server.kill()
        worker.kill()
        pytest.fail(f"server did not become ready: {_output(server)[-3000:]}")
    yield url, server, worker, restart
    _stop(*started)


def test_triton_client_talks_to_the_server(cluster, mnist_model, images):
    import tritonclient.http as triton

    url, server, worker, _ = cluster
    client = triton.InferenceServerClient(url.removeprefix("http://"), connection_timeout=30, network_timeout=30)
    assert client.is_server_live() and client.is_server_ready()
    name = mnist_model.spec.name
    assert client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert metadata["inputs"][0]["datatype"] == "FP32" and metadata["inputs"][0]["shape"] == [-1, 1, 28, 28]
    batch = images[:5].numpy()
    request = triton.InferInput("input", list(batch.shape), "FP32")
    request.set_data_from_numpy(batch, binary_data=False)
    outputs = [triton.InferRequestedOutput("logits", binary_data=False),
               triton.InferRequestedOutput("label", binary_data=False)]
    result = client.infer(name, [request], outputs=outputs)
    logits = result.as_numpy("logits")
    plan = make_segment_plan(make_partition_plan(50, 1, 2), cr=5.0)
    expected = simulate(mnist_model, images[:5], plan).numpy()
    assert_close(logits, expected)
    assert (result.as_numpy("label") == expected.argmax(-1)).all()
    client.close()
    # SIGTERM on rank 0 stops every rank cleanly
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    assert worker.wait(timeout=60) == 0
    assert "stopped by rank 0" in _output(worker)


class Load:
    """``clients`` threads sending one-image requests (image ``index % len(images)``, id ``index``)
    until :meth:`stop` or ``limit`` requests or ``limit_s`` seconds: bounded in count and time."""

    def __init__(self, url: str, model: str, images: torch.Tensor, clients: int = 4, limit: int = 3000,
                 limit_s: float = 150.0):
        self.url, self.model, self.images, self.clients, self.limit = url, model, images, clients, limit
        self.deadline = time.monotonic() + limit_s
        self.answers: dict[int, dict] = {}
        self.errors: list[str] = []
        self.sent = 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _next_index(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self.sent >= self.limit or time.monotonic() > self.deadline:
                return None
            self.sent += 1
            return self.sent - 1

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while (index := self._next_index()) is not None:
                image = self.images[index % len(self.images)]
                body = {"id": str(index), "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                                      "data": image.flatten().tolist()}]}
                response = http.post(f"/v2/models/{self.model}/infer", json=body)
                with self._lock:
                    if response.status_code != 200:
                        self.errors.append(f"{index}: {response.status_code} {response.text}")
                    else:
                        self.answers[index] = response.json()

    def wait_for(self, answered: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < answered and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, now: bool = True) -> None:
        """Stop sending (``now``) or let the clients reach the limit, and wait for their last answers."""
        if now:
            self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def check(self, expected: dict[str, torch.Tensor]) -> dict[str, int]:
        """Every request answered exactly once and correctly for the mode it ran in; counts per mode."""
        assert not self.errors, self.errors[:5]
        assert sorted(self.answers) == list(range(self.sent))  # counts in == counts out, each answered once
        modes = dict.fromkeys(expected, 0)
        for index, answer in self.answers.items():
            assert answer["id"] == str(index)
            mode = answer["parameters"]["mode"]
            modes[mode] += 1
            logits = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
            reference = expected[mode][index % len(self.images)].numpy()
            assert_close(logits, reference, name=f"request {index} ({mode}) logits")
        return modes


def _expected(mnist_model, images) -> dict[str, torch.Tensor]:
    plan = make_segment_plan(make_partition_plan(50, 1, 2), cr=5.0)
    with torch.no_grad():
        return {"prism": simulate(mnist_model, images, plan), "local": mnist_model(images)}


def _health(url: str) -> dict:
    return httpx.get(f"{url}/v2/health/ready", timeout=10).json()


def _wait_health(url: str, degraded: bool, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (health := _health(url))["degraded"] is not degraded and time.monotonic() < deadline:
        time.sleep(0.1)
    return health


def test_killing_a_worker_under_load_loses_nothing(cluster, mnist_model, images):
    url, server, worker, _ = cluster
    load = Load(url, mnist_model.spec.name, images, limit=200)
    load.wait_for(50)
    worker.send_signal(signal.SIGKILL)
    load.stop(now=False)
    assert load.sent == 200
    modes = load.check(_expected(mnist_model, images))
    assert modes["prism"] > 0 and modes["local"] > 0
    ready = httpx.get(f"{url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["degraded"] is True
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "prism_fallbacks_total" in metrics


def test_a_restarted_worker_rejoins_under_load(cluster, mnist_model, images):
    """Kill the worker under load, start it again with the same command: rank 0 re-forms the group
    without a restart, prism mode resumes, and every accepted request is answered exactly once."""
    url, server, worker, restart = cluster
    load = Load(url, mnist_model.spec.name, images)
    load.wait_for(30)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert _wait_health(url, degraded=True)["degraded"] is True
    answered_while_degraded = len(load.answers)
    restarted = restart()
    health = _wait_health(url, degraded=False, timeout_s=120)
    assert health == {"ready": True, "degraded": False}, (health, restarted.poll())
    resumed_from = load.sent  # every request sent from here on finds the group formed again
    load.wait_for(resumed_from + 40)
    load.stop()
    modes = load.check(_expected(mnist_model, images))
    assert modes["local"] > 0 and len(load.answers) > answered_while_degraded
    after = [load.answers[i]["parameters"]["mode"] for i in range(resumed_from, load.sent)]
    assert after and set(after) == {"prism"}, after
    server.send_signal(signal.SIGTERM)  # the rejoined worker follows rank 0's stop like the first one
    assert server.wait(timeout=60) == 0 and restarted.wait(timeout=60) == 0
    assert "stopped by rank 0" in _output(restarted)


def test_a_frozen_worker_shows_as_degraded_while_it_stalls(cluster, mnist_model, images):
    url, server, worker, _ = cluster
    name = mnist_model.spec.name
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "data": images[0].flatten().tolist()}]}
    worker.send_signal(signal.SIGSTOP)
    try:
        answers: list = []
        request = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=120)))
        request.start()
        stalled = _wait_health(url, degraded=True, timeout_s=30)
    finally:
        worker.send_signal(signal.SIGCONT)
    assert stalled["degraded"] is True and "have not answered" in stalled["reason"], stalled
    request.join(timeout=120)
    assert answers and answers[0].status_code == 200, answers
    # thawed within the collective timeout, the batch finishes distributed; thawed later, the group
    # is re-formed: either way readiness comes back to ready
    assert _wait_health(url, degraded=False, timeout_s=120) == {"ready": True, "degraded": False}


def test_a_requested_cr_is_served_as_the_chain_it_builds(engines, mnist_model, images):
    """`--cr 2` is L = 13 (CR 1.923) at build, serve and in every answer: one key, one label."""
    master, http = free_port(), free_port()
    worker, server = _serve(engines, 1, master, http, cr="2"), _serve(engines, 0, master, http, cr="2")
    try:
        url = f"http://127.0.0.1:{http}"
        assert wait_until_ready(url, [server, worker]), _output(server)[-3000:]
        name = mnist_model.spec.name
        modes = httpx.get(f"{url}/v2/models/{name}", timeout=10).json()["parameters"]["modes"].split(",")
        assert "prism-cr1.92" in modes
        body = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                            "data": images[:2].flatten().tolist()}]}
        answer = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30).json()
        parameters = answer["parameters"]
        assert parameters["choice"] == "prism-cr1.92" and parameters["segments"] == 13
        assert parameters["cr"] == pytest.approx(25 / 13)
        plan = make_segment_plan(make_partition_plan(50, 1, 2), segments=13)
        assert_close(np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(2, -1),
                     simulate(mnist_model, images[:2], plan).numpy())
    finally:
        _stop(server, worker)


def test_serve_refuses_a_cr_that_was_not_built(engines):
    """Start-up fails with the built chains named, instead of a server that answers 500 forever."""
    master, http = free_port(), free_port()
    worker, server = _serve(engines, 1, master, http, cr="9.9"), _serve(engines, 0, master, http, cr="9.9")
    try:
        out = _output(server)
        assert server.returncode == 2, out
        assert "no prism-cr8.33 engines in this directory (built: local, voltage, prism-cr5, prism-cr1.92)" in out
        assert "Traceback" not in out
    finally:
        _stop(server, worker)
