"""Partition plan (which tokens each rank owns) and segment plan (how each rank averages them).

prism.md sections 2 and 3: contiguous partitions along the sequence, prefix tokens on rank 0;
each partition's patch tokens cut into near-equal contiguous segments, prefix tokens as size-1
segments; CR = ceil(N/P) / L.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import PrismError


class PlanError(PrismError, ValueError):
    """Arguments that cannot make a valid partition or segment plan."""


@dataclass(frozen=True)
class PartitionPlan:
    """Contiguous token ranges per rank. sizes[p] = n_p; rank 0 starts with the prefix tokens."""

    num_tokens: int
    num_prefix_tokens: int
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if sum(self.sizes) != self.num_tokens:
            raise PlanError(f"partition sizes {self.sizes} sum to {sum(self.sizes)}, not {self.num_tokens} tokens")
        if any(s < 1 for s in self.sizes):
            raise PlanError(f"every rank needs at least one token, sizes are {self.sizes}")
        if self.sizes[0] < self.num_prefix_tokens:
            raise PlanError(f"rank 0 must hold all {self.num_prefix_tokens} prefix tokens, it has {self.sizes[0]}")

    @property
    def ranks(self) -> int:
        return len(self.sizes)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.cumsum((0,) + self.sizes[:-1]))

    def token_range(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the rank's tokens in the full sequence."""
        start = self.starts[rank]
        return start, start + self.sizes[rank]

    def prefix_count(self, rank: int) -> int:
        """Prefix tokens owned by the rank (all on rank 0)."""
        start, stop = self.token_range(rank)
        return max(0, min(stop, self.num_prefix_tokens) - start)

    def patch_count(self, rank: int) -> int:
        return self.sizes[rank] - self.prefix_count(rank)


def _weighted_sizes(total: int, weights: Sequence[float], minimums: Sequence[int]) -> list[int]:
    """Largest-remainder apportionment of ``total`` by ``weights`` with a minimum per share.

    Ranks whose share falls below their minimum get exactly the minimum; the rest of ``total`` is
    shared among the others in proportion to their weights, so every other rank stays within one
    token of its share of what is left.
    """
    weights = np.asarray(weights, dtype=float)
    minimums = np.asarray(minimums, dtype=int)
    fixed = np.zeros(len(weights), dtype=bool)
    while True:
        free = ~fixed
        budget = total - minimums[fixed].sum()
        shares = np.where(fixed, minimums, weights / weights[free].sum() * budget)
        below = free & (shares < minimums)
        if not below.any():
            break
        fixed |= below
    sizes = np.where(fixed, minimums, np.floor(shares)).astype(int)
    remainders = np.where(fixed, -1.0, shares - np.floor(shares))
    for i in np.argsort(-remainders, kind="stable")[: total - int(sizes.sum())]:
        sizes[i] += 1
    return [int(v) for v in sizes]


def make_partition_plan(num_tokens: int, num_prefix_tokens: int, ranks: int,
                        weights: Sequence[float] | None = None) -> PartitionPlan:
    """Near-equal partitions (sizes differ by at most one, larger first), or sizes proportional to
    ``weights`` (one per rank, > 0) for boards of different speed."""
    num_patches = num_tokens - num_prefix_tokens
    if ranks < 1:
        raise PlanError(f"ranks must be >= 1, got {ranks}")
    if ranks > num_patches:
        raise PlanError(f"{ranks} ranks but only {num_patches} patch tokens: every rank needs at least one patch")
    # rank 0 holds the prefix tokens and at least one patch; every other rank at least one patch
    minimums = [num_prefix_tokens + 1] + [1] * (ranks - 1)
    if weights is None:
        base, extra = divmod(num_tokens, ranks)
        sizes = [base + 1] * extra + [base] * (ranks - extra)
        if sizes[0] < minimums[0]:
            sizes = _weighted_sizes(num_tokens, [1.0] * ranks, minimums)
    else:
        if len(weights) != ranks:
            raise PlanError(f"got {len(weights)} weights for {ranks} ranks; give one weight per rank")
        bad = [w for w in weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
        if bad:
            raise PlanError(f"rank weights must be finite and > 0, got {list(weights)}")
        sizes = _weighted_sizes(num_tokens, weights, minimums)
    return PartitionPlan(num_tokens, num_prefix_tokens, tuple(sizes))


def array_split_sizes(n: int, parts: int) -> tuple[int, ...]:
    """Sizes of numpy.array_split(range(n), parts): near-equal, larger first."""
    base, extra = divmod(n, parts)
    return tuple([base + 1] * extra + [base] * (parts - extra))


def attended_ranks(ranks: int, rank: int, causal: bool = False) -> list[int]:
    """The ranks whose means ``rank`` attends to: every other rank, or for a causal model only
    the earlier ones (the partition-aware causal mask, core/text_rank.py)."""
    return [q for q in range(ranks) if q != rank and (not causal or q < rank)]


@dataclass(frozen=True)
class SegmentPlan:
    """Per rank, the sizes of the segments whose means that rank sends after every block.

    segments: requested patch segments per partition (L); a rank with fewer patch tokens uses one
    segment per token. segment_sizes[p] lists rank p's segments in token order, prefix ones first.
    """

    partition: PartitionPlan
    segments: int
    segment_sizes: tuple[tuple[int, ...], ...] = field(repr=False)

    @property
    def ranks(self) -> int:
        return self.partition.ranks

    @property
    def cr(self) -> float:
        """Compression rate as in seed 000: ceil(N/P) / L (1 for Voltage, even on a weighted
        partition whose largest rank needs L > ceil(N/P) to send every token)."""
        return cr_for_segments(self.partition.num_tokens, self.partition.ranks, self.segments)

    @property
    def counts(self) -> tuple[int, ...]:
        """L_p: entries rank p sends per block (its prefix tokens included)."""
        return tuple(len(s) for s in self.segment_sizes)

    @property
    def max_count(self) -> int:
        """The padded size of one all-gather slot."""
        return max(self.counts)

    @property
    def is_lossless(self) -> bool:
        """Every segment is one token: exchanging means equals exchanging features (Voltage)."""
        return all(size == 1 for sizes in self.segment_sizes for size in sizes)

    def remote_ranks(self, rank: int) -> list[int]:
        return [q for q in range(self.ranks) if q != rank]

    def attended_ranks(self, rank: int, causal: bool = False) -> list[int]:
        """The ranks whose means ``rank`` attends to (see :func:`attended_ranks`)."""
        return attended_ranks(self.ranks, rank, causal)

    def remote_count(self, rank: int) -> int:
        return sum(self.counts[q] for q in self.remote_ranks(rank))

    def remote_log_sizes(self, rank: int) -> np.ndarray:
        """ln(s) for every remote segment rank ``rank`` attends to, in rank order (float32)."""
        sizes = [s for q in self.remote_ranks(rank) for s in self.segment_sizes[q]]
        return np.log(np.asarray(sizes, dtype=np.float64)).astype(np.float32)

    def averaging_matrix(self, rank: int) -> np.ndarray:
        """(L_p, n_p) float32 matrix A with A @ x = the rank's segment means."""
        sizes = self.segment_sizes[rank]
        matrix = np.zeros((len(sizes), sum(sizes)), dtype=np.float32)
        start = 0
        for row, size in enumerate(sizes):
            matrix[row, start:start + size] = 1.0 / size
            start += size
        return matrix

    def describe(self) -> str:
        return (f"P={self.ranks} tokens/rank={list(self.partition.sizes)} L={self.segments} CR={self.cr:.3g} "
                f"sent/rank={list(self.counts)}")


def tokens_per_rank(num_tokens: int, ranks: int) -> int:
    """ceil(N/P): the most tokens a rank of a near-equal partition holds, the L of CR 1."""
    return math.ceil(num_tokens / ranks)


def segments_for_cr(num_tokens: int, ranks: int, cr: float) -> int:
    """The segment count L a compression rate stands for, the one CR -> L rule:
    L = ceil(N/P) / CR rounded half up. CR must lie in [1, ceil(N/P)]."""
    per_rank = tokens_per_rank(num_tokens, ranks)
    if isinstance(cr, bool) or not isinstance(cr, (int, float)) or not math.isfinite(cr) or not 1 <= cr <= per_rank:
        raise PlanError(f"CR must be between 1 (no compression) and ceil(N/P) = {per_rank} (one segment per "
                        f"partition), got {cr}")
    return max(1, math.floor(per_rank / cr + 0.5))


def cr_for_segments(num_tokens: int, ranks: int, segments: int) -> float:
    """The compression rate of L segments per partition, the one L -> CR rule: ceil(N/P) / L, at
    least 1 (a voltage plan on a weighted partition can need L > ceil(N/P))."""
    return max(1.0, tokens_per_rank(num_tokens, ranks) / segments)


def make_segment_plan(partition: PartitionPlan, segments: int | None = None, cr: float | None = None) -> SegmentPlan:
    """Segments per partition from ``segments`` (L) or ``cr``; exactly one must be given."""
    if (segments is None) == (cr is None):
        raise PlanError("give exactly one of segments (L) or cr")
    if cr is not None:
        segments = segments_for_cr(partition.num_tokens, partition.ranks, cr)
    # ceil(N/P), or more on a weighted partition: one segment per patch of its largest rank.
    most = max(tokens_per_rank(partition.num_tokens, partition.ranks),
               *map(partition.patch_count, range(partition.ranks)))
    if not isinstance(segments, (int, np.integer)) or segments < 1 or segments > most:
        raise PlanError(f"segments per partition must be an integer in [1, {most}] (one segment per token of the "
                        f"largest partition), got {segments}")
    segment_sizes = []
    for rank in range(partition.ranks):
        patches = partition.patch_count(rank)
        prefix = (1,) * partition.prefix_count(rank)
        segment_sizes.append(prefix + array_split_sizes(patches, min(int(segments), patches)))
    return SegmentPlan(partition, int(segments), tuple(segment_sizes))


def voltage_plan(partition: PartitionPlan) -> SegmentPlan:
    """CR = 1: every token is its own segment. L is the largest rank's patch count, which on a
    weighted partition can exceed ceil(N/P) (with L = ceil(N/P) that rank would average pairs)."""
    most = max(tokens_per_rank(partition.num_tokens, partition.ranks),
               *map(partition.patch_count, range(partition.ranks)))
    return make_segment_plan(partition, segments=most)
