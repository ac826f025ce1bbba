"""Explicit, timed staging around every collective (seed 000 section 3.2).

GLOO moves host memory only. Before each all-gather the rank's means are copied device -> host
into a padded send slot; after it, the other ranks' slots are copied host -> device into one
remote-means tensor for the next block. Buffers are allocated once per (config, batch) key and
reused: nothing is allocated in the steady state.

A per-position text head (GPT-2's LM head) runs on rank 0 over every position, so after the last
block :class:`FinalGather` gathers the ranks' final hidden states there, staged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.plan import attended_ranks
from ..errors import UsageError
from .timing import Stopwatch


@dataclass
class StagingBuffers:
    send: torch.Tensor  # (B, max_count, D) host: this rank's means, padded
    gathered: list[torch.Tensor]  # P x (B, max_count, D) host: what the all-gather fills
    remote: torch.Tensor  # (B, remote_count, D) on the compute device: the next block's input


class Staging:
    """Host staging for CPU backends: the copies that really happen, timed like the GPU ones.

    counts: entries each rank sends per block; rank: this rank; dim: D; attended: the ranks whose
    means this rank reads, in order (default :func:`~prism_trt.core.plan.attended_ranks` of a
    non-causal model: every other rank; a causal text model's rank p reads ranks < p only, and the
    all-gather's other slots are not copied: a first version that sends every rank's means to every
    rank, masked by what is read).
    """

    name = "host"

    def __init__(self, counts: list[int], rank: int, dim: int, device: str = "cpu", attended: list[int] | None = None):
        self.counts, self.rank, self.dim = list(counts), rank, dim
        self.attended = attended_ranks(len(counts), rank) if attended is None else list(attended)
        self.max_count = max(counts)
        self.device = torch.device(device)
        self._buffers: dict[tuple, StagingBuffers] = {}
        self.allocations = 0

    def _host(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32)

    def buffers(self, key: tuple, batch: int) -> StagingBuffers:
        if key not in self._buffers:
            slot = (batch, self.max_count, self.dim)
            remote = sum(self.counts[q] for q in self.attended)
            self._buffers[key] = StagingBuffers(
                self._host(slot), [self._host(slot) for _ in self.counts],
                torch.empty((batch, remote, self.dim), dtype=torch.float32, device=self.device))
            self.allocations += 1
        return self._buffers[key]

    def to_host(self, means: torch.Tensor | None, buffers: StagingBuffers) -> torch.Tensor:
        """Copy this rank's means into its padded send slot (device -> host); a rank whose means
        nobody reads (None) sends its slot untouched."""
        if means is not None:
            buffers.send[:, : means.shape[1]].copy_(means, non_blocking=self.device.type == "cuda")
        self.synchronize()
        return buffers.send

    def to_device(self, buffers: StagingBuffers) -> torch.Tensor | None:
        """Copy the means this rank reads, sliced to their counts, into the remote tensor (host ->
        device); None when it reads none."""
        if not self.attended:
            return None
        offset = 0
        for q in self.attended:
            count = self.counts[q]
            buffers.remote[:, offset: offset + count].copy_(buffers.gathered[q][:, :count],
                                                            non_blocking=self.device.type == "cuda")
            offset += count
        self.synchronize()
        return buffers.remote

    def synchronize(self) -> None:
        pass


class TorchCudaStaging(Staging):
    """Pinned host buffers and non-blocking copies, synchronised before the collective needs the
    data (d2h) and before the next block reads it (h2d), so each copy's time is its own."""

    name = "torch-cuda"

    def __init__(self, counts: list[int], rank: int, dim: int, device: str = "cuda", attended: list[int] | None = None):
        if not torch.cuda.is_available():
            raise UsageError("torch-cuda staging needs a CUDA build of torch and a GPU")
        super().__init__(counts, rank, dim, device, attended)

    def _host(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32).pin_memory()

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()


def make_staging(counts: list[int], rank: int, dim: int, device: str, attended: list[int] | None = None) -> Staging:
    """Host staging for CPU engines, torch-CUDA staging for engines whose tensors live on a GPU."""
    staging = TorchCudaStaging if torch.device(device).type == "cuda" else Staging
    return staging(counts, rank, dim, device, attended)


class FinalGather:
    """Every rank's final hidden states gathered to rank 0, in position order (a per-position head
    runs there). Host slots padded to the largest partition, reused per batch size; the join on
    rank 0 is the head's input.

    sizes: positions per rank; rank: this rank; dim: D; device: where the head's input lives.
    """

    def __init__(self, sizes: list[int], rank: int, dim: int, device: str = "cpu"):
        self.sizes, self.rank, self.dim, self.device = list(sizes), rank, dim, torch.device(device)
        self._slots: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def gather(self, tokens: torch.Tensor, watch: Stopwatch) -> torch.Tensor | None:
        """(B, N, D) on rank 0, None elsewhere; timed as d2h / comm / h2d, bytes counted."""
        batch = tokens.shape[0]
        if batch not in self._slots:
            slot = (batch, max(self.sizes), self.dim)
            self._slots[batch] = (torch.zeros(slot), [torch.zeros(slot) for _ in self.sizes] if self.rank == 0 else [])
        send, slots = self._slots[batch]
        with watch.phase("d2h"):
            send[:, : tokens.shape[1]].copy_(tokens)
        with watch.phase("comm"):
            dist.gather(send, slots if self.rank == 0 else None, dst=0)
        entry = batch * self.dim * 4
        watch.times.collectives += 1
        if self.rank != 0:
            watch.times.bytes_sent += tokens.shape[1] * entry
            return None
        watch.times.bytes_received += (sum(self.sizes) - self.sizes[0]) * entry
        with watch.phase("h2d"):
            return torch.cat([slot[:, :size] for slot, size in zip(slots, self.sizes)], dim=1).to(self.device)
