"""Model descriptions (:class:`ViTSpec`, :class:`TextSpec`), the internal layouts (:class:`PrismViT`,
:class:`PrismText`) and adapters (timm, the MNIST checkpoint, Hugging Face transformers: an optional extra)."""

from .adapters import (
                       CheckpointMismatchError,
                       UnsupportedModelError,
                       from_mnist_checkpoint,
                       from_timm,
                       load_model,
                       spec_from_timm,
                       timm_spec,
                       weights_hash,
)
from .spec import BlockSpec, ViTSpec
from .text import PrismText
from .text_adapters import MissingDependencyError, from_hf, load_text_model, spec_from_hf, text_spec
from .text_spec import TextSpec
from .vit import MEANS_SOURCES, MeansSource, PrismBlock, PrismViT

__all__ = [
    "CheckpointMismatchError", "UnsupportedModelError", "ViTSpec", "PrismViT", "PrismBlock", "MeansSource",
    "MEANS_SOURCES", "from_timm", "from_mnist_checkpoint", "load_model", "spec_from_timm", "timm_spec", "weights_hash",
    "BlockSpec", "TextSpec", "PrismText", "MissingDependencyError", "from_hf", "load_text_model", "spec_from_hf",
    "text_spec",
]
