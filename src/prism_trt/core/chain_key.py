"""The identity of a chain: which engines run a batch.

A chain is local (rank 0 alone, P=1), voltage (every token exchanged, CR=1) or prism with L
segments per partition. L is what a build compiles and what two measurements must share to be
the same chain, so ``(mode, segments)`` is the key; the compression rate CR = ceil(N/P) / L is
carried for people and never compared. A CR someone types is turned into L by the one rule of
:func:`prism_trt.core.plan.segments_for_cr` (L = round(ceil(N/P) / CR)): on the MNIST ViT with
two ranks ``--cr 2`` is L = 13, i.e. CR 1.923, wherever it is typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import UsageError
from .plan import SegmentPlan, cr_for_segments, segments_for_cr


class Mode(str, Enum):
    """How a chain exchanges: not at all (rank 0 alone), every token, or segment means."""

    LOCAL = "local"
    VOLTAGE = "voltage"
    PRISM = "prism"

    def __str__(self) -> str:  # the value, on Python 3.10 and 3.11 alike
        return self.value

    @classmethod
    def parse(cls, mode: Mode | str) -> Mode:
        """``mode`` as a Mode; a UsageError naming the modes for anything else."""
        try:
            return cls(mode)
        except ValueError:
            raise UsageError(f"mode must be one of {', '.join(MODE_NAMES)}, got {mode!r}") from None


MODE_NAMES = tuple(m.value for m in Mode)  # for click choices and messages


@dataclass(frozen=True)
class ChainKey:
    """``mode`` and, for prism, ``segments`` (L); ``cr`` is L's compression rate, for display."""

    mode: Mode
    segments: int | None = None
    cr: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))  # JSON, the CLI and callers may give the string
        if self.mode is Mode.PRISM:
            if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
                raise UsageError(f"a prism chain needs a segment count L >= 1, got {self.segments!r}")
        elif self.segments is not None:
            raise UsageError(f"{self.mode} chains have no segment count (got {self.segments})")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def local(cls) -> ChainKey:
        return cls(Mode.LOCAL)

    @classmethod
    def voltage(cls) -> ChainKey:
        return cls(Mode.VOLTAGE, cr=1.0)

    @classmethod
    def prism(cls, segments: int, num_tokens: int, ranks: int) -> ChainKey:
        """The prism chain with ``segments`` per partition of ``num_tokens`` over ``ranks``."""
        return cls(Mode.PRISM, int(segments), cr=cr_for_segments(num_tokens, ranks, int(segments)))

    @classmethod
    def for_cr(cls, cr: float, num_tokens: int, ranks: int) -> ChainKey:
        """The prism chain a requested CR stands for; a PlanError for a CR outside [1, ceil(N/P)]."""
        return cls.prism(segments_for_cr(num_tokens, ranks, cr), num_tokens, ranks)

    @classmethod
    def of_plan(cls, mode: Mode | str, plan: SegmentPlan) -> ChainKey:
        """The key of a chain built from ``plan`` (a local chain's plan has one rank)."""
        mode = Mode.parse(mode)
        if mode is Mode.PRISM:
            return cls.prism(plan.segments, plan.partition.num_tokens, plan.ranks)
        return cls.voltage() if mode is Mode.VOLTAGE else cls.local()

    @classmethod
    def parse(cls, mode: Mode | str, cr: float | None, num_tokens: int, ranks: int) -> ChainKey:
        """What a user's ``--mode`` / ``--cr`` mean on a partition of ``num_tokens`` over ``ranks``."""
        mode = Mode.parse(mode)
        if mode is Mode.PRISM:
            if cr is None:
                raise UsageError("prism mode needs a compression rate (--cr)")
            return cls.for_cr(cr, num_tokens, ranks)
        if cr is not None:
            raise UsageError(f"--cr applies to prism mode only, not {mode}")
        return cls.voltage() if mode is Mode.VOLTAGE else cls.local()

    # -- presentation and records ------------------------------------------------------------------
    @property
    def label(self) -> str:
        """``local``, ``voltage`` or ``prism-cr9.9`` (the CR to 3 significant digits, as the build's
        directory names); ``prism-L5`` for a key made without its CR."""
        if self.mode is not Mode.PRISM:
            return self.mode.value
        return f"prism-cr{self.cr:.3g}" if self.cr is not None else f"prism-L{self.segments}"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "segments": self.segments, "cr": self.cr}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChainKey:
        if not isinstance(data, dict):
            raise UsageError(f"a chain key is an object with mode, segments and cr, got {data!r}")
        mode = data.get("mode")
        segments = data.get("segments") if mode == Mode.PRISM else None
        cr = data.get("cr")
        return cls(mode, segments, cr=None if cr is None else float(cr))

    def __str__(self) -> str:
        return self.label
