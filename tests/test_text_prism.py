"""The Prism core for sequences: the partition-aware causal mask, padding-aware segment means
(prism-text.md sections 2.4 and 3)."""

import math

import pytest
import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from test_text_model import VOCAB, random_batch, reference_outputs, tiny_pair

from prism_trt.core import PlanError, make_partition_plan, make_segment_plan, voltage_plan
from prism_trt.core.text_rank import TextRankForward, segment_positions, simulate_text, text_partition
from prism_trt.model.text import MASKED

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")

# Outputs a change must not reach may differ by rounding at most: the masked keys weigh exactly 0,
# so in practice they are bit-identical; a leak moves them by orders of magnitude more (see the
# `changed` assertions, which use the same bound).
UNCHANGED = 1e-6


def visible(bias: torch.Tensor) -> torch.Tensor:
    """0/1 (n, m) table of which keys the queries see, from a (1, 1, n, m) bias."""
    return (bias[0, 0] > MASKED / 2).int()


def test_worked_example_masks():
    """prism-text.md 3.3: N = 8, P = 2, L = 2; rank 0 sees its own past only, rank 1 its own past
    and both means of rank 0, each with bias ln 2."""
    _, model = tiny_pair("gpt2")
    plan = make_segment_plan(text_partition(model.spec, 8, 2), segments=2)
    ids = torch.zeros(1, 8, dtype=torch.long)
    first, second = (TextRankForward(model, plan, r) for r in range(2))
    causal = torch.tril(torch.ones(4, 4, dtype=torch.int))
    masks0, masks1 = first.masks(ids), second.masks(ids)
    assert first.attended_ranks == [] and masks0.remote_bias is None and not second.sends_means and first.sends_means
    assert torch.equal(visible(masks0.local_bias), causal) and torch.equal(visible(masks1.local_bias), causal)
    assert second.attended_ranks == [0] and torch.equal(visible(masks1.remote_bias), torch.ones(4, 2, dtype=torch.int))
    assert torch.allclose(masks1.remote_bias[0, 0], torch.full((4, 2), math.log(2)))


def test_causal_mask_is_block_triangular_by_rank():
    """Uneven partitions (4/3/3 tokens): rank p sees every segment of every earlier rank, with
    ln of its size, and nothing of a later rank."""
    _, model = tiny_pair("gpt2")
    plan = make_segment_plan(text_partition(model.spec, 10, 3), segments=2)
    ids = torch.zeros(1, 10, dtype=torch.long)
    for rank in range(3):
        forward = TextRankForward(model, plan, rank)
        assert forward.attended_ranks == list(range(rank))
        if rank:
            sizes = [end - start for q in range(rank) for start, end in segment_positions(plan, q)]
            expected = torch.tensor(sizes, dtype=torch.float32).log().expand(plan.partition.sizes[rank], -1)
            assert torch.allclose(forward.masks(ids).remote_bias[0, 0], expected)


def assert_causal(model, plan, ids, position: int, means_source: str = "ln1") -> None:
    """Changing the token at ``position`` leaves every earlier output as it was and changes its own."""
    changed_ids = ids.clone()
    changed_ids[:, position] = (ids[:, position] + 1 + position) % VOCAB
    before = simulate_text(model, plan, ids, means_source=means_source)
    after = simulate_text(model, plan, changed_ids, means_source=means_source)
    earlier = (after[:, :position] - before[:, :position]).abs().max().item() if position else 0.0
    assert earlier <= UNCHANGED, f"token {position} changed an earlier output by {earlier:.3g} ({plan.describe()})"
    assert (after[:, position] - before[:, position]).abs().max() > 1000 * UNCHANGED


@settings(max_examples=30)
@given(ranks=st.integers(1, 3), data=st.data(), means_source=st.sampled_from(["ln1", "input"]))
def test_no_future_token_changes_an_earlier_output(ranks, data, means_source):
    _, model = tiny_pair("gpt2")
    length = data.draw(st.integers(ranks + 1, 14), label="length")
    segments = data.draw(st.integers(1, math.ceil(length / ranks)), label="segments")
    position = data.draw(st.integers(0, length - 1), label="position")
    plan = make_segment_plan(text_partition(model.spec, length, ranks), segments=segments)
    ids, _ = random_batch(2, length, seed=length * 31 + segments)
    assert_causal(model, plan, ids, position, means_source)


@pytest.mark.parametrize("ranks", [2, 3])
def test_causality_at_every_cr_and_position(ranks):
    """The exhaustive version of the property test on one sequence: every L, every position."""
    _, model = tiny_pair("gpt2")
    length = 10
    ids, _ = random_batch(1, length, seed=3)
    partition = text_partition(model.spec, length, ranks)
    for segments in range(1, math.ceil(length / ranks) + 1):
        plan = make_segment_plan(partition, segments=segments)
        for position in range(length):
            assert_causal(model, plan, ids, position)


def test_rank0_is_exact_and_later_ranks_are_not():
    """Causal: rank 0 receives nothing usable, so its positions equal the unpartitioned model at any CR."""
    reference, model = tiny_pair("gpt2")
    ids, mask = random_batch(2, 12, seed=4)
    plan = make_segment_plan(text_partition(model.spec, 12, 3), segments=1)
    got, want = simulate_text(model, plan, ids, mask), reference_outputs(reference, ids, mask)
    assert_close(got[:, :4], want[:, :4])
    assert (got[:, 4:] - want[:, 4:]).abs().max() > 1e-3


@settings(max_examples=25)
@given(ranks=st.integers(1, 3), data=st.data())
def test_padding_contents_never_change_valid_outputs(ranks, data):
    """BERT at any CR: what the padded positions hold (ids, token types) changes no valid output,
    and no output is NaN even when whole segments or partitions are padding."""
    _, model = tiny_pair("bert-base-uncased", "features")
    length = data.draw(st.integers(ranks + 1, 14), label="length")
    segments = data.draw(st.integers(1, math.ceil(length / ranks)), label="segments")
    valid = data.draw(st.lists(st.integers(1, length), min_size=2, max_size=2), label="valid lengths")
    plan = make_segment_plan(text_partition(model.spec, length, ranks), segments=segments)
    ids, mask = random_batch(2, length, seed=length + 17 * segments, lengths=valid)
    padding = ~mask.bool()
    other_ids = torch.where(padding, (ids + 7) % VOCAB, ids)
    other_types = padding.long()
    before = simulate_text(model, plan, ids, mask)
    after = simulate_text(model, plan, other_ids, mask, token_type_ids=other_types)
    assert before.isfinite().all() and after.isfinite().all()
    difference = (after - before)[mask.bool()].abs().max().item()
    assert difference <= UNCHANGED, f"padding changed a valid output by {difference:.3g} ({plan.describe()})"


def test_padding_changes_outputs_when_it_is_not_masked():
    """Guards the padding property: the same ids change valid outputs once the mask calls them tokens."""
    _, model = tiny_pair("bert-base-uncased", "features")
    plan = make_segment_plan(text_partition(model.spec, 10, 2), segments=2)
    ids, mask = random_batch(1, 10, seed=6, lengths=[6])
    other_ids = torch.where(mask.bool(), ids, (ids + 7) % VOCAB)
    full = torch.ones_like(mask)
    difference = (simulate_text(model, plan, other_ids, full) - simulate_text(model, plan, ids, full))[:, :6]
    assert difference.abs().max() > 1000 * UNCHANGED


def test_cls_inside_a_segment_is_still_exact_at_cr1():
    """cls_segment=False (the paper's accounting) averages [CLS] with rank 0's first tokens; at
    CR = 1 that is still exact, and at L = 1 rank 1 receives one mean instead of two."""
    reference, model = tiny_pair("bert-base-uncased")
    ids, mask = random_batch(2, 10, seed=9, lengths=[10, 7])
    partition = text_partition(model.spec, 10, 2, cls_segment=False)
    assert_close(simulate_text(model, voltage_plan(partition), ids, mask), reference_outputs(reference, ids, mask))
    assert make_segment_plan(partition, segments=1).counts == (1, 1)


@pytest.mark.parametrize("segments", [1, 2, 4])
def test_a_rank_of_padding_leaves_cls_exact(segments):
    """prism-text.md 2.4: when rank 1 holds only padding, rank 0 (and [CLS]) is computed exactly:
    the classifier equals Hugging Face's on the unpadded short sequence, at any CR."""
    reference, model = tiny_pair("bert-base-uncased")
    ids, mask = random_batch(2, 8, seed=7, lengths=[4, 4])
    plan = make_segment_plan(text_partition(model.spec, 8, 2), segments=segments)
    got = simulate_text(model, plan, ids, mask)
    assert_close(got, reference_outputs(reference, ids[:, :4], mask[:, :4]))


def test_segment_means_average_valid_tokens_only():
    _, model = tiny_pair("bert-base-uncased", "features")
    plan = make_segment_plan(text_partition(model.spec, 9, 2), segments=2)  # rank 0: [CLS] + {1, 2} + {3, 4}
    forward = TextRankForward(model, plan, 0)
    ids, mask = random_batch(1, 9, seed=8, lengths=[4])
    masks = forward.masks(ids, mask)
    x = torch.randn(1, 5, model.spec.embed_dim)
    means = forward.segment_means(x, masks, next_block=1)
    assert torch.equal(means[:, 0], x[:, 0])  # [CLS]: a segment of its own
    assert torch.allclose(means[:, 1], x[:, 1:3].mean(dim=1))
    assert torch.equal(means[:, 2], x[:, 3])  # position 4 is padding: only position 3 counts
    receiver = TextRankForward(model, plan, 1).masks(ids, mask).remote_bias[0, 0, 0]
    assert torch.allclose(receiver, torch.tensor([0.0, math.log(2), 0.0]))  # ln of 1, 2 and 1 valid tokens


def test_plans_that_do_not_fit_the_model_are_refused():
    _, model = tiny_pair("bert-base-uncased")
    two_prefix_tokens = make_segment_plan(make_partition_plan(8, 2, 2), segments=2)
    with pytest.raises(PlanError, match="prefix tokens"):
        TextRankForward(model, two_prefix_tokens, 0)
    plan = make_segment_plan(text_partition(model.spec, 8, 2), segments=2)
    with pytest.raises(PlanError, match="sequences of 8"):
        simulate_text(model, plan, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(PlanError, match="only rank 0"):
        TextRankForward(model, plan, 1).head(torch.zeros(1, 4, model.spec.embed_dim))
