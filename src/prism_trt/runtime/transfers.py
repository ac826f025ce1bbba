"""The one boundary between host and device memory of a rank: every crossing goes through a
:class:`DeviceTransfers`, which moves it (reusing its buffers) or, for the copies the staging makes
into its own buffers, is told of it, and counts the bytes by kind.

What may cross in a batch is fixed by the design: the request once (host -> device, from a reused
page-locked buffer into a reused device buffer), the exchanged means, Voltage features or final
positions around each collective, and the logits once at the end. Everything else stays on the
device. A CPU rank crosses nothing for real (its host memory is its device's), but the crossings
are counted all the same, so the design is checked where it runs in CI.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

import torch

from ..engines.device import resolve_device


class Crossing(str, Enum):
    """What a host <-> device copy carries."""

    REQUEST = "request"  # the batch's inputs, host -> device, once per batch
    EXCHANGE = "exchange"  # means / Voltage features / final positions around a collective
    LOGITS = "logits"  # the answer, device -> host, once per batch on the rank that runs the head
    OTHER = "other"  # anything else: a stray copy the design does not allow

    def __str__(self) -> str:
        return self.value


class DeviceTransfers:
    """Moves tensors between the host and ``device`` and counts every crossing: ``bytes`` and
    ``crossings`` by :class:`Crossing`, since construction (or :meth:`reset`).

    On CUDA a tensor going to the device is copied into a reused page-locked buffer (unless it is
    pinned already) and from there, asynchronously on the current stream, into a reused device
    buffer of its shape: the same addresses every batch of a size. On the CPU nothing is copied.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.bytes = {kind: 0 for kind in Crossing}
        self.crossings = {kind: 0 for kind in Crossing}
        self._pinned: dict[tuple, torch.Tensor] = {}
        self._on_device: dict[tuple, torch.Tensor] = {}

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def record(self, kind: Crossing, nbytes: int) -> None:
        """Record one crossing of ``nbytes`` made elsewhere (the staging's copies into its own buffers)."""
        self.bytes[kind] += nbytes
        self.crossings[kind] += 1

    def count(self, kind: Crossing, tensor: torch.Tensor | None) -> None:
        """Record the crossing of ``tensor`` (nothing for None)."""
        if tensor is not None:
            self.record(kind, tensor.numel() * tensor.element_size())

    def to_device(self, tensor: torch.Tensor, kind: Crossing, slot: str = "") -> torch.Tensor:
        """``tensor`` on the device: the reused buffer of ``slot`` and its shape on CUDA; on the CPU
        the tensor itself (a host copy of one that lives elsewhere)."""
        self.count(kind, tensor)
        if not self.on_cuda:
            return tensor if tensor.device == self.device else tensor.to(self.device)
        key = (slot, tuple(tensor.shape), tensor.dtype)
        source = tensor
        if not tensor.is_pinned():
            if key not in self._pinned:
                self._pinned[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            source = self._pinned[key]
            source.copy_(tensor)
        if key not in self._on_device:
            self._on_device[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        return self._on_device[key].copy_(source, non_blocking=True)

    def request_to_device(self, request: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch's request tensors (images; ids and mask) on the device, each in its reused buffer."""
        return {name: self.to_device(tensor, Crossing.REQUEST, name) for name, tensor in request.items()}

    def to_host(self, tensor: torch.Tensor, kind: Crossing) -> torch.Tensor:
        """``tensor`` in host memory (a new tensor from a GPU, once the stream's work before it is
        done; the tensor itself on the CPU)."""
        self.count(kind, tensor)
        return tensor.cpu()  # the tensor itself where it is in host memory already

    def reset(self) -> None:
        for kind in Crossing:
            self.bytes[kind] = self.crossings[kind] = 0

    def to_dict(self) -> dict:
        """``{"bytes": {kind: n}, "crossings": {kind: n}}`` with the kinds as strings."""
        return {"bytes": {str(k): v for k, v in self.bytes.items()},
                "crossings": {str(k): v for k, v in self.crossings.items()}}
