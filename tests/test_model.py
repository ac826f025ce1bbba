import argparse

import pytest
import torch
from conftest import assert_close, random_model, small_spec

from prism_trt.model import (
    CheckpointMismatchError,
    UnsupportedModelError,
    ViTSpec,
    from_mnist_checkpoint,
    load_model,
    spec_from_timm,
    timm_spec,
    weights_hash,
)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "deit3_small_patch16_224"])
def test_adapter_matches_timm_forward(timm_pair, name):
    reference, model = timm_pair(name)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close(model(images), reference(images))


def test_timm_avg_pool_and_reg_tokens():
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", reg_tokens=4,
                                  img_size=64).eval()
    from prism_trt.model import from_timm

    model = from_timm(reference)
    assert model.spec.num_prefix_tokens == 5 and model.spec.pool == "avg" and model.spec.fc_norm
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(images), reference(images))


def test_spec_of_vit_b():
    spec = timm_spec("vit_base_patch16_224")
    assert (spec.num_tokens, spec.embed_dim, spec.num_heads, spec.head_dim,
            spec.mlp_hidden_dim) == (197, 768, 12, 64, 3072)
    assert ViTSpec.from_dict(spec.to_dict()) == spec


def test_unknown_timm_model():
    with pytest.raises(ValueError, match="unknown timm model 'vit_nope'"):
        load_model("vit_nope")


def test_unsupported_timm_feature():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True)
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        spec_from_timm(model)


def test_mnist_spec(mnist_model):
    spec = mnist_model.spec
    assert (spec.num_tokens, spec.embed_dim, spec.num_heads, spec.head_dim, spec.attn_dim) == (50, 64, 4, 64, 256)
    assert spec.mlp_act == "relu" and spec.in_chans == 1 and spec.patch_size == (4, 4)


def test_mnist_checkpoint_mismatch_names_keys(mnist_dir, tmp_path):
    state = torch.load(mnist_dir / "vit_mnist.pt", map_location="cpu", weights_only=True)
    del state["transformer.layers.2.1.fn.net.3.bias"]
    state["mlp_head.0.weight"] = torch.zeros(65)
    state["extra.thing"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        from_mnist_checkpoint(path)
    message = str(info.value)
    assert "missing keys: transformer.layers.2.1.fn.net.3.bias" in message
    assert "unexpected keys: extra.thing" in message
    assert "mlp_head.0.weight: expected (64,), found (65,)" in message


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)  # an arbitrary class: refused by weights_only
    with pytest.raises(CheckpointMismatchError, match="weights_only"):
        from_mnist_checkpoint(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="garbage.pt"):
        from_mnist_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        from_mnist_checkpoint(tmp_path / "absent.pt")


def test_weights_hash_changes_with_weights():
    a, b = random_model(small_spec(), seed=0), random_model(small_spec(), seed=1)
    assert weights_hash(a) == weights_hash(random_model(small_spec(), seed=0))
    assert weights_hash(a) != weights_hash(b)


def test_spec_validation():
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        small_spec(img=30, patch=8)
    with pytest.raises(ValueError, match="mlp_act"):
        small_spec(act="swish")
