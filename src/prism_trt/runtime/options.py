"""How this process runs its engines, decided once (by the command line) and passed along."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeOptions:
    """threads: the backend's intra-op threads per engine (None: the backend's default).
    device: where engine tensors live (``cpu``, ``cuda:0``), and so which staging a distributed
    rank uses around its collectives. profile_barrier: rank 0 asks for a barrier before every
    collective, so that ``comm`` is transfer only and the ranks' skew is timed as ``wait``
    (workers follow rank 0's choice per batch, whatever theirs says). link_probe_s: rank 0 times
    a small payload over the link once no distributed batch crossed it for this long (0: never;
    see :mod:`.link_probe`)."""

    threads: int | None = None
    device: str = "cpu"
    profile_barrier: bool = False
    link_probe_s: float = 0.0


#: The defaults (the backend's threads, CPU tensors, no barrier): one shared value, being frozen.
DEFAULT_OPTIONS = RuntimeOptions()
