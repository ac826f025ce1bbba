"""The typed records of a measurement: one rank's time per phase (:class:`PhaseTimes`), the latency
statistics of a timed point (:class:`LatencyStats`), how its samples were taken
(:class:`SampleStats`) and what online refinement added (:class:`OnlineStats`).

They live here, below the runtime that fills them and the profiler that reads them, because the
performance map (:mod:`.perfmap`) stores them: each record writes and parses its own part of the
map's JSON, so a point reads back as the same records it was written from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .json_record import NUMBER, Fields

# The phases of one inference on one rank, in the order of a breakdown table (see PhaseTimes).
PHASES = ("request", "compute", "d2h", "h2d", "wait", "comm", "other")
# What a map may lack: ``request`` in maps from before it was timed, ``wait`` (null) without a
# barrier, the byte and collective counts in hand-written maps. Every other phase and the total
# must be there.
_OPTIONAL_IN_MAPS = {"request", "wait", "bytes_sent", "bytes_received", "collectives", "request_bytes"}
STOP_REASONS = ("converged", "max_repeat", "time_budget", "stopped")


@dataclass
class PhaseTimes:
    """Milliseconds per phase for one inference on one rank, and bytes moved.

    request: rank 0's sending of the request to the other ranks of a distributed chain, each rank
    its own share (its patches' pixels, or its positions' ids and mask) (0 locally and on the
    workers); on slow links it can outweigh every other phase, so it is part of the total the
    profiler and the selector compare. request_bytes: the request's bytes that crossed the network
    for this rank: the share a worker received, the sum of the shares rank 0 sent. compute: engine
    execution. d2h / h2d: staging copies device->host before and host->device after every
    collective (a CPU backend's host copy, possibly ~0). wait: time at a barrier before each
    collective, i.e. skew between ranks — measured only in profiling mode, else None and folded
    into comm. comm: the collective itself (pure transfer when wait is measured). other: the rest
    (Python, slicing, padding). total: wall time of the whole inference.
    """

    compute: float = 0.0
    request: float = 0.0
    d2h: float = 0.0
    h2d: float = 0.0
    wait: float | None = None
    comm: float = 0.0
    other: float = 0.0
    total: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    request_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, record: Fields) -> PhaseTimes:
        """One rank's entry of a map point's ``per_rank``; numbers are kept as written (an integer
        stays one), so a map reads back and writes out unchanged."""
        values = {f.name: _number(record, f.name, optional=f.name in _OPTIONAL_IN_MAPS) for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})

    @property
    def staging(self) -> float:
        return self.d2h + self.h2d

    def phase(self, name: str) -> float:
        """The time of phase ``name`` (one of :data:`PHASES`), 0 where it was not measured."""
        return getattr(self, name) or 0.0

    def close(self, total_ms: float) -> PhaseTimes:
        """Set the total and make ``other`` the unaccounted remainder."""
        self.total = total_ms
        accounted = sum(self.phase(name) for name in PHASES if name != "other")
        self.other = max(0.0, total_ms - accounted)
        return self

    @classmethod
    def mean(cls, runs: list[PhaseTimes]) -> PhaseTimes:
        out = cls()
        for f in fields(cls):
            values = [getattr(r, f.name) for r in runs]
            if any(v is None for v in values):
                setattr(out, f.name, None)
            else:
                setattr(out, f.name, sum(values) / len(values) if values else 0.0)
        return out


@dataclass(frozen=True)
class LatencyStats:
    """Rank 0's latency over the timed runs of a point (ms, whole batch; ``per_sample_ms`` is the
    mean over the batch size)."""

    mean_ms: float
    p50_ms: float
    p90_ms: float
    stdev_ms: float
    per_sample_ms: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def parse(cls, record: Fields) -> LatencyStats:
        return cls(**{f.name: _number(record, f.name) for f in fields(cls)})


def _number(record: Fields, key: str, optional: bool = False) -> float | int | None:
    """A number >= 0 as the JSON has it (an integer stays one, so a record writes back unchanged)."""
    return None if record.number(key, optional=optional, minimum=0) is None else record.data[key]


def _numbers(record: Fields, key: str, length: int) -> tuple[float, ...]:
    values = record.get(key, list)
    if len(values) != length or not all(isinstance(v, NUMBER) and not isinstance(v, bool) and v >= 0
                                        for v in values):
        raise record.fail(key, f"expected {length} numbers >= 0, found {values!r:.80}")
    return tuple(values)


@dataclass(frozen=True)
class SampleStats:
    """How a point was sampled: rank 0's latency median, its spread (IQR, MAD), the median's ~95 %
    confidence interval (absolute and relative half-width), the outliers kept in the mean, why
    sampling stopped (one of :data:`STOP_REASONS`) and each rank's compute jitter (sigma, ms)."""

    count: int
    median_ms: float
    iqr_ms: float
    mad_ms: float
    ci_low_ms: float
    ci_high_ms: float
    ci_rel: float
    outliers: int
    outlier_ms: tuple[float, ...]
    stopped: str
    compute_sigma_ms: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outlier_ms"], data["compute_sigma_ms"] = list(self.outlier_ms), list(self.compute_sigma_ms)
        return data

    @classmethod
    def parse(cls, record: Fields, ranks: int) -> SampleStats:
        """``ranks``: the point's rank count, one jitter each."""
        count, outliers = record.integer("count", minimum=1), record.integer("outliers", minimum=0)
        spread = {name: _number(record, name)
                  for name in ("median_ms", "iqr_ms", "mad_ms", "ci_low_ms", "ci_high_ms", "ci_rel")}
        if record.get("stopped", str) not in STOP_REASONS:
            raise record.fail("stopped", f"must be one of {', '.join(STOP_REASONS)}")
        return cls(count=count, **spread, outliers=outliers, outlier_ms=_numbers(record, "outlier_ms", outliers),
                   stopped=record.data["stopped"], compute_sigma_ms=_numbers(record, "compute_sigma_ms", ranks))


@dataclass(frozen=True)
class OnlineStats:
    """What marks a point refined online by the server: the batches observed in its cell, the
    median's ~95 % half-width (ms per sample), and when it was last updated."""

    observations: int
    half_width_ms: float
    updated: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, record: Fields) -> OnlineStats:
        return cls(record.integer("observations", minimum=1), _number(record, "half_width_ms"),
                   record.get("updated", str))
