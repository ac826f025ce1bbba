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
from ..engines.buckets import Bucket, BucketSet
from ..engines.manifest import Manifest, ModelRecord
from ..engines.stage_spec import ATTENTION_MASK, IMAGES, INPUT_IDS
from ..errors import UsageError
from ..model.spec import ViTSpec
from ..model.text_spec import TextSpec
from .timing import PhaseTimes

#: A batch: a ViT's images (B, C, H, W), or named tensors (a text model's ``input_ids`` and
#: ``attention_mask``, (B, N) int64 each; ``{"images": ...}`` works for a ViT too).
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def as_request(inputs: Inputs, model: ModelRecord) -> dict[str, torch.Tensor]:
    """The batch as the model's named request tensors, checked: names, dtypes, shapes, one batch size."""
    request = {IMAGES: inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
    specs = model.request_inputs()
    if sorted(request) != sorted(t.name for t in specs):
        raise UsageError(f"{model.spec.name} takes inputs {[t.name for t in specs]}, got {sorted(request)}")
    batch = request[specs[0].name].shape[0]
    for spec in specs:
        tensor = request[spec.name]
        want = spec.concrete(batch)
        if str(tensor.dtype).removeprefix("torch.") != spec.dtype or tuple(tensor.shape) != want:
            raise UsageError(f"input {spec.name!r} must be {spec.dtype} of shape {list(want)}, got {tensor.dtype} "
                             f"of shape {list(tensor.shape)}")
    return {spec.name: request[spec.name] for spec in specs}


def fit_request(inputs: Inputs, buckets: BucketSet) -> tuple[dict[str, torch.Tensor], Bucket, int | None]:
    """The batch as request tensors for the bucket that runs it: a text batch of n <= N positions is
    right-padded (ids 0, mask 0: exact, padding never changes a real position's output) to the
    smallest built N >= n. Returns (request, bucket, n); n is None for a ViT."""
    if isinstance(inputs, torch.Tensor) or not buckets.lengths or INPUT_IDS not in inputs:
        return as_request(inputs, buckets.primary.manifest.model), buckets.primary, None
    ids = inputs[INPUT_IDS]
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise UsageError(f"input {INPUT_IDS!r} must be (B, n) with n >= 1 positions, got shape {list(ids.shape)}")
    mask = inputs.get(ATTENTION_MASK)
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise UsageError(f"{ATTENTION_MASK!r} has shape {list(mask.shape)}, {INPUT_IDS!r} {list(ids.shape)}; they must "
                         f"match")
    positions = int(ids.shape[1])
    bucket = buckets.for_length(positions)
    request = dict(inputs)
    if positions < bucket.length and mask is not None:
        for name in (INPUT_IDS, ATTENTION_MASK):
            request[name] = torch.nn.functional.pad(request[name], (0, bucket.length - positions))
    return as_request(request, bucket.manifest.model), bucket, positions


def trim_positions(logits: torch.Tensor, positions: int | None, model: ModelRecord) -> torch.Tensor:
    """A per-position head's logits cut back to the request's own positions (padding removed)."""
    return logits[:, :positions] if positions is not None and model.head_reads_all_positions else logits


@dataclass
class InferenceResult:
    logits: torch.Tensor  # (B, classes), or (B, N, V | D) for a per-position text head; on the CPU
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
    Text inputs may be shorter than the longest bucket: they run padded on the shortest that holds
    them, and a per-position head answers their own positions.
    """

    manifest: Manifest
    buckets: BucketSet
    spec: ViTSpec | TextSpec
    model_name: str
    max_batch: int
    #: The rate the collectives achieved lately, Mbit/s; None where nothing crosses a network.
    bandwidth_mbit: float | None = None

    @abstractmethod
    def chains(self) -> list[ChainKey]:
        """The chains whose engines are loaded, local first."""

    def key_for(self, mode: str, cr: float | None = None) -> ChainKey:
        """The loaded chain a user's mode and CR stand for; a UsageError naming the loaded ones otherwise."""
        key = ChainKey.parse(mode, cr, self.manifest.num_tokens, self.manifest.world_size)
        for loaded in self.chains():
            if loaded == key:
                return loaded
        single = key.mode != Mode.LOCAL and self.manifest.world_size > 1 and len(self.chains()) == 1
        raise UsageError(f"no {key.label} chain is loaded here (loaded: {', '.join(k.label for k in self.chains())})"
                         + ("; voltage and prism need --world-size >= 2" if single else ""))

    @abstractmethod
    def infer(self, inputs: Inputs, key: ChainKey, gather_timings: bool = False) -> InferenceResult:
        """inputs: images (B, C, H, W) float32 normalised, or the model's named request tensors
        (:func:`as_request`), 1 <= B <= max_batch. ``gather_timings``: every rank's phase times in
        ``per_rank`` (one more collective; rank 0's alone otherwise)."""

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
