"""Stage modules of a text model (BERT, GPT-2): the seams of :class:`~prism_trt.model.text.PrismText`.

Same seams as the ViT's (``embed``, ``block_NN`` with its segment-means head, ``head``), over a
fixed sequence length N per build: the plan partitions N positions, so every request is
right-padded to N and the attention mask says which positions hold tokens. Padding never changes
the outputs of valid positions (tests/test_text_prism.py), so one length serves every shorter
input exactly.

A rank's stages read its share of the request (:func:`~prism_trt.core.text_rank.text_share`): its
own positions' ids and INT64 attention mask (B, n_p), and where it attends to remote means, their
segments' valid-token counts ``remote_sizes`` (B, m) float32, which rank 0 counts from the whole
mask. Every block computes its rank's masks from them
(:meth:`~prism_trt.core.text_rank.TextRankForward.share_masks`: a few element-wise ops): no bias
tensors travel between stages, and the sizes of the remote segments (``ln s``, masked when a
segment is all padding) follow each request's padding.

Heads: BERT's classifier reads [CLS] on rank 0; a per-position head (GPT-2's LM head, features)
runs on rank 0 over the final hidden states of all N positions, which the runtime gathers after
the last block (D values a position instead of V logits).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.plan import SegmentPlan
from ..core.text_rank import RankBatch, TextRankForward
from ..engines.base import BATCH_AXIS, TensorSpec
from ..engines.stage_spec import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MEANS,
    NEXT_TOKENS,
    REMOTE_MEANS,
    REMOTE_SIZES,
    TOKENS,
    StageSpec,
    text_request_inputs,
)
from ..model.text import PrismText
from ..model.vit import MeansSource


def _tensor(name: str, *dims: int) -> TensorSpec:
    return TensorSpec(name, (BATCH_AXIS, *dims), "float32")


def head_outputs(model: PrismText, seq_len: int) -> TensorSpec:
    """The head's output: (B, classes) from [CLS], or (B, N, V | D) per position."""
    return _tensor(LOGITS, *model.spec.output_shape(seq_len))


class TextStage(nn.Module):
    """A stage over one rank's :class:`TextRankForward` (None: the whole model); ``vocab_size`` and
    ``seq_len`` shape example requests."""

    def __init__(self, rank: TextRankForward | None, model: PrismText | None = None, seq_len: int | None = None):
        super().__init__()
        self.rank = rank
        model = rank.model if rank is not None else model
        self.vocab_size = model.spec.vocab_size
        self.seq_len = rank.plan.partition.num_tokens if rank is not None else seq_len


class TextEmbedStage(TextStage):
    """Inputs: input_ids[, attention_mask] of the rank's own positions (the mask only where the rank
    sends means: exporters drop unused inputs)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        batch = RankBatch(input_ids, self.rank.share_masks(mask, None))
        tokens, means = self.rank.embed(batch)
        return tokens if means is None else (tokens, means)


class TextBlockStage(TextStage):
    """Inputs: tokens, attention_mask (a rank that attends to no remote means: causal rank 0, P = 1)."""

    def __init__(self, rank: TextRankForward, index: int):
        super().__init__(rank)
        self.index = index

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor):
        return self.run_block(tokens, None, attention_mask, None)

    def run_block(self, tokens: torch.Tensor, remote_means: torch.Tensor | None, attention_mask: torch.Tensor,
                  remote_sizes: torch.Tensor | None):
        batch = RankBatch(attention_mask, self.rank.share_masks(attention_mask, remote_sizes))  # ids not read
        tokens, means = self.rank.block(self.index, tokens, remote_means, batch)
        return tokens if means is None else (tokens, means)


class ReceivingTextBlockStage(TextBlockStage):
    """Inputs: tokens, remote_means, attention_mask, remote_sizes. Named arguments, not ``*args``:
    the dynamo exporter binds dynamic axes by argument name."""

    def forward(self, tokens: torch.Tensor, remote_means: torch.Tensor, attention_mask: torch.Tensor,
                remote_sizes: torch.Tensor):
        return self.run_block(tokens, remote_means, attention_mask, remote_sizes)


class TextHeadStage(TextStage):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rank.head(tokens)


def text_rank_stages(model: PrismText, plan: SegmentPlan, rank: int, means_source: MeansSource = "ln1"
                     ) -> list[tuple[StageSpec, nn.Module]]:
    """The stages rank ``rank`` runs over ``plan`` (N = the plan's positions), in order, with their I/O."""
    spec, N = model.spec, plan.partition.num_tokens
    forward = TextRankForward(model, plan, rank, means_source).eval()
    D, n_p = spec.embed_dim, plan.partition.sizes[rank]
    ids, mask = (TensorSpec(name, (BATCH_AXIS, n_p), "int64") for name in (INPUT_IDS, ATTENTION_MASK))
    means_out = (_tensor(MEANS, plan.counts[rank], D),) if forward.sends_means else ()
    received = forward.remote_segments
    remote_in = (_tensor(REMOTE_MEANS, received, D),) if forward.attended_ranks else ()
    sizes_in = (_tensor(REMOTE_SIZES, received),) if forward.attended_ranks else ()

    embed_in = (ids, mask) if forward.sends_means else (ids,)
    stages = [(StageSpec("embed", "embed", None, embed_in, (_tensor(NEXT_TOKENS, n_p, D),) + means_out),
               TextEmbedStage(forward))]
    for index in range(spec.depth):
        outputs = (_tensor(NEXT_TOKENS, n_p, D),) + (means_out if index + 1 < spec.depth else ())
        inputs = (_tensor(TOKENS, n_p, D), *remote_in, mask, *sizes_in)
        stages.append((StageSpec(f"block_{index:02d}", "block", index, inputs, outputs),
                       (ReceivingTextBlockStage if remote_in else TextBlockStage)(forward, index)))
    if rank == 0:
        head_tokens = n_p if model.reads_only_prefix else N
        stages.append((StageSpec("head", "head", None, (_tensor(TOKENS, head_tokens, D),),
                                 (head_outputs(model, N),)), TextHeadStage(forward)))
    return stages


class _Monolithic(TextStage):
    def __init__(self, model: PrismText, seq_len: int):
        super().__init__(None, model, seq_len)
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


def text_monolithic_stage(model: PrismText, seq_len: int | None) -> tuple[StageSpec, nn.Module]:
    """The whole unpartitioned model as one stage, for P=1 comparisons."""
    if seq_len is None:
        raise ValueError("a text model's monolithic stage needs the build's sequence length")
    return (StageSpec("model", "model", None, text_request_inputs(seq_len), (head_outputs(model, seq_len),)),
            _Monolithic(model.eval(), seq_len))


def example_text_inputs(batch: int, seq_len: int, vocab_size: int, generator: torch.Generator
                        ) -> dict[str, torch.Tensor]:
    """Random ids and a right-padded mask: row 0 full, the others 1..N valid positions."""
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return {INPUT_IDS: ids, ATTENTION_MASK: mask}


def example_text_share(batch: int, module: TextStage, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """What ``module``'s stage reads of random whole sequences (:func:`example_text_inputs`): its
    rank's share, or the whole request for the unpartitioned model."""
    whole = example_text_inputs(batch, module.seq_len, module.vocab_size, generator)
    if module.rank is None:
        return whole
    share = module.rank.share(whole[INPUT_IDS], whole[ATTENTION_MASK])
    return {INPUT_IDS: share.input_ids, ATTENTION_MASK: share.attention_mask, REMOTE_SIZES: share.remote_sizes}
