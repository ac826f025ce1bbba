"""What a stage is to everything after the exporter: its name, kind and named inputs / outputs.

The exporter writes stages, the build lists them in the manifest, and the runtime binds their
tensors by these names; the names live here so the runtime does not depend on the exporter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .base import TensorSpec

# Tensor names of the stage I/O (prism.md section 5).
TOKENS, NEXT_TOKENS, REMOTE_MEANS, MEANS, IMAGES, LOGITS = (
    "tokens", "next_tokens", "remote_means", "means", "images", "logits")
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
