"""Bad input over HTTP: every malformed request or image gets a clear 4xx naming the problem, and
the server goes on serving (the decoder's own unit tests are in test_protocol.py)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image
from prometheus_text import metric_value, scrape
from serving import BODY_LIMIT, MAX_BATCH, assert_still_serving, expected_logits, logits_of, outputs_of

pytestmark = pytest.mark.timeout(60)


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
    ("nan", {"content": with_value("NaN")}, 400, "NaN is not a JSON number"),
    ("infinity", {"content": with_value("-Infinity")}, 400, "-Infinity is not a JSON number"),
    ("fp32_overflow", {"content": with_value("1e39")}, 400, "non-finite value (inf)"),
    ("batch_over_limit", {"json": tensor_body([MAX_BATCH + 1, 3, 32, 32])}, 413, f"exceeds this server's max batch "
                                                                                f"{MAX_BATCH}"),
    ("unknown_output", {"json": tensor_body([1, 3, 32, 32], outputs=[{"name": "probs"}])}, 400, "['probs']"),
    ("binary_extension", {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 12288}}]}}, 400,
     "no Inference-Header-Content-Length header"),
    ("body_too_large", {"content": b" " * (BODY_LIMIT + 1)}, 413, f"accepts at most {BODY_LIMIT}"),
    ("chunked_too_large", {"content": lambda: iter([b" " * (BODY_LIMIT // 2)] * 3)}, 413, f"exceeds {BODY_LIMIT}"),
]


@pytest.mark.parametrize("case,request_kwargs,status,message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_and_server_goes_on(serve_client, serve_executor, case, request_kwargs, status, message):
    kwargs = {k: (v() if callable(v) else v) for k, v in request_kwargs.items()}
    if "content" in kwargs:
        kwargs["headers"] = {"content-type": "application/json"}
    before = scrape(serve_client)
    response = serve_client.post("/v2/models/tiny-test/infer", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    errors = metric_value(scrape(serve_client), "prism_request_errors_total", endpoint="infer", code=str(status))
    assert errors == metric_value(before, "prism_request_errors_total", endpoint="infer", code=str(status)) + 1
    assert_still_serving(serve_client, serve_executor)


# ------------------------------------------------------------------ image endpoint


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_endpoint_matches_manual_preprocessing(serve_client, serve_executor):
    pixels = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(pixels, "RGB"))
    # the model's preprocessing, done by hand: HWC uint8 -> CHW, /255, (x - 0.5) / 0.5
    x = torch.from_numpy(((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]
    expected = expected_logits(serve_executor, x)
    raw = serve_client.post("/v2/models/tiny-test/infer/image", content=data, headers={"content-type": "image/png"})
    upload = serve_client.post("/v2/models/tiny-test/infer/image", files={"file": ("digit.png", data, "image/png")})
    for response in (raw, upload):
        assert_close(logits_of(response), expected)
        assert outputs_of(response)["label"]["data"] == expected.argmax(axis=1).tolist()
        assert response.json()["parameters"]["mode"] == "local"


def test_image_endpoint_converts_and_resizes(serve_client):
    gray = Image.fromarray(np.random.default_rng(4).integers(0, 256, size=(40, 50), dtype=np.uint8), "L")
    rgba = Image.new("RGBA", (64, 20), (200, 10, 10, 128))
    for image in (gray, rgba):
        response = serve_client.post("/v2/models/tiny-test/infer/image", files={"file": ("x.png", png_bytes(image))})
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
def test_bad_image_is_refused(serve_client, serve_executor, case, request_kwargs, status, message):
    response = serve_client.post("/v2/models/tiny-test/infer/image", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert_still_serving(serve_client, serve_executor)
