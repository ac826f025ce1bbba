"""Engine directory manifests: what was built, from what, for which backend/device, with the
SHA-256 of every file; verified on every load."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..core.plan import segments_for

SCHEMA_VERSION = 2  # 2: build_options.precision, per-stage verification reports
MANIFEST_NAME = "manifest.json"


class ManifestError(RuntimeError):
    """An engine directory that cannot be used as it is; the message names the file and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as stream:
        json.dump(data, stream, indent=2, sort_keys=False)
        stream.write("\n")
        temporary = Path(stream.name)
    os.replace(temporary, path)


def compute_device(backend: dict) -> str:
    """Where a manifest's engines compute: "cpu" (onnxruntime's CPU EP) or "cuda" (every other)."""
    on_cpu = backend.get("name") == "onnxruntime" and (backend.get("provider") or "cpu") == "cpu"
    return "cpu" if on_cpu else "cuda"


def rank_directory(engines: Path, rank: int = 0) -> Path:
    """``engines/rankN`` when ``engines`` is a build directory, else ``engines`` itself (one rank's)."""
    candidate = Path(engines) / f"rank{rank}"
    return candidate if candidate.is_dir() else Path(engines)


def read_manifest(directory: Path) -> dict:
    """Parse ``directory/manifest.json`` and check its schema version (no file hashing)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing; {directory} is not an engine directory (make one with `prism-trt build`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema version {version!r}, this prism-trt reads version {SCHEMA_VERSION}; "
                            f"rebuild the engines with this version of prism-trt")
    for key in ("files", "backend", "configs", "rank", "world_size"):
        if key not in manifest:
            raise ManifestError(f"{path}: required field {key!r} is missing")
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Every listed file exists and has the recorded SHA-256."""
    directory = Path(directory)
    for relative, expected in sorted(manifest["files"].items()):
        path = directory / relative
        if not path.is_file():
            raise ManifestError(f"{path}: missing (listed in {directory / MANIFEST_NAME})")
        found = sha256_file(path)
        if found != expected:
            raise ManifestError(f"{path}: SHA-256 mismatch (manifest {expected[:16]}..., file {found[:16]}...); "
                                f"the file changed after the build, rebuild with `prism-trt build`")


def load_manifest(directory: Path, backend: str | None = None, device: str | None = None,
                  verify: bool = True) -> dict:
    """Read and verify an engine directory's manifest; optionally require a backend and device."""
    manifest = read_manifest(directory)
    path = Path(directory) / MANIFEST_NAME
    built = manifest["backend"]
    if backend is not None and built.get("name") != backend:
        raise ManifestError(f"{path}: engines were built for backend {built.get('name')!r}, not {backend!r}")
    if device is not None and built.get("device") != device:
        raise ManifestError(f"{path}: engines were built for device {built.get('device')!r}, this device is "
                            f"{device!r}; engines are device specific, rebuild them here")
    if verify:
        verify_files(directory, manifest)
    return manifest


def find_config(manifest: dict, mode: str, cr: float | None = None) -> dict:
    """The config for a mode ("local" | "voltage" | "prism"); for prism, the one whose segment
    count a requested CR maps to (L = round(ceil(N/P) / CR), as when the plan was made)."""
    candidates = [c for c in manifest["configs"] if c["mode"] == mode]
    if not candidates:
        built = sorted({c["mode"] for c in manifest["configs"]})
        raise ManifestError(f"no {mode!r} engines in this directory (built modes: {', '.join(built)})")
    if mode != "prism" or cr is None:
        return candidates[0]
    for config in candidates:
        if cr > 0 and segments_for(sum(config["partition"]), config["ranks"], cr) == config["segments"]:
            return config
    raise ManifestError(f"no prism engines for CR {cr}; built CRs: {sorted(round(c['cr'], 3) for c in candidates)}")
