"""Precision-aware comparison of outputs: one tolerance model for every check in the project.

Like Polygraphy's comparator, an element passes when ``|got - want| <= atol + rtol * |want|``, and
the report says how large the errors were, where the worst one sits and how much of the tolerance
it used. Unlike a fixed threshold, both tolerances come from the *precision* the engines compute
in and are *scaled to the reference's values*:

    rtol = k_p * u_p            atol = k_p * u_p * max|want|

``u_p`` is the unit roundoff of the arithmetic that rounds most in precision ``p`` and ``k_p``
the number of roundoffs one comparison allows. Rounding errors are relative to the magnitudes
that flow through a stage, so an absolute threshold tuned on one model (or one CPU's summation
order) fails on the next: a trained model's residual stream can be 40x larger than a random
one's. Scaled to ``max|want|``, the same ``k_p`` holds for small and large activations.

How ``k_p`` was chosen (measurements in ``docs/precision.md``), from both sides:

* noise — the worst fp32 error between onnxruntime and torch on any stage, on AVX-512 and with
  torch capped to AVX2, was 47 u (the MNIST ViT's block 4, whose trained attention is sharp); fp32
  allows 1024 u (6e-5 of the output's scale), a margin of 20x. TF32 and fp16 round to 11
  significant bits: TF32 emulated on the CPU stayed within 3.5 u and allows 32 u (1.6 % of the
  scale); fp16 engines on onnxruntime's CPU EP reached 7 u and fp16 allows 64 u (3.1 %), since a
  GPU also keeps softmax and LayerNorm intermediates in fp16, which the CPU EP does not.
* defects — dropping the ``+ ln(s)`` of the remote means moves a block's output by 7-14x the
  fp16 tolerance (MNIST ViT and a random ViT), so even the loosest tolerance catches it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np

from ..errors import UsageError

Precision = Literal["fp32", "tf32", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: Unit roundoff: fp32 keeps 24 significant bits; TF32 rounds matmul inputs to 11 bits (fp32
#: accumulation); fp16 keeps 11 bits for everything it stores.
UNIT_ROUNDOFF: dict[str, float] = {"fp32": 2.0**-24, "tf32": 2.0**-11, "fp16": 2.0**-11}
#: Roundoffs a comparison allows (see the module docstring for where they come from).
ALLOWED_ROUNDOFFS: dict[str, float] = {"fp32": 1024.0, "tf32": 32.0, "fp16": 64.0}


class ToleranceError(AssertionError):
    """Outputs that differ beyond the precision's tolerance; the message is the comparison report."""


def check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class Tolerance:
    """``rtol = k*u`` and ``atol = rtol * max|want|`` for one precision."""

    precision: str
    rtol: float

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        return cls(precision, ALLOWED_ROUNDOFFS[check_precision(precision)] * UNIT_ROUNDOFF[precision])

    def atol(self, scale: float) -> float:
        # A reference of all zeros still gets an absolute tolerance (as if its scale were 1).
        return self.rtol * (scale if scale > 0 else 1.0)


@dataclass(frozen=True)
class Comparison:
    """One output compared with its reference. ``used`` is the largest share of the tolerance an
    element needed (<= 1 passes), so ``margin = 1 / used`` says how far from failing it is."""

    name: str
    precision: str
    passed: bool
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float  # |got - want| / |want| over elements where want != 0
    scale: float  # max |want|
    atol: float
    rtol: float
    used: float
    worst_index: tuple[int, ...]
    worst_got: float
    worst_want: float
    nonfinite: int  # NaN / inf in got where want is finite

    @property
    def margin(self) -> float:
        return math.inf if self.used == 0 else 1.0 / self.used

    def describe(self) -> str:
        status = "ok" if self.passed else "FAILED"
        where = f"at {list(self.worst_index)} (got {self.worst_got:.6g}, want {self.worst_want:.6g})"
        text = (f"{self.name}: {status}, max |err| {self.max_abs_error:.3g}, max rel err {self.max_rel_error:.3g}; "
                f"worst {where}; tolerance {self.atol:.3g} + {self.rtol:.3g}*|want| ({self.precision}, scale "
                f"{self.scale:.3g}); used {100 * self.used:.3g} % of it")
        text += f" (margin {self.margin:.3g}x)" if self.passed and self.used > 0 else ""
        if self.nonfinite:
            text += f"; {self.nonfinite} NaN/inf values where the reference is finite"
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"], data["worst_index"] = list(self.shape), list(self.worst_index)
        return data


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def compare(got, want, precision: str = "fp32", name: str = "output") -> Comparison:
    """Compare one output (numpy array or torch tensor) with its reference at ``precision``."""
    tolerance = Tolerance.for_precision(precision)
    got64, want64 = _as_array(got).astype(np.float64), _as_array(want).astype(np.float64)
    if got64.shape != want64.shape:
        raise ToleranceError(f"{name}: shape {got64.shape} differs from the reference's {want64.shape}")
    if want64.size == 0:
        return Comparison(name, precision, True, want64.shape, 0.0, 0.0, 0.0, tolerance.atol(0.0), tolerance.rtol,
                          0.0, (), 0.0, 0.0, 0)
    finite_want = np.isfinite(want64)
    scale = float(np.abs(want64[finite_want]).max()) if finite_want.any() else 0.0
    atol = tolerance.atol(scale)
    with np.errstate(invalid="ignore"):  # inf - inf: handled just below
        error = np.abs(got64 - want64)
    # Where the reference itself is NaN/inf the engine must match it exactly (same special value).
    special_match = ~finite_want & ((got64 == want64) | (np.isnan(got64) & np.isnan(want64)))
    error = np.where(finite_want, error, np.where(special_match, 0.0, np.inf))
    error = np.where(np.isnan(error), np.inf, error)
    allowed = atol + tolerance.rtol * np.abs(np.where(finite_want, want64, 0.0))
    share = error / allowed
    worst = np.unravel_index(int(np.argmax(share)), share.shape)
    nonzero = finite_want & (want64 != 0)
    max_rel = float((error[nonzero] / np.abs(want64[nonzero])).max()) if nonzero.any() else 0.0
    used = float(share[worst])
    return Comparison(name, precision, bool(used <= 1.0), tuple(want64.shape), float(error.max()), max_rel, scale, atol,
                      tolerance.rtol, used, tuple(int(i) for i in worst), float(got64[worst]), float(want64[worst]),
                      int((~np.isfinite(got64) & finite_want).sum()))


def compare_outputs(got: Mapping, want: Mapping, precision: str = "fp32", prefix: str = "") -> list[Comparison]:
    """One comparison per named output; a missing or extra output is an error naming it."""
    if set(got) != set(want):
        raise ToleranceError(f"{prefix}outputs {sorted(got)} differ from the reference's {sorted(want)}")
    return [compare(got[name], want[name], precision, f"{prefix}{name}") for name in want]


def worst(comparisons: list[Comparison]) -> Comparison:
    """The comparison that used the largest share of its tolerance."""
    return max(comparisons, key=lambda c: c.used)


def require_close(got, want, precision: str = "fp32", name: str = "output") -> Comparison:
    """:func:`compare`, raising :class:`ToleranceError` with the report when it fails."""
    result = compare(got, want, precision, name)
    if not result.passed:
        raise ToleranceError(result.describe())
    return result
