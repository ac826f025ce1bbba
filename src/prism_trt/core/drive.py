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

A batch may be driven as micro-batches in flight (:func:`drive_micro_batches`): every stage of
one micro-batch runs while the exchange another one started is still in flight, so a
distributed rank's collectives (and the wait for the slower rank they hold) hide behind compute
instead of idling it. The exchange has two halves for this, :meth:`Exchange.begin_means` and the
pending exchange's ``wait``; in process the first does all the work and the second returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
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


class PendingMeans(Protocol):
    """An exchange of means started by :meth:`Exchange.begin_means`."""

    def wait(self) -> list[torch.Tensor | None]:
        """The remote means each driven rank reads before its next block (blocks until they are here)."""
        ...


@dataclass(frozen=True)
class Exchanged:
    """An exchange that completed when it began (in process): ``wait`` returns what it received."""

    remote: list[torch.Tensor | None]

    def wait(self) -> list[torch.Tensor | None]:
        return self.remote


class Exchange:
    """The exchange in process: every driven rank's means in one list, each rank reading those of
    the ranks it attends to; a per-position head's input is every rank's positions joined.
    Subclasses replace the lists with collectives."""

    def means(self, ranks: Sequence[DrivenRank], sent: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The remote means each driven rank reads before the next block, from what each sent."""
        return [remote_means(sent, rank.attended_ranks) for rank in ranks]

    def begin_means(self, ranks: Sequence[DrivenRank], sent: list[torch.Tensor | None]) -> PendingMeans:
        """Start exchanging ``sent``; the result's ``wait`` gives what :meth:`means` would. What
        ``sent`` holds may be overwritten once this returns. In process the exchange is done here;
        a distributed rank starts its collective and returns while it is in flight."""
        return Exchanged(self.means(ranks, sent))

    def hold(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tokens`` kept valid while another micro-batch runs the same stages: a rank's stages may
        return buffers they reuse for the next input of the same shape (engine runners do). Copies."""
        return [t.clone() for t in tokens]

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


@dataclass
class MicroBatch:
    """One micro-batch in flight: what each driven rank reads of it, its exchange, every rank's
    ``(tokens, means)`` after the last stage run, and the exchange of those means once begun."""

    requests: Sequence[Any]
    exchange: Exchange
    states: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    pending: PendingMeans | None = None

    def ran_stage(self, ranks: Sequence[DrivenRank], exchange_means: bool, others_follow: bool) -> None:
        """After a stage: start the exchange of its means (where a block follows), and hold its
        tokens when another micro-batch runs the same stage before this one reads them."""
        if exchange_means:
            self.pending = self.exchange.begin_means(ranks, [means for _, means in self.states])
        if others_follow:
            tokens = self.exchange.hold([tokens for tokens, _ in self.states])
            self.states = [(held, None) for held in tokens]  # the means were sent (or go nowhere)

    def tokens(self) -> list[torch.Tensor]:
        return [tokens for tokens, _ in self.states]


def _drive_in_flight(ranks: Sequence[DrivenRank], flights: Sequence[MicroBatch]) -> None:
    """Every block of every micro-batch, each micro-batch's exchange begun after its previous
    stage; block ``index`` of micro-batch m runs while m's next exchange and the exchanges the
    micro-batches after it began are in flight."""
    depth = ranks[0].depth
    for index in range(depth):
        for number, flight in enumerate(flights):
            remote = flight.pending.wait()
            with flight.exchange.compute():
                flight.states = [rank.block(index, tokens, received, request) for rank, (tokens, _), received, request
                                 in zip(ranks, flight.states, remote, flight.requests)]
            flight.ran_stage(ranks, index + 1 < depth, number + 1 < len(flights))


def drive_blocks(ranks: Sequence[DrivenRank], states: list[tuple[torch.Tensor, torch.Tensor | None]],
                 requests: Sequence[Any], exchange: Exchange) -> list[torch.Tensor]:
    """Every block of every driven rank from their ``(tokens, means)`` after embedding, the means
    exchanged before each block; returns each rank's final tokens."""
    flight = MicroBatch(requests, exchange, states)
    flight.ran_stage(ranks, exchange_means=True, others_follow=False)
    _drive_in_flight(ranks, [flight])
    return flight.tokens()


def drive_micro_batches(ranks: Sequence[DrivenRank], micro_requests: Sequence[Sequence[Any]],
                        exchanges: Sequence[Exchange], head_reads_all_positions: bool = False) -> torch.Tensor | None:
    """One forward of the driven ranks over a batch cut into micro-batches along its first axis,
    ``micro_requests[m][i]`` being what ``ranks[i]`` reads of micro-batch m and ``exchanges[m]``
    its exchange (one per micro-batch: each has its own buffers in flight). Every rank must issue
    the micro-batches' exchanges in the same order, which this loop does. Returns the heads'
    outputs joined along the batch axis where rank 0 is driven, else None.

    The head runs on rank 0 over its own tokens (the prefix tokens a classifier reads), or, for a
    per-position head (``head_reads_all_positions``), over every rank's positions gathered."""
    flights = [MicroBatch(requests, exchange) for requests, exchange in zip(micro_requests, exchanges)]
    for number, flight in enumerate(flights):
        with flight.exchange.compute():
            flight.states = [rank.embed(request) for rank, request in zip(ranks, flight.requests)]
        flight.ran_stage(ranks, exchange_means=True, others_follow=number + 1 < len(flights))
    _drive_in_flight(ranks, flights)
    outputs = []
    for flight in flights:
        final = flight.tokens()
        head_input = flight.exchange.positions(final) if head_reads_all_positions else final[0]
        if ranks[0].rank == 0:
            with flight.exchange.compute():
                outputs.append(ranks[0].head(head_input))
    if not outputs:
        return None
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def drive(ranks: Sequence[DrivenRank], requests: Sequence[Any], exchange: Exchange,
          head_reads_all_positions: bool = False) -> torch.Tensor | None:
    """One forward of the driven ranks (every rank in rank order, or one rank of a distributed run),
    ``requests[i]`` being what ``ranks[i]`` reads of the batch. Returns the head's output where rank
    0 is driven, else None (:func:`drive_micro_batches` with the whole batch as one)."""
    return drive_micro_batches(ranks, [requests], [exchange], head_reads_all_positions)


def micro_batch_sizes(batch: int, micro_batches: int) -> list[int]:
    """``batch`` cut into at most ``micro_batches`` near-equal parts, larger ones first (never an
    empty one: a batch smaller than the count runs in as many micro-batches as it has samples)."""
    count = max(1, min(batch, micro_batches))
    return [batch // count + (1 if m < batch % count else 0) for m in range(count)]
