"""Explicit, timed staging around every collective (seed 000 section 3.2).

GLOO moves host memory only. Before each all-gather a rank's means (or Voltage features) are
packed, on the device and in the exchange dtype, into a padded send slot and copied device -> host
in one contiguous copy; after it, the slots of the ranks it reads are copied host -> device (one
copy per run of adjacent slots) and unpacked, on the device and back in the engines' dtype, into
one remote-means tensor for the next block. Casting on the device side means an fp16 exchange
halves the PCIe bytes as well as the network's.

What is copied where (slot layout, padding, offsets, byte counts) is :class:`SlotLayout`, shared
by every kind of staging; a kind only says how memory is allocated and how one contiguous copy is
made: :class:`HostStaging` (CPU engines: the host slots are the "device" ones, no copy),
:class:`TorchCudaStaging` (pinned torch tensors, ``copy_(non_blocking=True)``) and, in
:mod:`.pycuda_staging`, ``PycudaStaging`` (page-locked pycuda buffers, ``memcpy_*_async``).
Buffers are allocated once per (config, batch) key and reused: nothing is allocated in the steady
state.

A per-position text head (GPT-2's LM head) runs on rank 0 over every position, so after the last
block :class:`FinalGather` gathers the ranks' final hidden states there, staged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..core.plan import attended_ranks
from ..errors import UsageError
from .options import ExchangeDtype
from .timing import Stopwatch

TORCH_DTYPES = {ExchangeDtype.FP32: torch.float32, ExchangeDtype.FP16: torch.float16}


@dataclass(frozen=True)
class SlotLayout:
    """Where each rank's entries sit in the all-gather's slots, and which bytes a rank moves.

    counts: entries each rank sends per block; rank: this rank; dim: D; attended: the ranks whose
    entries this rank reads, in order. Every slot is padded to the largest count so the all-gather
    moves equal tensors; the receiver slices each slot to its rank's count.
    """

    counts: tuple[int, ...]
    rank: int
    dim: int
    attended: tuple[int, ...]

    @classmethod
    def of(cls, counts, rank: int, dim: int, attended=None) -> SlotLayout:
        attended = attended_ranks(len(counts), rank) if attended is None else attended
        return cls(tuple(counts), rank, dim, tuple(attended))

    @property
    def max_count(self) -> int:
        return max(self.counts)

    @property
    def remote_count(self) -> int:
        """Entries of the remote tensor: the attended ranks' counts, joined in order."""
        return sum(self.counts[q] for q in self.attended)

    def slot_shape(self, batch: int) -> tuple[int, int, int]:
        return batch, self.max_count, self.dim

    @property
    def pieces(self) -> tuple[tuple[int, int, int], ...]:
        """(rank, offset in the remote tensor, count) for every attended rank, in order."""
        out, offset = [], 0
        for q in self.attended:
            out.append((q, offset, self.counts[q]))
            offset += self.counts[q]
        return tuple(out)

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """The host slots copied to the device, as [first, stop) runs of adjacent attended ranks
        (one contiguous copy each): rank 1 of 3 copies (0, 1) and (2, 3), rank 2 copies (0, 2)."""
        runs: list[list[int]] = []
        for q in sorted(self.attended):
            if runs and runs[-1][1] == q:
                runs[-1][1] = q + 1
            else:
                runs.append([q, q + 1])
        return tuple((first, stop) for first, stop in runs)

    def slot_elements(self, batch: int) -> int:
        return batch * self.max_count * self.dim

    def bytes_sent(self, batch: int, itemsize: int) -> int:
        """What this rank's entries weigh on the wire (padding excluded, as in the plan's accounting)."""
        return batch * self.counts[self.rank] * self.dim * itemsize

    def bytes_received(self, batch: int, itemsize: int) -> int:
        return batch * self.remote_count * self.dim * itemsize

    def d2h_bytes(self, batch: int, itemsize: int) -> int:
        """The device -> host copy: the whole padded send slot, one contiguous copy."""
        return self.slot_elements(batch) * itemsize

    def h2d_bytes(self, batch: int, itemsize: int) -> int:
        """The host -> device copies: every slot of every run, padding included."""
        return sum(stop - first for first, stop in self.runs) * self.slot_elements(batch) * itemsize


@dataclass
class StagingBuffers:
    """One (config, batch)'s buffers. ``send`` and ``host_slots`` are host memory in the exchange
    dtype; ``device_send`` / ``device_slots`` are their device-side twins (the same tensors for CPU
    engines); ``remote`` is the next block's input, on the device in the engines' dtype."""

    send: torch.Tensor  # (B, max_count, D) host
    host_slots: torch.Tensor  # (P, B, max_count, D) host: the all-gather fills one slot per rank
    device_send: torch.Tensor  # (B, max_count, D) device
    device_slots: torch.Tensor  # (P, B, max_count, D) device; only the attended runs are filled
    remote: torch.Tensor  # (B, remote_count, D) device
    gathered: list[torch.Tensor] = field(init=False)  # the all-gather's output list: views of host_slots

    def __post_init__(self) -> None:
        self.gathered = list(self.host_slots.unbind(0))


class Staging:
    """The copies around one route's all-gathers, for one kind of memory (see the module docstring).

    counts, rank, dim, attended: the :class:`SlotLayout` (``attended`` defaults to every other
    rank; a causal text model's rank p reads ranks < p only, and the all-gather's other slots are
    not copied). device: where the engines' tensors live. exchange_dtype: what is staged and sent.
    engine_dtype: what the engines read and write.
    """

    name = "host"

    def __init__(self, counts: list[int], rank: int, dim: int, device: str = "cpu", attended: list[int] | None = None,
                 exchange_dtype: ExchangeDtype = ExchangeDtype.FP32, engine_dtype: torch.dtype = torch.float32):
        self.layout = SlotLayout.of(counts, rank, dim, attended)
        self.counts, self.rank, self.dim = list(counts), rank, dim
        self.attended = list(self.layout.attended)
        self.max_count = self.layout.max_count
        self.device = torch.device(device)
        self.exchange_dtype = ExchangeDtype(exchange_dtype)
        if self.exchange_dtype not in TORCH_DTYPES:
            raise UsageError(f"resolve the exchange dtype before staging ({self.exchange_dtype} given)")
        self.dtype, self.engine_dtype = TORCH_DTYPES[self.exchange_dtype], engine_dtype
        self._buffers: dict[tuple, StagingBuffers] = {}
        self.allocations = 0

    @property
    def itemsize(self) -> int:
        return self.exchange_dtype.itemsize

    @property
    def stream_handle(self) -> int:
        """The CUDA stream the copies are ordered on (a ``cudaStream_t`` as an int; 0 on the CPU):
        the engines run on the same one, so nothing but the collective waits for them."""
        return 0

    # What a kind provides: allocation, one contiguous copy each way, and waiting for them.
    def _host(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype)

    def _device(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def _copy_to_host(self, host: torch.Tensor, device: torch.Tensor) -> None:
        host.copy_(device)

    def _copy_to_device(self, device: torch.Tensor, host: torch.Tensor) -> None:
        device.copy_(host)

    def synchronize(self) -> None:
        pass

    @property
    def _separate_device_memory(self) -> bool:
        return True

    def buffers(self, key: tuple, batch: int) -> StagingBuffers:
        if key not in self._buffers:
            layout, slot = self.layout, self.layout.slot_shape(batch)
            send, slots = self._host(slot), self._host((len(self.counts), *slot))
            if self._separate_device_memory:
                device_send, device_slots = self._device(slot, self.dtype), self._device(tuple(slots.shape), self.dtype)
            else:
                device_send, device_slots = send, slots
            remote = self._device((batch, layout.remote_count, self.dim), self.engine_dtype)
            self._buffers[key] = StagingBuffers(send, slots, device_send, device_slots, remote)
            self.allocations += 1
        return self._buffers[key]

    def to_host(self, means: torch.Tensor | None, buffers: StagingBuffers) -> torch.Tensor:
        """Pack this rank's means into its padded send slot in the exchange dtype (on the device),
        then copy the slot to the host; a rank whose means nobody reads (None) sends its slot untouched."""
        if means is not None:
            source = self.packed(means, buffers)
            if source is not buffers.send:
                self._copy_to_host(buffers.send, source)
        self.synchronize()
        return buffers.send

    def packed(self, means: torch.Tensor, buffers: StagingBuffers) -> torch.Tensor:
        """What the device -> host copy reads: the means themselves where they already fill the slot
        in the exchange dtype (device memory only: the host slot must be GLOO's own buffer), else
        the device send slot they are packed (and cast) into."""
        if (buffers.device_send is not buffers.send and isinstance(means, torch.Tensor)
                and means.shape == buffers.device_send.shape and means.dtype == self.dtype
                and means.device == buffers.device_send.device and means.is_contiguous()):
            return means
        buffers.device_send[:, : means.shape[1]].copy_(means)  # the cast, where the means live
        return buffers.device_send

    def to_device(self, buffers: StagingBuffers) -> torch.Tensor | None:
        """Copy the slots this rank reads to the device, then unpack them, sliced to their counts and
        back in the engines' dtype, into the remote tensor; None when it reads none."""
        if not self.attended:
            return None
        if buffers.device_slots is not buffers.host_slots:
            for first, stop in self.layout.runs:
                self._copy_to_device(buffers.device_slots[first:stop], buffers.host_slots[first:stop])
        for q, offset, count in self.layout.pieces:
            buffers.remote[:, offset: offset + count].copy_(buffers.device_slots[q, :, :count])
        self.synchronize()
        return buffers.remote


class HostStaging(Staging):
    """CPU engines: the host slots are the device ones, so staging is the pack (with the cast) and
    the unpack, host copies timed like the GPU ones."""

    name = "host"

    @property
    def _separate_device_memory(self) -> bool:
        return False


class TorchCudaStaging(Staging):
    """Pinned host buffers and non-blocking torch copies on the current stream, synchronised before
    the collective needs the data (d2h) and before the next block reads it (h2d), so each copy's
    time is its own."""

    name = "torch-cuda"

    def __init__(self, counts: list[int], rank: int, dim: int, device: str = "cuda", attended: list[int] | None = None,
                 exchange_dtype: ExchangeDtype = ExchangeDtype.FP32, engine_dtype: torch.dtype = torch.float32):
        if not torch.cuda.is_available():
            raise UsageError("torch-cuda staging needs a CUDA build of torch and a GPU; use --staging pycuda where "
                             "the GPU is reached through pycuda")
        super().__init__(counts, rank, dim, device, attended, exchange_dtype, engine_dtype)

    @property
    def stream_handle(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _host(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype).pin_memory()

    def _copy_to_host(self, host: torch.Tensor, device: torch.Tensor) -> None:
        host.copy_(device, non_blocking=True)

    def _copy_to_device(self, device: torch.Tensor, host: torch.Tensor) -> None:
        device.copy_(host, non_blocking=True)

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()


class FinalGather:
    """Every rank's final hidden states gathered to rank 0, in position order (a per-position head
    runs there). Host slots padded to the largest partition, in the exchange dtype (cast where the
    tokens live, before they leave the device), reused per batch size; the join on rank 0, back in
    the engines' dtype, is the head's input.

    sizes: positions per rank; rank: this rank; dim: D; device: where the head's input lives.
    """

    def __init__(self, sizes: list[int], rank: int, dim: int, device: str = "cpu",
                 exchange_dtype: ExchangeDtype = ExchangeDtype.FP32):
        self.sizes, self.rank, self.dim, self.device = list(sizes), rank, dim, torch.device(device)
        self.exchange_dtype = ExchangeDtype(exchange_dtype)
        self.dtype = TORCH_DTYPES[self.exchange_dtype]
        self._slots: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def gather(self, tokens: torch.Tensor, watch: Stopwatch) -> torch.Tensor | None:
        """(B, N, D) on rank 0, None elsewhere; timed as d2h / comm / h2d, bytes counted."""
        batch = tokens.shape[0]
        if batch not in self._slots:
            slot = (batch, max(self.sizes), self.dim)
            self._slots[batch] = (torch.zeros(slot, dtype=self.dtype),
                                  [torch.zeros(slot, dtype=self.dtype) for _ in self.sizes] if self.rank == 0 else [])
        send, slots = self._slots[batch]
        with watch.phase("d2h"):
            send[:, : tokens.shape[1]].copy_(tokens.to(self.dtype))
        with watch.phase("comm"):
            dist.gather(send, slots if self.rank == 0 else None, dst=0)
        entry = batch * self.dim * self.exchange_dtype.itemsize
        watch.times.collectives += 1
        if self.rank != 0:
            watch.times.bytes_sent += tokens.shape[1] * entry
            return None
        watch.times.bytes_received += (sum(self.sizes) - self.sizes[0]) * entry
        with watch.phase("h2d"):
            joined = torch.cat([slot[:, :size] for slot, size in zip(slots, self.sizes)], dim=1)
            return joined.to(self.device, dtype=tokens.dtype)
