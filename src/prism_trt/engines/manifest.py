"""The build's record of one rank's engine directory (``manifest.json``): what was built, from
what, for which backend and device, at which precision, every chain and stage with its
verification report, and the SHA-256 of every file; checked on every load.

:class:`Manifest` is the only reader and writer of that file. The JSON layout (schema 4)::

    {"schema_version": 4, "tool": {...}, "created": ..., "rank": r, "world_size": P, "means_source": ...,
     "model": {"source": {...}, "spec": {ViTSpec | TextSpec}, "weights_sha256": ...
               [, "kind": "text", "sequence_length": N]},
     "backend": {"name", "version", "device", "provider"}, "build_options": {BuildOptions},
     "export": {"exporter", "opset", "ir_version", "torch"},
     "configs": [{"name", "mode", "ranks", "partition", "segments", "cr", "counts", "segment_sizes",
                  "stages": [{StageSpec, "onnx", "onnx_sha256", "engine", "engine_sha256", "export_key",
                              "cache_key", "verification"}]}],
     "monolithic": {stage entry} | null, "files": {relative path: sha256},
     ["sequence_buckets": [shorter N, ...]],
     "manifest_sha256": SHA-256 of every other field}

``sequence_buckets`` (text builds of several ``--seq-len``, written only when there are any) lists
the shorter sequence lengths whose engines lie in ``seqN/`` beside this manifest, each with its
own manifest (:mod:`.buckets`).

The files' digests protect the engines; ``manifest_sha256`` protects the manifest's own fields
(an edited ``max_batch`` or plan would otherwise be served as if the build had verified it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..core.chain_key import MODE_NAMES, ChainKey, Mode
from ..core.plan import PartitionPlan, PlanError, SegmentPlan, make_segment_plan, voltage_plan
from ..errors import PrismError
from ..model.spec import ViTSpec
from ..model.text_spec import TextSpec
from .base import BuildOptions
from .json_record import Fields, read_json_object, sha256_file, sha256_json, write_json_atomic
from .model_record import ModelRecord
from .stage_spec import StageSpec
from .verification import StageVerification

# 2: build_options.precision, verification reports; 3: manifest_sha256 (its own digest); 4: a rank's
# stages read its share of the request (a ViT's embed its own raw-pixel patches, normalised inside;
# a text rank its own positions and the remote segments' sizes)
SCHEMA_VERSION = 4
DIGEST_FIELD = "manifest_sha256"
MANIFEST_NAME = "manifest.json"

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "BackendRecord", "ChainConfig", "Manifest", "ManifestError",
           "ModelRecord", "StageEntry", "rank_directory", "sha256_file", "sha256_json", "write_json_atomic"]


class ManifestError(PrismError, RuntimeError):
    """An engine directory that cannot be used as it is; the message names the file and why."""


def rank_directory(engines: Path, rank: int = 0) -> Path:
    """``engines/rankN`` when ``engines`` is a build directory, else ``engines`` itself (one rank's)."""
    candidate = Path(engines) / f"rank{rank}"
    return candidate if candidate.is_dir() else Path(engines)


def _inside(fields: Fields, key: str) -> str:
    """A file path relative to the engine directory that cannot leave it."""
    value = fields.get(key, str)
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise fields.fail(key, f"{value!r} must be a path inside the engine directory (relative, no '..')")
    return value


@dataclass(frozen=True)
class StageEntry:
    """One built stage: its I/O, files and verification report."""

    spec: StageSpec
    onnx: str
    onnx_sha256: str
    engine: str
    engine_sha256: str
    export_key: str
    cache_key: str
    verification: StageVerification | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "onnx": self.onnx, "onnx_sha256": self.onnx_sha256, "engine": self.engine,
                "engine_sha256": self.engine_sha256, "export_key": self.export_key, "cache_key": self.cache_key,
                "verification": None if self.verification is None else self.verification.to_dict()}

    @classmethod
    def parse(cls, fields: Fields) -> StageEntry:
        try:
            spec = StageSpec.from_dict(fields.data)
        except (KeyError, TypeError, ValueError) as error:
            raise fields.error(f"{fields.where}: not a stage description ({error!r})") from None
        verification = fields.nested("verification", optional=True)
        return cls(spec, _inside(fields, "onnx"), fields.get("onnx_sha256", str), _inside(fields, "engine"),
                   fields.get("engine_sha256", str), fields.get("export_key", str), fields.get("cache_key", str),
                   None if verification is None else StageVerification.parse(verification))


@dataclass(frozen=True)
class ChainConfig:
    """One chain a rank can run: its identity, its plan and its stages in execution order. A
    local chain's plan has one rank; voltage's L is one segment per token of the largest partition."""

    key: ChainKey
    plan: SegmentPlan
    stages: tuple[StageEntry, ...] = ()

    def __post_init__(self) -> None:
        if self.key != ChainKey.of_plan(self.key.mode, self.plan) or (self.mode is Mode.LOCAL) != (self.ranks == 1):
            raise PlanError(f"a {self.key.label} chain cannot run the plan {self.plan.describe()}")

    @classmethod
    def of_plan(cls, mode: Mode | str, plan: SegmentPlan) -> ChainConfig:
        """A chain (no stages yet) for ``plan``; local chains have a one-rank plan."""
        return cls(ChainKey.of_plan(mode, plan), plan)

    @property
    def name(self) -> str:
        """The chain's directory in the build, its key's label."""
        return self.key.label

    @property
    def mode(self) -> Mode:
        return self.key.mode

    @property
    def ranks(self) -> int:
        return self.plan.ranks

    def stage(self, name: str) -> StageEntry:
        for entry in self.stages:
            if entry.name == name:
                return entry
        raise ManifestError(f"chain {self.name} has no stage {name!r}")

    def plan_dict(self) -> dict[str, Any]:
        """The chain without its stages (part of every stage's export key)."""
        plan, distributed = self.plan, self.ranks > 1
        return {"name": self.name, "mode": self.mode.value, "ranks": self.ranks,
                "partition": list(plan.partition.sizes),
                "segments": plan.segments if distributed else None, "cr": plan.cr if distributed else None,
                "counts": list(plan.counts), "segment_sizes": [list(s) for s in plan.segment_sizes]}

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan_dict(), "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def parse(cls, fields: Fields, num_tokens: int, num_prefix_tokens: int) -> ChainConfig:
        """The chain recorded in ``fields``, its plan rebuilt from the partition and L by the plan's
        own rules and required to be the one recorded (segment sizes, counts, CR and name)."""
        mode = fields.get("mode", str)
        if mode not in MODE_NAMES:
            raise fields.fail("mode", f"expected local, voltage or prism, found {mode!r}")
        ranks = fields.integer("ranks", minimum=1)
        sizes = fields.integers("partition", minimum=1, length=ranks)
        segments = fields.integer("segments", minimum=1, optional=mode == Mode.LOCAL)
        fields.number("cr", optional=mode == Mode.LOCAL, minimum=1)
        fields.integers("counts", minimum=1, length=ranks)
        recorded = fields.get("segment_sizes", list)
        if len(recorded) != ranks:
            raise fields.fail("segment_sizes", f"expected one list per rank ({ranks}), found {len(recorded)}")
        for rank, rank_sizes in enumerate(recorded):
            Fields({"sizes": rank_sizes}, f"{fields.where}.segment_sizes[{rank}]", ManifestError).integers(
                "sizes", minimum=1)
        stages = tuple(StageEntry.parse(s) for s in fields.items("stages"))
        try:
            partition = PartitionPlan(num_tokens, num_prefix_tokens, sizes)
            plan = voltage_plan(partition) if mode == Mode.LOCAL else make_segment_plan(partition, segments=segments)
            config = cls(ChainKey.of_plan(mode, plan), plan, stages)
        except PlanError as error:
            raise fields.error(f"{fields.where}: not a plan of {num_tokens} tokens ({error}); rebuild the engines "
                               f"with `prism-trt build`") from None
        if config.plan_dict() != {k: v for k, v in fields.data.items() if k != "stages"}:
            raise fields.error(f"{fields.where}: the recorded plan is not the one its partition and segment count "
                               f"make ({config.plan_dict()}); rebuild the engines with `prism-trt build`")
        return config


@dataclass(frozen=True)
class BackendRecord:
    name: str
    version: str
    device: str
    provider: str | None = None

    @property
    def compute_device(self) -> str:
        """Where the engines compute: "cpu" (onnxruntime's CPU EP) or "cuda" (every other)."""
        return "cpu" if self.name == "onnxruntime" and (self.provider or "cpu") == "cpu" else "cuda"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Manifest:
    """One rank's engine directory. Build it with :class:`export.build.Builder`; read it with
    :meth:`load` (checks versions, fields and, by default, every file's SHA-256)."""

    rank: int
    world_size: int
    means_source: str
    model: ModelRecord
    backend: BackendRecord
    build_options: BuildOptions
    export: dict
    configs: list[ChainConfig] = field(default_factory=list)
    monolithic: StageEntry | None = None
    files: dict[str, str] = field(default_factory=dict)
    tool: dict = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    #: the shorter sequence lengths built beside this one (``seqN/``), ascending; () for one length
    sequence_buckets: tuple[int, ...] = ()
    #: the digest recorded in the file and the one its content has (None: not read from a file)
    recorded_digest: str | None = field(default=None, compare=False, repr=False)
    content_digest: str | None = field(default=None, compare=False, repr=False)

    # -- reading and writing ---------------------------------------------------------------------
    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Parse and check ``directory/manifest.json`` (no file hashing)."""
        path = Path(directory) / MANIFEST_NAME
        data = read_json_object(path, ManifestError, f"{directory} is not an engine directory (make one with "
                                                     f"`prism-trt build`)")
        return cls.from_dict(data, str(path))

    @classmethod
    def load(cls, directory: Path, backend: str | None = None, device: str | None = None,
             verify: bool = True) -> Manifest:
        """Read ``directory``'s manifest; optionally require a backend and device; verify the files."""
        return cls.read(directory).check(directory, backend, device, verify)

    def check(self, directory: Path, backend: str | None = None, device: str | None = None,
              verify: bool = True) -> Manifest:
        """This manifest (read from ``directory``), after requiring a backend and device and, with
        ``verify``, its own digest and every file's; for callers that read it to pick the backend."""
        path = Path(directory) / MANIFEST_NAME
        if backend is not None and self.backend.name != backend:
            raise ManifestError(f"{path}: engines were built for backend {self.backend.name!r}, not {backend!r}")
        if device is not None and self.backend.device != device:
            raise ManifestError(f"{path}: engines were built for device {self.backend.device!r}, this device is "
                                f"{device!r}; engines are device specific, rebuild them here")
        if verify:
            self.verify(directory)
        return self

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_NAME, self.to_dict())

    def verify(self, directory: Path) -> None:
        """The manifest's fields are those the build wrote, and every listed file exists and has the
        recorded SHA-256."""
        directory = Path(directory)
        if self.recorded_digest != self.content_digest:
            raise ManifestError(f"{directory / MANIFEST_NAME}: its fields changed after the build (recorded digest "
                                f"{str(self.recorded_digest)[:16]}..., content {str(self.content_digest)[:16]}...); "
                                f"engines are only used as built and verified: rebuild with `prism-trt build`")
        for relative, expected in sorted(self.files.items()):
            path = directory / relative
            if not path.is_file():
                raise ManifestError(f"{path}: missing (listed in {directory / MANIFEST_NAME})")
            found = sha256_file(path)
            if found != expected:
                raise ManifestError(f"{path}: SHA-256 mismatch (manifest {expected[:16]}..., file {found[:16]}...); "
                                    f"the file changed after the build, rebuild with `prism-trt build`")

    def to_dict(self) -> dict[str, Any]:
        content = {"schema_version": self.schema_version, "tool": self.tool, "created": self.created,
                   "rank": self.rank, "world_size": self.world_size, "means_source": self.means_source,
                   "model": self.model.to_dict(), "backend": self.backend.to_dict(),
                   "build_options": self.build_options.to_dict(), "export": self.export,
                   "configs": [c.to_dict() for c in self.configs],
                   "monolithic": None if self.monolithic is None else self.monolithic.to_dict(), "files": self.files}
        if self.sequence_buckets:  # one-length builds keep their layout, so their digests do not change
            content["sequence_buckets"] = list(self.sequence_buckets)
        return {**content, DIGEST_FIELD: sha256_json(content)}

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> Manifest:
        fields = Fields(data, where, ManifestError)
        version = data.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
            raise ManifestError(f"{where}: engines of schema version {version}, built by an older prism-trt whose "
                                f"stages read the whole request (this one sends each rank only its share, raw "
                                f"pixels normalised inside the engines: schema {SCHEMA_VERSION}); rebuild them with "
                                f"`prism-trt build`")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{where}: schema version {version!r}, this prism-trt reads version {SCHEMA_VERSION}; "
                                f"rebuild the engines with this version of prism-trt")
        backend = fields.nested("backend")
        try:
            options = BuildOptions(**fields.get("build_options", dict))
        except (TypeError, ValueError) as error:
            raise ManifestError(f"{where}.build_options: {error}") from None
        files = fields.get("files", dict)
        for relative, digest in files.items():
            _inside(Fields({relative: relative}, f"{where}.files", ManifestError), relative)
            if not isinstance(digest, str):
                raise ManifestError(f"{where}.files.{relative}: expected a SHA-256 hex string, found {digest!r}")
        monolithic = fields.nested("monolithic", optional=True)
        model = ModelRecord.parse(fields.nested("model"))
        manifest = cls(
            rank=fields.integer("rank", minimum=0), world_size=fields.integer("world_size", minimum=1),
            means_source=fields.get("means_source", str),
            model=model,
            backend=BackendRecord(backend.get("name", str), backend.get("version", str), backend.get("device", str),
                                  backend.get("provider", str, optional=True)),
            build_options=options, export=fields.get("export", dict),
            configs=[ChainConfig.parse(c, model.num_tokens, model.spec.num_prefix_tokens)
                     for c in fields.items("configs")],
            monolithic=None if monolithic is None else StageEntry.parse(monolithic), files=dict(files),
            tool=fields.get("tool", dict, optional=True) or {}, created=fields.get("created", str, optional=True) or "",
            sequence_buckets=fields.integers("sequence_buckets", minimum=1) if "sequence_buckets" in data else (),
            recorded_digest=fields.get(DIGEST_FIELD, str),
            content_digest=sha256_json({k: v for k, v in data.items() if k != DIGEST_FIELD}))
        if manifest.rank >= manifest.world_size:
            raise ManifestError(f"{where}.rank: {manifest.rank} is not a rank of a {manifest.world_size}-rank build")
        return manifest

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def spec(self) -> ViTSpec | TextSpec:
        return self.model.spec

    @property
    def num_tokens(self) -> int:
        """N of every plan in this build (see :attr:`ModelRecord.num_tokens`)."""
        return self.model.num_tokens

    def keys(self) -> list[ChainKey]:
        return [c.key for c in self.configs]

    def config(self, key: ChainKey) -> ChainConfig:
        """The chain with ``key``; a ManifestError naming the chains that were built otherwise."""
        for config in self.configs:
            if config.key == key:
                return config
        built = ", ".join(c.key.label for c in self.configs) or "none"
        raise ManifestError(f"no {key.label} engines in this directory (built: {built}); build them with "
                            f"`prism-trt build`")

    def key_for(self, mode: Mode | str, cr: float | None = None) -> ChainKey:
        """The built chain a user's mode and CR stand for (the CR mapped to L by the one rule)."""
        key = ChainKey.parse(mode, cr, self.num_tokens, self.world_size)
        return self.config(key).key

    def fingerprint(self) -> dict[str, Any]:
        """The identity of the build a measurement was made with (rank 0's manifest)."""
        return {"manifest_sha256": sha256_json(self.files), "backend": self.backend.name,
                "device": self.backend.device, "world_size": self.world_size, "model": self.spec.name,
                "weights_sha256": self.model.weights_sha256}
