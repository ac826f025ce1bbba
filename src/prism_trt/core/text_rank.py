"""Prism for sequences (BERT, GPT-2): one rank's forward, masks, and the simulation of all ranks.

The maths, tagged as in ``../shared/docs/prism-text.md`` ([P] the paper states it, [D] derived
there analytically, [I] inferred there and adopted here) or [ours] (decided here):

* Partition plan: the ViT's (:func:`~prism_trt.core.plan.make_partition_plan`) over sequence
  positions. [CLS] is a prefix token like the ViT's: on rank 0, never averaged, sent as its own
  size-1 segment [ours] (``cls_segment=False`` averages it into rank 0's first segment, as the
  paper's headline BERT accounting does [D, 2.2]). GPT-2 has no prefix token. Every rank embeds
  its own ids with *global* position ids (and its own token types) [I, 2.3].
* Segment means respect padding [I, 2.4]: ``m_g = sum_j a_j x_j / s_g`` with ``s_g = sum_j a_j``
  over the segment's valid tokens (``a_j`` the attention mask), logit bias ``ln(s_g)``. A segment
  with no valid token has ``s_g = 0``: its mean is 0 (we divide by ``max(s_g, 1)``, never by 0) and
  its bias is :data:`~prism_trt.model.text.MASKED`, so it carries no weight and makes no NaN
  [ours: a finite mask value, like Hugging Face's, so a query with nothing visible is finite too].
  Padded own keys are masked as Hugging Face masks them. A rank reads only its share of a
  request (:func:`text_share`): its own positions' ids and mask, and the valid-token count
  ``s_g`` of every remote segment it attends to (counted by rank 0, which holds the whole
  mask), so neither other ranks' ids nor their mask travel, and between blocks only the means do
  [ours].
* Partition-aware causal mask [I, 3.2; the paper names it, the rule is not retrievable]: query
  ``t`` sees its own partition's tokens ``j <= t`` and a remote segment only if *every* token of it
  precedes ``t`` (``end_g <= t``; implemented as "the last position a key covers is ``<= t``",
  which for a single token is the ordinary causal mask [ours]). Segments are whole-segment means, never
  prefix means. With contiguous partitions this is block-lower-triangular: rank ``p`` sees all
  segments of ranks ``r < p`` and none of ``r > p``, so it receives only earlier ranks' means and
  the last rank sends nothing [I, 3.3]. By induction over blocks, no output depends on a later
  token, at any CR; rank 0 is exact.
* What is averaged (``means_source``): GPT-2 is pre-norm, so ``ln1`` / ``input`` of prism.md
  section 3 apply unchanged [I, 3.5]; BERT is post-norm and the two coincide [I, 2.3].
* Heads [I, 2.3 / 3.5]: BERT's classifier reads [CLS] on rank 0 (no final gather); GPT-2's LM
  head and the ``features`` head run on rank 0 over every rank's positions, gathered [ours: one
  head rule for the simulation and the engines, :func:`~prism_trt.core.drive.drive`].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..model.text import MASKED, PrismText, attention_bias, token_log_weights
from ..model.text_spec import TextSpec
from ..model.vit import MEANS_SOURCES, MeansSource
from .drive import Exchange, drive
from .plan import PartitionPlan, PlanError, SegmentPlan, attended_ranks, make_partition_plan


def text_partition(spec: TextSpec, seq_len: int, ranks: int, weights: list[float] | None = None,
                   cls_segment: bool = True) -> PartitionPlan:
    """Contiguous positions per rank for sequences of ``seq_len`` ([CLS] on rank 0).

    cls_segment: [CLS] is a prefix token, sent as its own segment (the default, like a ViT's CLS),
    or (False) averaged into rank 0's first segment, as the paper's BERT figures count it."""
    if seq_len > spec.max_positions:
        raise PlanError(f"sequence length {seq_len} exceeds {spec.name}'s {spec.max_positions} positions")
    return make_partition_plan(seq_len, spec.num_prefix_tokens if cls_segment else 0, ranks, weights)


def segment_positions(plan: SegmentPlan, rank: int) -> list[tuple[int, int]]:
    """[start, end) sequence positions of rank ``rank``'s segments, in order."""
    start = plan.partition.token_range(rank)[0]
    bounds = []
    for size in plan.segment_sizes[rank]:
        bounds.append((start, start + size))
        start += size
    return bounds


def _membership(bounds: list[tuple[int, int]], offset: int, width: int) -> np.ndarray:
    """(segments, width) 0/1 float32: row g is 1 over segment g's positions (shifted by offset)."""
    matrix = np.zeros((len(bounds), width), dtype=np.float32)
    for row, (start, end) in enumerate(bounds):
        matrix[row, start - offset:end - offset] = 1.0
    return matrix


def attended_segment_positions(plan: SegmentPlan, rank: int, causal: bool) -> list[tuple[int, int]]:
    """[start, end) positions of every remote segment rank ``rank`` attends to, in the order of
    its remote means."""
    return [b for q in attended_ranks(plan.ranks, rank, causal) for b in segment_positions(plan, q)]


@dataclass(frozen=True)
class TextShare:
    """What rank ``rank`` reads of a text batch: its own positions' ids, mask (1 = token) and token
    types (B, n_p), and ``remote_sizes`` (B, m) float32, the valid tokens of each remote segment it
    attends to (None when it attends to none)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    remote_sizes: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None


def text_share(plan: SegmentPlan, rank: int, causal: bool, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None) -> TextShare:
    """Rank ``rank``'s share of a batch of whole sequences (B, N) (default mask: no padding); its
    tensors are contiguous (to send as they are)."""
    B, N = input_ids.shape
    if N != plan.partition.num_tokens:
        raise PlanError(f"plan is for sequences of {plan.partition.num_tokens}, got {N} positions")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    own = slice(*plan.partition.token_range(rank))
    bounds = attended_segment_positions(plan, rank, causal)
    sizes = None
    if bounds:
        valid = torch.nn.functional.pad((mask != 0).to(torch.int64).cumsum(dim=1), (1, 0))  # (B, N + 1) prefix sums
        starts, ends = (torch.tensor(b, dtype=torch.long) for b in zip(*bounds))
        sizes = (valid[:, ends] - valid[:, starts]).to(torch.float32)
    types = None if token_type_ids is None else token_type_ids[:, own].contiguous()
    return TextShare(input_ids[:, own].contiguous(), mask[:, own].contiguous(), sizes, types)


@dataclass(frozen=True)
class RankMasks:
    """Per batch, what one rank's blocks need besides its tokens: which own positions are valid
    (B, n_p) float 0/1, the bias over its own keys (B, 1, n_p, n_p) and over the remote means it
    attends to (B, 1, n_p, m), or None when it attends to none."""

    valid: torch.Tensor
    local_bias: torch.Tensor
    remote_bias: torch.Tensor | None


@dataclass(frozen=True)
class RankBatch:
    """One batch as one rank's stages read it: its own positions' ids (B, n_p), their token types
    (or None) and the rank's masks (:meth:`TextRankForward.batch`)."""

    input_ids: torch.Tensor
    masks: RankMasks
    token_type_ids: torch.Tensor | None = None


class TextRankForward(nn.Module):
    """Rank ``rank``'s stages of a Prism forward of a :class:`PrismText` over ``plan``.

    Like :class:`~prism_trt.core.rank.RankForward`, ``embed`` and ``block`` also return the
    segment means this rank sends before the next block (None when no rank attends to them).
    """

    def __init__(self, model: PrismText, plan: SegmentPlan, rank: int, means_source: MeansSource = "ln1"):
        super().__init__()
        if means_source not in MEANS_SOURCES:
            raise PlanError(f"means_source must be one of {MEANS_SOURCES}, got {means_source!r}")
        if plan.partition.num_prefix_tokens not in (0, model.spec.num_prefix_tokens):
            raise PlanError(f"plan has {plan.partition.num_prefix_tokens} prefix tokens, {model.spec.name} has "
                            f"{model.spec.num_prefix_tokens}: make it with text_partition()")
        if not 0 <= rank < plan.ranks:
            raise PlanError(f"rank {rank} out of range for {plan.ranks} ranks")
        causal = model.spec.causal
        self.model, self.plan, self.rank, self.means_source = model, plan, rank, means_source
        self.token_range = plan.partition.token_range(rank)
        self.attended_ranks = plan.attended_ranks(rank, causal)
        self.sends_means = any(rank in plan.attended_ranks(q, causal) for q in plan.remote_ranks(rank))
        start, stop = self.token_range
        remote_bounds = attended_segment_positions(plan, rank, causal)
        self.remote_segments = len(remote_bounds)  # m, the remote means it reads
        self.register_buffer("membership", torch.from_numpy(
            _membership(segment_positions(plan, rank), start, stop - start)), persistent=False)
        self.register_buffer("positions", torch.arange(start, stop), persistent=False)
        self.register_buffer("remote_last_positions", torch.tensor([end - 1 for _, end in remote_bounds],
                                                                   dtype=torch.long), persistent=False)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def share(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> TextShare:
        """This rank's share of a batch of whole sequences (:func:`text_share`)."""
        return text_share(self.plan, self.rank, self.model.spec.causal, input_ids, attention_mask, token_type_ids)

    def share_masks(self, attention_mask: torch.Tensor, remote_sizes: torch.Tensor | None) -> RankMasks:
        """This rank's masks from its share: its own positions' mask (B, n_p) and the valid tokens
        of the remote segments it attends to (B, m), or None when it attends to none (or reads no
        remote means, as its embed stage: then there is no remote bias)."""
        valid = attention_mask.bool()
        causal = self.model.spec.causal
        local = attention_bias(token_log_weights(valid), self.positions, self.positions, causal)
        remote = None
        if self.attended_ranks and remote_sizes is not None:
            sizes = remote_sizes.to(torch.float32)
            log_sizes = torch.where(sizes > 0, sizes.clamp(min=1).log(), torch.full_like(sizes, MASKED))
            remote = attention_bias(log_sizes, self.remote_last_positions, self.positions, causal)
        return RankMasks(valid.float(), local, remote)

    def masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RankMasks:
        """This rank's masks for a batch of whole sequences (B, N) (default: no padding)."""
        share = self.share(input_ids, attention_mask)
        return self.share_masks(share.attention_mask, share.remote_sizes)

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> RankBatch:
        """A batch of whole sequences as this rank's stages read it (its masks computed once)."""
        return self.share_batch(self.share(input_ids, attention_mask, token_type_ids))

    def share_batch(self, share: TextShare) -> RankBatch:
        """This rank's share as its stages read it (its masks computed once)."""
        return RankBatch(share.input_ids, self.share_masks(share.attention_mask, share.remote_sizes),
                         share.token_type_ids)

    def segment_means(self, x: torch.Tensor, masks: RankMasks, next_block: int) -> torch.Tensor | None:
        """(B, L_p, D) means over valid tokens of what ``next_block`` averages, or None."""
        if next_block >= self.depth or not self.sends_means:
            return None
        source = self.model.blocks[next_block].means_source_tokens(x, self.means_source)
        sums = self.membership @ (source * masks.valid[..., None])  # (B, L_p, D)
        counts = masks.valid @ self.membership.T  # (B, L_p)
        return sums / counts.clamp(min=1)[..., None]  # an empty segment's mean is 0, masked by the receiver

    def embed(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Own ids (B, n_p) -> own tokens (B, n_p, D) and the means for block 0."""
        x = self.model.embed(batch.input_ids, self.token_range[0], batch.token_type_ids)
        return x, self.segment_means(x, batch.masks, 0)

    def block(self, index: int, x: torch.Tensor, remote_means: torch.Tensor | None, batch: RankBatch
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        masks = batch.masks
        remote_bias = None if remote_means is None else masks.remote_bias
        x = self.model.blocks[index](x, remote_means, remote_bias, self.means_source, masks.local_bias)
        return x, self.segment_means(x, masks, index + 1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.reads_only_prefix and self.rank != 0:
            raise PlanError("only rank 0 holds [CLS] and runs the classifier head")
        return self.model.forward_head(x)


@torch.no_grad()
def simulate_text(model: PrismText, plan: SegmentPlan, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                  means_source: MeansSource = "ln1", exchange: Exchange | None = None) -> torch.Tensor:
    """Outputs of a Prism forward over ``plan``, every rank run in this process (the exchange is a
    list, or ``exchange``): classifier logits (B, classes) from rank 0, or per-position outputs
    (B, N, ...) over every rank's positions."""
    ranks = [TextRankForward(model, plan, r, means_source) for r in range(plan.ranks)]
    batches = [rank.batch(input_ids, attention_mask, token_type_ids) for rank in ranks]
    return drive(ranks, batches, exchange or Exchange(), head_reads_all_positions=not model.reads_only_prefix)
