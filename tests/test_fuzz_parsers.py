"""Property-based tests (Hypothesis, derandomized by conftest's profile) over the parsers that take
outside bytes: the KServe binary header and request parser, image decoding, the manifest and
performance-map readers and the CLI's numeric and device option types. Each input is either
accepted or refused cleanly (RequestError 4xx, the record's PrismError, click's BadParameter);
anything else escaping is a bug. About 11,000 inputs in all."""

from __future__ import annotations

import io
import json

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prism_trt.cli.common import DEVICE, FiniteFloat, NumberList
from prism_trt.engines import Manifest, ManifestError
from prism_trt.engines.json_record import MAX_JSON_DEPTH, read_json_object
from prism_trt.engines.manifest import SCHEMA_VERSION
from prism_trt.engines.modality import Vision
from prism_trt.engines.perfmap import PerfMap, PerfMapError
from prism_trt.model.spec import ViTSpec
from prism_trt.serve.binary import MAX_BYTE_COUNT_DIGITS, byte_count, split_body
from prism_trt.serve.protocol import VisionServing, decode_image
from prism_trt.serve.request_error import RequestError

SPEC = ViTSpec(name="fuzz", img_size=(8, 8), patch_size=(4, 4), in_chans=3, num_prefix_tokens=1, embed_dim=8,
               depth=1, num_heads=1, head_dim=8, mlp_hidden_dim=16, mlp_act="gelu", norm_eps=1e-6, qkv_bias=True,
               pre_norm=False, final_norm=True, pool="token", fc_norm=False, num_classes=5, mean=(0.5, 0.5, 0.5),
               std=(0.5, 0.5, 0.5))
MAX_BATCH = 4
SERVED = VisionServing(Vision(SPEC), "fuzz", MAX_BATCH)


def fast(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def assert_client_error(error: RequestError) -> None:
    assert 400 <= error.status < 500 and error.message, (error.status, error.message)


# ------------------------------------------------------------------ KServe binary extension

@fast(1500)
@given(st.text(max_size=40) | st.from_regex(r"\s*[0-9]{1,25}\s*", fullmatch=True))
def test_a_byte_count_header_is_a_number_or_a_400(text):
    try:
        value = byte_count(text, "Content-Length")
    except RequestError as error:
        assert error.status == 400
        return
    assert value >= 0 and len(text.strip()) <= MAX_BYTE_COUNT_DIGITS and text.strip().isascii()


@fast(1500)
@given(st.binary(max_size=64), st.none() | st.text(max_size=8) | st.integers(-5, 80).map(str))
def test_split_body_splits_or_refuses(body, header_length):
    try:
        head, rest = split_body(body, header_length)
    except RequestError as error:
        assert_client_error(error)
        return
    assert head + rest == body


def infer_body(payload) -> bytes:
    return json.dumps(payload).encode()


INPUT_TENSORS = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "x", ""]), "datatype": st.sampled_from(["FP32", "INT64", "FP16", 3]),
     "shape": st.lists(st.integers(-2, 9), max_size=5) | JSON_VALUES, "data": JSON_VALUES},
    optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "binary_data", "x"]), JSON_VALUES,
                                            max_size=2)})
REQUESTS = st.fixed_dictionaries({"inputs": st.lists(INPUT_TENSORS, max_size=2) | JSON_VALUES},
                                 optional={"id": JSON_VALUES, "outputs": JSON_VALUES, "parameters": JSON_VALUES})


@fast(2000)
@given(REQUESTS.map(infer_body) | st.binary(max_size=80), st.binary(max_size=600), st.booleans())
def test_any_request_body_is_parsed_or_a_4xx(json_part, binary, with_binary_header):
    body = json_part + binary if with_binary_header else json_part
    header = str(len(json_part)) if with_binary_header else None
    try:
        SERVED.parse(body, header)
    except RequestError as error:
        assert_client_error(error)


# ------------------------------------------------------------------ images

def image_bytes(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB" if kind != "GIF" else "P", (12, 9), (20, 200, 90)).save(buffer, format=kind)
    return buffer.getvalue()


IMAGES = {kind: image_bytes(kind) for kind in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(IMAGES[draw(st.sampled_from(sorted(IMAGES)))])
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@pytest.mark.filterwarnings("ignore")  # Pillow warns about damaged files it still reads
@fast(1500)
@given(damaged_images() | st.binary(max_size=64))
def test_any_image_bytes_decode_or_are_a_4xx(data):
    try:
        image = decode_image(data, SPEC)
    except RequestError as error:
        assert_client_error(error)
        return
    assert tuple(image.shape) == (1, 3, 8, 8)


# ------------------------------------------------------------------ manifest and performance map files

JSON_TEXTS = JSON_VALUES.map(json.dumps) | st.text(alphabet='[]{}",:0123456789 abc\\', max_size=300)


@fast(1200)
@given(JSON_TEXTS)
def test_any_json_file_is_a_record_or_the_records_error(tmp_path_factory, text):
    directory = tmp_path_factory.mktemp("record", numbered=True)
    (directory / "manifest.json").write_text(text)
    (directory / "perf.json").write_text(text)
    with pytest.raises(ManifestError):
        Manifest.read(directory)
    try:
        PerfMap.load(directory / "perf.json")
    except PerfMapError:
        pass


@fast(300)
@given(st.integers(1, 3 * MAX_JSON_DEPTH), st.sampled_from(["[", "{\"a\":"]), st.booleans())
def test_any_nesting_depth_is_read_or_refused_by_depth(tmp_path_factory, depth, opener, closed):
    closer = "]" if opener == "[" else "}"
    text = '{"x": ' + opener * depth + ("1" if opener != "[" else "") + (closer * depth if closed else "") + "}"
    path = tmp_path_factory.mktemp("deep", numbered=True) / "record.json"
    path.write_text(text)
    try:
        read_json_object(path, PerfMapError, "")
    except PerfMapError as error:
        assert ("nested deeper" in str(error)) == (depth + 1 > MAX_JSON_DEPTH), str(error)
    else:
        assert closed and depth + 1 <= MAX_JSON_DEPTH


@fast(600)
@given(st.dictionaries(st.sampled_from(["schema_version", "rank", "world_size", "build_options", "files", "model",
                                        "backend", "configs", "means_source", "manifest_sha256", "export"]),
                       JSON_VALUES, max_size=11))
def test_any_manifest_object_is_refused_with_the_manifests_error(data):
    data.setdefault("schema_version", SCHEMA_VERSION)
    try:
        Manifest.from_dict(data)
    except ManifestError:
        pass


# ------------------------------------------------------------------ CLI option types

NUMBER_TEXTS = st.text(max_size=12) | st.floats().map(repr) | st.integers(-(10**20), 10**20).map(str) | \
    st.sampled_from(["nan", "inf", "-inf", "1e309", "-0", "0x10", "1_000", "\u00b2", "\u0663"])


@fast(1500)
@given(NUMBER_TEXTS, st.sampled_from([FiniteFloat(), FiniteFloat(min=0.1), FiniteFloat(0, 1),
                                      FiniteFloat(min=0, min_open=True)]))
def test_a_float_option_is_a_finite_number_in_range_or_bad_parameter(text, kind):
    try:
        value = kind.convert(text, None, None)
    except click.BadParameter:
        return
    assert value == value and abs(value) != float("inf")
    assert kind.min is None or value >= kind.min and not (kind.min_open and value == kind.min)
    assert kind.max is None or value <= kind.max


@fast(1000)
@given(st.lists(NUMBER_TEXTS, max_size=4).map(",".join), st.sampled_from([int, float]))
def test_a_comma_list_holds_positive_finite_numbers_or_is_bad_parameter(text, cast):
    try:
        values = NumberList(cast).convert(text, None, None)
    except click.BadParameter:
        return
    assert all(value > 0 and value != float("inf") for value in values)


@fast(300)
@given(st.text(max_size=10) | st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:1", "cuda:-1", "mps", "meta", "cpu:0"]))
def test_a_device_option_is_a_device_here_or_bad_parameter(text):
    try:
        value = DEVICE.convert(text, None, None)
    except click.BadParameter:
        return
    assert value == "cpu" or value.startswith("cuda")
