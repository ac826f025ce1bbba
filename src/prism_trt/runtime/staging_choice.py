"""Which staging a rank uses: host staging for CPU engines; on a GPU the kind asked for, torch's
by default where torch has CUDA (one home for the choice, above both kinds' modules)."""

from __future__ import annotations

import torch

from .options import ExchangeDtype, StagingKind
from .pycuda_staging import PycudaStaging
from .staging import HostStaging, Staging, TorchCudaStaging


def resolve_staging_kind(kind: StagingKind, device: str) -> StagingKind | None:
    """The kind ``auto`` stands for on ``device`` (None: CPU engines, host staging): torch when
    torch has CUDA, else pycuda (TensorRT reaching the GPU without CUDA-enabled torch)."""
    if torch.device(device).type != "cuda":
        return None
    if kind is StagingKind.AUTO:
        return StagingKind.TORCH if torch.cuda.is_available() else StagingKind.PYCUDA
    return kind


def make_staging(counts: list[int], rank: int, dim: int, device: str, attended: list[int] | None = None,
                 kind: StagingKind = StagingKind.AUTO, exchange_dtype: ExchangeDtype = ExchangeDtype.FP32) -> Staging:
    """Host staging for CPU engines; on a GPU the kind asked for (see :func:`resolve_staging_kind`)."""
    resolved = resolve_staging_kind(StagingKind(kind), device)
    if resolved is None:
        return HostStaging(counts, rank, dim, device, attended, exchange_dtype)
    if resolved is StagingKind.PYCUDA:
        return PycudaStaging(counts, rank, dim, device, attended, exchange_dtype)
    return TorchCudaStaging(counts, rank, dim, device, attended, exchange_dtype)
