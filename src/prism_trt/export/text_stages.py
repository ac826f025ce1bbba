"""Stage modules of a text model (BERT, GPT-2): the seams of :class:`~prism_trt.model.text.PrismText`.

Same seams as the ViT's (``embed``, ``block_NN`` with its segment-means head, ``head``), over a
fixed sequence length N per build: the plan partitions N positions, so every request is
right-padded to N and the attention mask says which positions hold tokens. Padding never changes
the outputs of valid positions (tests/test_text_prism.py), so one length serves every shorter
input exactly.

Every stage that attends gets the whole INT64 attention mask (B, N) as an input and computes its
rank's masks from it (:meth:`~prism_trt.core.text_rank.TextRankForward.masks`: a few element-wise
ops and one small matmul per block): no bias tensors travel between stages, and the sizes of the
remote segments (``ln s``, masked when a segment is all padding) follow each request's padding.

Heads: BERT's classifier reads [CLS] on rank 0; a per-position head (GPT-2's LM head, features)
runs on rank 0 over the final hidden states of all N positions, which the runtime gathers after
the last block (D values a position instead of V logits).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.plan import SegmentPlan
from ..core.text_rank import TextRankForward
from ..engines.base import BATCH_AXIS, TensorSpec
from ..engines.stage_spec import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MEANS,
    NEXT_TOKENS,
    REMOTE_MEANS,
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
    """A stage over one rank's :class:`TextRankForward`; ``vocab_size`` bounds example ids."""

    def __init__(self, rank: TextRankForward):
        super().__init__()
        self.rank = rank
        self.vocab_size = rank.model.spec.vocab_size


class TextEmbedStage(TextStage):
    """Inputs: input_ids[, attention_mask] (the mask only where the rank sends means: exporters drop unused inputs)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        tokens, means = self.rank.embed(self.rank.batch(input_ids, attention_mask))
        return tokens if means is None else (tokens, means)


class TextBlockStage(TextStage):
    """Inputs: tokens, attention_mask (a rank that attends to no remote means: causal rank 0, P = 1)."""

    def __init__(self, rank: TextRankForward, index: int):
        super().__init__(rank)
        self.index = index

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor):
        return self.run_block(tokens, None, attention_mask)

    def run_block(self, tokens: torch.Tensor, remote_means: torch.Tensor | None, attention_mask: torch.Tensor):
        batch = self.rank.batch(attention_mask, attention_mask)  # the ids only give the masks' shape
        tokens, means = self.rank.block(self.index, tokens, remote_means, batch)
        return tokens if means is None else (tokens, means)


class ReceivingTextBlockStage(TextBlockStage):
    """Inputs: tokens, remote_means, attention_mask. Named arguments, not ``*args``: the dynamo
    exporter binds dynamic axes by argument name."""

    def forward(self, tokens: torch.Tensor, remote_means: torch.Tensor, attention_mask: torch.Tensor):
        return self.run_block(tokens, remote_means, attention_mask)


class TextHeadStage(TextStage):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rank.head(tokens)


def text_rank_stages(model: PrismText, plan: SegmentPlan, rank: int, means_source: MeansSource = "ln1"
                     ) -> list[tuple[StageSpec, nn.Module]]:
    """The stages rank ``rank`` runs over ``plan`` (N = the plan's positions), in order, with their I/O."""
    spec, N = model.spec, plan.partition.num_tokens
    forward = TextRankForward(model, plan, rank, means_source).eval()
    D, n_p = spec.embed_dim, plan.partition.sizes[rank]
    ids, mask = text_request_inputs(N)
    means_out = (_tensor(MEANS, plan.counts[rank], D),) if forward.sends_means else ()
    received = int(forward.remote_membership.shape[0])
    remote_in = (_tensor(REMOTE_MEANS, received, D),) if forward.attended_ranks else ()

    embed_in = (ids, mask) if forward.sends_means else (ids,)
    stages = [(StageSpec("embed", "embed", None, embed_in, (_tensor(NEXT_TOKENS, n_p, D),) + means_out),
               TextEmbedStage(forward))]
    for index in range(spec.depth):
        outputs = (_tensor(NEXT_TOKENS, n_p, D),) + (means_out if index + 1 < spec.depth else ())
        stages.append((StageSpec(f"block_{index:02d}", "block", index, (_tensor(TOKENS, n_p, D), *remote_in, mask),
                                 outputs), (ReceivingTextBlockStage if remote_in else TextBlockStage)(forward, index)))
    if rank == 0:
        head_tokens = n_p if model.reads_only_prefix else N
        stages.append((StageSpec("head", "head", None, (_tensor(TOKENS, head_tokens, D),),
                                 (head_outputs(model, N),)), TextHeadStage(forward)))
    return stages


class _Monolithic(nn.Module):
    def __init__(self, model: PrismText):
        super().__init__()
        self.model, self.vocab_size = model, model.spec.vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


def text_monolithic_stage(model: PrismText, seq_len: int | None) -> tuple[StageSpec, nn.Module]:
    """The whole unpartitioned model as one stage, for P=1 comparisons."""
    if seq_len is None:
        raise ValueError("a text model's monolithic stage needs the build's sequence length")
    return (StageSpec("model", "model", None, text_request_inputs(seq_len), (head_outputs(model, seq_len),)),
            _Monolithic(model.eval()))


def example_text_inputs(batch: int, seq_len: int, vocab_size: int, generator: torch.Generator
                        ) -> dict[str, torch.Tensor]:
    """Random ids and a right-padded mask: row 0 full, the others 1..N valid positions."""
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return {INPUT_IDS: ids, ATTENTION_MASK: mask}
