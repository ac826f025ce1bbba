"""The vision input spec of the KServe v2 server: one tensor named ``input`` (B, C, H, W) of images,
UINT8 raw pixels (0..255, one byte a value all the way to the engines, which normalise them) or
FP32 already normalised with the model's mean and std (``(pixels / 255 - mean) / std``, listed in
the metadata); (B, classes) ``logits`` and their ``label`` out; and the image endpoint's decoding
(an image file in, UINT8 pixels of the model's size out). The protocol itself is in kserve.py.
"""

from __future__ import annotations

import io

import numpy as np
import orjson
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from ..core.chain_key import ChainKey
from ..engines.modality import Vision
from ..engines.stage_spec import IMAGES
from ..model.spec import ViTSpec
from .binary import binary_size
from .kserve import (
    BODY_ALLOWANCE,
    LABEL_OUTPUT,
    LOGITS_OUTPUT,
    MODEL_VERSION,
    PLATFORM,
    KServeRequest,
    ServedModality,
    array_from_data,
    input_values,
    read_payload,
    requested_outputs,
    shape_text,
    show_json,
)
from .request_error import RequestError

INPUT_NAME = "input"
#: What the vision input's OIP datatypes mean: raw pixels, or images normalised with the mean and std.
PIXELS, NORMALISED = "UINT8", "FP32"

# The image endpoint decodes at most max(IMAGE_PIXELS_FLOOR, IMAGE_PIXELS_PER_INPUT x the model's
# input pixels): a phone screenshot (~3 Mpx) of a digit still works for a 28 x 28 model, while a
# decompression bomb in a small PNG (a 6300 x 6300 RGBA PNG is 154 KB) is refused before it gets
# to allocate. JPEGs are first reduced while decoding (Image.draft, down to 1/8), so a 12 Mpx
# phone photo decodes at 1.5 Mpx.
IMAGE_PIXELS_FLOOR = 4 * 1024 * 1024
IMAGE_PIXELS_PER_INPUT = 64

IMAGE_BYTES_PER_PIXEL = 2  # a compressed image at the pixel cap is well under 2 bytes a pixel


def max_image_pixels(spec: ViTSpec) -> int:
    """The most pixels the image endpoint decodes for this model (after any JPEG reduction)."""
    height, width = spec.img_size
    return max(IMAGE_PIXELS_FLOOR, IMAGE_PIXELS_PER_INPUT * height * width)


class VisionServing(ServedModality):
    """A ViT served: the HTTP input ``input`` is the stage input ``images``."""

    input_names = {INPUT_NAME: IMAGES}
    modality: Vision

    @property
    def max_pixels(self) -> int:
        return max_image_pixels(self.modality.spec)

    def max_image_bytes(self) -> int:
        """An image file at the pixel cap (:func:`max_image_pixels`)."""
        return IMAGE_BYTES_PER_PIXEL * self.max_pixels + BODY_ALLOWANCE

    def require_image_input(self) -> None:
        return None

    def decode_image(self, data: bytes) -> dict[str, torch.Tensor]:
        return {INPUT_NAME: decode_image(data, self.modality.spec, self.max_pixels)}

    def metadata(self, choices: list[ChainKey]) -> dict:
        return model_metadata(self.model_name, self.modality.spec, self.max_batch, choices)

    def parse(self, body: bytes, header_length: str | None = None) -> KServeRequest:
        return parse_infer_request(self, body, header_length)


def model_metadata(model_name: str, spec: ViTSpec, max_batch: int, choices: list[ChainKey]) -> dict:
    height, width = spec.img_size
    return {
        "name": model_name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        # OIP names one datatype an input; UINT8 raw pixels are accepted too (the parameters say so)
        "inputs": [{"name": INPUT_NAME, "datatype": NORMALISED, "shape": [-1, spec.in_chans, height, width]}],
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
            "input_datatypes": f"{PIXELS},{NORMALISED}",
            "input_scale": f"{PIXELS}: raw pixels 0..255; {NORMALISED}: (pixels / 255 - mean) / std",
            "image_endpoint": f"/v2/models/{model_name}/infer/image",
        },
    }


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
        wrong = [f"{name} {got} (expected {want})" for name, got, want in zip(names, shape[1:], expected)
                 if got != want]
        raise RequestError(400, "shape", f"input '{INPUT_NAME}' shape {shape_text(shape)} does not fit this model: "
                                         f"{', '.join(wrong)}; expected {expected_text}")
    if shape[0] < 1:
        raise RequestError(400, "shape", f"input '{INPUT_NAME}' batch size is {shape[0]}; expected {expected_text}")
    if shape[0] > max_batch:
        raise RequestError(413, "batch_too_large", f"input '{INPUT_NAME}' batch size {shape[0]} exceeds this "
                                                   f"server's max batch {max_batch}; split the request")
    return shape


def _finite(values: np.ndarray) -> torch.Tensor:
    """The float32 array as a tensor, once every value is known to be finite."""
    finite = np.isfinite(values)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise RequestError(400, "non_finite", f"input '{INPUT_NAME}' has a non-finite value ({values.flat[index]}) at "
                                              f"flat index {index}; values must be finite and within FP32 range")
    return torch.from_numpy(np.ascontiguousarray(values))


def _pixels(tensor: dict, shape: list[int], size: int | None, raw: bytes, header_length: str | None,
            may_hold_booleans: bool) -> torch.Tensor:
    """A UINT8 input's pixels: raw bytes, or JSON integers each checked to lie in 0..255 (a cast
    alone would wrap 256 to 0 and answer for another image)."""
    if size is not None:
        return torch.from_numpy(input_values(tensor, INPUT_NAME, shape, PIXELS, size, raw, header_length, False))
    values = array_from_data(tensor["data"], shape, INPUT_NAME, "iu", may_hold_booleans)
    outside = (values < 0) | (values > 255)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise RequestError(400, "data", f"input '{INPUT_NAME}' has {values.flat[index]} at flat index {index}; "
                                        f"{PIXELS} pixels are integers 0..255")
    return torch.from_numpy(values.astype(np.uint8))


def parse_infer_request(served: VisionServing, body: bytes, header_length: str | None = None) -> KServeRequest:
    """Validate an OIP inference request for this model, or raise :class:`RequestError`.
    ``header_length``: the Inference-Header-Content-Length header, when the binary extension is used."""
    expected = f"one {PIXELS} or {NORMALISED} tensor named '{INPUT_NAME}'"
    payload, raw, request_id = read_payload(body, header_length, expected)
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
    datatype = tensor["datatype"]
    if datatype not in (PIXELS, NORMALISED):
        raise RequestError(400, "datatype", f"input '{INPUT_NAME}' has datatype {show_json(datatype)}; this model "
                                            f"takes {PIXELS} raw pixels (0..255) or {NORMALISED} images normalised "
                                            f"with its mean and std")
    shape = _check_shape(tensor["shape"], served.modality.spec, served.max_batch)
    if size is None and raw:
        raise RequestError(400, "binary_data", f"the body holds {len(raw)} bytes after the JSON header, but input "
                                               f"'{INPUT_NAME}' declares no binary_data_size")
    may_hold_booleans = b"true" in body or b"false" in body
    if datatype == PIXELS:
        images = _pixels(tensor, shape, size, raw, header_length, may_hold_booleans)
    else:
        images = _finite(input_values(tensor, INPUT_NAME, shape, NORMALISED, size, raw, header_length,
                                      may_hold_booleans))
    outputs, binary_outputs = requested_outputs(payload)
    return KServeRequest(served.request({INPUT_NAME: images}), request_id, outputs, binary_outputs)


def decode_image(data: bytes, spec: ViTSpec, max_pixels: int | None = None) -> torch.Tensor:
    """Image file bytes -> (1, C, H, W) uint8 raw pixels of the model's C channels and img_size (the
    engines normalise them with the model's mean and std).
    ``max_pixels`` (default :func:`max_image_pixels`) bounds the decoded size; larger images get 413."""
    limit = max_image_pixels(spec) if max_pixels is None else max_pixels
    if not data:
        raise RequestError(400, "bad_image", "the image is empty (0 bytes)")
    if spec.in_chans not in (1, 3):
        raise RequestError(400, "bad_image", f"this model takes {spec.in_chans} channels; images can only be "
                                             f"turned into 1 (grayscale) or 3 (RGB); send a tensor to /infer")
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
        pixels = _resized_pixels(image, spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated or corrupt data
        raise RequestError(400, "bad_image", f"the {image.format or 'image'} data is corrupt or truncated: "
                                             f"{exc}") from None
    return torch.from_numpy(np.array(pixels, order="C"))[None]  # a writable copy of what Pillow decoded


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


def _resized_pixels(image: Image.Image, spec: ViTSpec) -> np.ndarray:
    """(C, H, W) uint8 at the model's size."""
    height, width = spec.img_size
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: convert("L") would clip at 255, so scale in float, then round to a byte
        gray = Image.fromarray(np.asarray(image, dtype=np.float32) * (255 / 65535))  # float32 array -> mode "F"
        plane = np.asarray(gray.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
        return np.repeat(np.clip(np.rint(plane), 0, 255).astype(np.uint8)[None], spec.in_chans, axis=0)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent areas read as white, not as whatever colour the hidden pixels happen to have
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    converted = image.convert("L" if spec.in_chans == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
