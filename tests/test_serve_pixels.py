"""Raw pixels end to end: the served ViT takes UINT8 images (0..255) as well as FP32 ones
normalised with its mean and std, and answers the same logits for the same picture, through
tritonclient in binary and JSON, and through the image endpoint (which decodes to UINT8). Fixtures
in conftest.py: the tiny-test model (mean = std = 0.5), max batch 8, 3 x 32 x 32 inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image
from serving import LOCAL, expected_logits, logits_of

pytestmark = pytest.mark.timeout(60)

INFER = "/v2/models/tiny-test/infer"


def pixels_and_normalised(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random UINT8 pictures (B, 3, 32, 32) and the same pictures as the model's FP32 input."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(batch, 3, 32, 32), dtype=np.uint8)
    return pixels, ((pixels.astype(np.float32) / 255 - 0.5) / 0.5).astype(np.float32)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_answer_like_normalised_fp32(triton, serve_executor, binary):
    triton_http, client = triton
    pixels, normalised = pixels_and_normalised(3, seed=binary)
    answers = {}
    for datatype, values in (("UINT8", pixels), ("FP32", normalised)):
        request = triton_http.InferInput("input", list(values.shape), datatype)
        request.set_data_from_numpy(values, binary_data=binary)
        answers[datatype] = client.infer("tiny-test", [request]).as_numpy("logits")
    assert_close(answers["UINT8"], answers["FP32"], name="UINT8 vs FP32 logits")
    assert_close(answers["FP32"], expected_logits(serve_executor, torch.from_numpy(normalised)))
    raw = serve_executor.infer(serve_executor.request(torch.from_numpy(pixels)), LOCAL).logits
    assert_close(answers["UINT8"], raw.numpy())


def test_image_upload_answers_like_its_pixels(serve_client, triton):
    triton_http, client = triton
    pixels, _ = pixels_and_normalised(1, seed=7)
    buffer = io.BytesIO()
    Image.fromarray(pixels[0].transpose(1, 2, 0), "RGB").save(buffer, format="PNG")
    upload = serve_client.post(f"{INFER}/image", files={"file": ("x.png", buffer.getvalue(), "image/png")})
    request = triton_http.InferInput("input", list(pixels.shape), "UINT8")
    request.set_data_from_numpy(pixels)
    assert_close(logits_of(upload), client.infer("tiny-test", [request]).as_numpy("logits"))


@pytest.mark.parametrize("value", [256, -1])
def test_uint8_json_values_outside_a_byte_are_refused(serve_client, value):
    data = [0] * (3 * 32 * 32)
    data[5] = value
    response = serve_client.post(INFER, json={"inputs": [{"name": "input", "shape": [1, 3, 32, 32],
                                                          "datatype": "UINT8", "data": data}]})
    assert response.status_code == 400
    assert f"has {value} at flat index 5; UINT8 pixels are integers 0..255" in response.json()["error"]


def test_metadata_names_both_datatypes_and_the_normalisation(serve_client):
    parameters = serve_client.get("/v2/models/tiny-test").json()["parameters"]
    assert parameters["input_datatypes"] == "UINT8,FP32" and parameters["mean"] == "0.5,0.5,0.5"
    assert "(pixels / 255 - mean) / std" in parameters["input_scale"]
