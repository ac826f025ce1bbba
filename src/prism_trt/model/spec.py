"""`ViTSpec`: the shape of a Vision Transformer, independent of where its weights came from; its block
fields are a `BlockSpec`, shared with the text models' `TextSpec`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from ..errors import UsageError

MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
POOLINGS = ("token", "token_distilled", "avg")


@dataclass(frozen=True)
class BlockSpec:
    """The fields one Prism block reads, shared by every model family (ViTSpec, TextSpec), so that
    one PrismAttention / PrismBlock serves them all.

    embed_dim: token width D. depth: number of transformer blocks.
    num_heads / head_dim: H and d_h; the attention width H*d_h need not equal D.
    mlp_hidden_dim / mlp_act: width and activation of the block MLP.
    norm_eps: LayerNorm epsilon, shared by every norm of the model.
    qkv_bias: whether the Q, K, V projections have a bias.
    """

    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden_dim: int
    mlp_act: str
    norm_eps: float
    qkv_bias: bool

    def __post_init__(self) -> None:
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise UsageError(f"mlp_act must be one of {MLP_ACTIVATIONS}, got {self.mlp_act!r}")

    @property
    def attn_dim(self) -> int:
        """D_a = H * d_h, the width of queries, keys and values."""
        return self.num_heads * self.head_dim

    #: Fields that JSON turns into lists and from_dict turns back into tuples.
    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[SpecT], data: dict) -> SpecT:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        missing = sorted(fields - set(data))
        if unknown or missing:
            raise UsageError(f"not a {cls.__name__}: missing fields {missing}, unknown fields {unknown}")
        values = dict(data)
        for key in cls._TUPLE_FIELDS:
            values[key] = tuple(values[key])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


SpecT = TypeVar("SpecT", bound=BlockSpec)


@dataclass(frozen=True)
class ViTSpec(BlockSpec):
    """Everything the export, runtime and accounting code needs to know about a ViT.

    name: model name (timm name or checkpoint stem), for manifests and reports.
    img_size / patch_size: (height, width) of the input image and of one patch.
    in_chans: image channels C.
    num_prefix_tokens: CLS (+ distillation / register) tokens placed before the patches.
    embed_dim: token width D.
    depth: number of pre-norm transformer blocks.
    num_heads / head_dim: H and d_h; the attention width H*d_h need not equal D.
    mlp_hidden_dim / mlp_act: width and activation of the block MLP.
    norm_eps: LayerNorm epsilon, shared by every norm of the model.
    qkv_bias: whether the QKV projection has a bias.
    pre_norm: a LayerNorm right after the position embedding (timm `norm_pre`, CLIP-style).
    final_norm: LayerNorm on tokens after the last block (timm `norm`).
    pool: "token" (first prefix token), "token_distilled" (mean of the CLS and distillation
        heads, DeiT distilled) or "avg" (mean of patch tokens).
    fc_norm: LayerNorm on the pooled feature before the classifier (timm `fc_norm`,
        the MNIST model's `mlp_head.0`).
    num_classes: classifier outputs.
    mean / std: per-channel input normalisation the weights expect.
    """

    name: str
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    num_prefix_tokens: int
    pre_norm: bool
    final_norm: bool
    pool: str
    fc_norm: bool
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("img_size", "patch_size", "mean", "std")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in POOLINGS:
            raise UsageError(f"pool must be one of {POOLINGS}, got {self.pool!r}")
        for axis, (image, patch) in enumerate(zip(self.img_size, self.patch_size)):
            if patch <= 0 or image % patch:
                raise UsageError(f"image size {self.img_size} is not a multiple of patch size {self.patch_size} "
                                 f"(axis {axis})")
        if self.pool == "token_distilled" and self.num_prefix_tokens < 2:
            raise UsageError("pool 'token_distilled' needs a CLS and a distillation token")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UsageError(f"mean/std need {self.in_chans} entries, got {self.mean} / {self.std}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        """N: prefix tokens plus patch tokens."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: C * ph * pw."""
        return self.in_chans * self.patch_size[0] * self.patch_size[1]
