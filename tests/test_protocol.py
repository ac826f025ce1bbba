"""The KServe v2 protocol module on its own: request decoding and validation, response and
metadata structure, image decoding. No server, no executor."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from prism_trt.core.chain_key import ChainKey
from prism_trt.engines.modality import Vision
from prism_trt.model.spec import ViTSpec
from prism_trt.serve.kserve import infer_response, server_metadata
from prism_trt.serve.protocol import VisionServing, decode_image, max_image_pixels
from prism_trt.serve.request_error import RequestError

MAX_BATCH = 4
SHAPE = [3, 16, 8]  # C, H, W: not square, so a swapped height and width shows
COUNT = 3 * 16 * 8


def make_spec(in_chans: int = 3) -> ViTSpec:
    return ViTSpec(name="proto-test", img_size=(16, 8), patch_size=(4, 4), in_chans=in_chans, num_prefix_tokens=1,
                   embed_dim=8, depth=1, num_heads=1, head_dim=8, mlp_hidden_dim=16, mlp_act="gelu", norm_eps=1e-6,
                   qkv_bias=True, pre_norm=False, final_norm=True, pool="token", fc_norm=False, num_classes=5,
                   mean=(0.5, 0.25, 0.75)[:in_chans], std=(0.5, 0.25, 2.0)[:in_chans])


SPEC = make_spec()


def tensor(shape=None, data=None, **fields) -> dict:
    shape = [1, *SHAPE] if shape is None else shape
    data = [0.0] * int(np.prod(shape)) if data is None else data
    return {"name": "input", "shape": shape, "datatype": "FP32", "data": data, **fields}


def body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs) if inputs else [tensor()], **extra}).encode()


SERVED = VisionServing(Vision(SPEC), "proto-test", MAX_BATCH)


class Parsed:
    """A parsed request, with its images under the HTTP name's stage name."""

    def __init__(self, raw: bytes):
        parsed = SERVED.parse(raw)
        self.images = parsed.request.tensors["images"]
        self.request_id, self.outputs = parsed.request_id, parsed.outputs


def parse(raw: bytes):
    return Parsed(raw)


def refusal(raw: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(raw)
    assert str(info.value) == info.value.message
    return info.value


def with_first_value(value: str, index: int = 0) -> bytes:
    """A valid one-image body whose value at ``index`` is written as ``value`` (JSON extensions too)."""
    texts = ["0.0"] * COUNT
    texts[index] = value
    return ('{"inputs": [{"name": "input", "shape": [1, 3, 16, 8], "datatype": "FP32", "data": [' + ", ".join(texts)
            + "]}]}").encode()


# ------------------------------------------------------------------ valid requests


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("batch", range(1, MAX_BATCH + 1))
def test_valid_request_decodes_to_its_images(batch, nested):
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(batch))
    data = x.tolist() if nested else x.reshape(-1).tolist()
    request = parse(body(tensor([batch, *SHAPE], data), id="req-7"))
    assert request.images.dtype == torch.float32 and request.images.shape == (batch, *SHAPE)
    assert torch.equal(request.images, x)
    assert request.request_id == "req-7" and request.outputs == ("logits", "label")


def test_integer_data_and_generated_ids():
    first = parse(body(tensor(data=list(range(COUNT)))))
    assert torch.equal(first.images.reshape(-1), torch.arange(COUNT, dtype=torch.float32))
    second = parse(body())
    assert len(first.request_id) == 32 and int(first.request_id, 16) >= 0
    assert first.request_id != second.request_id
    assert parse(body(id="")).request_id == ""  # an id that was sent, even empty, is echoed


@pytest.mark.parametrize("requested,expected", [
    ([{"name": "label"}], ("label",)),
    ([{"name": "label"}, {"name": "logits"}], ("label", "logits")),
    ([{"name": "logits"}, {"name": "logits", "parameters": {"binary_data": True}}], ("logits",)),
    ([], ("logits", "label")),
])
def test_requested_outputs(requested, expected):
    assert parse(body(outputs=requested)).outputs == expected


@settings(max_examples=40)
@given(st.integers(1, MAX_BATCH).flatmap(lambda b: hnp.arrays(
    np.float32, (b, *SHAPE), elements=st.floats(width=32, allow_nan=False, allow_infinity=False))), st.booleans())
def test_any_finite_fp32_tensor_round_trips(array, nested):
    data = array.tolist() if nested else array.reshape(-1).tolist()
    request = parse(body(tensor(list(array.shape), data)))
    np.testing.assert_array_equal(request.images.numpy(), array)


# ------------------------------------------------------------------ refused requests

BAD = [  # case, body, status, reason, a fragment the message must hold
    ("truncated_json", b'{"inputs": [{"name": "input",', 400, "malformed_json", "not valid JSON"),
    ("not_utf8", b'\xff\xfe{"inputs": []}', 400, "malformed_json", "not valid JSON"),
    ("too_deep", b"[" * 200_000, 400, "malformed_json", "not valid JSON"),
    ("top_level_list", b"[1, 2]", 400, "malformed_request", "got a JSON list"),
    ("id_not_string", body(id=7), 400, "malformed_request", "'id' must be a string, got 7"),
    ("no_inputs", b'{"id": "x"}', 400, "missing_inputs", "no 'inputs'"),
    ("inputs_object", b'{"inputs": {"name": "input"}}', 400, "missing_inputs", "got a JSON dict"),
    ("two_inputs", body(tensor(), tensor()), 400, "missing_inputs", "got a list of 2"),
    ("empty_inputs", b'{"inputs": []}', 400, "missing_inputs", "got a list of 0"),
    ("input_not_object", b'{"inputs": [[1, 2]]}', 400, "missing_inputs", "exactly one tensor object"),
    ("no_data", body({k: v for k, v in tensor().items() if k != "data"}), 400, "malformed_request",
     "lacks field(s) ['data']"),
    ("no_name_no_shape", body({"datatype": "FP32", "data": []}), 400, "malformed_request",
     "lacks field(s) ['name', 'shape']"),
    ("binary_extension", body({"name": "input", "shape": [1, *SHAPE], "datatype": "FP32",
                               "parameters": {"binary_data_size": 4 * COUNT}}), 400, "binary_data",
     "no Inference-Header-Content-Length header"),
    ("wrong_name", body(tensor(name="pixels")), 400, "input_name", 'unknown input "pixels"'),
    ("wrong_datatype", body(tensor(datatype="FP16")), 400, "datatype", 'datatype "FP16"'),
    ("lowercase_datatype", body(tensor(datatype="fp32")), 400, "datatype", 'datatype "fp32"'),
    ("shape_string", body(tensor(shape="1,3,16,8", data=[0.0])), 400, "shape", '"1,3,16,8"'),
    ("shape_float", body(tensor(shape=[1, 3, 16.0, 8], data=[0.0])), 400, "shape", "list of integers"),
    ("shape_bool", body(tensor(shape=[True, 3, 16, 8], data=[0.0])), 400, "shape", "list of integers"),
    ("rank_3", body(tensor(shape=SHAPE)), 400, "shape", "rank 3 (shape [3, 16, 8])"),
    ("rank_5", body(tensor(shape=[1, 1, *SHAPE])), 400, "shape", "rank 5"),
    ("channels", body(tensor(shape=[1, 1, 16, 8])), 400, "shape", "channels C 1 (expected 3)"),
    ("swapped_hw", body(tensor(shape=[1, 3, 8, 16])), 400, "shape",
     "height H 8 (expected 16), width W 16 (expected 8)"),
    ("zero_batch", body(tensor(shape=[0, *SHAPE], data=[])), 400, "shape", "batch size is 0"),
    ("negative_batch", body(tensor(shape=[-1, *SHAPE], data=[])), 400, "shape", "batch size is -1"),
    ("batch_over_max", body(tensor(shape=[MAX_BATCH + 1, *SHAPE])), 413, "batch_too_large",
     f"batch size {MAX_BATCH + 1} exceeds this server's max batch {MAX_BATCH}"),
    ("data_string", body(tensor(data="0.0")), 400, "data", "got str"),
    ("data_object", body(tensor(data={"0": 1.0})), 400, "data", "got dict"),
    ("ragged", body(tensor(data=[[0.0, 1.0], [2.0]])), 400, "data_shape", "not a regular nested list"),
    ("strings", body(tensor(data=["0.5"] * COUNT)), 400, "data", "only numbers"),
    ("booleans", body(tensor(data=[True] * COUNT)), 400, "data", "only numbers"),
    ("nulls", body(tensor(data=[None] + [0.0] * (COUNT - 1))), 400, "data", "only numbers"),
    ("huge_integer", body(tensor(data=[10**40] + [0] * (COUNT - 1))), 400, "non_finite", "(inf) at flat index 0"),
    ("short_flat", body(tensor(data=[0.0] * (COUNT - 1))), 400, "data_length", f"has {COUNT - 1} values"),
    ("long_flat", body(tensor(data=[0.0] * (COUNT + 1))), 400, "data_length", f"needs {COUNT}"),
    ("batch_vs_data", body(tensor(shape=[2, *SHAPE], data=[0.0] * COUNT)), 400, "data_length", f"needs {2 * COUNT}"),
    ("nested_wrong_shape", body(tensor(data=np.zeros((1, 3, 8, 16)).tolist())), 400, "data_shape",
     "nested data has shape [1, 3, 8, 16]"),
    ("half_nested", body(tensor(data=np.zeros((3, 128)).tolist())), 400, "data_shape",
     "nested data has shape [3, 128]"),
    # JSON has no NaN or Infinity (orjson refuses them, the standard library read them): the message says so
    ("nan", with_first_value("NaN", 5), 400, "malformed_json", "NaN is not a JSON number, values must be finite"),
    ("infinity", with_first_value("Infinity"), 400, "malformed_json", "; Infinity is not a JSON number"),
    ("minus_infinity", with_first_value("-Infinity", COUNT - 1), 400, "malformed_json", "-Infinity is not a JSON"),
    ("boolean_output_flag", body(outputs=[{"name": "label", "parameters": {"binary_data": 1}}]), 400, "outputs",
     "output 'label' parameters.binary_data must be true or false, got 1"),
    ("class_count", body(outputs=[{"name": "logits", "parameters": {"class_count": 3}}]), 400, "outputs",
     "classification extension is not supported"),
    ("fp32_overflow", with_first_value("1e39", 2), 400, "non_finite", "(inf) at flat index 2"),
    ("outputs_object", body(outputs={"name": "logits"}), 400, "outputs", "'outputs' must be a list"),
    ("outputs_without_name", body(outputs=[{"binary_data": True}]), 400, "outputs", "with a 'name'"),
    ("unknown_output", body(outputs=[{"name": "probs"}]), 400, "outputs", "['probs']"),
]


@pytest.mark.parametrize("case,raw,status,reason,fragment", BAD, ids=[c[0] for c in BAD])
def test_bad_request_is_refused(case, raw, status, reason, fragment):
    error = refusal(raw)
    assert (error.status, error.reason) == (status, reason), error.message
    assert fragment in error.message


def test_non_object_tensor_parameters_are_refused():
    assert refusal(body(tensor(parameters=5))).status == 400


def test_booleans_among_numbers_are_refused():
    assert refusal(body(tensor(data=[True] + [0.5] * (COUNT - 1)))).reason == "data"


# ------------------------------------------------------------------ responses and metadata


def test_infer_response_structure():
    logits = torch.tensor([[0.5, 3.0, -1.0, 0.0, 2.0], [9.0, 1.0, 1.0, 1.0, 8.5]])
    prism = ChainKey.prism(3, 17, 2)
    response, raw = infer_response("proto-test", "r1", ("label", "logits"), logits, prism, True, 6, 1.23456, 7.0)
    assert raw == b""  # no output asked for in binary
    assert response["model_name"] == "proto-test" and response["id"] == "r1"
    label, out = response["outputs"]  # in the requested order
    assert label == {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]}
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [2, 5]
    np.testing.assert_array_equal(np.asarray(out["data"], dtype=np.float32).reshape(2, 5), logits.numpy())
    assert response["parameters"] == {"mode": "prism", "choice": prism.label, "segments": 3, "cr": prism.cr,
                                      "fell_back": True, "batch_size": 6, "queue_ms": 1.235, "executor_ms": 7.0}
    json.dumps(response, allow_nan=False)  # plain JSON all through

    local, _ = infer_response("proto-test", "r2", ("logits",), logits[:1], ChainKey.local(), False, 1, 0.0, 0.5)
    assert [o["name"] for o in local["outputs"]] == ["logits"]
    for order in (("logits", "label"), ("label", "logits")):
        answer, _ = infer_response("proto-test", "r3", order, logits, ChainKey.local(), False, 2, 0.0, 0.0)
        assert tuple(o["name"] for o in answer["outputs"]) == order
    assert local["parameters"]["mode"] == local["parameters"]["choice"] == "local"
    assert "cr" not in local["parameters"]  # OIP parameter values cannot be null


def test_response_parameters_are_never_null():
    response, _ = infer_response("m", "r", ("label",), torch.zeros(1, 5), ChainKey("prism", 4), False, 1, 0.0, 0.0)
    assert None not in response["parameters"].values()


def test_model_and_server_metadata():
    keys = [ChainKey.local(), ChainKey.voltage(), ChainKey.prism(2, 9, 2)]
    meta = SERVED.metadata(keys)
    assert meta["name"] == "proto-test" and meta["platform"] == "prism_trt" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]},
                               {"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert meta["parameters"] == {"max_batch_size": MAX_BATCH, "modes": f"local,voltage,{keys[2].label}",
                                  "mean": "0.5,0.25,0.75", "std": "0.5,0.25,2", "input_datatypes": "UINT8,FP32",
                                  "input_scale": "UINT8: raw pixels 0..255; FP32: (pixels / 255 - mean) / std",
                                  "image_endpoint": "/v2/models/proto-test/infer/image"}
    assert server_metadata("1.2.3") == {"name": "prism-trt", "version": "1.2.3",
                                        "extensions": ["binary_tensor_data", "model_configuration", "statistics"]}


# ------------------------------------------------------------------ images


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_at_model_size_is_decoded_to_its_bytes():
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 8, 3), dtype=np.uint8)  # H, W, C
    x = decode_image(png(Image.fromarray(pixels, "RGB")), SPEC)
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 16, 8)  # raw pixels: the engines normalise
    np.testing.assert_array_equal(x[0].numpy(), pixels.transpose(2, 0, 1))


def test_image_conversions():
    gray = np.random.default_rng(1).integers(0, 256, size=(16, 8), dtype=np.uint8)
    as_rgb = decode_image(png(Image.fromarray(gray, "L")), SPEC)[0].numpy()
    np.testing.assert_array_equal(as_rgb, np.repeat(gray[None], 3, axis=0))

    one_channel = make_spec(in_chans=1)
    red = decode_image(png(Image.new("RGB", (8, 16), (255, 0, 0))), one_channel)
    luma = np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)).convert("L"))[0, 0]
    assert red.shape == (1, 1, 16, 8)
    np.testing.assert_array_equal(red.numpy(), np.full((1, 1, 16, 8), luma))

    transparent = decode_image(png(Image.new("RGBA", (8, 16), (10, 200, 30, 0))), SPEC)[0].numpy()
    np.testing.assert_array_equal(transparent, np.full((3, 16, 8), 255))

    deep = Image.fromarray(np.full((16, 8), 32768, dtype=np.uint16))  # 16-bit grayscale, half scale
    np.testing.assert_array_equal(decode_image(png(deep), SPEC)[0].numpy(), np.full((3, 16, 8), 128))

    wide = decode_image(png(Image.new("RGB", (300, 20), (0, 255, 0))), SPEC)
    assert wide.shape == (1, 3, 16, 8)  # resized to (H, W), whatever the source aspect


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose valid header declares ``width`` x ``height`` and that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


BAD_IMAGES = [
    ("empty", b"", SPEC, 400, "bad_image", "empty (0 bytes)"),
    ("garbage", b"\x00\x01not an image at all", SPEC, 400, "bad_image", "starting 00016e6f7420616e"),
    ("truncated", png(Image.new("RGB", (300, 300), (1, 2, 3)))[:120], SPEC, 400, "bad_image", "corrupt or truncated"),
    ("too_many_pixels", png_header_only(10_000, max_image_pixels(SPEC) // 10_000 + 1), SPEC, 413, "image_too_large",
     f"at most {max_image_pixels(SPEC)} pixels"),
    ("two_channel_model", png(Image.new("RGB", (8, 16))), make_spec(in_chans=2), 400, "bad_image", "takes 2 channels"),
]


@pytest.mark.parametrize("case,data,spec,status,reason,fragment", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_is_refused(case, data, spec, status, reason, fragment):
    with pytest.raises(RequestError) as info:
        decode_image(data, spec)
    assert (info.value.status, info.value.reason) == (status, reason), info.value.message
    assert fragment in info.value.message
