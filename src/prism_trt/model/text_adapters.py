"""Adapters from Hugging Face ``transformers`` BERT and GPT-2 into :class:`PrismText`.

``transformers`` is an optional extra (``pip install 'prism-trt[text]'``), imported only here and
only when a text model is asked for, so the ViT path never needs it. Models are built from
configs with random init: nothing is downloaded. The one exception is ``gpt2-pydoc``, a tiny
byte-level GPT-2 trained on Python's docstrings whose weights ship with the package
(``data/tiny_gpt2/``, made by ``scripts/train_tiny_gpt2.py``): the one text model whose accuracy
means something.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingFileError, PrismError, UsageError
from .adapters import CheckpointMismatchError, UnsupportedModelError
from .text import PrismText
from .text_spec import TextSpec


class MissingDependencyError(PrismError, ImportError):
    """An optional dependency that the requested feature needs is not installed."""


#: Configs of the published checkpoints (their architectures only: weights are random).
#: BertConfig() and GPT2Config() default to bert-base-uncased and gpt2 (small).
TEXT_CONFIGS: dict[str, tuple[str, dict]] = {
    "bert-base-uncased": ("bert", {}),
    "bert-large-uncased": ("bert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096)),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16)),
    # The bundled trained tiny GPT-2 (byte-level, Python docstrings; data/tiny_gpt2/README.md).
    "gpt2-pydoc": ("gpt2", dict(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                                bos_token_id=255, eos_token_id=255)),
}
#: Known names whose weights are bundled (trained) rather than random: name -> file under prism_trt/data.
PRETRAINED_TEXT: dict[str, str] = {"gpt2-pydoc": "tiny_gpt2/gpt2-pydoc.pt"}
DEFAULT_HEADS = {"bert": "classifier", "gpt2": "lm"}
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def require_transformers():
    """The ``transformers`` module, or an error naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("BERT and GPT-2 models need Hugging Face transformers, which is not installed: "
                                     "pip install 'prism-trt[text]'") from None
    return transformers


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"unsupported MLP activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _check_supported(config) -> None:
    if config.model_type == "bert":
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(f"BERT position_embedding_type {config.position_embedding_type!r} is not "
                                        "supported (absolute only)")
        if config.is_decoder or config.add_cross_attention:
            raise UnsupportedModelError("BERT as a decoder or with cross-attention is not supported")
    elif config.model_type == "gpt2":
        if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
            raise UnsupportedModelError("GPT-2 attention scaling other than 1/sqrt(d_h) is not supported")
        if config.add_cross_attention:
            raise UnsupportedModelError("GPT-2 with cross-attention is not supported")
    else:
        raise UnsupportedModelError(f"model type {config.model_type!r} is not supported; text models: bert, gpt2")


def spec_from_config(config, head: str, name: str | None = None) -> TextSpec:
    """The :class:`TextSpec` of a ``BertConfig`` / ``GPT2Config`` with the given head."""
    _check_supported(config)
    name = name or getattr(config, "name_or_path", "") or config.model_type
    if config.model_type == "bert":
        D, heads = config.hidden_size, config.num_attention_heads
        return TextSpec(name=name, family="bert", vocab_size=config.vocab_size,
                        max_positions=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
                        num_prefix_tokens=1, embed_dim=D, depth=config.num_hidden_layers, num_heads=heads,
                        head_dim=D // heads, mlp_hidden_dim=config.intermediate_size,
                        mlp_act=_activation(config.hidden_act), norm_eps=config.layer_norm_eps, qkv_bias=True,
                        head=head, num_classes=config.num_labels if head == "classifier" else 0)
    D, heads = config.n_embd, config.n_head
    return TextSpec(name=name, family="gpt2", vocab_size=config.vocab_size, max_positions=config.n_positions,
                    type_vocab_size=0, num_prefix_tokens=0, embed_dim=D, depth=config.n_layer, num_heads=heads,
                    head_dim=D // heads, mlp_hidden_dim=config.n_inner or 4 * D,
                    mlp_act=_activation(config.activation_function), norm_eps=config.layer_norm_epsilon,
                    qkv_bias=True, head=head, num_classes=0)


def _head_of(model: nn.Module) -> str:
    heads = {"BertForSequenceClassification": "classifier", "BertModel": "features",
             "GPT2LMHeadModel": "lm", "GPT2Model": "features"}
    kind = type(model).__name__
    if kind not in heads:
        raise UnsupportedModelError(f"expected one of {sorted(heads)}, got {kind}")
    return heads[kind]


def spec_from_hf(model: nn.Module, name: str | None = None) -> TextSpec:
    """Describe a Hugging Face BERT (BertModel, BertForSequenceClassification) or GPT-2 (GPT2Model,
    GPT2LMHeadModel)."""
    return spec_from_config(model.config, _head_of(model), name)


def _bert_state(model: nn.Module, spec: TextSpec) -> dict[str, torch.Tensor]:
    bert = getattr(model, "bert", model)
    emb = bert.embeddings
    state = {"embed.word.weight": emb.word_embeddings.weight, "embed.position.weight": emb.position_embeddings.weight,
             "embed.token_type.weight": emb.token_type_embeddings.weight,
             "embed.norm.weight": emb.LayerNorm.weight, "embed.norm.bias": emb.LayerNorm.bias}
    for i, layer in enumerate(bert.encoder.layer):
        attn, ours = layer.attention, f"blocks.{i}"
        for part in ("weight", "bias"):
            state[f"{ours}.attn.qkv.{part}"] = torch.cat([getattr(getattr(attn.self, p), part)
                                                         for p in ("query", "key", "value")])
            for theirs, mine in ((attn.output.dense, "attn.proj"), (attn.output.LayerNorm, "norm1"),
                                 (layer.intermediate.dense, "mlp.fc1"), (layer.output.dense, "mlp.fc2"),
                                 (layer.output.LayerNorm, "norm2")):
                state[f"{ours}.{mine}.{part}"] = getattr(theirs, part)
    if spec.head == "classifier":
        for part in ("weight", "bias"):
            state[f"pooler.{part}"] = getattr(bert.pooler.dense, part)
            state[f"classifier.{part}"] = getattr(model.classifier, part)
    return state


def _gpt2_state(model: nn.Module, spec: TextSpec) -> dict[str, torch.Tensor]:
    gpt = getattr(model, "transformer", model)
    if spec.head == "lm" and model.lm_head.weight.data_ptr() != gpt.wte.weight.data_ptr():
        raise UnsupportedModelError("GPT-2 with an untied LM head is not supported (the head reuses wte)")
    state = {"embed.word.weight": gpt.wte.weight, "embed.position.weight": gpt.wpe.weight,
             "final_norm.weight": gpt.ln_f.weight, "final_norm.bias": gpt.ln_f.bias}
    for i, layer in enumerate(gpt.h):
        ours = f"blocks.{i}"
        # Conv1D stores (in, out), the transpose of nn.Linear's weight.
        for theirs, mine in ((layer.attn.c_attn, "attn.qkv"), (layer.attn.c_proj, "attn.proj"),
                             (layer.mlp.c_fc, "mlp.fc1"), (layer.mlp.c_proj, "mlp.fc2")):
            state[f"{ours}.{mine}.weight"], state[f"{ours}.{mine}.bias"] = theirs.weight.t(), theirs.bias
        for theirs, mine in ((layer.ln_1, "norm1"), (layer.ln_2, "norm2")):
            state[f"{ours}.{mine}.weight"], state[f"{ours}.{mine}.bias"] = theirs.weight, theirs.bias
    return state


def from_hf(model: nn.Module, name: str | None = None) -> PrismText:
    """Copy a Hugging Face BERT / GPT-2's weights into a :class:`PrismText` (eval mode)."""
    spec = spec_from_hf(model, name)
    out = PrismText(spec)
    state = _bert_state(model, spec) if spec.family == "bert" else _gpt2_state(model, spec)
    out.load_state_dict({key: value.detach().clone() for key, value in state.items()}, strict=True)
    return out.eval()


def size_overrides(name: str, layers: int | None = None, hidden_size: int | None = None, heads: int | None = None,
                   vocab_size: int | None = None) -> dict:
    """Config fields that shrink a known model (test-size builds), in its family's own names: the
    MLP stays 4x the width, and GPT-2's end-of-text id moves to the last id of a smaller vocabulary."""
    if name not in TEXT_CONFIGS:
        raise UsageError(f"unknown text model {name!r}; known: {', '.join(TEXT_CONFIGS)}")
    bert = TEXT_CONFIGS[name][0] == "bert"
    fields = {("num_hidden_layers" if bert else "n_layer"): layers,
              ("num_attention_heads" if bert else "n_head"): heads,
              ("hidden_size" if bert else "n_embd"): hidden_size, "vocab_size": vocab_size}
    if bert and hidden_size is not None:
        fields["intermediate_size"] = 4 * hidden_size
    if not bert and vocab_size is not None:
        fields["bos_token_id"] = fields["eos_token_id"] = vocab_size - 1
    return {key: value for key, value in fields.items() if value is not None}


def text_config(name: str, **overrides):
    """A ``BertConfig`` / ``GPT2Config`` for a known name (TEXT_CONFIGS) with overrides."""
    if name not in TEXT_CONFIGS:
        raise UsageError(f"unknown text model {name!r}; known: {', '.join(TEXT_CONFIGS)}")
    family, fields = TEXT_CONFIGS[name]
    transformers = require_transformers()
    config_class = transformers.BertConfig if family == "bert" else transformers.GPT2Config
    return config_class(**{**fields, **overrides})


def create_hf_text(config, head: str | None = None, seed: int = 0) -> nn.Module:
    """A Hugging Face model with random init from a config (nothing is downloaded), in eval mode."""
    transformers = require_transformers()
    _check_supported(config)
    head = head or DEFAULT_HEADS[config.model_type]
    classes = {("bert", "classifier"): transformers.BertForSequenceClassification,
               ("bert", "features"): transformers.BertModel,
               ("gpt2", "lm"): transformers.GPT2LMHeadModel, ("gpt2", "features"): transformers.GPT2Model}
    if (config.model_type, head) not in classes:
        raise UsageError(f"head {head!r} is not available for {config.model_type}; "
                         f"choose from {[h for family, h in classes if family == config.model_type]}")
    torch.manual_seed(seed)
    return classes[config.model_type, head](config).eval()


def text_spec(name: str, head: str | None = None, **overrides) -> TextSpec:
    """The spec of a known text model without allocating its weights."""
    config = text_config(name, **overrides)
    return spec_from_config(config, head or DEFAULT_HEADS[config.model_type], name)


def pretrained_path(name: str) -> Path:
    """The bundled checkpoint of a trained text model (PRETRAINED_TEXT)."""
    return Path(__file__).resolve().parents[1] / "data" / PRETRAINED_TEXT[name]


def load_pretrained_text(name: str, path: Path | None = None) -> PrismText:
    """A bundled trained model: its config's spec, weights stored (fp16) in PrismText's layout, run in
    fp32. ``path`` replaces the bundled file (the training script checks what it has just written)."""
    path = path or pretrained_path(name)
    if not path.is_file():
        raise MissingFileError(f"{name}'s checkpoint {path} is missing: reinstall prism-trt (it is package data)")
    model = PrismText(text_spec(name))
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise CheckpointMismatchError(f"{path} does not match {name}'s config {TEXT_CONFIGS[name][1]}")
    model.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    return model.eval()


def load_text_model(name: str, head: str | None = None, seed: int = 0, **overrides) -> PrismText:
    """A known text model (TEXT_CONFIGS) as a :class:`PrismText`: random init from its config, or
    (PRETRAINED_TEXT) its bundled trained weights, which cannot be resized or given another head."""
    if name in PRETRAINED_TEXT:
        if overrides or head not in (None, DEFAULT_HEADS[TEXT_CONFIGS[name][0]]):
            raise UsageError(f"{name} is a trained checkpoint: it has a fixed size and an LM head "
                             f"(got {overrides or {}}, head {head!r})")
        return load_pretrained_text(name)
    return from_hf(create_hf_text(text_config(name, **overrides), head, seed), name)


def text_source(name: str, overrides: dict | None = None) -> dict:
    """The manifest's source record of a text model: its trained checkpoint, or config and seed."""
    if name in PRETRAINED_TEXT:
        digest = hashlib.sha256(pretrained_path(name).read_bytes()).hexdigest()
        return {"text": name, "random_init": False, "checkpoint_sha256": digest}
    return {"text": name, "random_init": True, "seed": 0, "config": overrides or {}}
