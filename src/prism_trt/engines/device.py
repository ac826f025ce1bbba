"""Where a runner's tensors live and the one CUDA stream per device that torch and the engines share.

Engines on a GPU and the torch code around them (request and staging copies) enqueue their work on
one stream per device, so consecutive stages are ordered by the stream itself and nothing has to
synchronise between them; the host waits only where it reads a result (means for a collective, the
logits). onnxruntime's CUDA EP is given the stream's handle (``user_compute_stream``) when its
session is created, and TensorRT runs ``execute_async_v3`` on it, so the stream lives as long as
the process.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from ..errors import UsageError

_streams: dict[int, torch.cuda.Stream] = {}


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device with an index on CUDA (``cuda`` means the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"engine tensors live on cpu or cuda:N, not {device}")
    return device


def compute_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The stream every engine and copy on ``device`` runs on (created once per process); None on the CPU."""
    device = resolve_device(device)
    if device.type != "cuda":
        return None
    if device.index not in _streams:
        # Not the legacy default stream: onnxruntime takes a zero handle as "no stream given".
        _streams[device.index] = torch.cuda.Stream(device)
    return _streams[device.index]


def on_compute_stream(device: torch.device) -> AbstractContextManager:
    """Makes ``device``'s compute stream torch's current stream (nothing on the CPU)."""
    stream = compute_stream(device)
    return nullcontext() if stream is None else torch.cuda.stream(stream)
