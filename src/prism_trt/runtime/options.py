"""How this process runs its engines, decided once (by the command line) and passed along."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StagingKind(str, Enum):
    """Who copies the exchanged features between device and host memory around a collective.
    ``auto``: torch when torch has CUDA, pycuda when the GPU is reached without it (TensorRT on a
    board whose torch has no CUDA), the host copies for CPU engines."""

    AUTO = "auto"
    TORCH = "torch"
    PYCUDA = "pycuda"

    def __str__(self) -> str:
        return self.value


class ExchangeDtype(str, Enum):
    """The element type the segment means, Voltage features and a per-position head's final gather
    are staged and sent in: ``fp16`` halves the staged and sent bytes; ``auto`` is fp16 for engines
    built in fp16 (they round to fp16 inside already; the exchange's rounding is within their
    tolerance) and fp32 otherwise."""

    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"

    def __str__(self) -> str:
        return self.value

    def resolve(self, precision: str) -> ExchangeDtype:
        """This choice for engines built in ``precision``: ``auto`` becomes fp16 or fp32."""
        if self is not ExchangeDtype.AUTO:
            return self
        return ExchangeDtype.FP16 if precision == "fp16" else ExchangeDtype.FP32

    @property
    def itemsize(self) -> int:
        return {ExchangeDtype.FP32: 4, ExchangeDtype.FP16: 2}[self]


# Where micro-batches in flight won, measured side by side with the whole batch (two ranks pinned
# one core each, vit_tiny, Prism and Voltage): from batch 8, in micro-batches of about 4 samples
# (batch 16: 4 of 4 beat 2 of 8, which beat the whole batch); below, they tied or lost.
AUTO_MICRO_FROM_BATCH, AUTO_MICRO_SAMPLES, AUTO_MICRO_MOST = 8, 4, 4


@dataclass(frozen=True)
class RuntimeOptions:
    """threads: the backend's intra-op threads per engine (None: the backend's default).
    device: where engine tensors live (``cpu``, ``cuda:0``), and so which staging a distributed
    rank uses around its collectives. profile_barrier: rank 0 asks for a barrier before every
    collective, so that ``comm`` is transfer only and the ranks' skew is timed as ``wait``
    (workers follow rank 0's choice per batch, whatever theirs says). link_probe_s: rank 0 times
    a small payload over the link once no distributed batch crossed it for this long (0: never;
    see :mod:`.link_probe`). staging: which copies move the exchanged features on a GPU
    (:class:`StagingKind`). exchange_dtype: the element type they are exchanged in
    (:class:`ExchangeDtype`; every rank must resolve it alike, checked at the join).
    micro_batches: a distributed batch cut into this many micro-batches in flight, so one's
    all-gather hides behind another's compute (rank 0's choice travels with each batch; 1 runs the
    batch whole; None chooses per batch, :func:`micro_batches_for`). cuda_graphs: engines on
    onnxruntime's CUDA EP capture one CUDA graph per batch size and replay it (fewer launches at
    small batch; off by default: not measured to win yet)."""

    threads: int | None = None
    device: str = "cpu"
    profile_barrier: bool = False
    link_probe_s: float = 0.0
    staging: StagingKind = StagingKind.AUTO
    exchange_dtype: ExchangeDtype = ExchangeDtype.AUTO
    micro_batches: int | None = None
    cuda_graphs: bool = False


#: The defaults (the backend's threads, CPU tensors, no barrier): one shared value, being frozen.
DEFAULT_OPTIONS = RuntimeOptions()


def micro_batches_for(micro_batches: int | None, batch: int, profile_barrier: bool = False) -> int:
    """How many micro-batches a distributed batch of ``batch`` runs in: ``micro_batches`` when
    given; else (None) 1 with the profiling barrier (a barrier before each collective would
    serialise them, and the profiler measures the whole batch with its skew split out), else about
    4 samples each, at most 4, from batch 8 on (where they won), else 1."""
    if micro_batches is not None:
        return micro_batches
    if profile_barrier or batch < AUTO_MICRO_FROM_BATCH:
        return 1
    return min(AUTO_MICRO_MOST, batch // AUTO_MICRO_SAMPLES)
