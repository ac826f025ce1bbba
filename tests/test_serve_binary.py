"""Triton's binary tensor data extension: tritonclient with its default calls (binary inputs and
outputs) and in JSON mode against a real server, and malformed binary requests refused with a
clear 400 (fixtures in conftest.py: the tiny-test model, max batch 8, 3 x 32 x 32 inputs)."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest
from conftest import assert_close
from serving import LOCAL, assert_still_serving, expected_logits, images, running

from prism_trt.runtime.api import FixedSelector
from prism_trt.serve import create_app, default_max_body_bytes
from prism_trt.serve.binary import HEADER_LENGTH

pytestmark = pytest.mark.timeout(60)

INFER = "/v2/models/tiny-test/infer"


def test_server_metadata_lists_the_extension(triton):
    _, client = triton
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("outputs", ["default_binary", "none", "json", "mixed"])
@pytest.mark.parametrize("binary_input", [True, False], ids=["binary_in", "json_in"])
def test_tritonclient_default_and_json_calls(triton, serve_executor, outputs, binary_input):
    triton_http, client = triton
    x = images(3, seed=21)
    expected = expected_logits(serve_executor, x)
    request = triton_http.InferInput("input", list(x.shape), "FP32")
    if binary_input:
        request.set_data_from_numpy(x.numpy())  # tritonclient's default: binary
    else:
        request.set_data_from_numpy(x.numpy(), binary_data=False)
    requested = {
        "default_binary": [triton_http.InferRequestedOutput("logits"), triton_http.InferRequestedOutput("label")],
        "none": None,  # tritonclient then asks for every output in binary (binary_data_output)
        "json": [triton_http.InferRequestedOutput("logits", binary_data=False),
                 triton_http.InferRequestedOutput("label", binary_data=False)],
        "mixed": [triton_http.InferRequestedOutput("label", binary_data=False),
                  triton_http.InferRequestedOutput("logits")],
    }[outputs]
    result = client.infer("tiny-test", [request], outputs=requested, request_id="bin-1")
    logits, label = result.as_numpy("logits"), result.as_numpy("label")
    assert logits.dtype == np.float32 and logits.shape == (3, 5) and label.dtype == np.int64
    assert_close(logits, expected)
    np.testing.assert_array_equal(label, expected.argmax(axis=1))
    response = result.get_response()
    assert response["id"] == "bin-1" and response["parameters"]["mode"] == "local"
    sent_binary = {o["name"] for o in response["outputs"] if "binary_data_size" in o.get("parameters", {})}
    assert sent_binary == {"default_binary": {"logits", "label"}, "none": {"logits", "label"}, "json": set(),
                           "mixed": {"logits"}}[outputs]


def binary_request(x: np.ndarray, header: dict | None = None, raw: bytes | None = None) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes() if raw is None else raw
    header = header or {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                    "parameters": {"binary_data_size": len(raw)}}]}
    text = json.dumps(header).encode()
    return text + raw, {HEADER_LENGTH: str(len(text))}


def test_binary_response_layout(serve_client, serve_executor):
    """The response is the JSON header (its length in a header) followed by each binary output's bytes."""
    x = images(2, seed=4).numpy()
    body, headers = binary_request(x)
    with_outputs = json.loads(body[:int(headers[HEADER_LENGTH])])
    with_outputs["parameters"] = {"binary_data_output": True}
    body, headers = binary_request(x, with_outputs)
    response = serve_client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert [o["name"] for o in header["outputs"]] == ["logits", "label"] and sizes == [2 * 5 * 4, 2 * 8]
    assert all("data" not in o for o in header["outputs"])
    assert len(response.content) == length + sum(sizes)
    logits = np.frombuffer(response.content[length:length + sizes[0]], dtype="<f4").reshape(2, 5)
    assert_close(logits, expected_logits(serve_executor, images(2, seed=4)))
    label = np.frombuffer(response.content[length + sizes[0]:], dtype="<i8")
    np.testing.assert_array_equal(label, logits.argmax(axis=1))


def _input(size: int, shape=(1, 3, 32, 32), **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": size}, **extra}]}


ONE = np.zeros((1, 3, 32, 32), dtype=np.float32)
NAN = ONE.copy()
NAN.flat[7] = np.nan
FULL = 3 * 32 * 32 * 4

BAD_BINARY = [  # case, (body, headers), status, fragment of the error
    ("size_not_shape", binary_request(ONE, _input(FULL - 4), ONE.tobytes()[:-4]), 400,
     f"binary_data_size is {FULL - 4} bytes; shape [1, 3, 32, 32] of FP32 needs {FULL}"),
    ("body_short", binary_request(ONE, _input(FULL), ONE.tobytes()[:-1]), 400,
     f"holds {FULL - 1} bytes after the JSON header; input 'input' declares binary_data_size {FULL}"),
    ("body_long", binary_request(ONE, _input(FULL), ONE.tobytes() + b"\0"), 400, f"holds {FULL + 1} bytes"),
    ("size_not_a_count", binary_request(ONE, _input(-1)), 400, "binary_data_size must be a byte count, got -1"),
    ("size_bool", binary_request(ONE, _input(True)), 400, "must be a byte count, got true"),
    ("data_and_binary", binary_request(ONE, _input(FULL, data=[0.0])), 400, "both 'data' and binary_data_size"),
    ("bytes_without_binary_input", binary_request(ONE, {"inputs": [{"name": "input", "shape": [1, 3, 32, 32],
                                                                     "datatype": "FP32", "data": [0.0] * 3072}]}),
     400, f"holds {FULL} bytes after the JSON header, but input 'input' declares no binary_data_size"),
    ("nan_in_binary", binary_request(NAN), 400, "non-finite value (nan) at flat index 7"),
    ("header_length_past_body", (b"{}", {HEADER_LENGTH: "999"}), 400, "Inference-Header-Content-Length is 999, "
                                                                         "but the body holds 2 bytes"),
    ("header_length_not_a_number", (b"{}", {HEADER_LENGTH: "ten"}), 400, "must be a number of bytes, got 'ten'"),
    ("header_length_cuts_json", (binary_request(ONE)[0], {HEADER_LENGTH: "20"}), 400, "not valid JSON"),
    ("binary_output_flag_string", binary_request(ONE, {**_input(FULL), "parameters": {"binary_data_output": "yes"}}),
     400, "binary_data_output must be true or false"),
    ("gzip", (gzip.compress(binary_request(ONE)[0]), {**binary_request(ONE)[1], "Content-Encoding": "gzip"}), 415,
     "Content-Encoding 'gzip' is not supported"),
]


@pytest.mark.parametrize("case,request_parts,status,fragment", BAD_BINARY, ids=[c[0] for c in BAD_BINARY])
def test_bad_binary_request_is_refused(serve_client, serve_executor, case, request_parts, status, fragment):
    body, headers = request_parts
    response = serve_client.post(INFER, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert_still_serving(serve_client, serve_executor)


def test_binary_body_limit_is_the_binary_one(serve_executor):
    """A binary request is held to the binary limit (4 bytes a value), not the JSON one."""
    limit = default_max_body_bytes(serve_executor, "binary")
    with running(create_app(serve_executor, FixedSelector(LOCAL))) as url:
        full = np.zeros((8, 3, 32, 32), dtype=np.float32)  # max batch 8 fits
        assert httpx.post(url + INFER, content=binary_request(full)[0], headers=binary_request(full)[1],
                          timeout=30).status_code == 200
        over = httpx.post(url + INFER, content=b"{}" + b"\0" * limit, headers={HEADER_LENGTH: "2"}, timeout=30)
    assert over.status_code == 413 and f"accepts at most {limit}" in over.json()["error"]
