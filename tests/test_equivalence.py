"""The Prism core equals the unpartitioned model where the maths says it must (prism.md section 4)."""

import math

import pytest
import torch
from conftest import assert_close, random_model, small_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_trt.core import (
    PlanError,
    RankForward,
    make_partition_plan,
    make_segment_plan,
    simulate,
    simulate_blocks,
    voltage_plan,
)
from prism_trt.core.precision import compare


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("means_source", ["ln1", "input"])
def test_cr1_equals_timm(timm_pair, name, ranks, means_source):
    reference, model = timm_pair(name)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 224, 224)
    plan = voltage_plan(make_partition_plan(model.spec.num_tokens, 1, ranks))
    with torch.no_grad():
        expected = reference(images)
    assert_close(simulate(model, images, plan, means_source), expected)


def test_weighted_cr1_equals_unpartitioned(timm_pair):
    _, model = timm_pair("vit_tiny_patch16_224")
    images = torch.randn(1, 3, 224, 224)
    plan = voltage_plan(make_partition_plan(197, 1, 3, [3, 1, 2]))
    with torch.no_grad():
        assert_close(simulate(model, images, plan), model(images))


def test_compression_changes_logits(timm_pair):
    """Guards the property test below: with real (non-constant) tokens, CR > 1 is not exact, and
    the difference is far outside the fp32 tolerance that test uses."""
    _, model = timm_pair("vit_tiny_patch16_224")
    images = torch.randn(1, 3, 224, 224)
    plan = make_segment_plan(make_partition_plan(197, 1, 2), cr=9.9)
    with torch.no_grad():
        assert compare(simulate(model, images, plan), model(images)).used > 10


def segment_constant_tokens(plan, batch: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(B, N, D) tokens equal within every segment of every rank."""
    pieces = []
    for sizes in plan.segment_sizes:
        for size in sizes:
            pieces.append(torch.randn(batch, 1, dim, generator=generator).expand(batch, size, dim))
    return torch.cat(pieces, dim=1)


@settings(max_examples=40)
@given(grid=st.integers(2, 5), prefix=st.integers(0, 2), seed=st.integers(0, 2**16),
       means_source=st.sampled_from(["ln1", "input"]), data=st.data())
def test_segment_constant_inputs_are_exact_at_any_cr(grid, prefix, seed, means_source, data):
    spec = small_spec(img=8 * grid, patch=8, prefix=max(prefix, 1))
    model = random_model(spec, seed=seed % 7)
    ranks = data.draw(st.integers(1, min(4, spec.num_patches)))
    partition = make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, ranks)
    segments = data.draw(st.integers(1, math.ceil(spec.num_tokens / ranks)))
    plan = make_segment_plan(partition, segments=segments)
    tokens = segment_constant_tokens(plan, 2, spec.embed_dim, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = tokens
        for block in model.blocks:
            expected = block(expected)
    got = simulate_blocks(model, tokens, plan, means_source)
    assert_close(got, expected)


def test_rank_forward_validates():
    model = random_model(small_spec())
    plan = make_segment_plan(make_partition_plan(17, 1, 2), segments=2)
    with pytest.raises(PlanError, match="means_source"):
        RankForward(model, plan, 0, "middle")
    with pytest.raises(PlanError, match="rank 5 out of range"):
        RankForward(model, plan, 5)
    with pytest.raises(PlanError, match="only rank 0"):
        RankForward(model, plan, 1).head(torch.zeros(1, 8, 32))
    other = make_segment_plan(make_partition_plan(50, 1, 2), segments=2)
    with pytest.raises(PlanError, match="plan is for 50 tokens"):
        RankForward(model, other, 0)
