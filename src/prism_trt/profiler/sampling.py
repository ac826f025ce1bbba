"""How many times to time a point: robust statistics of a sample and the rule that stops sampling.

Latency samples on a shared board are skewed and have heavy tails (a preempted run, a late TCP
ACK), so a point is summarised by its median with a distribution-free confidence interval (order
statistics of the binomial, no normality assumed), its spread (IQR and MAD), and its outliers
(Tukey's fences at 1.5 IQR) — counted and stored, never dropped: the mean, which the per-phase
breakdown adds up to, still includes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959964  # two-sided 95 % normal quantile
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


def median_ci(samples: list[float], z: float = Z_95) -> tuple[float, float]:
    """The median's ~95 % confidence interval from order statistics (Conover): the values of rank
    floor(n/2 - z sqrt(n)/2) and ceil(1 + n/2 + z sqrt(n)/2), 1-based, clamped to the sample."""
    ordered = np.sort(np.asarray(samples, dtype=float))
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    low, high = max(0, math.floor(n / 2 - half) - 1), min(n - 1, math.ceil(1 + n / 2 + half) - 1)
    return float(ordered[low]), float(ordered[high])


def mad(samples: list[float]) -> float:
    """Median absolute deviation from the median (0 for fewer than two samples)."""
    values = np.asarray(samples, dtype=float)
    return float(np.median(np.abs(values - np.median(values)))) if len(values) > 1 else 0.0


def robust_summary(samples: list[float]) -> dict:
    """Median, IQR, MAD, the median's CI (absolute and relative half-width) and the outliers."""
    values = np.asarray(samples, dtype=float)
    median = float(np.median(values))
    q1, q3 = (float(q) for q in np.percentile(values, [25, 75]))
    iqr = q3 - q1
    low, high = median_ci(samples)
    outliers = [float(v) for v in values if v < q1 - 1.5 * iqr or v > q3 + 1.5 * iqr]
    return {"count": len(values), "median_ms": median, "iqr_ms": iqr, "mad_ms": mad(samples),
            "ci_low_ms": low, "ci_high_ms": high, "ci_rel": (high - low) / 2 / median if median > 0 else 0.0,
            "outliers": len(outliers), "outlier_ms": outliers}


@dataclass(frozen=True)
class SamplingRule:
    """Time a point at least ``min_repeat`` times, then until its median's CI half-width is at
    most ``target_ci`` of the median, or ``max_repeat`` samples, or ``budget_s`` seconds."""

    min_repeat: int = 20
    max_repeat: int = 100
    target_ci: float = 0.02
    budget_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_repeat <= self.max_repeat:
            raise ValueError(f"need 1 <= min_repeat <= max_repeat, got {self.min_repeat}, {self.max_repeat}")

    def verdict(self, samples: list[float], elapsed_s: float) -> str | None:
        """Why to stop now ("converged", "max_repeat", "time_budget"), or None to go on."""
        if len(samples) < self.min_repeat:
            return "time_budget" if elapsed_s >= self.budget_s and samples else None
        if median_ci_rel(samples) <= self.target_ci:
            return "converged"
        if len(samples) >= self.max_repeat:
            return "max_repeat"
        return "time_budget" if elapsed_s >= self.budget_s else None

    def to_dict(self) -> dict:
        return {"min_repeat": self.min_repeat, "max_repeat": self.max_repeat, "target_ci": self.target_ci,
                "budget_s": self.budget_s}


def median_ci_rel(samples: list[float]) -> float:
    """The median CI's half-width relative to the median."""
    low, high = median_ci(samples)
    median = float(np.median(samples))
    return (high - low) / 2 / median if median > 0 else 0.0
