"""What the server and the profiler need from the runtime: an :class:`Executor` that runs a batch
on a chain (a :class:`~prism_trt.engines.ChainKey`), and a :class:`Selector` that picks the chain
for a batch size. The fixed selector lives here; the profiler's adaptive one implements the same
interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..core.chain_key import ChainKey, Mode
from ..engines.buckets import BucketSet
from ..engines.manifest import Manifest
from ..errors import UsageError
from ..model.spec import ViTSpec
from ..model.text_spec import TextSpec
from .link_probe import LinkProbe
from .request import InferenceRequest
from .timing import PhaseTimes


@dataclass
class InferenceResult:
    logits: torch.Tensor  # (B, classes), or (B, N, V | D) of a per-position head on the request's bucket N; CPU
    choice: ChainKey  # the chain that actually ran (local after a fallback)
    timings: PhaseTimes  # rank 0's breakdown
    fell_back: bool = False  # True when a distributed run failed and the local chain answered
    per_rank: list[PhaseTimes] = field(default_factory=list)  # every rank's, when gathered (profiling)
    sequence_length: int | None = None  # the text bucket N that ran (the request padded to it); None: a ViT


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    degraded: bool = False
    reason: str = ""


class Executor(ABC):
    """Runs batches on rank 0 (and, for distributed chains, on the workers with it).

    Subclasses set ``manifest`` (rank 0's), ``buckets``, ``spec``, ``model_name`` and ``max_batch``.
    A request runs on the bucket it was made for (:meth:`request` makes one of plain tensors).
    """

    manifest: Manifest
    buckets: BucketSet
    spec: ViTSpec | TextSpec
    model_name: str
    max_batch: int
    #: The rate the collectives achieved lately, Mbit/s; None where nothing crosses a network.
    bandwidth_mbit: float | None = None
    #: The newest reading of the link's probe (:mod:`.link_probe`); None where none ran.
    link_probe: LinkProbe | None = None

    @abstractmethod
    def chains(self) -> list[ChainKey]:
        """The chains whose engines are loaded, local first."""

    def key_for(self, mode: str, cr: float | None = None) -> ChainKey:
        """The loaded chain a user's mode and CR stand for; a UsageError naming the loaded ones otherwise."""
        return self.loaded(ChainKey.parse(mode, cr, self.manifest.num_tokens, self.manifest.world_size))

    def loaded(self, key: ChainKey) -> ChainKey:
        """``key`` as loaded here (with its CR); a UsageError naming the loaded chains otherwise."""
        for loaded in self.chains():
            if loaded == key:
                return loaded
        single = key.mode != Mode.LOCAL and self.manifest.world_size > 1 and len(self.chains()) == 1
        raise UsageError(f"no {key.label} chain is loaded here (loaded: {', '.join(k.label for k in self.chains())})"
                         + ("; voltage and prism need --world-size >= 2" if single else ""))

    def request(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> InferenceRequest:
        """A request for this executor's model and buckets: images (B, C, H, W) float32 normalised,
        or the model's named tensors (a text model's ids and mask of n <= the longest bucket)."""
        return InferenceRequest.of(self.manifest.model, inputs, self.buckets.lengths)

    @abstractmethod
    def infer(self, request: InferenceRequest, key: ChainKey, gather_timings: bool = False) -> InferenceResult:
        """Run ``request`` (1 <= B <= max_batch) on its bucket. The logits are the bucket's: a
        per-position head's are cut back with ``request.trim``. ``gather_timings``: every rank's
        phase times in ``per_rank`` (one more collective; rank 0's alone otherwise)."""

    @abstractmethod
    def health(self) -> Health: ...

    @abstractmethod
    def close(self) -> None: ...


class Selector(Protocol):
    def choose(self, batch: int) -> ChainKey: ...


@dataclass(frozen=True)
class Observation:
    """What a learning selector made of one batch it was shown (for the server's metrics)."""

    mode: str  # the label of the chain that ran
    measured_ms: float  # per sample
    predicted_ms: float | None = None  # per sample, predicted for that chain when it was chosen; None if not
    explored: bool = False  # chosen to explore rather than as the predicted best
    bandwidth_mbit: float | None = None  # the selector's live link-rate estimate after this batch

    @property
    def relative_error(self) -> float | None:
        """|predicted - measured| / measured."""
        if self.predicted_ms is None or self.measured_ms <= 0:
            return None
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms


class ObservingSelector(Selector, Protocol):
    """A selector that learns from what ran: the server hands it every batch's result, after the
    batch's responses are settled, on the thread that ran the batch. A plain Selector (no
    ``observe``) is never shown results."""

    def observe(self, batch: int, result: InferenceResult) -> Observation | None: ...


class FixedSelector:
    """Always the same chain (``prism-trt serve --mode ...``)."""

    def __init__(self, key: ChainKey):
        self.key = key

    def choose(self, batch: int) -> ChainKey:
        return self.key
