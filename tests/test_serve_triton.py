"""Triton's model endpoints (configuration, statistics, repository index) and ``--model-name``,
through tritonclient's own calls against real servers: the in-process app on uvicorn (fixtures in
conftest.py: the tiny-test model, max batch 8, 3 x 32 x 32 inputs) and a `prism-trt serve` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_close, build_engines, random_model, small_spec
from prometheus_text import metric_value, scrape
from serving import LOCAL, VoltageForBatchOfThree, expected_logits, images, infer_body, running

from prism_trt.cli import main
from prism_trt.runtime.api import FixedSelector, Health
from prism_trt.runtime.group import free_port
from prism_trt.serve import create_app
from prism_trt.serve.client import wait_until_ready
from prism_trt.serve.triton import model_config

triton_http = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

pytestmark = pytest.mark.timeout(120)


def triton_client(url: str):
    return triton_http.InferenceServerClient(url.removeprefix("http://"), connection_timeout=30, network_timeout=30)


@pytest.fixture
def triton(serve_client):
    client = triton_client(str(serve_client.base_url))
    yield client
    client.close()


# ------------------------------------------------------------------ configuration


def test_model_config_lists_the_metadata_tensors_and_the_batcher(triton):
    config = triton.get_model_config("tiny-test")
    assert config["name"] == "tiny-test" and config["platform"] == config["backend"] == "prism_trt"
    assert config["max_batch_size"] == 8
    assert {"name": "input", "data_type": "TYPE_FP32", "dims": [3, 32, 32]} in config["input"]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [5]},
                                {"name": "label", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}]
    # serve_client batches for at most 25 ms, up to the engines' max batch, first come first served
    assert config["dynamic_batching"] == {"preferred_batch_size": [8], "max_queue_delay_microseconds": 25000,
                                          "preserve_ordering": True}
    assert config["parameters"]["modes"] == {"string_value": "local"}
    assert config["parameters"]["max_queue_images"] == {"string_value": str(16 * 8)}
    # whatever inputs the metadata lists (FP32 images, raw UINT8 pixels, ...), the configuration lists too
    metadata = triton.get_model_metadata("tiny-test")
    for listed, configured in zip(metadata["inputs"] + metadata["outputs"], config["input"] + config["output"]):
        assert configured["name"] == listed["name"] and configured["data_type"] == f"TYPE_{listed['datatype']}"
        assert configured["dims"] == (listed["shape"][1:] or [1])
    assert len(config["input"]) == len(metadata["inputs"]) and len(config["output"]) == len(metadata["outputs"])
    assert triton.get_model_config("tiny-test", model_version="1") == config


def test_model_config_of_other_datatypes_and_variable_dims():
    metadata = {"name": "m", "platform": "prism_trt", "parameters": {"max_batch_size": 4, "vocab_size": 97},
                "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, 8, 8]},
                           {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                           {"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, 97]}]}
    config = model_config(metadata, max_batch=4, max_wait_s=0.0015, max_queue_images=64)
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_UINT8", "dims": [3, 8, 8]},
                               {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]},
                               {"name": "text", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [-1, 97]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1500
    assert config["parameters"] == {"vocab_size": {"string_value": "97"}, "max_queue_images": {"string_value": "64"}}


@pytest.mark.parametrize("call,message", [
    (lambda c: c.get_model_config("vit_huge"), "model 'vit_huge' is not served here; this server serves 'tiny-test'"),
    (lambda c: c.get_inference_statistics("vit_huge"), "model 'vit_huge' is not served here"),
    (lambda c: c.get_model_config("tiny-test", model_version="2"), "model 'tiny-test' has no version '2'"),
    (lambda c: c.get_inference_statistics("tiny-test", model_version="0"), "it has one version, '1'"),
    (lambda c: c.get_model_metadata("tiny-test", model_version="7"), "has no version '7'"),
], ids=["config_unknown_model", "stats_unknown_model", "config_bad_version", "stats_bad_version",
        "metadata_bad_version"])
def test_unknown_model_or_version_is_a_clear_404(triton, call, message):
    with pytest.raises(InferenceServerException) as raised:
        call(triton)
    # the traceback holds the client past the fixture's close, and tritonclient 2.40 then fails closing it twice
    error = raised.value.with_traceback(None)
    del raised
    assert error.status() == "404" and message in error.message()


# ------------------------------------------------------------------ statistics


@pytest.fixture
def fresh_server(serve_executor):
    """A server of its own, so its statistics count only this test's requests: batches of 3 fail
    (the executor refuses voltage), the others run locally."""
    with running(create_app(serve_executor, VoltageForBatchOfThree(), max_wait_ms=1)) as url:
        yield url


def test_statistics_count_what_the_metrics_count(fresh_server, serve_executor):
    client = triton_client(fresh_server)
    empty = client.get_inference_statistics("tiny-test")["model_stats"][0]
    assert empty["inference_count"] == empty["execution_count"] == empty["last_inference"] == 0
    assert empty["inference_stats"]["success"] == {"count": 0, "ns": 0} and empty["batch_stats"] == []
    started_ms = time.time() * 1e3
    with httpx.Client(base_url=fresh_server, timeout=30) as http:
        for batch in (1, 2, 2):  # one after the other: each its own batch
            response = http.post("/v2/models/tiny-test/infer", json=infer_body(images(batch, seed=batch)))
            assert response.status_code == 200, response.text
        assert http.post("/v2/models/tiny-test/infer", json=infer_body(images(3, seed=3))).status_code == 500
        assert http.post("/v2/models/tiny-test/infer", content=b"{").status_code == 400  # the client's mistake
        metrics = scrape(http)
    finished_ms = time.time() * 1e3

    stats = client.get_inference_statistics("tiny-test")
    assert stats == client.get_inference_statistics() == client.get_inference_statistics("tiny-test", "1")
    (model,) = stats["model_stats"]
    assert model["name"] == "tiny-test" and model["version"] == "1"
    assert model["inference_count"] == 5 and model["execution_count"] == 3  # images and batches that ran
    assert started_ms <= model["last_inference"] <= finished_ms
    inference = model["inference_stats"]
    assert inference["success"]["count"] == inference["queue"]["count"] == 3
    assert inference["fail"] == {"count": 1, "ns": 0}  # the 500; the 400 is not the model's failure
    assert inference["compute_infer"]["count"] == inference["compute_input"]["count"] == 3
    assert 0 < inference["compute_infer"]["ns"] < inference["success"]["ns"]
    sizes = {entry["batch_size"]: entry for entry in model["batch_stats"]}
    assert {size: entry["compute_infer"]["count"] for size, entry in sizes.items()} == {1: 1, 2: 2}
    per_size_ns = sum(entry["compute_infer"]["ns"] for entry in sizes.values())
    assert abs(per_size_ns - inference["compute_infer"]["ns"]) <= len(sizes)  # each rounded to the ns
    # the same counts and durations as /metrics
    latency_ns = metric_value(metrics, "prism_inference_latency_seconds", "prism_inference_latency_seconds_sum") * 1e9
    assert inference["success"]["ns"] == round(latency_ns)
    assert model["inference_count"] == metric_value(metrics, "prism_batch_size", "prism_batch_size_sum")
    assert inference["queue"]["count"] == metric_value(metrics, "prism_queue_seconds", "prism_queue_seconds_count")
    assert metric_value(metrics, "prism_batch_executor_seconds", "prism_batch_executor_seconds_count",
                        batch_size="2") == 2
    client.close()


# ------------------------------------------------------------------ repository index


def test_repository_index_reports_the_model_and_its_state(flaky_client, serve_executor):
    client = triton_client(str(flaky_client.base_url))
    try:
        assert client.get_model_repository_index() == [{"name": "tiny-test", "version": "1", "state": "READY"}]
        assert flaky_client.post("/v2/repository/index", json={"ready": True}).json()[0]["state"] == "READY"
        serve_executor.reported = Health(live=True, ready=False, reason="engines not loaded")
        assert client.get_model_repository_index() == [{"name": "tiny-test", "version": "1", "state": "UNAVAILABLE",
                                                        "reason": "engines not loaded"}]
        assert flaky_client.post("/v2/repository/index", json={"ready": True}).json() == []
    finally:
        serve_executor.reported = None
        client.close()
    for body in (b"[1]", b'{"ready": "yes"}', b"{"):
        refused = flaky_client.post("/v2/repository/index", content=body)
        assert refused.status_code == 400, body
        assert "repository index takes" in refused.json()["error"] or "not valid JSON" in refused.json()["error"]


# ------------------------------------------------------------------ --model-name


def test_a_model_served_under_another_name(serve_executor):
    with running(create_app(serve_executor, FixedSelector(LOCAL), max_wait_ms=1, model_name="edge-vit")) as url:
        client = triton_client(url)
        assert client.is_model_ready("edge-vit") and not client.is_model_ready("tiny-test")
        assert client.get_model_metadata("edge-vit")["name"] == "edge-vit"
        assert client.get_model_config("edge-vit")["name"] == "edge-vit"
        x = images(2, seed=11)
        request = triton_http.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x.numpy())
        result = client.infer("edge-vit", [request])
        assert result.get_response()["model_name"] == "edge-vit"
        assert_close(result.as_numpy("logits"), expected_logits(serve_executor, x))
        assert client.get_inference_statistics("edge-vit")["model_stats"][0]["inference_count"] == 2
        assert client.get_model_repository_index()[0]["name"] == "edge-vit"
        with pytest.raises(InferenceServerException, match="model 'tiny-test' is not served here; this server "
                                                           "serves 'edge-vit'"):
            client.get_model_metadata("tiny-test")
        client.close()


@pytest.mark.parametrize("name,message", [("", "must be non-empty"), ("a/b", "without spaces or /"),
                                          ("stats", "taken by the statistics endpoint")])
def test_a_model_name_no_url_could_carry_is_refused_before_loading(tmp_path, name, message):
    result = CliRunner().invoke(main, ["serve", "--engines", str(tmp_path), "--model-name", name],
                                env={"PRISM_TRT_TOKEN": None})
    assert result.exit_code == 2 and message in result.output and "manifest.json" not in result.output, result.output


def test_serve_model_name_through_tritonclient(tmp_path):
    """`prism-trt serve --model-name` in its own process: tritonclient finds the model by that name."""
    build_engines(random_model(small_spec(img=32, depth=1)), tmp_path, 1, source={"timm": "test"}, max_batch=8)
    port = free_port()
    argv = [sys.executable, "-m", "prism_trt.cli", "serve", "--engines", str(tmp_path), "--port", str(port),
            "--threads", "1", "--model-name", "board-vit", "--max-wait-ms", "2"]
    environment = {key: value for key, value in os.environ.items() if key != "PRISM_TRT_TOKEN"}
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**environment, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until_ready(url, [server], timeout_s=60), server.communicate(timeout=30)[0][-3000:]
        client = triton_client(url)
        assert client.get_model_metadata("board-vit")["inputs"][0]["shape"] == [-1, 3, 32, 32]
        assert client.get_model_config("board-vit")["max_batch_size"] == 8
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
        request = triton_http.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        assert client.infer("board-vit", [request]).as_numpy("logits").shape == (2, 5)
        assert client.get_inference_statistics("board-vit")["model_stats"][0]["execution_count"] == 1
        assert client.get_model_repository_index() == [{"name": "board-vit", "version": "1", "state": "READY"}]
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out[-3000:]
    assert "serving board-vit (local) on http://127.0.0.1" in out
