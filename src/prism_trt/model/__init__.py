"""Model description (:class:`ViTSpec`), the internal layout (:class:`PrismViT`) and adapters."""

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
from .spec import ViTSpec
from .vit import MEANS_SOURCES, MeansSource, PrismBlock, PrismViT

__all__ = [
    "CheckpointMismatchError", "UnsupportedModelError", "ViTSpec", "PrismViT", "PrismBlock", "MeansSource",
    "MEANS_SOURCES", "from_timm", "from_mnist_checkpoint", "load_model", "spec_from_timm", "timm_spec", "weights_hash",
]
