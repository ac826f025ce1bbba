"""One rank's view of a Prism forward, and the single-process simulation of all ranks.

:class:`RankForward` is the per-rank computation the export stages and the distributed runtime
are built from (embed -> block_i ... -> head); :func:`simulate` drives every rank's partition in
one process (:func:`~prism_trt.core.drive.drive`, the all-gather being a list), and is the
reference for everything later.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.spec import ViTSpec
from ..model.vit import MEANS_SOURCES, MeansSource, PrismViT, patch_range, patchify
from .drive import Exchange, drive, drive_blocks
from .plan import PartitionPlan, PlanError, SegmentPlan


def own_patches(images: torch.Tensor, spec: ViTSpec, partition: PartitionPlan, rank: int) -> torch.Tensor:
    """What rank ``rank`` reads of a batch of images (B, C, H, W): its own patches (B, n, C * ph * pw),
    in patchify order, contiguous (a tensor to send as it is)."""
    return patchify(images, spec.patch_size)[:, slice(*patch_range(spec, *partition.token_range(rank)))].contiguous()


class RankForward(nn.Module):
    """Rank ``rank``'s stages of a Prism forward over ``plan``.

    ``embed`` and ``block`` also return the segment means this rank sends before the next block
    (the *segment-means head*), so that one stage = compute + what to exchange.
    """

    def __init__(self, model: PrismViT, plan: SegmentPlan, rank: int, means_source: MeansSource = "ln1"):
        super().__init__()
        if means_source not in MEANS_SOURCES:
            raise PlanError(f"means_source must be one of {MEANS_SOURCES}, got {means_source!r}")
        if plan.partition.num_tokens != model.spec.num_tokens:
            raise PlanError(f"plan is for {plan.partition.num_tokens} tokens, model {model.spec.name} has "
                            f"{model.spec.num_tokens}")
        if not 0 <= rank < plan.ranks:
            raise PlanError(f"rank {rank} out of range for {plan.ranks} ranks")
        if plan.ranks > 1 and model.head.tokens_needed > plan.partition.sizes[0]:
            raise PlanError(f"pooling {model.spec.pool!r} reads {model.head.tokens_needed} tokens but rank 0 holds "
                            f"{plan.partition.sizes[0]}: partitioned runs need token pooling")
        if plan.partition.patch_count(rank) < 1:
            raise PlanError(f"rank {rank} holds no patch ({plan.partition.sizes}): every rank embeds at least one")
        self.model, self.plan, self.rank, self.means_source = model, plan, rank, means_source
        self.token_range = plan.partition.token_range(rank)
        self.attended_ranks = plan.attended_ranks(rank)
        self.register_buffer("averaging", torch.from_numpy(plan.averaging_matrix(rank)), persistent=False)
        self.register_buffer("remote_log_sizes", torch.from_numpy(plan.remote_log_sizes(rank)), persistent=False)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def segment_means(self, x: torch.Tensor, next_block: int) -> torch.Tensor | None:
        """(B, L_p, D) means of what ``next_block`` averages, or None after the last block."""
        if next_block >= self.depth or self.plan.ranks == 1:
            return None
        source = self.model.blocks[next_block].means_source_tokens(x, self.means_source)
        return self.averaging @ source

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """This rank's patches of a batch of images (:func:`own_patches`)."""
        return own_patches(images, self.model.spec, self.plan.partition, self.rank)

    def embed(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Own patches (B, n, C * ph * pw) (:meth:`patches`) -> own tokens (B, n_p, D) and the means
        for block 0: a rank reads only its share of the images."""
        x = self.model.embed.from_patches(patches, *self.token_range)
        return x, self.segment_means(x, 0)

    def block(self, index: int, x: torch.Tensor, remote_means: torch.Tensor | None, patches: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``index`` over own tokens attending to ``remote_means`` (B, sum L_q, D), each mean
        weighted by the ``ln(s)`` the plan fixes (``patches``, the rank's request, is not read: the
        drive loop hands every stage its request)."""
        remote_bias = None if remote_means is None else self.remote_log_sizes
        x = self.model.blocks[index](x, remote_means, remote_bias, self.means_source)
        return x, self.segment_means(x, index + 1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank != 0:
            raise PlanError("only rank 0 holds the prefix tokens and runs the head")
        return self.model.head(x)


@torch.no_grad()
def simulate(model: PrismViT, images: torch.Tensor, plan: SegmentPlan, means_source: MeansSource = "ln1"
             ) -> torch.Tensor:
    """Logits of a Prism forward over ``plan``, every rank run in this process."""
    ranks = [RankForward(model, plan, r, means_source) for r in range(plan.ranks)]
    return drive(ranks, [rank.patches(images) for rank in ranks], Exchange())


@torch.no_grad()
def simulate_blocks(model: PrismViT, tokens: torch.Tensor, plan: SegmentPlan, means_source: MeansSource = "ln1"
                    ) -> torch.Tensor:
    """All blocks over given token features (B, N, D); returns the re-assembled (B, N, D)."""
    ranks = [RankForward(model, plan, r, means_source) for r in range(plan.ranks)]
    xs = [tokens[:, slice(*rank.token_range)] for rank in ranks]
    states = [(x, rank.segment_means(x, 0)) for rank, x in zip(ranks, xs)]
    return torch.cat(drive_blocks(ranks, states, [None] * plan.ranks, Exchange()), dim=1)
