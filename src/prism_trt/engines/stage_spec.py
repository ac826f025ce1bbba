"""What a stage is to everything after the exporter: its name, kind and named inputs / outputs.

The exporter writes stages, the build lists them in the manifest, and the runtime binds their
tensors by these names; the names live here so the runtime does not depend on the exporter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .base import BATCH_AXIS, TensorSpec

# Tensor names of the stage I/O (prism.md section 5).
TOKENS, NEXT_TOKENS, REMOTE_MEANS, MEANS, IMAGES, LOGITS = (
    "tokens", "next_tokens", "remote_means", "means", "images", "logits")
# A ViT rank's embed stage reads its own patches (raw pixels on the [0, 255] scale, normalised inside).
PATCHES = "patches"
# Text models: the request's INT64 inputs, (B, N) each; a rank's stages read its own positions of
# them (B, n_p), and the valid tokens of every remote segment they attend to (B, m) float32.
INPUT_IDS, ATTENTION_MASK, REMOTE_SIZES = "input_ids", "attention_mask", "remote_sizes"
STAGE_KINDS = ("embed", "block", "head", "model")


@dataclass(frozen=True)
class StageSpec:
    """Name, kind and I/O of one stage; ``block`` is the block index for block stages."""

    name: str
    kind: str  # "embed" | "block" | "head" | "model"
    block: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "block": self.block,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSpec:
        return cls(data["name"], data["kind"], data["block"], tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in data["outputs"]))


def image_request_inputs(in_chans: int, img_size: tuple[int, int]) -> tuple[TensorSpec]:
    """What a ViT request brings: images (B, C, H, W), float32 already normalised (the model's mean
    and std) or uint8 raw pixels (:meth:`~prism_trt.engines.modality.Vision.dtypes`)."""
    return (TensorSpec(IMAGES, (BATCH_AXIS, in_chans, *img_size), "float32"),)


def text_request_inputs(seq_len: int) -> tuple[TensorSpec, TensorSpec]:
    """What a text request brings: ids and attention mask (1 = token, 0 = padding), (B, N) INT64 each."""
    return (TensorSpec(INPUT_IDS, (BATCH_AXIS, seq_len), "int64"),
            TensorSpec(ATTENTION_MASK, (BATCH_AXIS, seq_len), "int64"))
