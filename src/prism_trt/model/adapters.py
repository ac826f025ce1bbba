"""Adapters from timm models and from the bundled (vit-pytorch style) MNIST checkpoint format
into :class:`PrismViT`, prism-trt's one internal weight layout."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingFileError, PrismError, UsageError
from .spec import ViTSpec
from .vit import PrismViT


class CheckpointMismatchError(PrismError, ValueError):
    """A checkpoint's keys or shapes do not match the expected format."""


class UnsupportedModelError(PrismError, ValueError):
    """A model uses a feature prism-trt does not partition (yet)."""


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _layer_scale(module: nn.Module, dim: int) -> torch.Tensor:
    """timm LayerScale gamma, or ones for Identity; folded into the preceding Linear."""
    if _is_identity(module):
        return torch.ones(dim)
    if hasattr(module, "gamma"):
        return module.gamma.detach()
    raise UnsupportedModelError(f"unsupported layer-scale module {type(module).__name__}")


def _activation_name(act: nn.Module) -> str:
    if isinstance(act, nn.ReLU):
        return "relu"
    if type(act).__name__ in ("GELU", "GELUTanh", "QuickGELU"):
        approximate = getattr(act, "approximate", "none")
        if type(act).__name__ == "GELUTanh" or approximate == "tanh":
            return "gelu_tanh"
        if type(act).__name__ == "GELU":
            return "gelu"
    raise UnsupportedModelError(f"unsupported MLP activation {type(act).__name__}")


def spec_from_timm(model: nn.Module, name: str | None = None) -> ViTSpec:
    """Describe a timm ``VisionTransformer`` (ViT, DeiT, DeiT-III; token or avg pooling)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError(f"global_pool {model.global_pool!r} is not supported (token or avg)")
    if not _is_identity(model.patch_embed.norm):
        raise UnsupportedModelError("patch-embedding norm is not supported")
    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    for label, module in (("q_norm", attn.q_norm), ("k_norm", attn.k_norm), ("attn.norm", getattr(attn, "norm", None)),
                          ("mlp.norm", getattr(mlp, "norm", None))):
        if not _is_identity(module):
            raise UnsupportedModelError(f"blocks with {label} are not supported")
    if not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2") or hasattr(mlp, "fc1_g"):
        raise UnsupportedModelError(f"MLP type {type(mlp).__name__} is not supported (plain fc1-act-fc2 only)")
    distilled = hasattr(model, "dist_token") and model.dist_token is not None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans = model.patch_embed.proj.in_channels
    return ViTSpec(
        name=name or cfg.get("architecture") or type(model).__name__,
        img_size=tuple(model.patch_embed.img_size),
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=in_chans,
        num_prefix_tokens=model.num_prefix_tokens,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        mlp_hidden_dim=mlp.fc1.out_features,
        mlp_act=_activation_name(mlp.act),
        norm_eps=block.norm1.eps,
        qkv_bias=attn.qkv.bias is not None,
        pre_norm=not _is_identity(model.norm_pre),
        final_norm=not _is_identity(model.norm),
        pool="token_distilled" if distilled else model.global_pool,
        fc_norm=not _is_identity(model.fc_norm),
        num_classes=model.num_classes,
        mean=tuple(cfg.get("mean", (0.5,) * in_chans)),
        std=tuple(cfg.get("std", (0.5,) * in_chans)),
    )


def from_timm(model: nn.Module, name: str | None = None) -> PrismViT:
    """Copy a timm VisionTransformer's weights into a :class:`PrismViT` (LayerScale folded)."""
    spec = spec_from_timm(model, name)
    out = PrismViT(spec)
    src, D = model, spec.embed_dim
    with torch.no_grad():
        conv = src.patch_embed.proj
        out.embed.patch_embed.proj.weight.copy_(conv.weight.reshape(D, -1))
        out.embed.patch_embed.proj.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(D))
        prefix = [t for t in (src.cls_token, getattr(src, "dist_token", None), src.reg_token) if t is not None]
        if prefix:
            out.embed.prefix_tokens.copy_(torch.cat(prefix, dim=1))
        if src.pos_embed is not None:
            start = spec.num_prefix_tokens if src.no_embed_class else 0
            out.embed.pos_embed[:, start:].copy_(src.pos_embed)
        if spec.pre_norm:
            out.embed.norm_pre.load_state_dict(src.norm_pre.state_dict())
        for theirs, ours in zip(src.blocks, out.blocks):
            ours.norm1.load_state_dict(theirs.norm1.state_dict())
            ours.norm2.load_state_dict(theirs.norm2.state_dict())
            ours.attn.qkv.load_state_dict(theirs.attn.qkv.state_dict())
            ours.mlp.fc1.load_state_dict(theirs.mlp.fc1.state_dict())
            for theirs_linear, ours_linear, scale in (
                (theirs.attn.proj, ours.attn.proj, _layer_scale(theirs.ls1, D)),
                (theirs.mlp.fc2, ours.mlp.fc2, _layer_scale(theirs.ls2, D)),
            ):
                ours_linear.weight.copy_(theirs_linear.weight * scale[:, None])
                ours_linear.bias.copy_(theirs_linear.bias * scale)
        if spec.final_norm:
            out.head.norm.load_state_dict(src.norm.state_dict())
        if spec.fc_norm:
            out.head.fc_norm.load_state_dict(src.fc_norm.state_dict())
        out.head.head.load_state_dict(src.head.state_dict())
        if out.head.head_dist is not None:
            out.head.head_dist.load_state_dict(src.head_dist.state_dict())
    return out.eval()


def create_timm(name: str, **kwargs) -> nn.Module:
    """A timm model with random init (nothing is downloaded), in eval mode."""
    import timm

    if name not in timm.list_models():
        raise UnsupportedModelError(f"unknown timm model {name!r}; e.g. vit_tiny_patch16_224, vit_small_patch16_224, "
                                    "deit_tiny_patch16_224")
    torch.manual_seed(kwargs.pop("seed", 0))
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def timm_spec(name: str) -> ViTSpec:
    """The spec of a timm model, without allocating its weights where timm allows it."""
    try:
        with torch.device("meta"):
            return spec_from_timm(create_timm(name), name)
    except RuntimeError as error:
        # timm before 1.0.10 or so calls .item() on a tensor in VisionTransformer.__init__ (the drop-path
        # schedule), which meta tensors refuse: build it for real then (slower, same spec).
        if "meta" not in str(error):
            raise
        return spec_from_timm(create_timm(name), name)


# --- the bundled MNIST checkpoint (vit-pytorch layout, prism.md section 9) -------------------

MNIST_FORMAT = dict(img_size=(28, 28), in_chans=1, num_heads=4, mean=(0.1307,), std=(0.3081,), norm_eps=1e-5)


def _expected_mnist_shapes(depth: int, D: int, patch_dim: int, N: int, attn_dim: int, hidden: int,
                           classes: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "pos_embedding": (1, N, D), "cls_token": (1, 1, D),
        "to_patch_embedding.1.weight": (D, patch_dim), "to_patch_embedding.1.bias": (D,),
        "mlp_head.0.weight": (D,), "mlp_head.0.bias": (D,),
        "mlp_head.1.weight": (classes, D), "mlp_head.1.bias": (classes,),
    }
    for i in range(depth):
        a, f = f"transformer.layers.{i}.0", f"transformer.layers.{i}.1"
        shapes.update({
            f"{a}.norm.weight": (D,), f"{a}.norm.bias": (D,),
            f"{a}.fn.to_qkv.weight": (3 * attn_dim, D),
            f"{a}.fn.to_out.0.weight": (D, attn_dim), f"{a}.fn.to_out.0.bias": (D,),
            f"{f}.norm.weight": (D,), f"{f}.norm.bias": (D,),
            f"{f}.fn.net.0.weight": (hidden, D), f"{f}.fn.net.0.bias": (hidden,),
            f"{f}.fn.net.3.weight": (D, hidden), f"{f}.fn.net.3.bias": (D,),
        })
    return shapes


def _check_state_dict(state: dict, expected: dict[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}"
                  for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not match the MNIST ViT checkpoint format (prism.md section 9):"]
        if missing:
            lines.append(f"  missing keys: {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {', '.join(unexpected)}")
        if mismatched:
            lines.append("  mismatched shapes: " + "; ".join(mismatched))
        raise CheckpointMismatchError("\n".join(lines))


def spec_from_mnist_state(state: dict, name: str = "vit_mnist") -> ViTSpec:
    """Infer the spec from tensor shapes; what weights cannot tell comes from MNIST_FORMAT."""
    for key in ("cls_token", "to_patch_embedding.1.weight", "to_patch_embedding.1.bias",
                "pos_embedding", "mlp_head.1.weight", "transformer.layers.0.0.fn.to_qkv.weight",
                "transformer.layers.0.1.fn.net.0.weight"):
        if key not in state:
            raise CheckpointMismatchError(f"not an MNIST ViT checkpoint: missing key {key!r}")
    D = state["cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")})
    h, w = MNIST_FORMAT["img_size"]
    N = state["pos_embedding"].shape[1]
    patch_dim = state["to_patch_embedding.1.weight"].shape[1]
    ps = int(round((patch_dim / MNIST_FORMAT["in_chans"]) ** 0.5))
    if (h // ps) * (w // ps) + 1 != N:
        raise CheckpointMismatchError(f"pos_embedding has {N} tokens but {h}x{w} images with {ps}x{ps} patches give "
                                      f"{(h // ps) * (w // ps) + 1}")
    attn_dim = state["transformer.layers.0.0.fn.to_qkv.weight"].shape[0] // 3
    heads = MNIST_FORMAT["num_heads"]
    return ViTSpec(
        name=name, img_size=(h, w), patch_size=(ps, ps), in_chans=MNIST_FORMAT["in_chans"], num_prefix_tokens=1,
        embed_dim=D, depth=depth, num_heads=heads, head_dim=attn_dim // heads,
        mlp_hidden_dim=state["transformer.layers.0.1.fn.net.0.weight"].shape[0], mlp_act="relu",
        norm_eps=MNIST_FORMAT["norm_eps"], qkv_bias=False, pre_norm=False, final_norm=False, pool="token",
        fc_norm=True, num_classes=state["mlp_head.1.weight"].shape[0],
        mean=MNIST_FORMAT["mean"], std=MNIST_FORMAT["std"],
    )


def from_mnist_checkpoint(path: str | Path) -> PrismViT:
    """Load the bundled vit-pytorch style checkpoint (``weights_only=True``, mapped to CPU)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    with open(path, "rb") as stream:
        magic = stream.read(4)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol byte 0x80)
    if not (magic == b"PK\x03\x04" or magic[:1] == b"\x80"):
        raise CheckpointMismatchError(f"{path} is not a checkpoint: a torch checkpoint is a zip archive or a "
                                      f"pickle, this file starts with {magic!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointMismatchError(f"{path} is not a plain state_dict of tensors (refused by weights_only "
                                      f"loading): {str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001  (a damaged file fails anywhere in the unpickler or the zip reader)
        raise CheckpointMismatchError(f"{path} is not a readable torch checkpoint: "
                                      f"{type(error).__name__}: {error}") from None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path} holds a {type(state).__name__}, expected a state_dict")
    spec = spec_from_mnist_state(state, name=path.stem)
    _check_state_dict(state, _expected_mnist_shapes(spec.depth, spec.embed_dim, spec.patch_dim, spec.num_tokens,
                                                    spec.attn_dim, spec.mlp_hidden_dim, spec.num_classes), path)
    out = PrismViT(spec)
    ps, C, D = spec.patch_size[0], spec.in_chans, spec.embed_dim
    with torch.no_grad():
        # vit-pytorch flattens patches as (p1 p2 c); ours is (c p1 p2), like timm's conv weight.
        weight = state["to_patch_embedding.1.weight"].reshape(D, ps, ps, C).permute(0, 3, 1, 2)
        out.embed.patch_embed.proj.weight.copy_(weight.reshape(D, -1))
        out.embed.patch_embed.proj.bias.copy_(state["to_patch_embedding.1.bias"])
        out.embed.prefix_tokens.copy_(state["cls_token"])
        out.embed.pos_embed.copy_(state["pos_embedding"])
        for i, block in enumerate(out.blocks):
            a, f = f"transformer.layers.{i}.0", f"transformer.layers.{i}.1"
            block.norm1.weight.copy_(state[f"{a}.norm.weight"]), block.norm1.bias.copy_(state[f"{a}.norm.bias"])
            block.attn.qkv.weight.copy_(state[f"{a}.fn.to_qkv.weight"])
            block.attn.proj.weight.copy_(state[f"{a}.fn.to_out.0.weight"])
            block.attn.proj.bias.copy_(state[f"{a}.fn.to_out.0.bias"])
            block.norm2.weight.copy_(state[f"{f}.norm.weight"]), block.norm2.bias.copy_(state[f"{f}.norm.bias"])
            block.mlp.fc1.weight.copy_(state[f"{f}.fn.net.0.weight"])
            block.mlp.fc1.bias.copy_(state[f"{f}.fn.net.0.bias"])
            block.mlp.fc2.weight.copy_(state[f"{f}.fn.net.3.weight"])
            block.mlp.fc2.bias.copy_(state[f"{f}.fn.net.3.bias"])
        out.head.fc_norm.weight.copy_(state["mlp_head.0.weight"])
        out.head.fc_norm.bias.copy_(state["mlp_head.0.bias"])
        out.head.head.weight.copy_(state["mlp_head.1.weight"])
        out.head.head.bias.copy_(state["mlp_head.1.bias"])
    return out.eval()


def load_model(model: str | None = None, checkpoint: str | Path | None = None) -> PrismViT:
    """A timm model by name (random init) or the bundled checkpoint format, as a PrismViT."""
    if (model is None) == (checkpoint is None):
        raise UsageError("give exactly one of a timm model name or a checkpoint path")
    if checkpoint is not None:
        return from_mnist_checkpoint(checkpoint)
    return from_timm(create_timm(model), model)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the internal state_dict (names, shapes, bytes): identifies the weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
