"""BERT and GPT-2 in the internal layout equal Hugging Face's forward, unpartitioned and at CR = 1.

The tiny models here (also imported by test_text_prism.py) use a large init scale: with BERT's
default 0.02 the attention is nearly uniform, and a uniform attention is the one case in which
segment means are exact, so compression would hardly show and the tests would prove little.
"""

import builtins
import subprocess
import sys

import pytest
import torch
from conftest import assert_close

from prism_trt.core import PlanError, make_segment_plan, voltage_plan
from prism_trt.core.precision import compare
from prism_trt.core.text_rank import simulate_text, text_partition
from prism_trt.errors import UsageError
from prism_trt.model.adapters import UnsupportedModelError
from prism_trt.model.text_adapters import (
    MissingDependencyError,
    create_hf_text,
    from_hf,
    require_transformers,
    spec_from_hf,
    text_config,
    text_spec,
)
from prism_trt.model.text_spec import TextSpec

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")

VOCAB, POSITIONS = 97, 32
TINY = {
    "bert-base-uncased": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_labels=3,
                              initializer_range=0.3),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=POSITIONS, bos_token_id=VOCAB - 1,
                 eos_token_id=VOCAB - 1, initializer_range=0.3),
}


def tiny_pair(name: str, head: str | None = None, seed: int = 0):
    """(Hugging Face model, the same weights as a PrismText), both in eval mode."""
    reference = create_hf_text(text_config(name, **TINY[name]), head, seed)
    return reference, from_hf(reference, name)


def random_batch(batch: int, length: int, seed: int, lengths: list[int] | None = None):
    """Random ids, and an attention mask with ``lengths[b]`` leading valid tokens (else all valid)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, valid in enumerate(lengths or []):
        mask[row, valid:] = 0
    return ids, mask


def reference_outputs(reference, ids, mask):
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name,head", [("bert-base-uncased", "classifier"), ("bert-base-uncased", "features"),
                                       ("gpt2", "lm"), ("gpt2", "features")])
def test_adapter_matches_hugging_face(name, head):
    reference, model = tiny_pair(name, head)
    assert model.spec.head == head and model.spec.causal == (name == "gpt2")
    ids, mask = random_batch(2, 12, seed=1)
    with torch.no_grad():
        assert_close(model(ids, mask), reference_outputs(reference, ids, mask))


@pytest.mark.parametrize("name", ["bert-base-uncased", "gpt2"])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_cr1_equals_hugging_face(name, ranks):
    """Every segment one token (CR = 1): the partitioned forward is the model itself, padding included."""
    reference, model = tiny_pair(name)
    ids, mask = random_batch(3, 13, seed=ranks, lengths=[13, 9, 4])
    plan = voltage_plan(text_partition(model.spec, 13, ranks))
    assert plan.is_lossless
    got, want = simulate_text(model, plan, ids, mask), reference_outputs(reference, ids, mask)
    if model.spec.causal:  # per position: only valid positions are defined (padding is trailing)
        got, want = got[mask.bool()], want[mask.bool()]
    assert_close(got, want)
    assert (got - want).abs().max() <= 1e-4  # the absolute bar, next to the scaled one


@pytest.mark.parametrize("name", ["bert-base-uncased", "gpt2"])
def test_compression_changes_outputs(name):
    """Guards the exactness tests: at CR > 1 these tiny models are visibly approximate, far outside
    the fp32 tolerance, so a partitioned forward that ignored the plan could not pass them."""
    reference, model = tiny_pair(name, "features")
    ids, mask = random_batch(2, 12, seed=5)
    plan = make_segment_plan(text_partition(model.spec, 12, 2), segments=1)
    got = simulate_text(model, plan, ids, mask)
    assert compare(got, reference_outputs(reference, ids, mask)).used > 10


def test_spec_from_configs_without_weights():
    bert, gpt2 = text_spec("bert-base-uncased"), text_spec("gpt2")
    assert (bert.embed_dim, bert.depth, bert.num_heads, bert.mlp_hidden_dim, bert.max_positions) == (768, 12, 12,
                                                                                                  3072, 512)
    assert bert.family == "bert" and bert.post_norm and not bert.causal and bert.num_prefix_tokens == 1
    assert bert.head == "classifier" and bert.mlp_act == "gelu" and bert.norm_eps == 1e-12
    assert (gpt2.embed_dim, gpt2.depth, gpt2.vocab_size, gpt2.num_prefix_tokens) == (768, 12, 50257, 0)
    assert gpt2.causal and gpt2.head == "lm" and gpt2.mlp_act == "gelu_tanh"
    assert TextSpec.from_dict(bert.to_dict()) == bert


def test_spec_from_hf_reads_the_head():
    reference, model = tiny_pair("bert-base-uncased", "features")
    spec = spec_from_hf(reference, "tiny")
    assert spec.head == "features" and spec.num_classes == 0 and spec.name == "tiny"
    assert model.pooler is None and model.classifier is None


def test_unsupported_configs_are_refused_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="position_embedding_type"):
        text_spec("bert-base-uncased", position_embedding_type="relative_key")
    with pytest.raises(UnsupportedModelError, match="scaling"):
        text_spec("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedModelError, match="activation"):
        text_spec("gpt2", activation_function="silu")
    with pytest.raises(UsageError, match="unknown text model 'llama'"):
        text_config("llama")
    with pytest.raises(UsageError, match="head 'lm' is not available for bert"):
        create_hf_text(text_config("bert-base-uncased", **TINY["bert-base-uncased"]), "lm")


def test_invalid_specs_are_refused():
    fields = text_spec("gpt2").to_dict()
    with pytest.raises(UsageError, match="causal model has no prefix"):
        TextSpec.from_dict({**fields, "num_prefix_tokens": 1})
    with pytest.raises(UsageError, match="num_classes"):
        TextSpec.from_dict({**fields, "num_classes": 2})
    with pytest.raises(UsageError, match="not a TextSpec"):
        TextSpec.from_dict({**fields, "colour": "blue"})


def test_positions_beyond_the_table_are_refused():
    _, model = tiny_pair("gpt2")
    with pytest.raises(PlanError, match="exceeds"):
        text_partition(model.spec, POSITIONS + 1, 2)


def test_missing_transformers_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def without_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_transformers)
    with pytest.raises(MissingDependencyError, match=r"pip install 'prism-trt\[text\]'"):
        require_transformers()
    with pytest.raises(MissingDependencyError):
        text_spec("gpt2")


def test_the_vit_path_does_not_import_transformers():
    code = ("import sys, prism_trt.model, prism_trt.core, prism_trt.model.text_adapters, prism_trt.core.text_rank; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
