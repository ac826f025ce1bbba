"""A model family's differences in one object: what a request brings, what it answers, how many
positions a plan partitions, and a deterministic example request.

A :class:`Vision` model (a ViT) takes images, raw UINT8 pixels or FP32 already normalised, and
answers one row of class logits per image. A :class:`Text` model (BERT, GPT-2) takes INT64 ids
and an attention mask of one build's sequence length N (or of a shorter sequence bucket) and
answers class logits ([CLS]) or one row per position.

A distributed rank reads only its *share* of a request (:meth:`Modality.share`): a ViT rank its
own patches as raw pixels (one byte a value when the request came as UINT8; the engines
normalise), a text rank its own positions and the valid tokens of the remote segments it attends
to. Rank 0 cuts the shares and sends each rank its own; the local chain reads the whole request.

Code that would ask "ViT or text?" asks the modality instead; the layers above (export, serve)
attach their own parts to a modality by its ``kind`` (one dispatch per layer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.plan import SegmentPlan
from ..core.rank import own_patches
from ..core.text_rank import text_share
from ..errors import UsageError
from ..model.spec import ViTSpec
from ..model.text_spec import TextSpec
from .base import BATCH_AXIS, TensorSpec
from .stage_spec import (
    ATTENTION_MASK,
    IMAGES,
    INPUT_IDS,
    PATCHES,
    REMOTE_SIZES,
    image_request_inputs,
    text_request_inputs,
)

#: The dtype of raw pixels: one byte a value, on the [0, 255] scale.
PIXELS_DTYPE = "uint8"


class Modality(ABC):
    """One model family's answers to the questions the runtime, the server and the exporter ask."""

    kind: ClassVar[str]  # the manifest's ``model.kind``
    spec_class: ClassVar[type]
    records_length: ClassVar[bool] = False  # its manifest record holds the build's sequence length
    spec: ViTSpec | TextSpec

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """N, the positions a plan partitions."""

    @property
    def sequence_length(self) -> int | None:
        """The build's sequence length (None: the model fixes its own tokens)."""
        return None

    @property
    def causal(self) -> bool:
        """A rank reads only the means of the ranks before it."""
        return False

    @property
    def per_position(self) -> bool:
        """The head answers every position (its logits have a position axis), so rank 0 gathers
        every rank's final hidden states; else rank 0's own suffice."""
        return False

    @abstractmethod
    def request_inputs(self, length: int | None = None) -> tuple[TensorSpec, ...]:
        """The named tensors one request brings (``length``: a sequence bucket's N, default the build's)."""

    @abstractmethod
    def output_shape(self, length: int | None = None) -> tuple[int, ...]:
        """One item's logits on a bucket of ``length`` positions (default the build's)."""

    @abstractmethod
    def example_inputs(self, batch: int, seed: int = 0, positions: int | None = None) -> dict[str, torch.Tensor]:
        """A deterministic random request of ``batch`` items (``positions``: a text request's length)."""

    def request_positions(self, tensors: dict[str, torch.Tensor]) -> int | None:
        """The positions a request's tensors hold (None: nothing of the request is padded)."""
        return None

    def dtypes(self, spec: TensorSpec) -> tuple[str, ...]:
        """The dtypes a request's tensor of ``spec`` may come in (its spec's first)."""
        return (spec.dtype,)

    @abstractmethod
    def share_inputs(self, plan: SegmentPlan, rank: int, narrow: bool = False) -> tuple[TensorSpec, ...]:
        """What rank ``rank``'s stages read of a request over ``plan`` (besides tokens and means),
        in the engines' dtypes, or as it crosses the wire when ``narrow`` (:meth:`narrow`)."""

    @abstractmethod
    def share(self, tensors: dict[str, torch.Tensor], plan: SegmentPlan, rank: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s share of a request's tensors as it crosses the wire (contiguous; the
        dtypes of ``share_inputs(plan, rank, self.narrow(tensors))``)."""

    def narrow(self, tensors: dict[str, torch.Tensor]) -> bool:
        """The request's share crosses the wire in a narrower dtype than the engines read (cast
        where it arrives)."""
        return False

    def rank_inputs(self, tensors: dict[str, torch.Tensor], plan: SegmentPlan, rank: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s share in the engines' dtypes (the local chain: plan of one rank)."""
        dtypes = {t.name: getattr(torch, t.dtype) for t in self.share_inputs(plan, rank)}
        return {name: tensor.to(dtypes[name]) for name, tensor in self.share(tensors, plan, rank).items()}

    def model_inputs(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole request as the unpartitioned model's one stage reads it (raw pixels may still
        be uint8: cast where they arrive, as a share's)."""
        return tensors

    def record_fields(self) -> dict:
        """What the manifest's model record adds for this family (a ViT's adds nothing, so its
        records and their digests keep their layout)."""
        return {}

    @staticmethod
    def of(kind: str, spec: ViTSpec | TextSpec, sequence_length: int | None) -> Modality:
        """The modality a manifest records as ``kind``."""
        if kind not in MODALITIES:
            raise UsageError(f"model kind must be one of {tuple(MODALITIES)}, got {kind!r}")
        modality = MODALITIES[kind]
        if not isinstance(spec, modality.spec_class):
            raise UsageError(f"a {kind} model needs a {modality.spec_class.__name__}, got {type(spec).__name__}")
        return modality.recorded(spec, sequence_length)

    @staticmethod
    def family(spec: ViTSpec | TextSpec) -> type[Modality]:
        """The modality of models described by ``spec``."""
        for modality in MODALITIES.values():
            if isinstance(spec, modality.spec_class):
                return modality
        raise UsageError(f"no modality takes a {type(spec).__name__}")

    @staticmethod
    def of_spec(spec: ViTSpec | TextSpec, num_tokens: int) -> Modality:
        """The modality of a model with ``spec``, built for ``num_tokens`` positions."""
        return Modality.family(spec).built_for(spec, num_tokens)

    @classmethod
    @abstractmethod
    def recorded(cls, spec, sequence_length: int | None) -> Modality:
        """The modality of a manifest record (its sequence length, if it has one)."""

    @classmethod
    @abstractmethod
    def built_for(cls, spec, num_tokens: int) -> Modality:
        """The modality of a build whose plans partition ``num_tokens`` positions."""


@dataclass(frozen=True)
class Vision(Modality):
    """A ViT: images (B, C, H, W) in, (B, classes) logits out. Images are raw pixels (uint8, the
    [0, 255] scale) or float32 already normalised with the spec's mean and std; either way the
    engines read raw-scale float32 and normalise inside the embed stage."""

    kind: ClassVar[str] = "vit"
    spec_class: ClassVar[type] = ViTSpec
    spec: ViTSpec

    @property
    def num_tokens(self) -> int:
        return self.spec.num_tokens

    @classmethod
    def recorded(cls, spec, sequence_length: int | None) -> Vision:
        if sequence_length is not None:
            raise UsageError("a ViT record has no sequence length (its tokens are fixed by its spec)")
        return cls(spec)

    @classmethod
    def built_for(cls, spec, num_tokens: int) -> Vision:
        return cls(spec)

    def request_inputs(self, length: int | None = None) -> tuple[TensorSpec, ...]:
        return image_request_inputs(self.spec.in_chans, self.spec.img_size)

    def output_shape(self, length: int | None = None) -> tuple[int, ...]:
        return (self.spec.num_classes,)

    def example_inputs(self, batch: int, seed: int = 0, positions: int | None = None) -> dict[str, torch.Tensor]:
        if positions is not None:
            raise UsageError("a number of positions (--seq-len) is for text models; a ViT's requests are images")
        (images,) = self.request_inputs()
        generator = torch.Generator().manual_seed(seed)
        return {images.name: torch.randn(images.concrete(batch), generator=generator)}

    def dtypes(self, spec: TensorSpec) -> tuple[str, ...]:
        return (spec.dtype, PIXELS_DTYPE)

    def narrow(self, tensors: dict[str, torch.Tensor]) -> bool:
        return tensors[IMAGES].dtype == torch.uint8

    def raw_pixels(self, values: torch.Tensor, patches: bool = False) -> torch.Tensor:
        """Images (B, C, H, W), or ``patches`` (B, n, C * ph * pw), on the raw [0, 255] scale: uint8
        ones as they are, normalised float32 ones mapped back, ``(x * std + mean) * 255`` per
        channel (exact up to float rounding)."""
        if values.dtype == torch.uint8:
            return values
        mean = torch.tensor(self.spec.mean, dtype=torch.float32)
        std = torch.tensor(self.spec.std, dtype=torch.float32)
        if patches:  # a patch is flattened channel first
            pixels = self.spec.patch_size[0] * self.spec.patch_size[1]
            mean, std = mean.repeat_interleave(pixels), std.repeat_interleave(pixels)
        else:
            mean, std = mean[:, None, None], std[:, None, None]
        return (values * std + mean) * 255

    def share_inputs(self, plan: SegmentPlan, rank: int, narrow: bool = False) -> tuple[TensorSpec, ...]:
        patches = plan.partition.patch_count(rank)
        return (TensorSpec(PATCHES, (BATCH_AXIS, patches, self.spec.patch_dim), PIXELS_DTYPE if narrow else "float32"),)

    def share(self, tensors: dict[str, torch.Tensor], plan: SegmentPlan, rank: int) -> dict[str, torch.Tensor]:
        return {PATCHES: self.raw_pixels(own_patches(tensors[IMAGES], self.spec, plan.partition, rank), patches=True)}

    def model_inputs(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {IMAGES: self.raw_pixels(tensors[IMAGES])}


@dataclass(frozen=True)
class Text(Modality):
    """A text model built for ``sequence_length`` positions: ids and mask (B, n) INT64 in, n <= N;
    (B, classes) or per-position (B, N, V | D) logits out."""

    kind: ClassVar[str] = "text"
    spec_class: ClassVar[type] = TextSpec
    records_length: ClassVar[bool] = True
    spec: TextSpec
    length: int

    @property
    def num_tokens(self) -> int:
        return self.length

    @property
    def sequence_length(self) -> int:
        return self.length

    @property
    def causal(self) -> bool:
        return self.spec.causal

    @property
    def per_position(self) -> bool:
        return self.spec.per_position_head

    @classmethod
    def recorded(cls, spec, sequence_length: int | None) -> Text:
        if sequence_length is None:
            raise UsageError("a text model record needs a sequence length")
        return cls(spec, sequence_length)

    @classmethod
    def built_for(cls, spec, num_tokens: int) -> Text:
        return cls(spec, num_tokens)

    def request_inputs(self, length: int | None = None) -> tuple[TensorSpec, ...]:
        return text_request_inputs(length or self.length)

    def output_shape(self, length: int | None = None) -> tuple[int, ...]:
        return self.spec.output_shape(length or self.length)

    def example_inputs(self, batch: int, seed: int = 0, positions: int | None = None) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.spec.vocab_size, (batch, positions or self.length), generator=generator)
        return {INPUT_IDS: ids, ATTENTION_MASK: torch.ones_like(ids)}

    def request_positions(self, tensors: dict[str, torch.Tensor]) -> int | None:
        ids = tensors.get(INPUT_IDS)
        if ids is None or ids.dim() != 2 or ids.shape[1] < 1:
            shape = None if ids is None else list(ids.shape)
            raise UsageError(f"input {INPUT_IDS!r} must be (B, n) with n >= 1 positions, got shape {shape}")
        return int(ids.shape[1])

    def record_fields(self) -> dict:
        return {"kind": self.kind, "sequence_length": self.length}

    def share_inputs(self, plan: SegmentPlan, rank: int, narrow: bool = False) -> tuple[TensorSpec, ...]:
        n_p, remote = plan.partition.sizes[rank], self._remote_segments(plan, rank)
        own = tuple(TensorSpec(name, (BATCH_AXIS, n_p), "int64") for name in (INPUT_IDS, ATTENTION_MASK))
        return own + ((TensorSpec(REMOTE_SIZES, (BATCH_AXIS, remote), "float32"),) if remote else ())

    def share(self, tensors: dict[str, torch.Tensor], plan: SegmentPlan, rank: int) -> dict[str, torch.Tensor]:
        share = text_share(plan, rank, self.causal, tensors[INPUT_IDS], tensors[ATTENTION_MASK])
        own = {INPUT_IDS: share.input_ids, ATTENTION_MASK: share.attention_mask}
        return own if share.remote_sizes is None else {**own, REMOTE_SIZES: share.remote_sizes}

    def _remote_segments(self, plan: SegmentPlan, rank: int) -> int:
        """m, the remote segments rank ``rank`` attends to."""
        return sum(len(plan.segment_sizes[q]) for q in plan.attended_ranks(rank, self.causal))


#: Every modality by the ``kind`` a manifest records.
MODALITIES: dict[str, type[Modality]] = {Vision.kind: Vision, Text.kind: Text}
