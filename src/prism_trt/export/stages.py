"""Stage modules: the seams of the model a rank compiles into engines (prism.md section 5).

``embed`` (images -> own tokens [+ means for block 0]), ``block_NN`` (own tokens [+ the other
ranks' means] -> next tokens [+ means for the next block], i.e. the block with its segment-means
head) and ``head`` (rank 0 only: logits). They are the seams of timm's ``forward_features`` /
``forward_head``, so a stage file maps to model code at a glance.

Every rank embeds its own patches: rank 0 sends each rank only the pixels of its patches (B, n,
C * ph * pw) in patchify order, the patch projection is split P ways like the rest of the compute,
and no token features cross the network before block 0. The embed stage reads raw pixels on the
[0, 255] scale and normalises them itself (the model's mean and std, a multiply-add a backend
fuses into the projection), so a request of UINT8 images crosses the wire one byte a value; the
unpartitioned model's one stage reads raw-scale images the same way. ``ln(s)`` of the remote
segments is fixed by the plan, so it is baked into each block stage as a constant instead of being
one more input to bind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..core.plan import SegmentPlan
from ..core.rank import RankForward
from ..engines.base import BATCH_AXIS, TensorSpec
from ..engines.modality import Modality, Text, Vision
from ..engines.stage_spec import IMAGES, LOGITS, MEANS, NEXT_TOKENS, PATCHES, REMOTE_MEANS, TOKENS, StageSpec
from ..model.text import PrismText
from ..model.vit import MeansSource, PixelNormalisation, PrismViT
from .text_stages import TextStage, example_text_share, text_monolithic_stage, text_rank_stages


def _tensor(name: str, *dims: int) -> TensorSpec:
    return TensorSpec(name, (BATCH_AXIS, *dims), "float32")


class EmbedStage(nn.Module):
    """Input: the rank's patches, raw pixels (B, n, C * ph * pw) float32 on the [0, 255] scale."""

    def __init__(self, rank: RankForward):
        super().__init__()
        self.rank, self.normalisation = rank, PixelNormalisation(rank.model.spec)

    def forward(self, patches: torch.Tensor):
        tokens, means = self.rank.embed(self.normalisation.patches(patches))
        return tokens if means is None else (tokens, means)


class BlockStage(nn.Module):
    def __init__(self, rank: RankForward, index: int):
        super().__init__()
        self.rank, self.index = rank, index

    def forward(self, tokens: torch.Tensor, remote_means: torch.Tensor | None = None):
        tokens, means = self.rank.block(self.index, tokens, remote_means)
        return tokens if means is None else (tokens, means)


class HeadStage(nn.Module):
    def __init__(self, rank: RankForward):
        super().__init__()
        self.rank = rank

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rank.head(tokens)


def rank_stages(model: PrismViT | PrismText, plan: SegmentPlan, rank: int, means_source: MeansSource = "ln1"
                ) -> list[tuple[StageSpec, nn.Module]]:
    """The stages rank ``rank`` runs over ``plan``, in execution order, with their I/O."""
    return STAGE_BUILDERS[Modality.family(model.spec).kind].rank_stages(model, plan, rank, means_source)


def monolithic_stage(model: PrismViT | PrismText, num_tokens: int | None = None) -> tuple[StageSpec, nn.Module]:
    """The whole unpartitioned model as one stage, for P=1 comparisons (``num_tokens``: a text
    build's sequence length, required there; a ViT's is fixed by its spec)."""
    return STAGE_BUILDERS[Modality.family(model.spec).kind].monolithic_stage(model, num_tokens)


def vit_rank_stages(model: PrismViT, plan: SegmentPlan, rank: int, means_source: MeansSource = "ln1"
                    ) -> list[tuple[StageSpec, nn.Module]]:
    """A ViT rank's stages: embed (images in), its blocks, and on rank 0 the classifier head."""
    spec = model.spec
    forward = RankForward(model, plan, rank, means_source).eval()
    D, n_p = spec.embed_dim, plan.partition.sizes[rank]
    exchanging = plan.ranks > 1
    sent, received = plan.counts[rank], plan.remote_count(rank)
    means_out = (_tensor(MEANS, sent, D),)

    stages = [(StageSpec("embed", "embed", None, (_tensor(PATCHES, plan.partition.patch_count(rank), spec.patch_dim),),
                         (_tensor(NEXT_TOKENS, n_p, D),) + (means_out if exchanging else ())), EmbedStage(forward))]
    for index in range(spec.depth):
        inputs = (_tensor(TOKENS, n_p, D),) + ((_tensor(REMOTE_MEANS, received, D),) if exchanging else ())
        sends_means = exchanging and index + 1 < spec.depth
        outputs = (_tensor(NEXT_TOKENS, n_p, D),) + (means_out if sends_means else ())
        stages.append((StageSpec(f"block_{index:02d}", "block", index, inputs, outputs), BlockStage(forward, index)))
    if rank == 0:
        stages.append((StageSpec("head", "head", None, (_tensor(TOKENS, n_p, D),),
                                 (_tensor(LOGITS, spec.num_classes),)), HeadStage(forward)))
    return stages


class RawImageModel(nn.Module):
    """The whole ViT over raw-scale images (B, C, H, W) float32 in [0, 255], normalised inside."""

    def __init__(self, model: PrismViT):
        super().__init__()
        self.model, self.normalisation = model, PixelNormalisation(model.spec)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalisation.images(images))


def vit_monolithic_stage(model: PrismViT, num_tokens: int | None = None) -> tuple[StageSpec, nn.Module]:
    """The whole ViT as one stage (its tokens are fixed by its spec), raw-scale images in."""
    spec = model.spec
    return (StageSpec("model", "model", None, (_tensor(IMAGES, spec.in_chans, *spec.img_size),),
                      (_tensor(LOGITS, spec.num_classes),)), RawImageModel(model.eval()).eval())


class StageBuilder(NamedTuple):
    """How the exporter cuts one modality's models into stages."""

    rank_stages: Callable[..., list[tuple[StageSpec, nn.Module]]]
    monolithic_stage: Callable[..., tuple[StageSpec, nn.Module]]


#: The stage builder that exports each modality, by its kind.
STAGE_BUILDERS: dict[str, StageBuilder] = {
    Vision.kind: StageBuilder(vit_rank_stages, vit_monolithic_stage),
    Text.kind: StageBuilder(text_rank_stages, text_monolithic_stage),
}


def example_feed(stage: StageSpec, batch: int, seed: int = 0, module: nn.Module | None = None
                 ) -> dict[str, torch.Tensor]:
    """Random inputs of the stage's shapes (deterministic), for tracing and verification: normal
    floats, raw pixels uniform in [0, 255], and for a text stage (``module`` a TextStage) the
    rank's share of random ids below the vocabulary with a padded mask."""
    generator = torch.Generator().manual_seed(seed)
    text = example_text_share(batch, module, generator) if isinstance(module, TextStage) else {}
    feed = {}
    for t in stage.inputs:
        if t.name in text:
            feed[t.name] = text[t.name]
        elif t.name in (PATCHES, IMAGES):
            feed[t.name] = torch.rand(t.concrete(batch), generator=generator) * 255
        else:
            feed[t.name] = torch.randn(t.concrete(batch), generator=generator)
    return feed
