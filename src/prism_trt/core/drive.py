"""The one drive loop of a Prism forward: embed -> (exchange -> block)* -> head.

Every way of running ranks goes through :func:`drive`: the simulations (every rank in this
process), the engine chains run in process (local executors, tests) and a distributed rank (one
rank per process). What differs between them is only the :class:`Exchange`: how the means a
rank sends after a block reach the ranks that attend to them, and how a per-position head gets
every rank's positions. In process both are lists; distributed they are staged, timed
collectives (``runtime/distributed_rank.py``).

A driven rank is any object with ``rank`` (its index in the plan), ``depth``, ``attended_ranks``
(whose means it reads, in order: :func:`~prism_trt.core.plan.attended_ranks`), and the stages
``embed(request) -> (tokens, means)``, ``block(index, tokens, remote_means, request) -> (tokens,
means)`` and ``head(tokens)``: a :class:`~prism_trt.core.rank.RankForward`, a
:class:`~prism_trt.core.text_rank.TextRankForward` or an engine chain. ``means`` is None where no
rank reads them (the last block, a single rank, a causal model's last rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch


class DrivenRank(Protocol):
    """What the drive loop needs of a rank (see the module docstring)."""

    rank: int
    depth: int
    attended_ranks: list[int]

    def embed(self, request: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def block(self, index: int, tokens: torch.Tensor, remote_means: torch.Tensor | None, request: Any
              ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def head(self, tokens: torch.Tensor) -> torch.Tensor: ...


def remote_means(gathered: Sequence[torch.Tensor | None], attended: Sequence[int]) -> torch.Tensor | None:
    """The means a rank attends to, joined in rank order from one gathered entry per rank (B, m, D);
    None when it attends to none."""
    return torch.cat([gathered[q] for q in attended], dim=1) if attended else None


class Exchange:
    """The exchange in process: every driven rank's means in one list, each rank reading those of
    the ranks it attends to; a per-position head's input is every rank's positions joined.
    Subclasses replace the lists with collectives."""

    def means(self, ranks: Sequence[DrivenRank], sent: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The remote means each driven rank reads before the next block, from what each sent."""
        return [remote_means(sent, rank.attended_ranks) for rank in ranks]

    def positions(self, tokens: list[torch.Tensor]) -> torch.Tensor | None:
        """Every rank's final hidden states in position order (B, N, D), where the head runs."""
        return torch.cat(tokens, dim=1)

    def compute(self) -> AbstractContextManager:
        """Spans the driven ranks' own work (a distributed rank times it as compute)."""
        return nullcontext()


class NoExchange(Exchange):
    """Every rank alone: it reads no means (the baseline of what the exchange buys)."""

    def means(self, ranks: Sequence[DrivenRank], sent: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [None for _ in ranks]


def drive_blocks(ranks: Sequence[DrivenRank], states: list[tuple[torch.Tensor, torch.Tensor | None]],
                 requests: Sequence[Any], exchange: Exchange) -> list[torch.Tensor]:
    """Every block of every driven rank from their ``(tokens, means)`` after embedding, the means
    exchanged before each block; returns each rank's final tokens."""
    for index in range(ranks[0].depth):
        remote = exchange.means(ranks, [means for _, means in states])
        with exchange.compute():
            states = [rank.block(index, tokens, received, request)
                      for rank, (tokens, _), received, request in zip(ranks, states, remote, requests)]
    return [tokens for tokens, _ in states]


def drive(ranks: Sequence[DrivenRank], requests: Sequence[Any], exchange: Exchange,
          head_reads_all_positions: bool = False) -> torch.Tensor | None:
    """One forward of the driven ranks (every rank in rank order, or one rank of a distributed run),
    ``requests[i]`` being what ``ranks[i]`` reads of the batch. Returns the head's output where rank
    0 is driven, else None.

    The head runs on rank 0 over its own tokens (the prefix tokens a classifier reads), or, for a
    per-position head (``head_reads_all_positions``), over every rank's positions gathered."""
    with exchange.compute():
        states = [rank.embed(request) for rank, request in zip(ranks, requests)]
    final = drive_blocks(ranks, states, requests, exchange)
    head_input = exchange.positions(final) if head_reads_all_positions else final[0]
    if ranks[0].rank != 0:
        return None
    with exchange.compute():
        return ranks[0].head(head_input)
