"""KServe v2 / Open Inference Protocol, whatever the model: the request body (JSON, or raw bytes by
Triton's binary tensor data extension, see binary.py), tensor values and their datatypes, the
requested outputs, the response and server metadata; and :class:`ServedModality`, the base of the
vision and text input specs beside this module (``protocol.py``, ``text_protocol.py``).

JSON is parsed with orjson (several times faster than the standard library on a full batch). It
refuses what JSON itself does not allow, such as NaN and Infinity, which the error message names.
"""

from __future__ import annotations

import math
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import orjson
import torch

from ..core.chain_key import ChainKey, Mode
from ..engines.modality import Modality
from ..errors import UsageError
from ..runtime.request import InferenceRequest
from .binary import DATATYPES, encode_outputs, flag, split_body, tensor_from_binary
from .request_error import RequestError

LOGITS_OUTPUT = "logits"
LABEL_OUTPUT = "label"
OUTPUT_NAMES = (LOGITS_OUTPUT, LABEL_OUTPUT)
PLATFORM = "prism_trt"
MODEL_VERSION = "1"  # a server serves one model at one version
# Triton's extensions spoken here: binary.py, and the model configuration and statistics of triton.py
PROTOCOL_EXTENSIONS: list[str] = ["binary_tensor_data", "model_configuration", "statistics"]

_NON_JSON_NUMBER = re.compile(rb"(?<![\w\"])-?(NaN|Infinity)\b")

# What one value of a full batch may take in a request body: as JSON, a float64 written in full
# (up to 24 characters, "-2.2250738585072014e-308") with its separator, nesting brackets and some
# whitespace; in Triton's binary encoding, the value's own size (4 bytes FP32, 8 bytes INT64).
BYTES_PER_VALUE = {"json": 32, "binary": None}
BODY_ALLOWANCE = 64 << 10  # the rest of a request: id, names, parameters, the binary request's JSON header


@dataclass(frozen=True, eq=False)
class KServeRequest:
    """One parsed /infer request: the model's request and what the client wants back."""

    request: InferenceRequest
    request_id: str
    outputs: tuple[str, ...]  # requested outputs, in response order
    binary_outputs: frozenset[str] = frozenset()  # outputs to send as raw bytes (binary extension)


def server_metadata(version: str) -> dict:
    return {"name": "prism-trt", "version": version, "extensions": PROTOCOL_EXTENSIONS}


def shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


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


def read_payload(body: bytes, header_length: str | None, expected: str) -> tuple[dict, bytes, str]:
    """(the JSON object, the binary section, the request id or a new one) of an /infer body;
    ``expected`` says in errors what its 'inputs' must hold."""
    json_part, raw = split_body(body, header_length)
    payload = load_json(json_part)
    if not isinstance(payload, dict):
        raise RequestError(400, "malformed_request", f"request body must be a JSON object with an 'inputs' list, "
                                                     f"got a JSON {type(payload).__name__}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "malformed_request", f"'id' must be a string, got {show_json(request_id)}")
    if "inputs" not in payload:
        raise RequestError(400, "missing_inputs", f"request has no 'inputs'; expected a list holding {expected}")
    return payload, raw, uuid.uuid4().hex if request_id is None else request_id


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


class ServedModality(ABC):
    """A modality as the server speaks it: its KServe inputs (and their names on the wire), metadata,
    request parsing and body limits. ``lengths``: the sequence buckets served (ascending; () for
    a model of fixed tokens)."""

    #: The HTTP input names clients send -> the request tensors they become.
    input_names: ClassVar[dict[str, str]]

    def __init__(self, modality: Modality, model_name: str, max_batch: int, lengths: tuple[int, ...] = ()):
        self.modality, self.model_name, self.max_batch, self.lengths = modality, model_name, max_batch, lengths

    @abstractmethod
    def metadata(self, choices: list[ChainKey]) -> dict:
        """The model metadata document (GET /v2/models/NAME)."""

    @abstractmethod
    def parse(self, body: bytes, header_length: str | None = None) -> KServeRequest:
        """An /infer body as a request, or a :class:`RequestError`. ``header_length``: the
        Inference-Header-Content-Length header, when the binary extension is used."""

    def request(self, tensors: dict[str, torch.Tensor]) -> InferenceRequest:
        """The request of the tensors a body held (by their HTTP names): bucket, padding, the model's checks."""
        try:
            return InferenceRequest.create(self.modality, {self.input_names[name]: tensor
                                                           for name, tensor in tensors.items()}, self.lengths)
        except UsageError as error:  # the parsers check the wire first, so this is a request they let through
            raise RequestError(400, "request", str(error)) from None

    def max_body_bytes(self, encoding: str = "json") -> int:
        """The /infer body limit: a full batch of the model's inputs (at the longest bucket) in
        ``encoding`` ("json" or "binary") and an allowance for the rest of the request."""
        total = 0
        for tensor in self.modality.request_inputs():
            width = BYTES_PER_VALUE[encoding] or np.dtype(tensor.dtype).itemsize
            total += width * math.prod(tensor.concrete(self.max_batch))
        return total + BODY_ALLOWANCE

    def max_image_bytes(self) -> int:
        """The /infer/image body limit (a model without an image endpoint reads no image)."""
        return BODY_ALLOWANCE

    max_pixels: int = 0  # the most pixels the image endpoint decodes

    def require_image_input(self) -> None:
        """A RequestError (404) where the model takes no images (before its body is read)."""
        raise RequestError(404, "no_image_input", f"'{self.model_name}' takes no images: POST its inputs "
                                                  f"{list(self.input_names)} to /v2/models/{self.model_name}/infer")

    def decode_image(self, data: bytes) -> dict[str, torch.Tensor]:
        """Image file bytes as the tensors of a one-item request, by their HTTP names."""
        self.require_image_input()
        return {}

