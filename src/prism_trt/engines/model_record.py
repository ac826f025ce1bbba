"""The model a build is for, as its manifest records it (``manifest.json``'s ``model`` field):
its source, spec, weights digest and kind (a ViT's images or a text model's ids and mask in).
Read and written only through :class:`~prism_trt.engines.manifest.Manifest`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..model.spec import ViTSpec
from ..model.text_spec import TextSpec
from .base import TensorSpec
from .json_record import Fields
from .stage_spec import image_request_inputs, text_request_inputs

MODEL_KINDS = ("vit", "text")


@dataclass(frozen=True)
class ModelRecord:
    """The model a build is for. ``kind`` "vit" (images in) or "text" (INT64 ids and attention mask
    in, every sequence padded to the build's ``sequence_length``: the plan is made for that N)."""

    source: dict  # {"timm": name, "pretrained": false}, {"checkpoint": path, "sha256": ...} or {"text": name, ...}
    spec: ViTSpec | TextSpec
    weights_sha256: str
    kind: str = "vit"
    sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise UsageError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if (self.kind == "text") != (self.sequence_length is not None):
            raise UsageError("a text model record needs a sequence length, a ViT record has none")

    @property
    def num_tokens(self) -> int:
        """N, the positions a plan partitions: the ViT's tokens or the text build's sequence length."""
        return self.sequence_length if self.kind == "text" else self.spec.num_tokens

    @property
    def causal(self) -> bool:
        """A causal text model: rank p reads only the means of ranks before it."""
        return self.kind == "text" and self.spec.causal

    @property
    def head_reads_all_positions(self) -> bool:
        """The head runs on rank 0 over every position (a per-position text head), so the ranks'
        final hidden states are gathered to rank 0 after the last block; else rank 0's own suffice."""
        return self.kind == "text" and self.spec.head != "classifier"

    @property
    def output_shape(self) -> tuple[int, ...]:
        """One request item's logits: (classes,), or a per-position text head's (N, V | D)."""
        if self.kind == "text":
            return self.spec.output_shape(self.sequence_length)
        return (self.spec.num_classes,)

    def request_inputs(self) -> tuple[TensorSpec, ...]:
        """The named tensors one request brings (images, or ids and attention mask)."""
        if self.kind == "text":
            return text_request_inputs(self.sequence_length)
        return image_request_inputs(self.spec.in_chans, self.spec.img_size)

    def to_dict(self) -> dict[str, Any]:
        record = {"source": self.source, "spec": self.spec.to_dict(), "weights_sha256": self.weights_sha256}
        if self.kind == "text":  # ViT records keep their layout, so their digests do not change
            record.update(kind=self.kind, sequence_length=self.sequence_length)
        return record

    @classmethod
    def parse(cls, fields: Fields) -> ModelRecord:
        kind = fields.get("kind", str, optional=True) or "vit"
        if kind not in MODEL_KINDS:
            raise fields.fail("kind", f"expected one of {MODEL_KINDS}, found {kind!r}")
        spec_class = TextSpec if kind == "text" else ViTSpec
        try:
            spec = spec_class.from_dict(fields.get("spec", dict))
        except (TypeError, ValueError, KeyError) as error:
            raise fields.error(f"{fields.where}.spec: not a model description ({error})") from None
        length = fields.integer("sequence_length", minimum=1, optional=kind == "vit")
        return cls(fields.get("source", dict), spec, fields.get("weights_sha256", str), kind, length)
