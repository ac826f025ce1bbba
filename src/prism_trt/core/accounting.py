"""FLOPs and communication accounting (prism.md section 6; seed 000 Table 3; prism-text.md 4).

FLOPs = 2 x multiply-accumulates of the matmuls (patch embedding, QKV, QK^T, AV, proj, MLP).
Local, Voltage and Prism are one code path: a segment plan (P=1; CR=1; any CR) decides how many
key/value tokens each rank attends to and how many entries it sends per block.

Text models (BERT, GPT-2) use the same formula with their sequence length as N. Embeddings are
look-ups (no FLOPs). A causal model attends only to earlier ranks' means, so rank p receives
L * p of them and the last rank sends nothing; its masked logits still count as work (the
paper's convention for GPT-2 is unknown, prism-text.md 4.2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model.spec import BlockSpec, ViTSpec
from ..model.text_spec import TextSpec
from .chain_key import Mode
from .plan import (
    PartitionPlan,
    PlanError,
    SegmentPlan,
    make_partition_plan,
    make_segment_plan,
    tokens_per_rank,
    voltage_plan,
)


def block_flops(spec: BlockSpec, queries: int, kv_tokens: int) -> int:
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
    strategy: Mode
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


def plan_cost(spec: ViTSpec | TextSpec, plan: SegmentPlan, strategy: Mode, batch: int = 1,
              bytes_per_element: int = 4) -> StrategyCost:
    """Cost of one forward over ``plan`` (local: P=1; voltage: CR=1; prism: any CR)."""
    partition = plan.partition
    causal = isinstance(spec, TextSpec) and spec.causal
    per_rank = []
    for rank in range(plan.ranks):
        remote = sum(plan.counts[q] for q in plan.attended_ranks(rank, causal))
        receivers = [q for q in plan.remote_ranks(rank) if rank in plan.attended_ranks(q, causal)]
        sent = plan.counts[rank] if receivers else 0
        flops = spec.depth * block_flops(spec, partition.sizes[rank], partition.sizes[rank] + remote)
        if isinstance(spec, ViTSpec):  # text embeddings are look-ups
            flops += embed_flops(spec, partition.patch_count(rank))
        entry_bytes = batch * spec.embed_dim * bytes_per_element
        per_rank.append(RankCost(rank, partition.sizes[rank], partition.sizes[rank] + remote, sent, remote,
                                 flops / 1e9, sent * entry_bytes, remote * entry_bytes))
    distributed = plan.ranks > 1
    voltage_entries = sum(size for size, r in zip(partition.sizes, per_rank) if r.sent_per_block)
    return StrategyCost(
        strategy=strategy,
        ranks=plan.ranks,
        cr=plan.cr if distributed else None,
        segments=plan.segments if distributed else None,
        per_rank=tuple(per_rank),
        gflops_per_device=sum(r.gflops for r in per_rank) / len(per_rank),
        comm_reduction=(1 - plan.segments / tokens_per_rank(partition.num_tokens, plan.ranks)) if distributed else None,
        bytes_reduction=(1 - sum(r.sent_per_block for r in per_rank) / voltage_entries) if distributed else None,
        bytes_per_block_per_rank=tuple(r.bytes_sent_per_block for r in per_rank),
    )


def _strategies(spec: ViTSpec | TextSpec, partition: PartitionPlan, local: PartitionPlan, crs: list[float],
                segments: list[int], batch: int, bytes_per_element: int) -> dict:
    """local, voltage and one prism entry per CR / segment count, as a JSON-ready dict."""
    plans = [make_segment_plan(partition, cr=cr) for cr in crs]
    plans += [make_segment_plan(partition, segments=L) for L in segments]
    return {
        "ranks": partition.ranks,
        "partition": list(partition.sizes),
        "batch": batch,
        "bytes_per_element": bytes_per_element,
        "local": plan_cost(spec, make_segment_plan(local, segments=1), Mode.LOCAL, batch, bytes_per_element).to_dict(),
        "voltage": plan_cost(spec, voltage_plan(partition), Mode.VOLTAGE, batch, bytes_per_element).to_dict(),
        "prism": [plan_cost(spec, plan, Mode.PRISM, batch, bytes_per_element).to_dict() for plan in plans],
    }


def flops_report(spec: ViTSpec, ranks: int, crs: list[float] = (), segments: list[int] = (), batch: int = 1,
                 bytes_per_element: int = 4, weights: list[float] | None = None) -> dict:
    """local, voltage and one prism entry per CR / segment count, as a JSON-ready dict."""
    partition = make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, ranks, weights)
    local = make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, 1)
    return {"model": spec.name, "tokens": spec.num_tokens,
            **_strategies(spec, partition, local, list(crs), list(segments), batch, bytes_per_element)}


def text_flops_report(spec: TextSpec, seq_len: int, ranks: int, crs: list[float] = (), segments: list[int] = (),
                      batch: int = 1, bytes_per_element: int = 4, weights: list[float] | None = None,
                      cls_segment: bool = True) -> dict:
    """:func:`flops_report` for a text model over sequences of ``seq_len`` positions.

    cls_segment: send [CLS] as its own segment (how prism-trt runs BERT) or average it into rank
    0's first segment (how the paper's 51.24 % is counted, prism-text.md 2.2)."""
    if not 1 <= seq_len <= spec.max_positions:
        raise PlanError(f"sequence length must be in [1, {spec.max_positions}] for {spec.name}, got {seq_len}")
    prefix = spec.num_prefix_tokens if cls_segment else 0
    partition = make_partition_plan(seq_len, prefix, ranks, weights)
    local = make_partition_plan(seq_len, prefix, 1)
    return {"model": spec.name, "tokens": seq_len, "causal": spec.causal, "cls_segment": bool(prefix),
            **_strategies(spec, partition, local, list(crs), list(segments), batch, bytes_per_element)}
