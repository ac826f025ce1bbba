"""FLOPs and communication accounting (prism.md section 6; seed 000 Table 3).

FLOPs = 2 x multiply-accumulates of the matmuls (patch embedding, QKV, QK^T, AV, proj, MLP).
Local, Voltage and Prism are one code path: a segment plan (P=1; CR=1; any CR) decides how many
key/value tokens each rank attends to and how many entries it sends per block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..model.spec import ViTSpec
from .plan import SegmentPlan, make_partition_plan, make_segment_plan, voltage_plan


def block_flops(spec: ViTSpec, queries: int, kv_tokens: int) -> int:
    """One block on a rank with ``queries`` own tokens attending to ``kv_tokens`` keys/values."""
    D, Da, Dm = spec.embed_dim, spec.attn_dim, spec.mlp_hidden_dim
    n, m = queries, kv_tokens
    macs = n * D * Da + 2 * m * D * Da + 2 * n * m * Da + n * Da * D + 2 * n * D * Dm
    return 2 * macs


def embed_flops(spec: ViTSpec, patches: int) -> int:
    return 2 * patches * spec.patch_dim * spec.embed_dim


@dataclass(frozen=True)
class RankCost:
    rank: int
    tokens: int  # n_p, own tokens (queries)
    kv_tokens: int  # m, keys/values each block attends to
    sent_per_block: int  # entries (tokens or means) sent per block
    received_per_block: int
    gflops: float
    bytes_sent_per_block: int
    bytes_received_per_block: int


@dataclass(frozen=True)
class StrategyCost:
    strategy: str  # "local", "voltage" or "prism"
    ranks: int
    cr: float | None
    segments: int | None
    per_rank: tuple[RankCost, ...]
    gflops_per_device: float  # average over ranks
    comm_reduction: float | None  # seed 000 definition: 1 - L / ceil(N/P)
    bytes_reduction: float | None  # measured on the plan: 1 - entries sent / Voltage's
    bytes_per_block_per_rank: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def plan_cost(spec: ViTSpec, plan: SegmentPlan, strategy: str, batch: int = 1, bytes_per_element: int = 4
              ) -> StrategyCost:
    """Cost of one forward over ``plan`` (local: P=1; voltage: CR=1; prism: any CR)."""
    partition = plan.partition
    per_rank = []
    for rank in range(plan.ranks):
        remote = plan.remote_count(rank) if plan.ranks > 1 else 0
        sent = plan.counts[rank] if plan.ranks > 1 else 0
        flops = spec.depth * block_flops(spec, partition.sizes[rank], partition.sizes[rank] + remote)
        flops += embed_flops(spec, partition.patch_count(rank))
        entry_bytes = batch * spec.embed_dim * bytes_per_element
        per_rank.append(RankCost(rank, partition.sizes[rank], partition.sizes[rank] + remote, sent, remote,
                                 flops / 1e9, sent * entry_bytes, remote * entry_bytes))
    distributed = plan.ranks > 1
    voltage_entries = partition.num_tokens
    return StrategyCost(
        strategy=strategy,
        ranks=plan.ranks,
        cr=plan.cr if distributed else None,
        segments=plan.segments if distributed else None,
        per_rank=tuple(per_rank),
        gflops_per_device=sum(r.gflops for r in per_rank) / len(per_rank),
        comm_reduction=(1 - plan.segments / math.ceil(partition.num_tokens / plan.ranks)) if distributed else None,
        bytes_reduction=(1 - sum(plan.counts) / voltage_entries) if distributed else None,
        bytes_per_block_per_rank=tuple(r.bytes_sent_per_block for r in per_rank),
    )


def flops_report(spec: ViTSpec, ranks: int, crs: list[float] = (), segments: list[int] = (), batch: int = 1,
                 bytes_per_element: int = 4, weights: list[float] | None = None) -> dict:
    """local, voltage and one prism entry per CR / segment count, as a JSON-ready dict."""
    partition = make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, ranks, weights)
    local = make_segment_plan(make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, 1), segments=1)
    plans = [make_segment_plan(partition, cr=cr) for cr in crs]
    plans += [make_segment_plan(partition, segments=L) for L in segments]
    return {
        "model": spec.name,
        "tokens": spec.num_tokens,
        "ranks": ranks,
        "partition": list(partition.sizes),
        "batch": batch,
        "bytes_per_element": bytes_per_element,
        "local": plan_cost(spec, local, "local", batch, bytes_per_element).to_dict(),
        "voltage": plan_cost(spec, voltage_plan(partition), "voltage", batch, bytes_per_element).to_dict(),
        "prism": [plan_cost(spec, plan, "prism", batch, bytes_per_element).to_dict() for plan in plans],
    }
