"""The model a build is for, as its manifest records it (``manifest.json``'s ``model`` field):
its source, spec, weights digest and kind (a ViT's images or a text model's ids and mask in).
Read and written only through :class:`~prism_trt.engines.manifest.Manifest`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..model.spec import ViTSpec
from ..model.text_spec import TextSpec
from .base import TensorSpec
from .json_record import Fields
from .modality import MODALITIES, Modality, Vision

MODEL_KINDS = tuple(MODALITIES)


@dataclass(frozen=True)
class ModelRecord:
    """The model a build is for. ``kind`` "vit" (images in) or "text" (INT64 ids and attention mask
    in, every sequence padded to the build's ``sequence_length``: the plan is made for that N);
    :attr:`modality` answers what differs between the two."""

    source: dict  # {"timm": name, "pretrained": false}, {"checkpoint": path, "sha256": ...} or {"text": name, ...}
    spec: ViTSpec | TextSpec
    weights_sha256: str
    kind: str = "vit"
    sequence_length: int | None = None
    modality: Modality = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", Modality.of(self.kind, self.spec, self.sequence_length))

    @classmethod
    def of(cls, source: dict, modality: Modality, weights_sha256: str) -> ModelRecord:
        """The record of a build of ``modality``."""
        return cls(source, modality.spec, weights_sha256, modality.kind, modality.sequence_length)

    @property
    def num_tokens(self) -> int:
        """N, the positions a plan partitions: the ViT's tokens or the text build's sequence length."""
        return self.modality.num_tokens

    @property
    def causal(self) -> bool:
        """A causal text model: rank p reads only the means of ranks before it."""
        return self.modality.causal

    @property
    def head_reads_all_positions(self) -> bool:
        """The head runs on rank 0 over every position (a per-position text head), so the ranks'
        final hidden states are gathered to rank 0 after the last block; else rank 0's own suffice."""
        return self.modality.per_position

    @property
    def output_shape(self) -> tuple[int, ...]:
        """One request item's logits: (classes,), or a per-position text head's (N, V | D)."""
        return self.modality.output_shape()

    def request_inputs(self) -> tuple[TensorSpec, ...]:
        """The named tensors one request brings (images, or ids and attention mask)."""
        return self.modality.request_inputs()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "spec": self.spec.to_dict(), "weights_sha256": self.weights_sha256,
                **self.modality.record_fields()}

    @classmethod
    def parse(cls, fields: Fields) -> ModelRecord:
        kind = fields.get("kind", str, optional=True) or Vision.kind
        if kind not in MODALITIES:
            raise fields.fail("kind", f"expected one of {MODEL_KINDS}, found {kind!r}")
        try:
            spec = MODALITIES[kind].spec_class.from_dict(fields.get("spec", dict))
        except (TypeError, ValueError, KeyError) as error:
            raise fields.error(f"{fields.where}.spec: not a model description ({error})") from None
        length = fields.integer("sequence_length", minimum=1, optional=not MODALITIES[kind].records_length)
        return cls(fields.get("source", dict), spec, fields.get("weights_sha256", str), kind, length)
