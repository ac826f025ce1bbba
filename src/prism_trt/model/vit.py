"""The ViT modules prism-trt runs, export and account for; the one Prism attention definition.

Blocks read like timm's: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. The only Prism
difference is visible in :class:`PrismAttention`: keys/values also come from the other ranks'
segment means, and each mean's logit gets the remote bias: ``+ ln(s)`` for the ``s`` tokens it
stands for (and, in text models, a mask).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .spec import BlockSpec, ViTSpec

MeansSource = Literal["ln1", "input"]
MEANS_SOURCES: tuple[str, ...] = ("ln1", "input")


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[name]


def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """Images (B, C, H, W) -> patches (B, gh * gw, C * ph * pw), row-major over the patch grid,
    each patch flattened in (c, ph, pw) order: the order of the tokens and of the projection's inputs."""
    B, C, H, W = images.shape
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    patches = images.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(B, gh * gw, C * ph * pw)


def patch_range(spec: ViTSpec, start: int, stop: int) -> tuple[int, int]:
    """[first, end) of the patches (in patchify order) that tokens ``[start, stop)`` hold."""
    prefix = spec.num_prefix_tokens
    return max(start, prefix) - prefix, max(stop, prefix) - prefix


class PatchEmbed(nn.Module):
    """Patches -> patch tokens as a Linear on flattened (c, ph, pw) patches.

    Equal to timm's strided Conv2d, but lets a rank project only its own patches.
    """

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.proj = nn.Linear(spec.patch_dim, spec.embed_dim)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.spec.patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class PixelNormalisation(nn.Module):
    """Raw pixels on the [0, 255] scale -> what the weights expect: ``(x / 255 - mean) / std`` per
    channel. It runs inside the engines, so a request's pixels cross the wire as one byte each."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        pixels_per_patch = spec.patch_size[0] * spec.patch_size[1]
        mean, std = torch.tensor(spec.mean, dtype=torch.float32), torch.tensor(spec.std, dtype=torch.float32)
        # a patch is flattened channel first: each channel's value repeated over its ph * pw pixels
        self.register_buffer("patch_mean", mean.repeat_interleave(pixels_per_patch), persistent=False)
        self.register_buffer("patch_std", std.repeat_interleave(pixels_per_patch), persistent=False)
        self.register_buffer("image_mean", mean[:, None, None], persistent=False)
        self.register_buffer("image_std", std[:, None, None], persistent=False)

    def patches(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, n, C * ph * pw) raw patches, normalised."""
        return (raw / 255 - self.patch_mean) / self.patch_std

    def images(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw images, normalised."""
        return (raw / 255 - self.image_mean) / self.image_std


class Embed(nn.Module):
    """Tokens ``[start, stop)`` of the embedded sequence: prefix tokens, patches, position, pre-norm."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.prefix_tokens = nn.Parameter(torch.zeros(1, spec.num_prefix_tokens, spec.embed_dim))
        # Prefix positions are zero for models whose position embedding skips them (timm no_embed_class).
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_tokens, spec.embed_dim))
        self.norm_pre = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps) if spec.pre_norm else nn.Identity()

    def forward(self, images: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.spec.num_tokens if stop is None else stop
        return self.from_patches(self.patch_embed.patchify(images)[:, slice(*patch_range(self.spec, start, stop))],
                                 start, stop)

    def from_patches(self, patches: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Tokens ``[start, stop)`` from the patches they hold (B, n, C * ph * pw) (:func:`patch_range`)."""
        prefix = self.spec.num_prefix_tokens
        B = patches.shape[0]
        parts = []
        if start < prefix:
            parts.append(self.prefix_tokens[:, start:min(stop, prefix)].expand(B, -1, -1))
        if stop > prefix:
            parts.append(self.patch_embed(patches))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.norm_pre(x + self.pos_embed[:, start:stop])


class PrismAttention(nn.Module):
    """Multi-head attention of own tokens over own tokens plus remote segment means.

    dim: token width D. num_heads / head_dim: H and d_h (H*d_h may differ from D).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.attn_dim, dim)

    def _heads(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        B, n, _ = x.shape
        return x.reshape(B, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(
        self,
        x_norm: torch.Tensor,
        remote_norm: torch.Tensor | None = None,
        remote_bias: torch.Tensor | None = None,
        local_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_norm: (B, n, D) normed own tokens; remote_norm: (B, m, D) normed remote means.
        Returns (B, n, D).

        remote_bias: the additive logit bias over the remote means, broadcast to the (B, H, n, m)
        logits: ``ln(s_j)`` for a mean standing for ``s_j`` tokens, plus a mask where a query may
        not see it. A ViT's depends only on the plan, so it passes the (m,) vector of ``ln(s)``;
        a text model's follows each request's padding (and causality), so it passes (B, 1, n, m),
        ``MASKED`` where a segment is all padding or later than the query. Required with
        remote_norm. local_bias, (B, 1, n, n) or None, is the same over own keys (0 or masked)."""
        B, n, _ = x_norm.shape
        q, k, v = self._heads(self.qkv(x_norm), 3)  # each (B, H, n, d_h)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, n, n)
        if local_bias is not None:
            logits = logits + local_bias
        if remote_norm is not None:
            kv_weight = self.qkv.weight[self.attn_dim:]
            kv_bias = None if self.qkv.bias is None else self.qkv.bias[self.attn_dim:]
            k_remote, v_remote = self._heads(F.linear(remote_norm, kv_weight, kv_bias), 2)  # (B, H, m, d_h)
            # A mean standing for s tokens weighs like s copies of one key: logits += ln(s).
            remote_logits = (q * self.scale) @ k_remote.transpose(-2, -1) + remote_bias
            logits = torch.cat([logits, remote_logits], dim=-1)  # (B, H, n, n + m)
            v = torch.cat([v, v_remote], dim=2)
        attn = logits.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, n, self.attn_dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PrismBlock(nn.Module):
    """Pre-norm transformer block over one rank's tokens (ViT, GPT-2)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        D = spec.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=spec.norm_eps)
        self.attn = PrismAttention(D, spec.num_heads, spec.head_dim, spec.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=spec.norm_eps)
        self.mlp = Mlp(D, spec.mlp_hidden_dim, spec.mlp_act)

    def means_source_tokens(self, x: torch.Tensor, means_source: MeansSource) -> torch.Tensor:
        """What this block's remote means average: LN1(x) (keys/values are affine in it) or x."""
        return self.norm1(x) if means_source == "ln1" else x

    def forward(
        self,
        x: torch.Tensor,
        remote_means: torch.Tensor | None = None,
        remote_bias: torch.Tensor | None = None,
        means_source: MeansSource = "ln1",
        local_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, n, D) own tokens; remote_means (B, m, D) and remote_bias as in
        :meth:`PrismAttention.forward`; local_bias over own keys (text masks), or None."""
        remote_norm = None
        if remote_means is not None:
            remote_norm = remote_means if means_source == "ln1" else self.norm1(remote_means)
        x = x + self.attn(self.norm1(x), remote_norm, remote_bias, local_bias)
        x = x + self.mlp(self.norm2(x))
        return x


class ClassifierHead(nn.Module):
    """Final norm -> pooling -> fc norm -> classifier (timm ``forward_head``)."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        D = spec.embed_dim
        self.spec = spec
        self.norm = nn.LayerNorm(D, eps=spec.norm_eps) if spec.final_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=spec.norm_eps) if spec.fc_norm else nn.Identity()
        self.head = nn.Linear(D, spec.num_classes)
        self.head_dist = nn.Linear(D, spec.num_classes) if spec.pool == "token_distilled" else None

    @property
    def tokens_needed(self) -> int:
        """How many leading tokens the head reads (all of them for average pooling)."""
        return {"token": 1, "token_distilled": 2, "avg": self.spec.num_tokens}[self.spec.pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.spec.pool == "avg":
            return self.head(self.fc_norm(x[:, self.spec.num_prefix_tokens:].mean(dim=1)))
        logits = self.head(self.fc_norm(x[:, 0]))
        if self.head_dist is not None:
            logits = (logits + self.head_dist(self.fc_norm(x[:, 1]))) / 2
        return logits


class PrismViT(nn.Module):
    """A ViT in prism-trt's internal weight layout; ``forward`` is the unpartitioned reference."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.embed = Embed(spec)
        self.blocks = nn.ModuleList(PrismBlock(spec) for _ in range(spec.depth))
        self.head = ClassifierHead(spec)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
