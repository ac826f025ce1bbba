"""The performance map: measured points bound to the engines they were measured with (petals'
throughput cache: a version, the keys it was measured for, and refusal to use a map made for other
engines). :class:`PerfMap` is the only reader and writer of ``perfmap.json``.

Schema (version 2; 2 keys every chain by its segment count, see :mod:`prism_trt.core.chain_key`)::

    {"schema": "prism-trt/perfmap", "schema_version": 2,
     "metadata": {"tool_version", "created", "model": {"name", "weights_sha256"},
                  "engines": {"manifest_sha256", "backend", "device", ...}, "hardware": {...},
                  "ranks", "threads_per_rank", "warmup", "repeat", "energy_meter"},
     "accuracy": [{"mode", "segments", "cr", "ranks", "agreement", "accuracy", "local_accuracy", "calibration"}],
     "points": [{"mode", "segments", "cr", "batch", "bandwidth_mbit", "measured_mbit",
                 "latency": LatencyStats,
                 "per_rank": [PhaseTimes (rank 0's "request" absent in maps from before it was timed)],
                 "energy_j": float | null, "energy_per_sample_j": float | null, "fell_back": bool,
                 "samples": SampleStats | absent,
                 "gflops_per_rank": [per rank, per sample] | absent,
                 "online": OnlineStats | absent}]}

Each record named is a dataclass of :mod:`.measured` whose fields are its JSON keys, in order.

Local points do not depend on the network: their ``bandwidth_mbit`` is null. Energy that could
not be measured is null, never estimated. ``samples`` (rank 0's latency median, its spread, the
median's confidence interval, the outliers kept in the mean, why sampling stopped, each rank's
compute jitter) and ``gflops_per_rank`` came later than schema 2 itself; maps without them
still load. ``online`` marks a point that ``serve --mode auto --save-map`` refined from
the batches it served (latency: the exponentially weighted median per sample x batch, and the
newest batch's rank-0 phases; ``observations`` counted, ``half_width_ms`` the median's ~95 % bound
per sample); absent in profiled points, and maps without it load unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.chain_key import ChainKey, Mode
from ..errors import PrismError
from .json_record import NUMBER, Fields, read_json_object, write_json_atomic
from .manifest import Manifest, rank_directory
from .measured import LatencyStats, OnlineStats, PhaseTimes, SampleStats

log = logging.getLogger(__name__)

SCHEMA, SCHEMA_VERSION = "prism-trt/perfmap", 2


class PerfMapError(PrismError, ValueError):
    """A performance map that is malformed, of another version, or made for other engines."""


def engines_fingerprint(engines_dir: Path) -> dict[str, Any]:
    """Identity of a build: the SHA-256 of rank 0's file hashes, backend, device, model."""
    return Manifest.read(rank_directory(engines_dir)).fingerprint()


def _bandwidth_cell(bandwidth: float | None) -> float | None:
    return None if bandwidth is None else round(float(bandwidth), 3)


def _key(fields: Fields) -> ChainKey:
    mode = fields.get("mode", str)
    if mode == Mode.PRISM:
        fields.integer("segments", minimum=1)
    fields.number("cr", optional=mode != Mode.PRISM, minimum=1)
    try:
        return ChainKey.from_dict(fields.data)
    except PrismError as error:
        raise PerfMapError(f"{fields.where}: {error}") from None


@dataclass
class PerfPoint:
    """One measured (chain, batch, bandwidth) cell; ``per_rank`` holds each rank's phase means (ms)."""

    key: ChainKey
    batch: int
    bandwidth_mbit: float | None  # None: local, or unshaped loopback
    latency: LatencyStats
    per_rank: list[PhaseTimes]
    measured_mbit: float | None = None
    energy_j: float | None = None
    energy_per_sample_j: float | None = None
    fell_back: bool = False
    samples: SampleStats | None = None  # None in maps from before it
    gflops_per_rank: list[float] | None = None
    online: OnlineStats | None = None  # None for profiled points

    @property
    def mode(self) -> Mode:
        return self.key.mode

    @property
    def cell(self) -> tuple:
        """Identity of a point: local points ignore bandwidth."""
        return (self.key, self.batch, None if self.key.mode == Mode.LOCAL else _bandwidth_cell(self.bandwidth_mbit))

    @property
    def bandwidth(self) -> float | None:
        """The link rate the point ran at: measured when it was, else configured."""
        return self.measured_mbit or self.bandwidth_mbit

    def to_dict(self) -> dict[str, Any]:
        return {**self.key.to_dict(), "batch": self.batch, "bandwidth_mbit": self.bandwidth_mbit,
                "measured_mbit": self.measured_mbit, "latency": self.latency.to_dict(),
                "per_rank": [times.to_dict() for times in self.per_rank],
                "energy_j": self.energy_j, "energy_per_sample_j": self.energy_per_sample_j,
                "fell_back": self.fell_back,
                **({"samples": self.samples.to_dict()} if self.samples is not None else {}),
                **({"gflops_per_rank": self.gflops_per_rank} if self.gflops_per_rank is not None else {}),
                **({"online": self.online.to_dict()} if self.online is not None else {})}

    @classmethod
    def parse(cls, fields: Fields) -> PerfPoint:
        key = _key(fields)
        per_rank = [PhaseTimes.parse(rank) for rank in fields.items("per_rank")]
        if not per_rank:
            raise fields.fail("per_rank", "empty: every point needs rank 0's phase times at least")
        samples, online = fields.nested("samples", optional=True), fields.nested("online", optional=True)
        return cls(key, fields.integer("batch", minimum=1),
                   None if key.mode == Mode.LOCAL else fields.number("bandwidth_mbit", optional=True, positive=True),
                   LatencyStats.parse(fields.nested("latency")), per_rank,
                   fields.number("measured_mbit", optional=True, positive=True),
                   fields.number("energy_j", optional=True, minimum=0),
                   fields.number("energy_per_sample_j", optional=True, minimum=0),
                   bool(fields.get("fell_back", bool, optional=True)),
                   None if samples is None else SampleStats.parse(samples, len(per_rank)),
                   _gflops(fields, len(per_rank)), None if online is None else OnlineStats.parse(online))


def _gflops(point: Fields, ranks: int) -> list[float] | None:
    values = point.get("gflops_per_rank", list, optional=True)
    if values is not None and (len(values) != ranks or not all(isinstance(v, NUMBER) and v > 0 for v in values)):
        raise point.fail("gflops_per_rank", f"expected {ranks} numbers > 0, found {values!r:.80}")
    return values


@dataclass(frozen=True)
class AccuracyEntry:
    """How often a chain agrees with the local model on the calibration set (and its accuracy)."""

    key: ChainKey
    ranks: int
    agreement: float
    accuracy: float | None = None
    local_accuracy: float | None = None
    calibration: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**self.key.to_dict(), "ranks": self.ranks, "agreement": self.agreement, "accuracy": self.accuracy,
                "local_accuracy": self.local_accuracy, "calibration": self.calibration}

    @classmethod
    def parse(cls, fields: Fields) -> AccuracyEntry:
        share = {"minimum": 0}
        entry = cls(_key(fields), fields.integer("ranks", minimum=1), fields.number("agreement", **share),
                    fields.number("accuracy", optional=True, **share),
                    fields.number("local_accuracy", optional=True, **share), fields.get("calibration", str, True) or "")
        for name in ("agreement", "accuracy", "local_accuracy"):
            value = getattr(entry, name)
            if value is not None and value > 1:
                raise fields.fail(name, f"a share must lie in [0, 1], found {value}")
        return entry


@dataclass
class PerfMap:
    metadata: dict[str, Any]
    accuracy: list[AccuracyEntry] = field(default_factory=list)
    points: list[PerfPoint] = field(default_factory=list)

    @classmethod
    def new(cls, fingerprint: dict, hardware: dict, ranks: int, threads: int, warmup: int, repeat: int,
            energy_meter: str | None = None) -> PerfMap:
        return cls({"tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "model": {"name": fingerprint["model"], "weights_sha256": fingerprint["weights_sha256"]},
                    "engines": fingerprint, "hardware": hardware, "ranks": ranks, "threads_per_rank": threads,
                    "warmup": warmup, "repeat": repeat, "energy_meter": energy_meter})

    # -- reading and writing ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, engines_dir: Path | None = None, strict: bool = True) -> PerfMap:
        """Read and check a map; with ``engines_dir``, refuse (strict) or warn when it was measured
        with other engines than those."""
        path = Path(path)
        data = read_json_object(path, PerfMapError, "make a performance map with `prism-trt profile`")
        perfmap = cls.from_dict(data, str(path))
        if engines_dir is not None:
            current = engines_fingerprint(engines_dir)["manifest_sha256"]
            measured = perfmap.metadata["engines"]["manifest_sha256"]
            if current != measured:
                message = (f"{path} was measured with other engines (manifest {measured[:12]}) than {engines_dir} "
                           f"({current[:12]}); re-run `prism-trt profile` for these engines")
                if strict:
                    raise PerfMapError(message)
                log.warning(message)
        return perfmap

    def save(self, path: Path) -> None:
        """Check, then write atomically (the sweep calls this after every point): a map that would
        not load is never written."""
        data = self.to_dict()
        PerfMap.from_dict(data, str(path))
        write_json_atomic(Path(path), data)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "metadata": self.metadata,
                "accuracy": [a.to_dict() for a in self.accuracy], "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "perfmap") -> PerfMap:
        """Check the schema; PerfMapError names the first bad field."""
        fields = Fields(data, source, PerfMapError)
        if data.get("schema") != SCHEMA:
            raise PerfMapError(f"{source}: not a prism-trt performance map (schema {data.get('schema')!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise PerfMapError(f"{source}: schema version {data.get('schema_version')!r}, this prism-trt reads "
                               f"{SCHEMA_VERSION}; re-run `prism-trt profile`")
        metadata = fields.nested("metadata")
        metadata.nested("engines").get("manifest_sha256", str)
        metadata.integer("ranks", minimum=1)
        metadata.integer("repeat", minimum=1)
        metadata.integer("warmup", minimum=0, optional=True)
        perfmap = cls(metadata.data, [AccuracyEntry.parse(a) for a in fields.items("accuracy")],
                      [PerfPoint.parse(p) for p in fields.items("points")])
        cells = [p.cell for p in perfmap.points]
        if len(set(cells)) != len(cells):
            raise PerfMapError(f"{source}.points: the same (chain, batch, bandwidth) is listed twice")
        return perfmap

    # -- queries -----------------------------------------------------------------------------------
    @property
    def ranks(self) -> int:
        return self.metadata["ranks"]

    def find(self, key: ChainKey, batch: int, bandwidth: float | None) -> PerfPoint | None:
        cell = (key, int(batch), None if key.mode == Mode.LOCAL else _bandwidth_cell(bandwidth))
        return next((p for p in self.points if p.cell == cell), None)

    def upsert(self, point: PerfPoint) -> None:
        self.points = [p for p in self.points if p.cell != point.cell] + [point]

    def chains(self) -> list[ChainKey]:
        """Every measured chain, in the order first measured."""
        return list(dict.fromkeys(p.key for p in self.points))

    def agreement(self, key: ChainKey) -> float | None:
        """The calibrated agreement of ``key`` with the local model at this map's rank count."""
        return next((a.agreement for a in self.accuracy if a.key == key and a.ranks == self.ranks), None)
