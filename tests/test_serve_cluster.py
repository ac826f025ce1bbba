"""`prism-trt serve` on two real ranks (GLOO over loopback), driven by real HTTP clients."""

import os
import signal
import subprocess
import sys
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
    argv = [sys.executable, "-m", "prism_trt.cli", "serve", "--engines", str(engines), "--rank", str(rank),
            "--world-size", "2", "--master-port", str(master_port), "--threads", "1", "--timeout", "10",
            "--mode", "prism", "--cr", cr, "--port", str(http_port), "--max-wait-ms", "2"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


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
    master, http = free_port(), free_port()
    worker = _serve(engines, 1, master, http)
    server = _serve(engines, 0, master, http)
    url = f"http://127.0.0.1:{http}"
    if not wait_until_ready(url, [server, worker]):
        server.kill()
        worker.kill()
        pytest.fail(f"server did not become ready: {server.communicate()[0][-3000:]}")
    yield url, server, worker
    _stop(server, worker)


def test_triton_client_talks_to_the_server(cluster, mnist_model, images):
    import tritonclient.http as triton

    url, server, worker = cluster
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
    assert "stopped by rank 0" in worker.communicate()[0]


def test_killing_a_worker_under_load_loses_nothing(cluster, mnist_model, images):
    url, server, worker = cluster
    plan = make_segment_plan(make_partition_plan(50, 1, 2), cr=5.0)
    with torch.no_grad():
        expected = {"prism": simulate(mnist_model, images, plan), "local": mnist_model(images)}
    requests_total, clients = 200, 4
    answers: dict[int, dict] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for index in range(offset, requests_total, clients):
                image = images[index % len(images)]
                body = {"id": str(index), "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                                      "data": image.flatten().tolist()}]}
                response = http.post(f"/v2/models/{mnist_model.spec.name}/infer", json=body)
                with lock:
                    if response.status_code != 200:
                        errors.append(f"{index}: {response.status_code} {response.text}")
                    else:
                        answers[index] = response.json()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(answers) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors[:5]
    assert sorted(answers) == list(range(requests_total))  # counts in == counts out, each answered once
    modes = {"prism": 0, "local": 0}
    for index, answer in answers.items():
        assert answer["id"] == str(index)
        mode = answer["parameters"]["mode"]
        modes[mode] += 1
        logits = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
        reference = expected[mode][index % len(images)].numpy()
        assert_close(logits, reference, name=f"request {index} ({mode}) logits")
    assert modes["prism"] > 0 and modes["local"] > 0
    ready = httpx.get(f"{url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["degraded"] is True
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "prism_fallbacks_total" in metrics


def test_a_requested_cr_is_served_as_the_chain_it_builds(engines, mnist_model, images):
    """`--cr 2` is L = 13 (CR 1.923) at build, serve and in every answer: one key, one label."""
    master, http = free_port(), free_port()
    worker, server = _serve(engines, 1, master, http, cr="2"), _serve(engines, 0, master, http, cr="2")
    try:
        url = f"http://127.0.0.1:{http}"
        assert wait_until_ready(url, [server, worker]), server.communicate()[0][-3000:]
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
        out = server.communicate(timeout=120)[0]
        assert server.returncode == 2, out
        assert "no prism-cr8.33 chain is loaded here (loaded: local, voltage, prism-cr5, prism-cr1.92)" in out
        assert "Traceback" not in out
    finally:
        _stop(server, worker)
