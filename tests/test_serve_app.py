"""The inference server over HTTP: real uvicorn servers on 127.0.0.1 (free ports), a real
LocalExecutor over engines built here, and a real httpx client (fixtures in conftest.py)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import assert_close
from prometheus_text import metric_value, scrape
from serving import MAX_BATCH, TOKEN, assert_still_serving, expected_logits, images, infer_body, logits_of, outputs_of

from prism_trt.runtime.api import Health

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ health and metadata


def test_health_and_metadata(serve_client):
    live = serve_client.get("/v2/health/live")
    assert live.status_code == 200 and live.json() == {"live": True}
    ready = serve_client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["degraded"] is False
    assert ready.headers["x-prism-health"] == "ready"

    server = serve_client.get("/v2").json()
    assert server["name"] == "prism-trt" and isinstance(server["version"], str)
    assert server["extensions"] == ["binary_tensor_data", "model_configuration", "statistics"]

    meta = serve_client.get("/v2/models/tiny-test")
    assert meta.status_code == 200
    meta = meta.json()
    assert meta["name"] == "tiny-test" and meta["platform"] == "prism_trt"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]},
                               {"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert meta["parameters"]["max_batch_size"] == MAX_BATCH and meta["parameters"]["modes"] == "local"
    model_ready = serve_client.get("/v2/models/tiny-test/ready")
    assert model_ready.status_code == 200 and model_ready.json()["ready"] is True


@pytest.mark.parametrize("method,path", [("GET", "/v2/models/vit_huge"), ("GET", "/v2/models/vit_huge/ready"),
                                         ("POST", "/v2/models/vit_huge/infer"), ("GET", "/v3/nothing")])
def test_unknown_model_or_route_is_404_json(serve_client, method, path):
    response = serve_client.request(method, path, json=infer_body(images(1, 0)))
    assert response.status_code == 404
    error = response.json()["error"]
    assert ("vit_huge" in error and "tiny-test" in error) if "vit_huge" in path else "/v3/nothing" in error


def test_readiness_reports_degraded_and_down(flaky_client, serve_executor):
    try:
        serve_executor.reported = Health(live=True, ready=True, degraded=True,
                                         reason="rank 1 unreachable, serving locally")
        ready = flaky_client.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.headers["x-prism-health"] == "degraded"
        assert ready.json() == {"ready": True, "degraded": True, "reason": "rank 1 unreachable, serving locally"}
        serve_executor.reported = Health(live=True, ready=False, reason="engines not loaded")
        for path in ("/v2/health/ready", "/v2/models/tiny-test/ready"):
            down = flaky_client.get(path)
            assert down.status_code == 503 and down.json()["ready"] is False, path
            assert down.json()["reason"] == "engines not loaded" and down.headers["x-prism-health"] == "not-ready"
        assert flaky_client.get("/v2/health/live").status_code == 200
    finally:
        serve_executor.reported = None
    assert flaky_client.get("/v2/health/ready").status_code == 200


# ------------------------------------------------------------------ inference


def test_infer_matches_executor(serve_client, serve_executor):
    x = images(2, seed=1)
    expected = expected_logits(serve_executor, x)
    for nested in (False, True):
        response = serve_client.post("/v2/models/tiny-test/infer",
                                     json=infer_body(x, nested=nested, id=f"req-{nested}"))
        body = response.json()
        assert body["model_name"] == "tiny-test" and body["id"] == f"req-{nested}"
        outputs = outputs_of(response)
        assert outputs["logits"]["datatype"] == "FP32" and outputs["logits"]["shape"] == [2, 5]
        assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [2]
        np.testing.assert_array_equal(logits_of(response), expected)
        assert outputs["label"]["data"] == expected.argmax(axis=1).tolist()
        params = body["parameters"]
        assert params["mode"] == "local" and params["choice"] == "local" and params["fell_back"] is False
        assert params["batch_size"] == 2 and "cr" not in params
    only_label = serve_client.post("/v2/models/tiny-test/infer", json=infer_body(x, outputs=[{"name": "label"}]))
    assert [out["name"] for out in only_label.json()["outputs"]] == ["label"]
    assert only_label.json()["id"]  # a server-made id when the request has none


def test_concurrent_requests_are_batched_and_answered_once(serve_client, serve_executor):
    inputs = {f"c{i}": images(1 + i % 3, seed=100 + i) for i in range(12)}
    expected = {rid: expected_logits(serve_executor, x) for rid, x in inputs.items()}
    bodies = {rid: json.dumps(infer_body(x, id=rid)).encode() for rid, x in inputs.items()}
    total_images = sum(x.shape[0] for x in inputs.values())

    def post_all() -> dict[str, httpx.Response]:
        barrier = threading.Barrier(len(bodies), timeout=20)
        clients = [httpx.Client(base_url=serve_client.base_url, timeout=30) for _ in bodies]
        try:
            for c in clients:  # connect before the barrier, so the requests arrive together
                assert c.get("/v2/health/live").status_code == 200

            def post(c: httpx.Client, rid: str) -> httpx.Response:
                barrier.wait()
                return c.post("/v2/models/tiny-test/infer", content=bodies[rid],
                              headers={"content-type": "application/json"})

            with ThreadPoolExecutor(len(bodies)) as pool:
                futures = {rid: pool.submit(post, c, rid) for c, rid in zip(clients, bodies)}
                return {rid: f.result(timeout=30) for rid, f in futures.items()}
        finally:
            for c in clients:
                c.close()

    for _attempt in range(3):  # batching depends on arrival timing; a few bounded tries
        before = scrape(serve_client)
        responses = post_all()
        after = scrape(serve_client)
        for rid, response in responses.items():
            assert response.json()["id"] == rid
            assert_close(logits_of(response), expected[rid])
            assert outputs_of(response)["label"]["data"] == expected[rid].argmax(axis=1).tolist()

        def delta(family, sample=None, before=before, after=after, **labels):
            return metric_value(after, family, sample, **labels) - metric_value(before, family, sample, **labels)

        # each image went through the serve_executor exactly once, each request was answered once
        assert delta("prism_batch_size", "prism_batch_size_sum") == total_images
        assert delta("prism_requests_total", endpoint="infer", code="200") == len(inputs)
        batches = delta("prism_batch_size", "prism_batch_size_count")
        single = delta("prism_batch_size", "prism_batch_size_bucket", le="1")
        assert 1 <= batches <= len(inputs)
        if batches - single >= 1:  # at least one batch of more than one image
            return
    pytest.fail("no batch of more than one image in 3 bursts of 12 concurrent requests")


def test_executor_failure_answers_500_and_isolates(flaky_client, serve_executor):
    x3 = images(3, seed=7)
    failed = flaky_client.post("/v2/models/tiny-test/infer", json=infer_body(x3))
    assert failed.status_code == 500
    assert "UsageError" in failed.json()["error"] and "only the local chain, not voltage" in failed.json()["error"]
    x1, x2 = images(1, seed=8), images(2, seed=9)
    ok = flaky_client.post("/v2/models/tiny-test/infer", json=infer_body(x1))
    assert_close(logits_of(ok), expected_logits(serve_executor, x1))

    # 1 + 2 images merge into a batch of 3, which fails; each request then runs alone and succeeds
    for _attempt in range(3):
        before = metric_value(scrape(flaky_client), "prism_batch_isolations_total")
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(flaky_client.post, "/v2/models/tiny-test/infer", json=infer_body(x))
                       for x in (x1, x2)]
            responses = [f.result(timeout=30) for f in futures]
        for x, response in zip((x1, x2), responses):
            assert_close(logits_of(response), expected_logits(serve_executor, x))
        if metric_value(scrape(flaky_client), "prism_batch_isolations_total") > before:
            break
    else:
        pytest.fail("the two concurrent requests never merged into one batch in 3 tries")
    errors = scrape(flaky_client)
    assert metric_value(errors, "prism_request_errors_total", code="500", reason="executor_error") >= 1


# ------------------------------------------------------------------ auth and metrics


def test_bearer_token(auth_client, serve_executor):
    assert auth_client.get("/v2/health/live").status_code == 200  # probes stay open
    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/v2/health/ready", "/v2", "/v2/models/tiny-test", "/v2/models/tiny-test/ready", "/metrics"):
        missing = auth_client.get(path)
        assert missing.status_code == 401 and "Bearer" in missing.json()["error"], path
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = auth_client.get(path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401 and "wrong" in wrong.json()["error"], path
        assert auth_client.get(path, headers=good).status_code == 200, path
    x = images(1, seed=5)
    assert auth_client.post("/v2/models/tiny-test/infer", json=infer_body(x)).status_code == 401
    assert auth_client.post("/v2/models/tiny-test/infer/image", content=b"x").status_code == 401
    authorised = auth_client.post("/v2/models/tiny-test/infer", json=infer_body(x), headers=good)
    assert_close(logits_of(authorised), expected_logits(serve_executor, x))
    metrics = scrape(auth_client, **good)
    assert metric_value(metrics, "prism_request_errors_total", code="401", reason="unauthorized") >= 12


def test_metrics_exposition(serve_client, serve_executor):
    assert_still_serving(serve_client, serve_executor)  # at least one batch and one latency observation
    serve_client.post("/v2/models/tiny-test/infer", content=b"{")
    families = scrape(serve_client)
    kinds = {
        "prism_requests_total": "counter", "prism_request_errors_total": "counter",
        "prism_inference_latency_seconds": "histogram", "prism_batch_size": "histogram",
        "prism_mode_chosen_total": "counter", "prism_queue_depth": "gauge",
    }
    for name, kind in kinds.items():
        assert families[name]["type"] == kind and families[name]["help"], name
    assert metric_value(families, "prism_inference_latency_seconds", "prism_inference_latency_seconds_count",
                        mode="local") >= 1
    assert metric_value(families, "prism_mode_chosen_total", mode="local") >= 1
    assert metric_value(families, "prism_request_errors_total", reason="malformed_json") >= 1
    assert metric_value(families, "prism_queue_depth") == 0  # nothing waits between requests
    buckets = [labels["le"] for name, labels, _ in families["prism_batch_size"]["samples"] if name.endswith("_bucket")]
    assert buckets == ["1", "2", "4", "8", "+Inf"]
