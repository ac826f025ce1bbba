"""The tolerance model: scaled to the values, derived from the precision, reporting where and how
much; loose enough for any correct implementation, tight enough that a real defect fails."""

import numpy as np
import pytest
import torch
from conftest import random_model, small_spec
from hypothesis import given
from hypothesis import strategies as st

from prism_trt.core import make_partition_plan, make_segment_plan
from prism_trt.core.precision import (
    ALLOWED_ROUNDOFFS,
    PRECISIONS,
    UNIT_ROUNDOFF,
    Tolerance,
    ToleranceError,
    compare,
    compare_outputs,
    require_close,
)
from prism_trt.export.stages import example_feed, rank_stages


def test_tolerances_come_from_the_precision():
    for precision in PRECISIONS:
        tolerance = Tolerance.for_precision(precision)
        assert tolerance.rtol == tolerance.atol(1.0) == ALLOWED_ROUNDOFFS[precision] * UNIT_ROUNDOFF[precision]
        assert tolerance.atol(40.0) == 40.0 * tolerance.rtol
    fp32, tf32, fp16 = (Tolerance.for_precision(p).rtol for p in ("fp32", "tf32", "fp16"))
    assert fp32 < 1e-4 < tf32 <= fp16 < 0.05  # ordered, and none so loose it could not tell models apart
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, fp16"):
        Tolerance.for_precision("int8")


def test_scaled_to_the_values():
    # The same relative perturbation passes or fails alike whatever the magnitude of the outputs.
    rng = np.random.default_rng(0)
    want = rng.standard_normal((4, 50))
    noise = rng.standard_normal(want.shape)
    for scale in (1e-3, 1.0, 40.0, 1e4):
        small = compare(scale * want + scale * 1e-6 * noise, scale * want)
        large = compare(scale * want + scale * 1e-3 * noise, scale * want)
        assert small.passed and not large.passed
        assert small.used == pytest.approx(compare(want + 1e-6 * noise, want).used, rel=1e-6)


def test_report_names_the_worst_element_and_margin():
    want = np.zeros((2, 3), np.float32) + 2.0
    got = want.copy()
    got[1, 2] += 1e-3
    result = compare(got, want, "fp32", "logits")
    assert not result.passed and result.worst_index == (1, 2)
    assert result.worst_got == pytest.approx(2.001, abs=1e-6) and result.worst_want == 2.0
    assert result.max_abs_error == pytest.approx(1e-3, rel=1e-3)  # float32 spacing at 2 is 2.4e-7
    assert result.max_rel_error == pytest.approx(5e-4, rel=1e-3)
    assert result.used == pytest.approx(result.max_abs_error / (result.atol + result.rtol * 2.0), rel=1e-9)
    text = result.describe()
    assert "logits: FAILED" in text and "[1, 2]" in text and "fp32" in text
    ok = compare(np.nextafter(want, np.float32(3)), want)  # one float32 step off
    assert ok.passed and ok.margin == pytest.approx(1 / ok.used) and "margin" in ok.describe()
    assert compare(want, want).margin == float("inf")


def test_nan_inf_and_shapes():
    want = np.ones(4, np.float32)
    got = want.copy()
    got[2] = np.nan
    result = compare(got, want)
    assert not result.passed and result.nonfinite == 1 and result.worst_index == (2,)
    assert "NaN/inf" in result.describe()
    both_inf = np.array([np.inf, 1.0], np.float32)
    assert compare(both_inf, both_inf).passed  # the reference's own specials must be matched exactly
    assert not compare(np.array([1e30, 1.0], np.float32), both_inf).passed
    with pytest.raises(ToleranceError, match=r"shape \(3,\) differs from the reference's \(4,\)"):
        compare(np.ones(3), want)
    with pytest.raises(ToleranceError, match="outputs"):
        compare_outputs({"a": want}, {"b": want})
    assert compare(np.zeros(0), np.zeros(0)).passed
    assert compare(torch.zeros(3), np.zeros(3, np.float32)).passed  # torch tensors and numpy arrays alike
    with pytest.raises(ToleranceError, match="FAILED"):
        require_close(want + 1, want)


@given(data=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64),
       precision=st.sampled_from(PRECISIONS))
def test_rounding_to_the_precision_always_passes(data, precision):
    # Storing the reference once in the precision's own format is the smallest error an engine can make.
    want = np.asarray(data, np.float32)
    got = want.astype(np.float16).astype(np.float32) if precision == "fp16" else want
    if precision == "tf32":
        bits = want.view(np.int32)
        got = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(np.float32)
    result = compare(got, want, precision)
    assert result.passed, result.describe()
    assert result.used <= 1 / 16  # one rounding uses a small share: the budget is for what a stage adds


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_real_defect_fails_every_precision(precision):
    """Dropping the + ln(s) of the remote means (segment sizes ignored) is caught even at fp16."""
    model = random_model(small_spec(img=48, depth=2))
    plan = make_segment_plan(make_partition_plan(model.spec.num_tokens, 1, 2), cr=4.0)
    stage, module = rank_stages(model, plan, 1)[1]
    feed = example_feed(stage, 3, seed=3)
    with torch.no_grad():
        good = module(*(feed[t.name] for t in stage.inputs))[0]
        module.rank.remote_log_sizes.zero_()
        defective = module(*(feed[t.name] for t in stage.inputs))[0]
    assert compare(defective, good, precision).used > 4, "the fp16 tolerance would hide a missing ln(s)"
