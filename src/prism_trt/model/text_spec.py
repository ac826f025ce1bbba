"""`TextSpec`: the shape of a BERT- or GPT-2-style text transformer, independent of its weights.

The block fields come from :class:`~prism_trt.model.spec.BlockSpec`, like the ViT's, so one
:class:`~prism_trt.model.vit.PrismAttention` / ``Mlp`` / ``PrismBlock`` serves both families.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .spec import BlockSpec

#: bert: post-norm encoder, bidirectional, [CLS] first; gpt2: pre-norm decoder, causal.
TEXT_FAMILIES = ("bert", "gpt2")
#: classifier: pooler on [CLS] + linear (BERT sequence classification); lm: final norm + tied
#: language-model head on every position (GPT-2); features: the last hidden states.
TEXT_HEADS = ("classifier", "lm", "features")


@dataclass(frozen=True)
class TextSpec(BlockSpec):
    """Everything the core, export and accounting code need to know about a text transformer.

    name: model name (a known config name or the user's), for manifests and reports.
    family: "bert" (post-norm blocks ``x = LN(x + Attn(x))``, bidirectional, padding mask) or
        "gpt2" (pre-norm blocks ``x = x + Attn(LN(x))``, causal).
    vocab_size / max_positions / type_vocab_size: embedding tables (token types: BERT only, else 0).
    num_prefix_tokens: tokens that are never averaged into a segment mean ([CLS] for BERT, as a
        ViT's prefix token; 0 for GPT-2).
    embed_dim, depth, num_heads, head_dim, mlp_hidden_dim, mlp_act, norm_eps, qkv_bias: the block
        fields of BlockSpec.
    head: "classifier", "lm" or "features" (see TEXT_HEADS). num_classes: classifier outputs
        (0 unless head is "classifier").
    """

    name: str
    family: str
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    num_prefix_tokens: int
    head: str
    num_classes: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.family not in TEXT_FAMILIES:
            raise UsageError(f"family must be one of {TEXT_FAMILIES}, got {self.family!r}")
        if self.head not in TEXT_HEADS:
            raise UsageError(f"head must be one of {TEXT_HEADS}, got {self.head!r}")
        if (self.head == "classifier") != (self.num_classes > 0):
            raise UsageError(f"num_classes must be > 0 exactly for a classifier head, got {self.num_classes} "
                             f"with head {self.head!r}")
        if self.head == "classifier" and self.num_prefix_tokens < 1:
            raise UsageError("a classifier head reads the [CLS] token: num_prefix_tokens must be >= 1")
        if self.causal and self.num_prefix_tokens:
            raise UsageError("a causal model has no prefix tokens ([CLS] would see nothing but itself)")

    def output_shape(self, seq_len: int) -> tuple[int, ...]:
        """One sequence's output: (classes,) from [CLS], or (N, V) logits / (N, D) features per position."""
        if not self.per_position_head:
            return (self.num_classes,)
        return (seq_len, self.vocab_size if self.head == "lm" else self.embed_dim)

    @property
    def per_position_head(self) -> bool:
        """The head answers every position (an LM head or features), not only [CLS]: it needs every
        rank's final hidden states, where a classifier needs only rank 0's."""
        return self.head != "classifier"

    @property
    def causal(self) -> bool:
        """Whether a position may attend only to itself and earlier positions."""
        return self.family == "gpt2"

    @property
    def post_norm(self) -> bool:
        """BERT's blocks normalise after the residual add; GPT-2's (like a ViT's) before."""
        return self.family == "bert"
