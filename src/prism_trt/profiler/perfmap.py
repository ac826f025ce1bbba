"""The performance map: a versioned JSON file of measured points, bound to the engines it was
measured with (petals' throughput cache: a version, the keys it was measured for, and refusal to
use a map made for other engines).

Schema (version 1)::

    {"schema": "prism-trt/perfmap", "schema_version": 1,
     "metadata": {"tool_version", "created", "model": {"name", "weights_sha256"},
                  "engines": {"manifest_sha256", "backend", "device"}, "hardware": {...},
                  "ranks", "threads_per_rank", "warmup", "repeat", "energy_meter"},
     "accuracy": [{"ranks", "cr", "segments", "agreement", "accuracy", "calibration"}],
     "points": [{"mode", "cr", "batch", "bandwidth_mbit", "measured_mbit",
                 "latency": {"mean_ms", "p50_ms", "p90_ms", "stdev_ms", "per_sample_ms"},
                 "per_rank": [{"compute", "d2h", "h2d", "wait", "comm", "other", "total",
                               "bytes_sent", "bytes_received", "collectives"}],
                 "energy_j": float | null, "energy_per_sample_j": float | null, "fell_back": bool}]}

Local points do not depend on the network: their ``bandwidth_mbit`` is null. Energy that could
not be measured is null, never estimated.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .. import __version__
from ..engines.manifest import MANIFEST_NAME, rank_directory, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

SCHEMA, SCHEMA_VERSION = "prism-trt/perfmap", 1
MODES = ("local", "voltage", "prism")
LATENCY_FIELDS = ("mean_ms", "p50_ms", "p90_ms", "stdev_ms", "per_sample_ms")


class PerfMapError(ValueError):
    """A performance map that is malformed, of another version, or made for other engines."""


def engines_fingerprint(engines_dir: Path) -> dict:
    """Identity of a build: the SHA-256 of rank 0's file hashes, backend and device."""
    manifest = json.loads((rank_directory(engines_dir) / MANIFEST_NAME).read_text())
    return {"manifest_sha256": sha256_json(manifest["files"]), "backend": manifest["backend"]["name"],
            "device": manifest["backend"]["device"], "world_size": manifest["world_size"],
            "model": manifest["model"]["spec"]["name"], "weights_sha256": manifest["model"]["weights_sha256"]}


def point_key(mode: str, cr: float | None, batch: int, bandwidth: float | None) -> tuple:
    """Identity of a point: local points ignore bandwidth and CR."""
    if mode == "local":
        return ("local", None, int(batch), None)
    return (mode, None if cr is None else round(float(cr), 4), int(batch),
            None if bandwidth is None else round(float(bandwidth), 3))


def new_map(fingerprint: dict, hardware: dict, ranks: int, threads: int, warmup: int, repeat: int,
            energy_meter: str | None) -> dict:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "metadata": {"tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "model": {"name": fingerprint["model"], "weights_sha256": fingerprint["weights_sha256"]},
                         "engines": fingerprint, "hardware": hardware, "ranks": ranks, "threads_per_rank": threads,
                         "warmup": warmup, "repeat": repeat, "energy_meter": energy_meter},
            "accuracy": [], "points": []}


def _require(container: dict, key: str, kinds, where: str):
    if key not in container:
        raise PerfMapError(f"{where}: required field {key!r} is missing")
    value = container[key]
    if kinds is not None and not isinstance(value, kinds):
        raise PerfMapError(f"{where}.{key}: expected {kinds}, found {type(value).__name__} {value!r}")
    return value


def validate(data: dict, source: str = "perfmap") -> dict:
    """Check the schema; raise PerfMapError naming the first bad field."""
    if not isinstance(data, dict):
        raise PerfMapError(f"{source}: expected a JSON object, found {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise PerfMapError(f"{source}: not a prism-trt performance map (schema {data.get('schema')!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise PerfMapError(f"{source}: schema version {data.get('schema_version')!r}, this prism-trt reads "
                           f"{SCHEMA_VERSION}; re-run `prism-trt profile`")
    metadata = _require(data, "metadata", dict, source)
    engines = _require(metadata, "engines", dict, f"{source}.metadata")
    _require(engines, "manifest_sha256", str, f"{source}.metadata.engines")
    for key in ("ranks", "repeat"):
        _require(metadata, key, int, f"{source}.metadata")
    for index, entry in enumerate(_require(data, "accuracy", list, source)):
        where = f"{source}.accuracy[{index}]"
        for key in ("ranks", "cr", "agreement"):
            _require(entry, key, (int, float), where)
    number = (int, float)
    for index, point in enumerate(_require(data, "points", list, source)):
        where = f"{source}.points[{index}]"
        mode = _require(point, "mode", str, where)
        if mode not in MODES:
            raise PerfMapError(f"{where}.mode: expected one of {MODES}, found {mode!r}")
        if mode == "prism":
            _require(point, "cr", number, where)
        batch = _require(point, "batch", int, where)
        if batch < 1:
            raise PerfMapError(f"{where}.batch: must be >= 1, found {batch}")
        if mode != "local" and point.get("bandwidth_mbit") is not None:
            _require(point, "bandwidth_mbit", number, where)  # null: unshaped loopback
        latency = _require(point, "latency", dict, where)
        for key in LATENCY_FIELDS:
            value = _require(latency, key, number, f"{where}.latency")
            if value < 0:
                raise PerfMapError(f"{where}.latency.{key}: negative ({value})")
        ranks = _require(point, "per_rank", list, where)
        if not ranks:
            raise PerfMapError(f"{where}.per_rank: empty")
        if "energy_per_sample_j" in point and point["energy_per_sample_j"] is not None \
                and not isinstance(point["energy_per_sample_j"], number):
            raise PerfMapError(f"{where}.energy_per_sample_j: expected a number or null")
    return data


def load(path: Path, engines_dir: Path | None = None, strict: bool = True) -> dict:
    """Read and validate a map; with ``engines_dir``, refuse (strict) or warn when it was measured
    with other engines than those."""
    path = Path(path)
    if not path.is_file():
        raise PerfMapError(f"{path}: no such performance map (make one with `prism-trt profile`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PerfMapError(f"{path}: not valid JSON ({error})") from None
    validate(data, str(path))
    if engines_dir is not None:
        current = engines_fingerprint(engines_dir)["manifest_sha256"]
        measured = data["metadata"]["engines"]["manifest_sha256"]
        if current != measured:
            message = (f"{path} was measured with other engines (manifest {measured[:12]}) than {engines_dir} "
                       f"({current[:12]}); re-run `prism-trt profile` for these engines")
            if strict:
                raise PerfMapError(message)
            log.warning(message)
    return data


def save(path: Path, data: dict) -> None:
    """Validate, then write atomically (the sweep calls this after every point)."""
    validate(data, str(path))
    write_json_atomic(Path(path), data)


def key_of(point: dict) -> tuple:
    return point_key(point["mode"], point.get("cr"), point["batch"], point.get("bandwidth_mbit"))


def find_point(data: dict, mode: str, cr: float | None, batch: int, bandwidth: float | None) -> dict | None:
    key = point_key(mode, cr, batch, bandwidth)
    for point in data["points"]:
        if key_of(point) == key:
            return point
    return None


def upsert_point(data: dict, point: dict) -> None:
    key = key_of(point)
    data["points"] = [p for p in data["points"] if key_of(p) != key] + [point]
