"""What the server needs from the runtime: an :class:`Executor` that runs a batch in a chosen
mode, and a :class:`Selector` that chooses the mode for a batch size. The fixed selector lives
here; the profiler's adaptive selector implements the same interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..model.spec import ViTSpec
from .timing import PhaseTimes

MODES = ("local", "voltage", "prism")


@dataclass(frozen=True)
class Choice:
    """How to run one batch: a mode and, for prism, a compression rate."""

    mode: str
    cr: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "prism" and self.cr is None:
            raise ValueError("prism mode needs a compression rate")

    @property
    def label(self) -> str:
        return f"prism-cr{self.cr:g}" if self.mode == "prism" else self.mode


@dataclass
class InferenceResult:
    logits: torch.Tensor  # (B, classes), on the CPU
    choice: Choice  # what actually ran (local after a fallback)
    timings: PhaseTimes  # rank 0's breakdown
    fell_back: bool = False  # True when a distributed run failed and the local chain answered
    per_rank: list[PhaseTimes] = field(default_factory=list)  # all ranks, when gathered (profiling)


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    degraded: bool = False
    reason: str = ""


class Executor(Protocol):
    """Runs batches on rank 0 (and, for distributed modes, on the workers with it)."""

    model_name: str
    spec: ViTSpec
    max_batch: int

    def choices(self) -> list[Choice]:
        """The (mode, CR) combinations whose engines are loaded."""
        ...

    def infer(self, images: torch.Tensor, choice: Choice) -> InferenceResult:
        """images: (B, C, H, W) float32 normalised, 1 <= B <= max_batch."""
        ...

    def health(self) -> Health: ...

    def close(self) -> None: ...


class Selector(Protocol):
    def choose(self, batch: int) -> Choice: ...


class FixedSelector:
    """Always the same choice (``prism-trt serve --mode ...``)."""

    def __init__(self, choice: Choice):
        self.choice = choice

    def choose(self, batch: int) -> Choice:
        return self.choice
