"""KServe v2 / Open Inference Protocol: request validation (JSON tensors, or raw bytes by Triton's
binary tensor data extension, see binary.py), response and metadata shapes, and image decoding
for the image endpoint.

JSON is parsed with orjson (several times faster than the standard library on a full batch). It
refuses what JSON itself does not allow, such as NaN and Infinity, which the error message names.
"""

from __future__ import annotations

import io
import math
import re
import uuid
from dataclasses import dataclass

import numpy as np
import orjson
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from ..core.chain_key import ChainKey, Mode
from ..model.spec import ViTSpec
from .binary import DATATYPES, binary_size, encode_outputs, flag, split_body, tensor_from_binary
from .request_error import RequestError

INPUT_NAME = "input"
LOGITS_OUTPUT = "logits"
LABEL_OUTPUT = "label"
OUTPUT_NAMES = (LOGITS_OUTPUT, LABEL_OUTPUT)
PLATFORM = "prism_trt"
PROTOCOL_EXTENSIONS: list[str] = ["binary_tensor_data"]

# The image endpoint decodes at most max(IMAGE_PIXELS_FLOOR, IMAGE_PIXELS_PER_INPUT x the model's
# input pixels): a phone screenshot (~3 Mpx) of a digit still works for a 28 x 28 model, while a
# decompression bomb in a small PNG (a 6300 x 6300 RGBA PNG is 154 KB) is refused before it gets
# to allocate. JPEGs are first reduced while decoding (Image.draft, down to 1/8), so a 12 Mpx
# phone photo decodes at 1.5 Mpx.
IMAGE_PIXELS_FLOOR = 4 * 1024 * 1024
IMAGE_PIXELS_PER_INPUT = 64

_NON_JSON_NUMBER = re.compile(rb"(?<![\w\"])-?(NaN|Infinity)\b")


def max_image_pixels(spec: ViTSpec) -> int:
    """The most pixels the image endpoint decodes for this model (after any JPEG reduction)."""
    height, width = spec.img_size
    return max(IMAGE_PIXELS_FLOOR, IMAGE_PIXELS_PER_INPUT * height * width)


@dataclass(frozen=True)
class InferRequest:
    inputs: torch.Tensor | dict[str, torch.Tensor]  # images (B, C, H, W) float32, finite; or text tensors
    request_id: str
    outputs: tuple[str, ...]  # requested outputs, in response order
    binary_outputs: frozenset[str] = frozenset()  # outputs to send as raw bytes (binary extension)
    positions: int | None = None  # a text request's own length: per-position outputs are cut back to it

    @property
    def images(self) -> torch.Tensor:
        """A ViT request's images."""
        return self.inputs


def server_metadata(version: str) -> dict:
    return {"name": "prism-trt", "version": version, "extensions": PROTOCOL_EXTENSIONS}


def model_metadata(model_name: str, spec: ViTSpec, max_batch: int, choices: list[ChainKey]) -> dict:
    height, width = spec.img_size
    return {
        "name": model_name,
        "versions": [],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, spec.in_chans, height, width]}],
        "outputs": [
            {"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": [-1, spec.num_classes]},
            {"name": LABEL_OUTPUT, "datatype": "INT64", "shape": [-1]},
        ],
        # OIP parameters are scalars, hence the joined strings.
        "parameters": {
            "max_batch_size": max_batch,
            "modes": ",".join(choice.label for choice in choices),
            "mean": ",".join(f"{m:g}" for m in spec.mean),
            "std": ",".join(f"{s:g}" for s in spec.std),
            "image_endpoint": f"/v2/models/{model_name}/infer/image",
        },
    }


def shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_shape(shape, spec: ViTSpec, max_batch: int) -> list[int]:
    expected = [spec.in_chans, *spec.img_size]
    expected_text = f"[B, {spec.in_chans}, {spec.img_size[0]}, {spec.img_size[1]}] with 1 <= B <= {max_batch}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(400, "shape", f"input '{INPUT_NAME}' shape must be a list of integers {expected_text}, "
                                         f"got {orjson.dumps(shape).decode()}")
    if len(shape) != 4:
        raise RequestError(400, "shape", f"input '{INPUT_NAME}' has rank {len(shape)} (shape {shape_text(shape)}); "
                                         f"expected rank 4, {expected_text}")
    if shape[1:] != expected:
        names = ("channels C", "height H", "width W")
        wrong = [f"{name} {got} (expected {want})" for name, got, want in zip(names, shape[1:], expected) if got != want]
        raise RequestError(400, "shape", f"input '{INPUT_NAME}' shape {shape_text(shape)} does not fit this model: "
                                         f"{', '.join(wrong)}; expected {expected_text}")
    if shape[0] < 1:
        raise RequestError(400, "shape", f"input '{INPUT_NAME}' batch size is {shape[0]}; expected {expected_text}")
    if shape[0] > max_batch:
        raise RequestError(413, "batch_too_large", f"input '{INPUT_NAME}' batch size {shape[0]} exceeds this "
                                                   f"server's max batch {max_batch}; split the request")
    return shape


def _leaves(data):
    """Every scalar of a (nested) JSON list."""
    for item in data:
        if isinstance(item, list):
            yield from _leaves(item)
        else:
            yield item


def array_from_data(data, shape: list[int], name: str, kinds: str, may_hold_booleans: bool) -> np.ndarray:
    """An OIP ``data`` list (flat or nested) as an array of ``shape``, of numpy kinds ``kinds``."""
    if not isinstance(data, list):
        raise RequestError(400, "data", f"input '{name}' data must be a JSON list of numbers "
                                        f"(flat or nested), got {type(data).__name__}")
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise RequestError(400, "data_shape", f"input '{name}' data is not a regular nested list: {exc}") from None
    # numpy reads [true, 0.5] as floats: booleans are refused wherever they hide. Walking the values
    # costs ~40 % of the JSON parse of a full batch, so only bodies that spell true/false are walked.
    hidden_booleans = (array.dtype.kind in "iuf" and may_hold_booleans
                       and any(isinstance(v, bool) for v in _leaves(data)))
    if array.dtype.kind not in kinds or hidden_booleans:
        what = "numbers" if "f" in kinds else "integers"
        raise RequestError(400, "data", f"input '{name}' data must hold only {what}; found values numpy "
                                        f"reads as {array.dtype} (strings, booleans, nulls or huge integers?)")
    expected_count = math.prod(shape)
    if array.ndim == 1:
        if array.size != expected_count:
            raise RequestError(400, "data_length", f"input '{name}' data has {array.size} values; shape "
                                                   f"{shape_text(shape)} needs {expected_count}")
    elif list(array.shape) != shape:
        raise RequestError(400, "data_shape", f"input '{name}' nested data has shape {shape_text(array.shape)}; "
                                              f"declared shape is {shape_text(shape)}")
    return array.reshape(shape)


def input_values(tensor: dict, name: str, shape: list[int], datatype: str, size: int | None, raw: bytes,
                 header_length: str | None, may_hold_booleans: bool) -> np.ndarray:
    """One input's values, of ``datatype`` ("FP32" or "INT64"): from its JSON ``data``, or, when it
    declares ``binary_data_size`` (``size``), from ``raw``, exactly its bytes of the binary section."""
    if size is None:
        array = array_from_data(tensor["data"], shape, name, "iuf" if datatype == "FP32" else "iu", may_hold_booleans)
        with np.errstate(over="ignore"):  # out-of-range floats become inf, which the FP32 caller reports
            return array.astype(DATATYPES[datatype].newbyteorder("="))
    if "data" in tensor:
        raise RequestError(400, "binary_data", f"input '{name}' has both 'data' and binary_data_size; send one")
    if header_length is None:
        raise RequestError(400, "binary_data", f"input '{name}' declares binary_data_size but the request has no "
                                               f"Inference-Header-Content-Length header saying where its JSON ends")
    return tensor_from_binary(raw, size, shape, datatype, name)


def _finite(values: np.ndarray) -> torch.Tensor:
    """The float32 array as a tensor, once every value is known to be finite."""
    finite = np.isfinite(values)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise RequestError(400, "non_finite", f"input '{INPUT_NAME}' has a non-finite value ({values.flat[index]}) at "
                                              f"flat index {index}; values must be finite and within FP32 range")
    return torch.from_numpy(np.ascontiguousarray(values))


def show_json(value) -> str:
    """A JSON value as the client wrote it, for error messages."""
    return orjson.dumps(value).decode()


def requested_outputs(payload: dict, names: tuple[str, ...] = OUTPUT_NAMES
                       ) -> tuple[tuple[str, ...], frozenset[str]]:
    """(output names in response order, those to send as raw bytes), of the model's ``names``."""
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(400, "malformed_request", f"request 'parameters' must be a JSON object, got "
                                                     f"{show_json(parameters)}")
    all_binary = bool(flag(parameters, "binary_data_output", "the request's"))
    requested = payload.get("outputs")
    if requested is None or requested == []:
        return names, frozenset(names) if all_binary else frozenset()
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                  and isinstance(o.get("parameters") or {}, dict) for o in requested):
        raise RequestError(400, "outputs", "'outputs' must be a list of objects with a 'name' (and optional "
                                           "'parameters' object)")
    wanted_names = tuple(o["name"] for o in requested)
    unknown = [name for name in wanted_names if name not in names]
    if unknown:
        raise RequestError(400, "outputs", f"unknown output(s) {unknown}; this model has outputs {list(names)}")
    binary = set()
    for output in requested:
        options = output.get("parameters") or {}
        if options.get("class_count", 0) not in (0, None):
            raise RequestError(400, "outputs", f"output '{output['name']}' asks for class_count; the "
                                               f"classification extension is not supported (read 'label')")
        wanted = flag(options, "binary_data", f"output '{output['name']}'")
        if wanted or (wanted is None and all_binary):
            binary.add(output["name"])
    return tuple(dict.fromkeys(wanted_names)), frozenset(binary)


def load_json(text: bytes):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8 and too deep nesting
        found = _NON_JSON_NUMBER.search(text)
        hint = f"; {found.group(0).decode()} is not a JSON number, values must be finite numbers" if found else ""
        raise RequestError(400, "malformed_json", f"request body is not valid JSON: {exc}{hint}") from None


def parse_infer_request(body: bytes, spec: ViTSpec, max_batch: int, header_length: str | None = None) -> InferRequest:
    """Validate an OIP inference request for this model, or raise :class:`RequestError`.
    ``header_length``: the Inference-Header-Content-Length header, when the binary extension is used."""
    json_part, raw = split_body(body, header_length)
    payload = load_json(json_part)
    if not isinstance(payload, dict):
        raise RequestError(400, "malformed_request", f"request body must be a JSON object with an 'inputs' list, "
                                                     f"got a JSON {type(payload).__name__}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "malformed_request", f"'id' must be a string, got {show_json(request_id)}")
    if "inputs" not in payload:
        raise RequestError(400, "missing_inputs", f"request has no 'inputs'; expected a list holding one FP32 tensor "
                                                  f"named '{INPUT_NAME}'")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        found = f"a list of {len(inputs)}" if isinstance(inputs, list) else f"a JSON {type(inputs).__name__}"
        raise RequestError(400, "missing_inputs", f"'inputs' must be a list holding exactly one tensor object "
                                                  f"named '{INPUT_NAME}', got {found}")
    tensor = inputs[0]
    parameters = tensor.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(400, "malformed_request", f"input tensor 'parameters' must be a JSON object, got "
                                                     f"{type(parameters).__name__}")
    size = binary_size(tensor, str(tensor.get("name")))
    missing = [key for key in ("name", "shape", "datatype") + (("data",) if size is None else ()) if key not in tensor]
    if missing:
        raise RequestError(400, "malformed_request", f"input tensor lacks field(s) {missing}; an OIP tensor has "
                                                     f"name, shape, datatype and data (or binary_data_size)")
    if tensor["name"] != INPUT_NAME:
        raise RequestError(400, "input_name", f"unknown input {show_json(tensor['name'])}; this model has one input "
                                              f"named '{INPUT_NAME}'")
    if tensor["datatype"] != "FP32":
        raise RequestError(400, "datatype", f"input '{INPUT_NAME}' has datatype {show_json(tensor['datatype'])}; "
                                            f"this model takes FP32")
    shape = _check_shape(tensor["shape"], spec, max_batch)
    if size is None and raw:
        raise RequestError(400, "binary_data", f"the body holds {len(raw)} bytes after the JSON header, but input "
                                               f"'{INPUT_NAME}' declares no binary_data_size")
    images = _finite(input_values(tensor, INPUT_NAME, shape, "FP32", size, raw, header_length,
                                  may_hold_booleans=b"true" in body or b"false" in body))
    outputs, binary_outputs = requested_outputs(payload)
    return InferRequest(images, uuid.uuid4().hex if request_id is None else request_id, outputs, binary_outputs)


def infer_response(model_name: str, request_id: str, outputs: tuple[str, ...], logits: torch.Tensor,
                   choice: ChainKey, fell_back: bool, batch_size: int, queue_ms: float, executor_ms: float,
                   binary_outputs: frozenset[str] = frozenset()) -> tuple[dict, bytes]:
    """An OIP inference response (JSON part, binary section); ``parameters`` says how the batch
    holding this request ran. Outputs in ``binary_outputs`` go to the binary section. ``logits``:
    (B, classes), or (B, n, V | D) of a per-position text head (which has no label)."""
    values = logits.detach().cpu().numpy()
    tensors = {LOGITS_OUTPUT: ({"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": list(values.shape)}, values)}
    if LABEL_OUTPUT in outputs:
        tensors[LABEL_OUTPUT] = ({"name": LABEL_OUTPUT, "datatype": "INT64", "shape": [values.shape[0]]},
                                 values.argmax(axis=1))
    parameters = {"mode": choice.mode, "choice": choice.label, "fell_back": fell_back, "batch_size": batch_size,
                  "queue_ms": round(queue_ms, 3), "executor_ms": round(executor_ms, 3)}
    if choice.mode == Mode.PRISM:  # OIP parameter values cannot be null
        parameters["segments"] = choice.segments
        if choice.cr is not None:
            parameters["cr"] = choice.cr
    objects, raw = encode_outputs([tensors[name] for name in outputs], binary_outputs)
    return {"model_name": model_name, "id": request_id, "parameters": parameters, "outputs": objects}, raw


def decode_image(data: bytes, spec: ViTSpec, max_pixels: int | None = None) -> torch.Tensor:
    """Image file bytes -> (1, C, H, W) float32, as the model expects it: C channels, img_size, mean/std.
    ``max_pixels`` (default :func:`max_image_pixels`) bounds the decoded size; larger images get 413."""
    limit = max_image_pixels(spec) if max_pixels is None else max_pixels
    if not data:
        raise RequestError(400, "bad_image", "the image is empty (0 bytes)")
    if spec.in_chans not in (1, 3):
        raise RequestError(400, "bad_image", f"this model takes {spec.in_chans} channels; images can only be "
                                             f"turned into 1 (grayscale) or 3 (RGB); send an FP32 tensor to /infer")
    try:
        image = _open_image(data)
        # JPEG decodes at 1/2, 1/4 or 1/8 scale for free: reduce to the smallest scale that still
        # covers the model's input, before any pixel is decoded (other formats ignore this)
        height, width = spec.img_size
        image.draft("L" if spec.in_chans == 1 else "RGB", (width, height))
    except UnidentifiedImageError:
        raise RequestError(400, "bad_image", f"could not decode the image: {len(data)} bytes starting "
                                             f"{data[:8].hex()} are no image format Pillow reads") from None
    except Image.DecompressionBombError:
        raise RequestError(413, "image_too_large", f"the image has more than {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                                                   f"at most {limit} pixels are decoded for this model; "
                                                   f"scale it down first") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(400, "bad_image", f"could not decode the image: {exc}") from None
    width, height = image.size
    if width * height > limit:
        raise RequestError(413, "image_too_large", f"the image is {width}x{height} pixels; at most {limit} pixels "
                                                   f"are decoded for this model (JPEGs count after 1/8 reduction); "
                                                   f"scale it down first")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with an orientation tag
        pixels = _resized_unit_pixels(image, spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated or corrupt data
        raise RequestError(400, "bad_image", f"the {image.format or 'image'} data is corrupt or truncated: "
                                             f"{exc}") from None
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((pixels - mean) / std))[None]


def _open_image(data: bytes) -> Image.Image:
    """The image, header read, no pixel decoded. Pillow's bomb check counts a JPEG at full size, but
    a JPEG is decoded reduced (draft), so one Pillow refuses is opened by its plugin and counted
    by the server's own rule after the reduction."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        if not data.startswith(b"\xff\xd8\xff"):
            raise
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))


def _resized_unit_pixels(image: Image.Image, spec: ViTSpec) -> np.ndarray:
    """(C, H, W) float32 in [0, 1] at the model's size."""
    height, width = spec.img_size
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: convert("L") would clip at 255, so scale in float instead
        gray = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)  # float32 array -> mode "F"
        plane = np.asarray(gray.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
        return np.repeat(plane[None], spec.in_chans, axis=0)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent areas read as white, not as whatever colour the hidden pixels happen to have
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    converted = image.convert("L" if spec.in_chans == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
