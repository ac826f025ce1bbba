"""The inference server end to end: real uvicorn servers on 127.0.0.1 (free ports), a real
LocalExecutor over an engine directory built here, and a real httpx client."""

from __future__ import annotations

import io
import json
import math
import re
import socket
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from conftest import assert_close, build_engines, random_model, small_spec
from PIL import Image

from prism_trt.runtime.api import Choice, FixedSelector, Health
from prism_trt.runtime.local import LocalExecutor
from prism_trt.serve import create_app

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"
MAX_BATCH = 8
BODY_LIMIT = 1 << 20  # a full batch of 3x32x32 as JSON is ~0.5 MiB
LOCAL = Choice("local")


class ReportingLocalExecutor(LocalExecutor):
    """The real local executor, reporting whatever health a test sets (a degraded or down cluster)."""

    reported: Health | None = None

    def health(self) -> Health:
        return self.reported or super().health()


class VoltageForBatchOfThree:
    """A selector that picks voltage for batches of 3 images, which the local executor refuses."""

    def choose(self, batch: int) -> Choice:
        return Choice("voltage") if batch == 3 else LOCAL


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-engines")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 1, source={"timm": "test"}, max_batch=MAX_BATCH)
    return out / "rank0"


@pytest.fixture(scope="module")
def executor(engine_dir):
    executor = ReportingLocalExecutor(engine_dir, threads=1)
    yield executor
    executor.close()


@contextmanager
def running(app):
    """uvicorn serving ``app`` from a background thread on a socket bound to 127.0.0.1:0."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def client(executor):
    app = create_app(executor, FixedSelector(LOCAL), max_wait_ms=25, max_body_bytes=BODY_LIMIT)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def flaky_client(executor):
    """Same executor, a selector the executor fails on for batches of 3, and a long batching wait."""
    app = create_app(executor, VoltageForBatchOfThree(), max_wait_ms=300)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def auth_client(executor):
    app = create_app(executor, FixedSelector(LOCAL), token=TOKEN, max_wait_ms=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def infer_body(x: torch.Tensor, nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.reshape(-1).tolist()
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}], **extra}


def outputs_of(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return {out["name"]: out for out in response.json()["outputs"]}


def logits_of(response: httpx.Response) -> np.ndarray:
    logits = outputs_of(response)["logits"]
    return np.asarray(logits["data"], dtype=np.float32).reshape(logits["shape"])


def expected_logits(executor, x: torch.Tensor) -> np.ndarray:
    return executor.infer(x, LOCAL).logits.numpy()


def assert_still_serving(client: httpx.Client, executor) -> None:
    x = images(1, seed=99)
    assert_close(logits_of(client.post("/v2/models/tiny-test/infer", json=infer_body(x))), expected_logits(executor, x))


# ------------------------------------------------------------------ metrics parsing

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, dict]:
    """family -> {"type", "help", "samples": [(name, labels, value)]}, asserting the format line by line."""
    families: dict[str, dict] = {}
    current = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} declared twice"
            families[name] = current = {"help": help_text, "type": None, "samples": []}
            current["name"] = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current["name"] == name, f"TYPE for {name} without its HELP first"
            assert kind in ("counter", "gauge", "histogram"), line
            current["type"] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, _, label_text, value = match.groups()
            assert current is not None and current["type"], f"sample before HELP/TYPE: {line!r}"
            suffixes = ("_bucket", "_sum", "_count") if current["type"] == "histogram" else ("",)
            assert any(name == current["name"] + s for s in suffixes), f"{name} outside family {current['name']}"
            labels = dict(LABEL.findall(label_text or ""))
            families[current["name"]]["samples"].append((name, labels, float(value)))
    for family in families.values():
        if family["type"] == "histogram":
            check_histogram(family)
    return families


def check_histogram(family: dict) -> None:
    name = family["name"]
    series = defaultdict(lambda: {"buckets": [], "sum": None, "count": None})
    for sample, labels, value in family["samples"]:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if sample.endswith("_bucket"):
            series[key]["buckets"].append((float(labels["le"]), value))
        else:
            series[key][sample.rsplit("_", 1)[1]] = value
    for key, parts in series.items():
        bounds = [b for b, _ in parts["buckets"]]
        counts = [c for _, c in parts["buckets"]]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}{key}: bucket bounds {bounds}"
        assert counts == sorted(counts), f"{name}{key}: buckets not cumulative {counts}"
        assert parts["count"] == counts[-1], f"{name}{key}: _count {parts['count']} != +Inf bucket {counts[-1]}"
        assert parts["sum"] is not None


def metric_value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    return sum(value for name, sample_labels, value in families[family]["samples"]
               if name == (sample or family) and all(sample_labels.get(k) == v for k, v in labels.items()))


def scrape(client: httpx.Client, **headers) -> dict:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


# ------------------------------------------------------------------ health and metadata


def test_health_and_metadata(client):
    live = client.get("/v2/health/live")
    assert live.status_code == 200 and live.json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["degraded"] is False
    assert ready.headers["x-prism-health"] == "ready"

    server = client.get("/v2").json()
    assert server["name"] == "prism-trt" and isinstance(server["version"], str) and server["extensions"] == []

    meta = client.get("/v2/models/tiny-test")
    assert meta.status_code == 200
    meta = meta.json()
    assert meta["name"] == "tiny-test" and meta["platform"] == "prism_trt"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]},
                               {"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert meta["parameters"]["max_batch_size"] == MAX_BATCH and meta["parameters"]["modes"] == "local"
    model_ready = client.get("/v2/models/tiny-test/ready")
    assert model_ready.status_code == 200 and model_ready.json()["ready"] is True


@pytest.mark.parametrize("method,path", [("GET", "/v2/models/vit_huge"), ("GET", "/v2/models/vit_huge/ready"),
                                         ("POST", "/v2/models/vit_huge/infer"), ("GET", "/v3/nothing")])
def test_unknown_model_or_route_is_404_json(client, method, path):
    response = client.request(method, path, json=infer_body(images(1, 0)))
    assert response.status_code == 404
    error = response.json()["error"]
    assert ("vit_huge" in error and "tiny-test" in error) if "vit_huge" in path else "/v3/nothing" in error


def test_readiness_reports_degraded_and_down(flaky_client, executor):
    try:
        executor.reported = Health(live=True, ready=True, degraded=True, reason="rank 1 unreachable, serving locally")
        ready = flaky_client.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.headers["x-prism-health"] == "degraded"
        assert ready.json() == {"ready": True, "degraded": True, "reason": "rank 1 unreachable, serving locally"}
        executor.reported = Health(live=True, ready=False, reason="engines not loaded")
        for path in ("/v2/health/ready", "/v2/models/tiny-test/ready"):
            down = flaky_client.get(path)
            assert down.status_code == 503 and down.json()["ready"] is False, path
            assert down.json()["reason"] == "engines not loaded" and down.headers["x-prism-health"] == "not-ready"
        assert flaky_client.get("/v2/health/live").status_code == 200
    finally:
        executor.reported = None
    assert flaky_client.get("/v2/health/ready").status_code == 200


# ------------------------------------------------------------------ inference


def test_infer_matches_executor(client, executor):
    x = images(2, seed=1)
    expected = expected_logits(executor, x)
    for nested in (False, True):
        response = client.post("/v2/models/tiny-test/infer", json=infer_body(x, nested=nested, id=f"req-{nested}"))
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
    only_label = client.post("/v2/models/tiny-test/infer", json=infer_body(x, outputs=[{"name": "label"}]))
    assert [out["name"] for out in only_label.json()["outputs"]] == ["label"]
    assert only_label.json()["id"]  # a server-made id when the request has none


def test_concurrent_requests_are_batched_and_answered_once(client, executor):
    inputs = {f"c{i}": images(1 + i % 3, seed=100 + i) for i in range(12)}
    expected = {rid: expected_logits(executor, x) for rid, x in inputs.items()}
    bodies = {rid: json.dumps(infer_body(x, id=rid)).encode() for rid, x in inputs.items()}
    total_images = sum(x.shape[0] for x in inputs.values())

    def post_all() -> dict[str, httpx.Response]:
        barrier = threading.Barrier(len(bodies), timeout=20)
        clients = [httpx.Client(base_url=client.base_url, timeout=30) for _ in bodies]
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
        before = scrape(client)
        responses = post_all()
        after = scrape(client)
        for rid, response in responses.items():
            assert response.json()["id"] == rid
            assert_close(logits_of(response), expected[rid])
            assert outputs_of(response)["label"]["data"] == expected[rid].argmax(axis=1).tolist()

        def delta(family, sample=None, before=before, after=after, **labels):
            return metric_value(after, family, sample, **labels) - metric_value(before, family, sample, **labels)

        # each image went through the executor exactly once, each request was answered once
        assert delta("prism_batch_size", "prism_batch_size_sum") == total_images
        assert delta("prism_requests_total", endpoint="infer", code="200") == len(inputs)
        batches = delta("prism_batch_size", "prism_batch_size_count")
        single = delta("prism_batch_size", "prism_batch_size_bucket", le="1")
        assert 1 <= batches <= len(inputs)
        if batches - single >= 1:  # at least one batch of more than one image
            return
    pytest.fail("no batch of more than one image in 3 bursts of 12 concurrent requests")


def test_executor_failure_answers_500_and_isolates(flaky_client, executor):
    x3 = images(3, seed=7)
    failed = flaky_client.post("/v2/models/tiny-test/infer", json=infer_body(x3))
    assert failed.status_code == 500
    assert "ValueError" in failed.json()["error"] and "only local mode, not voltage" in failed.json()["error"]
    x1, x2 = images(1, seed=8), images(2, seed=9)
    ok = flaky_client.post("/v2/models/tiny-test/infer", json=infer_body(x1))
    assert_close(logits_of(ok), expected_logits(executor, x1))

    # 1 + 2 images merge into a batch of 3, which fails; each request then runs alone and succeeds
    for _attempt in range(3):
        before = metric_value(scrape(flaky_client), "prism_batch_isolations_total")
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(flaky_client.post, "/v2/models/tiny-test/infer", json=infer_body(x))
                       for x in (x1, x2)]
            responses = [f.result(timeout=30) for f in futures]
        for x, response in zip((x1, x2), responses):
            assert_close(logits_of(response), expected_logits(executor, x))
        if metric_value(scrape(flaky_client), "prism_batch_isolations_total") > before:
            break
    else:
        pytest.fail("the two concurrent requests never merged into one batch in 3 tries")
    errors = scrape(flaky_client)
    assert metric_value(errors, "prism_request_errors_total", code="500", reason="executor_error") >= 1


# ------------------------------------------------------------------ bad input


def tensor_body(shape, data=None, datatype="FP32", name="input", **extra) -> dict:
    data = [0.0] * math.prod(shape) if data is None else data
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}], **extra}


def with_value(value: str) -> bytes:
    """A valid 1x3x32x32 body whose first value is written as ``value`` (JSON extensions included)."""
    return json.dumps(tensor_body([1, 3, 32, 32])).replace("[0.0,", f"[{value},", 1).encode()


BAD_REQUESTS = [
    ("malformed_json", {"content": b'{"inputs": [{"name": "input",'}, 400, "not valid JSON"),
    ("not_an_object", {"json": [1, 2, 3]}, 400, "must be a JSON object"),
    ("missing_inputs", {"json": {"id": "x"}}, 400, "no 'inputs'"),
    ("two_inputs", {"json": {"inputs": [tensor_body([1, 3, 32, 32])["inputs"][0]] * 2}}, 400, "exactly one"),
    ("missing_data", {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32"}]}}, 400,
     "lacks field(s) ['data']"),
    ("wrong_input_name", {"json": tensor_body([1, 3, 32, 32], name="pixels")}, 400, 'unknown input "pixels"'),
    ("wrong_datatype", {"json": tensor_body([1, 3, 32, 32], datatype="INT32")}, 400, 'datatype "INT32"'),
    ("wrong_rank", {"json": tensor_body([3, 32, 32])}, 400, "rank 3"),
    ("wrong_channels", {"json": tensor_body([1, 1, 32, 32])}, 400, "channels C 1 (expected 3)"),
    ("wrong_size", {"json": tensor_body([1, 3, 28, 28])}, 400, "height H 28 (expected 32), width W 28"),
    ("zero_batch", {"json": tensor_body([0, 3, 32, 32], data=[])}, 400, "batch size is 0"),
    ("shape_not_ints", {"json": tensor_body([1, 3, 32.5, 32], data=[0.0])}, 400, "list of integers"),
    ("short_data", {"json": tensor_body([1, 3, 32, 32], data=[0.5] * 100)}, 400, "has 100 values"),
    ("nested_mismatch", {"json": tensor_body([1, 3, 32, 32], data=np.zeros((1, 3, 16, 64)).tolist())}, 400,
     "nested data has shape [1, 3, 16, 64]"),
    ("ragged", {"json": tensor_body([1, 3, 32, 32], data=[[0.0, 1.0], [2.0]])}, 400, "not a regular nested list"),
    ("strings", {"json": tensor_body([1, 3, 32, 32], data=["0.5"] * 3072)}, 400, "only numbers"),
    ("nan", {"content": with_value("NaN")}, 400, "non-finite value (nan) at flat index 0"),
    ("infinity", {"content": with_value("-Infinity")}, 400, "non-finite value (-inf)"),
    ("fp32_overflow", {"content": with_value("1e39")}, 400, "non-finite value (inf)"),
    ("batch_over_limit", {"json": tensor_body([MAX_BATCH + 1, 3, 32, 32])}, 413, f"exceeds this server's max batch "
                                                                                f"{MAX_BATCH}"),
    ("unknown_output", {"json": tensor_body([1, 3, 32, 32], outputs=[{"name": "probs"}])}, 400, "['probs']"),
    ("binary_extension", {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 12288}}]}}, 400, "binary tensor"),
    ("body_too_large", {"content": b" " * (BODY_LIMIT + 1)}, 413, f"accepts at most {BODY_LIMIT}"),
    ("chunked_too_large", {"content": lambda: iter([b" " * (BODY_LIMIT // 2)] * 3)}, 413, f"exceeds {BODY_LIMIT}"),
]


@pytest.mark.parametrize("case,request_kwargs,status,message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_and_server_goes_on(client, executor, case, request_kwargs, status, message):
    kwargs = {k: (v() if callable(v) else v) for k, v in request_kwargs.items()}
    if "content" in kwargs:
        kwargs["headers"] = {"content-type": "application/json"}
    before = scrape(client)
    response = client.post("/v2/models/tiny-test/infer", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    errors = metric_value(scrape(client), "prism_request_errors_total", endpoint="infer", code=str(status))
    assert errors == metric_value(before, "prism_request_errors_total", endpoint="infer", code=str(status)) + 1
    assert_still_serving(client, executor)


# ------------------------------------------------------------------ image endpoint


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_endpoint_matches_manual_preprocessing(client, executor):
    pixels = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(pixels, "RGB"))
    # the model's preprocessing, done by hand: HWC uint8 -> CHW, /255, (x - 0.5) / 0.5
    x = torch.from_numpy(((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]
    expected = expected_logits(executor, x)
    raw = client.post("/v2/models/tiny-test/infer/image", content=data, headers={"content-type": "image/png"})
    upload = client.post("/v2/models/tiny-test/infer/image", files={"file": ("digit.png", data, "image/png")})
    for response in (raw, upload):
        assert_close(logits_of(response), expected)
        assert outputs_of(response)["label"]["data"] == expected.argmax(axis=1).tolist()
        assert response.json()["parameters"]["mode"] == "local"


def test_image_endpoint_converts_and_resizes(client):
    gray = Image.fromarray(np.random.default_rng(4).integers(0, 256, size=(40, 50), dtype=np.uint8), "L")
    rgba = Image.new("RGBA", (64, 20), (200, 10, 10, 128))
    for image in (gray, rgba):
        response = client.post("/v2/models/tiny-test/infer/image", files={"file": ("x.png", png_bytes(image))})
        assert outputs_of(response)["logits"]["shape"] == [1, 5]


BAD_IMAGES = [
    ("garbage", {"content": b"\x00\x01definitely not an image" * 10, "headers": {"content-type": "image/png"}}, 400,
     "could not decode the image"),
    ("truncated_png", {"content": png_bytes(Image.new("RGB", (300, 300), (1, 2, 3)))[:120],
                       "headers": {"content-type": "image/png"}}, 400, "PNG data is corrupt or truncated"),
    ("empty", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ("garbage_upload", {"files": {"file": ("x.png", b"GIF89a-not-really", "image/gif")}}, 400,
     "could not decode the image"),
    ("no_file_field", {"files": {"picture": ("x.png", b"whatever")}}, 400, "no 'file' field"),
    ("text_body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
]


@pytest.mark.parametrize("case,request_kwargs,status,message", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_is_refused(client, executor, case, request_kwargs, status, message):
    response = client.post("/v2/models/tiny-test/infer/image", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert_still_serving(client, executor)


# ------------------------------------------------------------------ auth and metrics


def test_bearer_token(auth_client, executor):
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
    assert_close(logits_of(authorised), expected_logits(executor, x))
    metrics = scrape(auth_client, **good)
    assert metric_value(metrics, "prism_request_errors_total", code="401", reason="unauthorized") >= 12


def test_metrics_exposition(client, executor):
    assert_still_serving(client, executor)  # at least one batch and one latency observation
    client.post("/v2/models/tiny-test/infer", content=b"{")
    families = scrape(client)
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
