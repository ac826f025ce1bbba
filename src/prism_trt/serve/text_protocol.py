"""The text input spec of the KServe v2 server: INT64 ``input_ids`` (and optionally
``attention_mask``, default all ones) of shape [B, n] in, ``logits`` out. The protocol itself is
in kserve.py.

A build partitions one sequence length N (or several: sequence buckets), so a request of n
positions runs right-padded on the shortest built N >= n (the request type does both, see
runtime/request.py); a per-position head's logits (GPT-2: [B, n, V]) are cut back to the
request's n. A classifier
(BERT) answers [B, classes] logits and their ``label``. Values arrive as JSON ``data`` or in
Triton's binary tensor extension, in the order the inputs are listed.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.chain_key import ChainKey
from ..engines.modality import Text
from ..engines.stage_spec import ATTENTION_MASK, INPUT_IDS
from .binary import binary_size
from .kserve import (
    LOGITS_OUTPUT,
    MODEL_VERSION,
    OUTPUT_NAMES,
    PLATFORM,
    KServeRequest,
    ServedModality,
    input_values,
    read_payload,
    requested_outputs,
    shape_text,
    show_json,
)
from .request_error import RequestError

TEXT_INPUT_NAMES = (INPUT_IDS, ATTENTION_MASK)


class TextServing(ServedModality):
    """A text model served: the HTTP inputs are named as the stage inputs."""

    input_names = {name: name for name in TEXT_INPUT_NAMES}
    modality: Text

    def __init__(self, modality: Text, model_name: str, max_batch: int, lengths: tuple[int, ...] = ()):
        super().__init__(modality, model_name, max_batch, lengths or (modality.sequence_length,))

    @property
    def output_names(self) -> tuple[str, ...]:
        """logits and label for a classifier; logits alone for a per-position head."""
        return (LOGITS_OUTPUT,) if self.modality.per_position else OUTPUT_NAMES

    def metadata(self, choices: list[ChainKey]) -> dict:
        return text_model_metadata(self, choices)

    def parse(self, body: bytes, header_length: str | None = None) -> KServeRequest:
        return parse_text_request(self, body, header_length)

    def require_image_input(self) -> None:
        raise RequestError(404, "no_image_input", f"'{self.model_name}' is a text model: POST INT64 input_ids "
                                                  f"(and attention_mask) to /v2/models/{self.model_name}/infer")


def text_model_metadata(served: TextServing, choices: list[ChainKey]) -> dict:
    """The metadata of a text model served on ``served.lengths`` (its sequence buckets, ascending)."""
    lengths, model_name, max_batch, spec = served.lengths, served.model_name, served.max_batch, served.modality.spec
    per_position = served.modality.per_position
    output_shape = served.modality.output_shape()
    logits_shape = [-1, -1, output_shape[1]] if per_position else [-1, *output_shape]
    outputs = [{"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": logits_shape}]
    if not per_position:
        outputs.append({"name": OUTPUT_NAMES[1], "datatype": "INT64", "shape": [-1]})
    return {
        "name": model_name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": name, "datatype": "INT64", "shape": [-1, -1]} for name in TEXT_INPUT_NAMES],
        "outputs": outputs,
        "parameters": {"max_batch_size": max_batch, "max_sequence_length": lengths[-1],
                       "sequence_buckets": ",".join(map(str, lengths)),
                       "vocab_size": spec.vocab_size, "modes": ",".join(choice.label for choice in choices)},
    }


def _check_shape(shape, name: str, seq_len: int, max_batch: int) -> list[int]:
    expected = f"[B, n] with 1 <= B <= {max_batch} and 1 <= n <= {seq_len}"
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise RequestError(400, "shape", f"input '{name}' shape must be {expected}, got {show_json(shape)}")
    batch, length = shape
    if batch > max_batch:
        raise RequestError(413, "batch_too_large", f"input '{name}' batch size {batch} exceeds this server's max "
                                                   f"batch {max_batch}; split the request")
    if length > seq_len:
        raise RequestError(413, "sequence_too_long", f"input '{name}' has {length} positions; these engines were "
                                                     f"built for at most {seq_len} (prism-trt build --seq-len)")
    if batch < 1 or length < 1:
        raise RequestError(400, "shape", f"input '{name}' shape {shape_text(shape)} is empty; expected {expected}")
    return shape


def _tensor(tensor: dict, raw: memoryview, offset: int, header_length: str | None, seq_len: int, max_batch: int,
            may_hold_booleans: bool) -> tuple[str, np.ndarray, int]:
    """(name, int64 values, bytes of the binary section used) of one input tensor object."""
    if not isinstance(tensor, dict):
        raise RequestError(400, "malformed_request", f"each input must be a tensor object, got {show_json(tensor)}")
    name = tensor.get("name")
    if name not in TEXT_INPUT_NAMES:
        raise RequestError(400, "input_name", f"unknown input {show_json(name)}; this model takes "
                                              f"{list(TEXT_INPUT_NAMES)}")
    size = binary_size(tensor, name)
    missing = [key for key in ("shape", "datatype") + (("data",) if size is None else ()) if key not in tensor]
    if missing:
        raise RequestError(400, "malformed_request", f"input '{name}' lacks field(s) {missing}")
    if tensor["datatype"] != "INT64":
        raise RequestError(400, "datatype", f"input '{name}' has datatype {show_json(tensor['datatype'])}; this model "
                                            f"takes INT64")
    shape = _check_shape(tensor["shape"], name, seq_len, max_batch)
    used = size or 0
    return name, input_values(tensor, name, shape, "INT64", size, bytes(raw[offset:offset + used]), header_length,
                              may_hold_booleans), used


def parse_text_request(served: TextServing, body: bytes, header_length: str | None = None) -> KServeRequest:
    """Validate an OIP request for a text model, or raise :class:`RequestError`; the request runs
    on the shortest of ``served.lengths`` (the sequence buckets, ascending) that holds it."""
    seq_len, vocab, max_batch = served.lengths[-1], served.modality.spec.vocab_size, served.max_batch
    payload, raw, request_id = read_payload(body, header_length, f"INT64 tensors {list(TEXT_INPUT_NAMES)}")
    if not isinstance(payload["inputs"], list):
        raise RequestError(400, "missing_inputs", f"request body must be a JSON object with an 'inputs' list holding "
                                                  f"INT64 tensors {list(TEXT_INPUT_NAMES)}")
    values, offset, view = {}, 0, memoryview(raw)
    booleans = b"true" in body or b"false" in body
    for tensor in payload["inputs"]:
        name, array, used = _tensor(tensor, view, offset, header_length, seq_len, max_batch, booleans)
        if name in values:
            raise RequestError(400, "input_name", f"input '{name}' is given twice")
        values[name], offset = array, offset + used
    if offset != len(raw):
        raise RequestError(400, "binary_data", f"the body holds {len(raw)} bytes after the JSON header; the inputs "
                                               f"declare {offset}")
    if INPUT_IDS not in values:
        raise RequestError(400, "missing_inputs", f"request has no '{INPUT_IDS}' tensor")
    ids = values[INPUT_IDS]
    mask = values.get(ATTENTION_MASK, np.ones_like(ids))
    if mask.shape != ids.shape:
        raise RequestError(400, "shape", f"'{ATTENTION_MASK}' has shape {shape_text(mask.shape)}, '{INPUT_IDS}' "
                                         f"{shape_text(ids.shape)}; they must match")
    if ids.min() < 0 or ids.max() >= vocab:
        raise RequestError(400, "token_id", f"'{INPUT_IDS}' must lie in [0, {vocab}), found {int(ids.min())}.."
                                            f"{int(ids.max())}")
    if not np.isin(mask, (0, 1)).all():
        raise RequestError(400, "attention_mask", f"'{ATTENTION_MASK}' must hold only 0 (padding) and 1 (token)")
    request = served.request({INPUT_IDS: torch.from_numpy(np.ascontiguousarray(ids)),
                              ATTENTION_MASK: torch.from_numpy(np.ascontiguousarray(mask))})
    outputs, binary_outputs = requested_outputs(payload, served.output_names)
    return KServeRequest(request, request_id, outputs, binary_outputs)
