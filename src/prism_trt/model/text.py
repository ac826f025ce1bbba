"""BERT and GPT-2 in prism-trt's internal weight layout, built from the ViT's Prism parts.

GPT-2's block *is* the ViT's :class:`PrismBlock` (pre-norm). BERT's differs only in where the
norms sit: ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``. Both use the one
:class:`PrismAttention`; what text adds is masking, passed in as additive logit biases:
padded keys and (GPT-2) keys later than the query get :data:`MASKED`, and a remote segment mean
standing for ``s`` valid tokens gets ``ln(s)`` (``MASKED`` when ``s = 0``), see
:func:`attention_bias`: the attention's ``local_bias`` and ``remote_bias``. The partitioned forward
lives in ``core/text_rank.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .text_spec import TextSpec
from .vit import MeansSource, Mlp, PrismAttention, PrismBlock

#: The additive logit of a masked key. Finite, like Hugging Face's mask, so that a query with no
#: visible key at all (a padded position) gets a uniform, finite softmax instead of NaN.
MASKED = torch.finfo(torch.float32).min


def attention_bias(key_log_weights: torch.Tensor, key_last_positions: torch.Tensor,
                   query_positions: torch.Tensor, causal: bool) -> torch.Tensor:
    """Additive logit bias (B, 1, n, m) of n queries over m keys.

    key_log_weights: (B, m) ``ln(s)`` of what each key stands for (0 for one valid token,
        ``ln(s)`` for a mean of ``s`` valid tokens) or :data:`MASKED` (padding, empty segment).
    key_last_positions: (m,) the last sequence position a key covers (a token: its own position;
        a segment: its last token). query_positions: (n,) the queries' sequence positions.
    causal: a key is visible to query ``t`` only if every position it covers is ``<= t``.
    """
    bias = key_log_weights[:, None, None, :].expand(-1, 1, len(query_positions), -1)
    if causal:
        future = key_last_positions[None, :] > query_positions[:, None]  # (n, m)
        bias = bias.masked_fill(future, MASKED)
    return bias


def token_log_weights(valid: torch.Tensor) -> torch.Tensor:
    """(B, n) bool -> 0 for valid tokens, :data:`MASKED` for padding."""
    return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, MASKED)


class TextEmbed(nn.Module):
    """Positions ``[start, start + n)``: word + global position (+ token type) embeddings (+ BERT's norm)."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        D = spec.embed_dim
        self.spec = spec
        self.word = nn.Embedding(spec.vocab_size, D)
        self.position = nn.Embedding(spec.max_positions, D)
        self.token_type = nn.Embedding(spec.type_vocab_size, D) if spec.type_vocab_size else None
        self.norm = nn.LayerNorm(D, eps=spec.norm_eps) if spec.post_norm else nn.Identity()

    def forward(self, input_ids: torch.Tensor, start: int = 0, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """input_ids (B, n) of positions start.. start+n-1 -> (B, n, D); token types default to 0."""
        B, n = input_ids.shape
        if start + n > self.spec.max_positions:
            raise UsageError(f"positions up to {start + n} but {self.spec.name} has {self.spec.max_positions}")
        positions = torch.arange(start, start + n, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)
        if self.token_type is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type(types)
        return self.norm(x)


class PostNormBlock(nn.Module):
    """BERT's block over one rank's tokens: ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``.

    Keys and values are affine in the block input itself, so the mean of the input *is* the
    mean of the keys/values: the ``ln1`` and ``input`` readings of prism.md section 3 coincide and
    ``means_source`` is accepted for a uniform interface but changes nothing.
    """

    def __init__(self, spec: TextSpec):
        super().__init__()
        D = spec.embed_dim
        self.attn = PrismAttention(D, spec.num_heads, spec.head_dim, spec.qkv_bias)
        self.norm1 = nn.LayerNorm(D, eps=spec.norm_eps)
        self.mlp = Mlp(D, spec.mlp_hidden_dim, spec.mlp_act)
        self.norm2 = nn.LayerNorm(D, eps=spec.norm_eps)

    def means_source_tokens(self, x: torch.Tensor, means_source: MeansSource) -> torch.Tensor:
        return x

    def forward(
        self,
        x: torch.Tensor,
        remote_means: torch.Tensor | None = None,
        remote_bias: torch.Tensor | None = None,
        means_source: MeansSource = "input",
        local_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, remote_means, remote_bias, local_bias))
        x = self.norm2(x + self.mlp(x))
        return x


class PrismText(nn.Module):
    """A BERT or GPT-2 in prism-trt's internal layout; ``forward`` is the unpartitioned reference.

    Heads (``spec.head``): ``lm`` = final norm + the word embedding as output projection (tied, as
    in GPT-2), on every position; ``classifier`` = ``tanh(pooler(h_CLS))`` + linear, on [CLS];
    ``features`` = the last hidden states (after GPT-2's final norm).
    """

    def __init__(self, spec: TextSpec):
        super().__init__()
        D = spec.embed_dim
        self.spec = spec
        self.embed = TextEmbed(spec)
        block = PostNormBlock if spec.post_norm else PrismBlock
        self.blocks = nn.ModuleList(block(spec) for _ in range(spec.depth))
        self.final_norm = nn.Identity() if spec.post_norm else nn.LayerNorm(D, eps=spec.norm_eps)
        classifier = spec.head == "classifier"
        self.pooler = nn.Linear(D, D) if classifier else None
        self.classifier = nn.Linear(D, spec.num_classes) if classifier else None

    @property
    def reads_only_prefix(self) -> bool:
        """The head needs only position 0 ([CLS]), which rank 0 holds: no final gather."""
        return not self.spec.per_position_head

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, n, D) -> per-position outputs (B, n, V | D), or (B, classes) from x[:, 0]."""
        x = self.final_norm(x)
        if self.spec.head == "lm":
            return F.linear(x, self.embed.word.weight)
        if self.spec.head == "classifier":
            return self.classifier(torch.tanh(self.pooler(x[:, 0])))
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, N), attention_mask (B, N) of 1 = token / 0 = padding (default all 1)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        bias = attention_bias(token_log_weights(valid), positions, positions, self.spec.causal)
        x = self.embed(input_ids, 0, token_type_ids)
        for block in self.blocks:
            x = block(x, local_bias=bias)
        return self.forward_head(x)
