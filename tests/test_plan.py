import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_trt.core import PlanError, make_partition_plan, make_segment_plan, segments_for_cr, voltage_plan

DETERMINISTIC = settings(max_examples=60)  # derandomized, no database: conftest's profile


@DETERMINISTIC
@given(patches=st.integers(1, 400), prefix=st.integers(0, 2), data=st.data())
def test_near_equal_partition(patches, prefix, data):
    ranks = data.draw(st.integers(1, min(patches, 8)))
    plan = make_partition_plan(patches + prefix, prefix, ranks)
    assert sum(plan.sizes) == patches + prefix
    assert max(plan.sizes) - min(plan.sizes) <= 1 or plan.sizes[0] == prefix + 1
    assert plan.prefix_count(0) == prefix and all(plan.prefix_count(r) == 0 for r in range(1, ranks))
    assert all(plan.patch_count(r) >= 1 for r in range(ranks))
    # contiguous and in order
    assert [plan.token_range(r)[0] for r in range(ranks)] == list(np.cumsum((0,) + plan.sizes[:-1]))


def test_near_equal_larger_first_vit_b():
    assert make_partition_plan(197, 1, 2).sizes == (99, 98)
    assert make_partition_plan(197, 1, 3).sizes == (66, 66, 65)
    assert make_partition_plan(197, 1, 4).sizes == (50, 49, 49, 49)


@DETERMINISTIC
@given(weights=st.lists(st.floats(0.1, 10), min_size=2, max_size=5), tokens=st.integers(20, 400))
def test_weighted_partition_honours_weights(weights, tokens):
    plan = make_partition_plan(tokens, 1, len(weights), weights)
    assert sum(plan.sizes) == tokens and min(plan.sizes) >= 1 and plan.sizes[0] >= 2
    ideal = np.asarray(weights) / sum(weights) * tokens
    # Largest remainder: within one token of the ideal share, plus what the minimums (rank 0: CLS and
    # one patch; others: one patch) had to take from the ideal shares.
    minimums = np.array([2] + [1] * (len(weights) - 1))
    forced = np.maximum(0.0, minimums - ideal).sum()
    assert np.all(np.abs(np.asarray(plan.sizes) - ideal) <= 1.0 + forced)


def test_weighted_two_to_one():
    assert make_partition_plan(197, 1, 2, [2, 1]).sizes == (131, 66)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tokens=197, num_prefix_tokens=1, ranks=197), "patch tokens"),
    (dict(num_tokens=197, num_prefix_tokens=1, ranks=0), "ranks must be >= 1"),
    (dict(num_tokens=197, num_prefix_tokens=1, ranks=2, weights=[1, 0]), "weights must be finite and > 0"),
    (dict(num_tokens=197, num_prefix_tokens=1, ranks=2, weights=[1, -2]), "weights must be finite and > 0"),
    (dict(num_tokens=197, num_prefix_tokens=1, ranks=2, weights=[1, float("nan")]), "finite"),
    (dict(num_tokens=197, num_prefix_tokens=1, ranks=3, weights=[1, 1]), "2 weights for 3 ranks"),
])
def test_partition_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_partition_plan(**kwargs)


@pytest.mark.parametrize("cr, segments", [(9.9, 10), (4.95, 20), (3.3, 30), (1, 99), (99, 1)])
def test_cr_to_segments_vit_b(cr, segments):
    plan = make_segment_plan(make_partition_plan(197, 1, 2), cr=cr)
    assert plan.segments == segments
    assert plan.cr == pytest.approx(99 / segments)


def test_segment_plan_vit_b_cr_9_9():
    plan = make_segment_plan(make_partition_plan(197, 1, 2), cr=9.9)
    assert plan.counts == (11, 10)  # CLS travels as its own segment
    assert plan.segment_sizes[0][0] == 1
    assert plan.segment_sizes[0][1:] == (10,) * 8 + (9,) * 2  # 98 patches in 10 near-equal segments
    assert plan.segment_sizes[1] == (10,) * 8 + (9,) * 2
    assert plan.remote_log_sizes(1)[0] == 0.0  # ln(1) for the CLS mean
    assert np.allclose(plan.averaging_matrix(0).sum(axis=1), 1.0)


@DETERMINISTIC
@given(patches=st.integers(2, 300), data=st.data())
def test_segment_sizes(patches, data):
    ranks = data.draw(st.integers(1, min(patches, 6)))
    partition = make_partition_plan(patches + 1, 1, ranks)
    L = data.draw(st.integers(1, math.ceil((patches + 1) / ranks)))
    plan = make_segment_plan(partition, segments=L)
    for rank, sizes in enumerate(plan.segment_sizes):
        patch_sizes = sizes[1:] if rank == 0 else sizes
        assert sum(sizes) == partition.sizes[rank]
        assert max(patch_sizes) - min(patch_sizes) <= 1
        assert len(patch_sizes) == min(L, partition.patch_count(rank))
        matrix = plan.averaging_matrix(rank)
        assert matrix.shape == (len(sizes), partition.sizes[rank])
        assert np.allclose(matrix.sum(axis=1), 1.0)


def test_voltage_plan_is_lossless():
    for ranks in (1, 2, 3, 4):
        plan = voltage_plan(make_partition_plan(197, 1, ranks))
        assert plan.is_lossless and plan.cr == 1.0
        assert plan.counts == make_partition_plan(197, 1, ranks).sizes


@DETERMINISTIC
@given(weights=st.lists(st.floats(0.1, 10), min_size=2, max_size=5), tokens=st.integers(20, 400))
def test_voltage_plan_is_lossless_on_weighted_partitions(weights, tokens):
    # A rank given more than ceil(N/P) tokens must still send every one of them (it used to average pairs).
    partition = make_partition_plan(tokens, 1, len(weights), weights)
    plan = voltage_plan(partition)
    assert plan.is_lossless and plan.cr == 1.0 and plan.counts == partition.sizes


@pytest.mark.parametrize("kwargs, message", [
    (dict(cr=0.5), "CR must be between 1"),
    (dict(cr=100), "CR must be between 1"),
    (dict(cr=float("inf")), "CR must be between 1"),
    (dict(segments=0), r"segments per partition must be an integer in \[1"),
    (dict(segments=100), r"segments per partition must be an integer in \[1"),
    (dict(), "exactly one of segments"),
    (dict(cr=2, segments=3), "exactly one of segments"),
])
def test_segment_plan_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_segment_plan(make_partition_plan(197, 1, 2), **kwargs)


def test_segments_for_cr_rounds_to_nearest():
    partition = make_partition_plan(197, 1, 2)
    assert segments_for_cr(partition.num_tokens, partition.ranks, 5) == 20  # 99 / 5 = 19.8
