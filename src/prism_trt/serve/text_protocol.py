"""KServe v2 / Open Inference Protocol for text models: INT64 ``input_ids`` (and optionally
``attention_mask``, default all ones) of shape [B, n] in, ``logits`` out.

A build partitions one sequence length N (or several: sequence buckets), so a request of n
positions is right-padded (ids 0, mask 0) to the shortest built N >= n before batching; padding
never changes the outputs of real positions, and a per-position head's logits (GPT-2: [B, n, V])
are cut back to the request's n. A classifier
(BERT) answers [B, classes] logits and their ``label``. Values arrive as JSON ``data`` or in
Triton's binary tensor extension, in the order the inputs are listed.
"""

from __future__ import annotations

import uuid

import numpy as np
import torch

from ..core.chain_key import ChainKey
from ..engines.buckets import shortest_holding
from ..engines.manifest import ModelRecord
from ..engines.stage_spec import ATTENTION_MASK, INPUT_IDS
from .binary import binary_size, split_body
from .protocol import (
    LOGITS_OUTPUT,
    OUTPUT_NAMES,
    PLATFORM,
    InferRequest,
    input_values,
    load_json,
    requested_outputs,
    shape_text,
    show_json,
)
from .request_error import RequestError

TEXT_INPUT_NAMES = (INPUT_IDS, ATTENTION_MASK)


def text_output_names(record: ModelRecord) -> tuple[str, ...]:
    """logits and label for a classifier; logits alone for a per-position head."""
    return OUTPUT_NAMES if record.spec.head == "classifier" else (LOGITS_OUTPUT,)


def text_model_metadata(model_name: str, record: ModelRecord, max_batch: int, choices: list[ChainKey],
                        lengths: tuple[int, ...] = ()) -> dict:
    """lengths: the sequence buckets, ascending (default the record's one length)."""
    lengths = lengths or (record.sequence_length,)
    per_position = record.head_reads_all_positions
    logits_shape = [-1, -1, record.output_shape[1]] if per_position else [-1, *record.output_shape]
    outputs = [{"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": logits_shape}]
    if not per_position:
        outputs.append({"name": OUTPUT_NAMES[1], "datatype": "INT64", "shape": [-1]})
    return {
        "name": model_name,
        "versions": [],
        "platform": PLATFORM,
        "inputs": [{"name": name, "datatype": "INT64", "shape": [-1, -1]} for name in TEXT_INPUT_NAMES],
        "outputs": outputs,
        "parameters": {"max_batch_size": max_batch, "max_sequence_length": lengths[-1],
                       "sequence_buckets": ",".join(map(str, lengths)),
                       "vocab_size": record.spec.vocab_size, "modes": ",".join(choice.label for choice in choices)},
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


def parse_text_request(body: bytes, record: ModelRecord, max_batch: int, header_length: str | None = None,
                       lengths: tuple[int, ...] = ()) -> InferRequest:
    """Validate an OIP request for a text model, or raise :class:`RequestError`; the inputs come
    back padded to the shortest of ``lengths`` (the sequence buckets, ascending; default the
    record's one length) that holds them."""
    lengths = lengths or (record.sequence_length,)
    seq_len, vocab = lengths[-1], record.spec.vocab_size
    json_part, raw = split_body(body, header_length)
    payload = load_json(json_part)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise RequestError(400, "missing_inputs", f"request body must be a JSON object with an 'inputs' list holding "
                                                  f"INT64 tensors {list(TEXT_INPUT_NAMES)}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "malformed_request", f"'id' must be a string, got {show_json(request_id)}")
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
    batch, length = ids.shape
    bucket = lengths[shortest_holding(lengths, length)]  # within the longest: checked with the shape
    padded = {name: torch.zeros((batch, bucket), dtype=torch.int64) for name in TEXT_INPUT_NAMES}
    padded[INPUT_IDS][:, :length] = torch.from_numpy(ids)
    padded[ATTENTION_MASK][:, :length] = torch.from_numpy(mask)
    outputs, binary_outputs = requested_outputs(payload, text_output_names(record))
    return InferRequest(padded, uuid.uuid4().hex if request_id is None else request_id, outputs, binary_outputs,
                        positions=length if record.head_reads_all_positions else None)
