"""Explicit, timed staging around every collective (seed 000 section 3.2).

GLOO moves host memory only. Before each all-gather the rank's means are copied device -> host
into a padded send slot; after it, the other ranks' slots are copied host -> device into one
remote-means tensor for the next block. Buffers are allocated once per (config, batch) key and
reused: nothing is allocated in the steady state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError


@dataclass
class StagingBuffers:
    send: torch.Tensor  # (B, max_count, D) host: this rank's means, padded
    gathered: list[torch.Tensor]  # P x (B, max_count, D) host: what the all-gather fills
    remote: torch.Tensor  # (B, remote_count, D) on the compute device: the next block's input


class Staging:
    """Host staging for CPU backends: the copies that really happen, timed like the GPU ones.

    counts: entries each rank sends per block; rank: this rank; dim: D.
    """

    name = "host"

    def __init__(self, counts: list[int], rank: int, dim: int, device: str = "cpu"):
        self.counts, self.rank, self.dim = list(counts), rank, dim
        self.max_count = max(counts)
        self.device = torch.device(device)
        self._buffers: dict[tuple, StagingBuffers] = {}
        self.allocations = 0

    def _host(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32)

    def buffers(self, key: tuple, batch: int) -> StagingBuffers:
        if key not in self._buffers:
            slot = (batch, self.max_count, self.dim)
            remote = sum(c for q, c in enumerate(self.counts) if q != self.rank)
            self._buffers[key] = StagingBuffers(
                self._host(slot), [self._host(slot) for _ in self.counts],
                torch.empty((batch, remote, self.dim), dtype=torch.float32, device=self.device))
            self.allocations += 1
        return self._buffers[key]

    def to_host(self, means: torch.Tensor, buffers: StagingBuffers) -> torch.Tensor:
        """Copy this rank's means into its padded send slot (device -> host)."""
        buffers.send[:, : means.shape[1]].copy_(means)
        self.synchronize()
        return buffers.send

    def to_device(self, buffers: StagingBuffers) -> torch.Tensor:
        """Copy the other ranks' means, sliced to their counts, into the remote tensor (host -> device)."""
        offset = 0
        for q, slot in enumerate(buffers.gathered):
            if q == self.rank:
                continue
            count = self.counts[q]
            buffers.remote[:, offset: offset + count].copy_(slot[:, :count], non_blocking=self.device.type == "cuda")
            offset += count
        self.synchronize()
        return buffers.remote

    def synchronize(self) -> None:
        pass


class TorchCudaStaging(Staging):
    """Pinned host buffers and non-blocking copies, synchronised before the collective needs the
    data (d2h) and before the next block reads it (h2d), so each copy's time is its own."""

    name = "torch-cuda"

    def __init__(self, counts: list[int], rank: int, dim: int, device: str = "cuda"):
        if not torch.cuda.is_available():
            raise UsageError("torch-cuda staging needs a CUDA build of torch and a GPU")
        super().__init__(counts, rank, dim, device)

    def _host(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32).pin_memory()

    def to_host(self, means: torch.Tensor, buffers: StagingBuffers) -> torch.Tensor:
        buffers.send[:, : means.shape[1]].copy_(means, non_blocking=True)
        self.synchronize()
        return buffers.send

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()


def make_staging(counts: list[int], rank: int, dim: int, device: str) -> Staging:
    """Host staging for CPU engines, torch-CUDA staging for engines whose tensors live on a GPU."""
    if torch.device(device).type == "cuda":
        return TorchCudaStaging(counts, rank, dim, device)
    return Staging(counts, rank, dim, device)
