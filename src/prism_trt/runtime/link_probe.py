"""A cheap, bounded probe of the link between rank 0 and its workers.

Distributed batches tell how fast the link is (their request broadcast and all-gathers cross it),
but a server that runs locally because the link was slow sends nothing over it, so it would never
learn that the link got fast again. While no distributed batch has crossed the link for
``RuntimeOptions.link_probe_s``, rank 0 therefore runs three rounds in place of a heartbeat:

1. a payload round, untimed: ``payload_bytes`` broadcast from rank 0, then a one-element
   all-reduce that no worker can answer before the whole payload has arrived. It spends what a
   rested link lets through faster than its rate (a token bucket's burst, WiFi aggregation) and
   opens TCP's window again after the idle time;
2. an empty round, the all-reduce alone: the round trip with no payload;
3. the payload round again, timed;
4. the empty round again.

The payload's goodput is its bits over the payload round less the shorter empty round, so the
fixed latency of a round trip cancels, and a round that waited on a busy core (which would read
as a faster link) counts only when both did. The payload is sized to take about ``TARGET_MS`` at the last reading,
within ``MIN_BYTES`` and ``MAX_BYTES``: at one probe a second, two payloads are about 3 % of the
link's time, and a probe holds rank 0's executor for about that long. Workers answer a probe header
with :func:`answer_probe`; both sides run inside the group's usual collective timeout, so a link
that went down fails the probe like any heartbeat (and rank 0 degrades to local serving).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

TARGET_MS = 15.0  # link time one probe's payload takes at the last reading
MIN_BYTES, MAX_BYTES = 32 * 1024, 4 * 1024 * 1024
FIRST_BYTES = 256 * 1024  # before any reading


@dataclass(frozen=True)
class LinkProbe:
    """One reading of the link: ``mbit`` is the payload's goodput (Mbit/s, the scale of a
    profiled map's measured rates); ``count`` numbers the readings of this executor, so a reader
    tells a new one from the one it saw."""

    mbit: float
    payload_bytes: int
    empty_ms: float  # the shorter empty round
    payload_ms: float  # the payload round
    count: int
    at: float  # time.monotonic() when it was taken


def payload_bytes(last: LinkProbe | None) -> int:
    """The next probe's payload: about TARGET_MS at the last reading, within MIN_BYTES..MAX_BYTES."""
    if last is None:
        return FIRST_BYTES
    wanted = last.mbit * 1e6 / 8 * TARGET_MS / 1e3
    return int(min(MAX_BYTES, max(MIN_BYTES, wanted)))


def _round_trip() -> None:
    dist.all_reduce(torch.zeros(1, dtype=torch.float32))


def _payload_round(payload: torch.Tensor) -> None:
    dist.broadcast(payload, src=0)
    _round_trip()


def probe_link(size: int, count: int) -> LinkProbe | None:
    """Rank 0's half, after it broadcast the probe header that names ``size``: the four rounds.
    None when the payload round was not measurably longer than the empty one (a reading of
    nothing); RuntimeError from GLOO when a peer or the link is gone."""
    payload = torch.zeros(size, dtype=torch.uint8)
    _payload_round(payload)
    start = time.perf_counter()
    _round_trip()
    empty = time.perf_counter()
    _payload_round(payload)
    done = time.perf_counter()
    _round_trip()
    empty_ms = min(empty - start, time.perf_counter() - done) * 1e3
    payload_ms = (done - empty) * 1e3
    transfer_ms = payload_ms - empty_ms
    if transfer_ms <= 0:
        return None
    return LinkProbe(size * 8 / (transfer_ms * 1e3), size, empty_ms, payload_ms, count, time.monotonic())


def answer_probe(size: int) -> None:
    """A worker's half of a probe whose header named ``size`` (the header's batch field)."""
    if not 0 < size <= MAX_BYTES:
        raise RuntimeError(f"a link probe of {size} bytes is outside 1..{MAX_BYTES}: rank 0 runs another version")
    payload = torch.empty(size, dtype=torch.uint8)
    _payload_round(payload)
    _round_trip()
    _payload_round(payload)
    _round_trip()
