"""Triton's binary tensor data extension (KServe v2 / OIP), as tritonclient speaks it by default.

A request body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
bytes of every input whose ``parameters.binary_data_size`` is set, in input order. Outputs are
sent raw when asked (an output's ``parameters.binary_data: true``, or the request's
``parameters.binary_data_output: true``, which tritonclient sends when no outputs are named): the
response is then a JSON header (its length in the ``Inference-Header-Content-Length`` response
header) followed by those outputs' bytes, each output carrying ``parameters.binary_data_size``.
Tensors are little-endian, row-major, as Triton sends them.
"""

from __future__ import annotations

import math

import numpy as np
import orjson

from .request_error import RequestError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
# bytes a value takes on the wire, per OIP datatype (only these three are spoken here)
DATATYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1")}


MAX_BYTE_COUNT_DIGITS = 18  # far above any body this server accepts, far below int()'s digit limit


def byte_count(text: str, header: str, reason: str = "bad_header") -> int:
    """A header's value as a byte count: ASCII digits only (``str.isdigit`` also admits ``²``, which
    ``int`` refuses) and at most :data:`MAX_BYTE_COUNT_DIGITS` of them; otherwise a 400 naming it."""
    value = text.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_BYTE_COUNT_DIGITS):
        shown = value if len(value) <= 40 else f"{value[:20]}...({len(value)} characters)"
        raise RequestError(400, reason, f"{header} must be a number of bytes, got {shown!r} (ASCII digits, "
                                        f"at most {MAX_BYTE_COUNT_DIGITS})")
    return int(value)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary section) of a request body; the whole body is JSON without the header."""
    if header_length is None:
        return body, b""
    length = byte_count(header_length, HEADER_LENGTH, "binary_data")
    if length < 2 or length > len(body):  # the smallest JSON object is {}
        raise RequestError(400, "binary_data", f"{HEADER_LENGTH} is {length}, but the body holds {len(body)} "
                                               f"bytes; it must be the length of the JSON header at the body's start")
    return body[:length], body[length:]


def binary_size(tensor: dict, name: str) -> int | None:
    """An input's ``parameters.binary_data_size``, checked to be a byte count, or None."""
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise RequestError(400, "binary_data", f"input '{name}' parameters.binary_data_size must be a byte count, "
                                               f"got {orjson.dumps(size).decode()}")
    return size


def tensor_from_binary(raw: bytes, size: int, shape: list[int], datatype: str, name: str) -> np.ndarray:
    """The input's values from the binary section, which must hold exactly its ``size`` bytes."""
    dtype = DATATYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise RequestError(400, "binary_data", f"input '{name}' binary_data_size is {size} bytes; shape "
                                               f"[{', '.join(map(str, shape))}] of {datatype} needs {expected}")
    if len(raw) != size:
        raise RequestError(400, "binary_data", f"the body holds {len(raw)} bytes after the JSON header; input "
                                               f"'{name}' declares binary_data_size {size}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))  # writable, native order


def flag(parameters: dict, key: str, where: str) -> bool | None:
    """A boolean parameter, or None when absent; anything else is refused, not read as truthy."""
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, "outputs", f"{where} parameters.{key} must be true or false, got "
                                           f"{orjson.dumps(value).decode()}")
    return value


def encode_outputs(tensors: list[tuple[dict, np.ndarray]], binary: frozenset[str]) -> tuple[list[dict], bytes]:
    """The response's output objects and binary section: outputs named in ``binary`` carry
    ``binary_data_size`` and their bytes go to the section, in output order; the rest carry ``data``."""
    objects, chunks = [], []
    for description, values in tensors:
        if description["name"] in binary:
            raw = np.ascontiguousarray(values, dtype=DATATYPES[description["datatype"]]).tobytes()
            objects.append({**description, "parameters": {"binary_data_size": len(raw)}})
            chunks.append(raw)
        else:
            objects.append({**description, "data": values.reshape(-1).tolist()})
    return objects, b"".join(chunks)


def encode_body(header: dict, binary: bytes) -> tuple[bytes, dict[str, str], str]:
    """(body, headers, media type) of a response; a JSON body when there is no binary section."""
    text = orjson.dumps(header)
    if not binary:
        return text, {}, "application/json"
    return text + binary, {HEADER_LENGTH: str(len(text))}, BINARY_CONTENT_TYPE
