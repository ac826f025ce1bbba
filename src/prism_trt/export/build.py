"""`prism-trt build`: export every rank's stages, verify them, compile engines, write manifests.

Layout of a build directory (one sub-directory per board; copy ``rankN/`` to board N)::

    OUT/build.json                    what was built, for which ranks
    OUT/rank0/manifest.json           schema, model, plans, stages, backend/device, SHA-256 of every file
    OUT/rank0/local/embed.onnx ...    rank 0's P=1 chain (the fallback) and the monolithic model.onnx
    OUT/rank0/voltage/...             CR = 1
    OUT/rank0/prism-cr9.9/...         one directory per compression rate
    OUT/rank1/...
    OUT/rank0/seq32/manifest.json ... a text build's shorter --seq-len, each a whole engine directory

A stage is re-exported only when its export key (weights, spec, plan, rank, exporter, ONNX format,
versions) changed, and its engine rebuilt only when its cache key (ONNX hash, backend, version,
device, build options incl. precision) changed and the files on disk still match the manifest.
Every new engine is verified on its target at its precision (:mod:`.verify`) before it is listed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..core.chain_key import Mode
from ..core.plan import SegmentPlan, make_partition_plan, make_segment_plan, voltage_plan
from ..engines.base import Backend, BuildOptions
from ..engines.buckets import BUCKET_PREFIX, bucket_directory
from ..engines.json_record import sha256_file, sha256_json, write_json_atomic
from ..engines.manifest import (
    SCHEMA_VERSION,
    BackendRecord,
    ChainConfig,
    Manifest,
    ManifestError,
    ModelRecord,
    StageEntry,
)
from ..engines.modality import Modality
from ..engines.stage_spec import StageSpec
from ..engines.verification import StageVerification, VerificationReport
from ..errors import UsageError
from ..model import PrismText, PrismViT, weights_hash
from ..model.vit import MeansSource
from .onnx_export import check_onnx, export_stage, resolve_exporter
from .stages import monolithic_stage, rank_stages
from .verify import reference_cases, require_passed, verification_batches, verify_engine, verify_onnx


@dataclass(frozen=True)
class ConfigPlan:
    """One chain a rank can run, with its plan: local (P=1), voltage (CR=1) or prism at one CR."""

    chain: ChainConfig
    request: int | None = None  # which --cr / --segments value (in that order) a prism chain was built for

    @classmethod
    def of(cls, mode: Mode, plan: SegmentPlan, request: int | None = None) -> ConfigPlan:
        return cls(ChainConfig.of_plan(mode, plan), request)

    @property
    def plan(self) -> SegmentPlan:
        return self.chain.plan

    @property
    def name(self) -> str:
        return self.chain.name

    @property
    def mode(self) -> Mode:
        return self.chain.mode


@dataclass
class StageReport:
    rank: int
    config: str
    stage: str
    exported: bool
    built: bool
    verification: VerificationReport | None  # the engine check's
    bytes: int

    @property
    def max_abs_error(self) -> float | None:
        return self.verification.max_abs_error if self.verification else None

    @property
    def tolerance_used(self) -> float | None:
        return self.verification.used if self.verification else None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "config": self.config, "stage": self.stage, "exported": self.exported,
                "built": self.built, "max_abs_error": self.max_abs_error, "tolerance_used": self.tolerance_used,
                "bytes": self.bytes}


@dataclass
class BuildResult:
    out_dir: Path
    rank_dirs: list[Path]
    stages: list[StageReport] = field(default_factory=list)
    seconds: float = 0.0


def config_plans(num_tokens: int, num_prefix: int, ranks: int, crs: list[float], segments: list[int],
                 weights: list[float] | None = None, include_voltage: bool = True) -> list[ConfigPlan]:
    """The chains a build holds: local, then voltage and one prism chain per CR / segment count."""
    configs = [ConfigPlan.of(Mode.LOCAL, voltage_plan(make_partition_plan(num_tokens, num_prefix, 1)))]
    if ranks == 1:
        return configs
    partition = make_partition_plan(num_tokens, num_prefix, ranks, weights)
    if include_voltage:
        configs.append(ConfigPlan.of(Mode.VOLTAGE, voltage_plan(partition)))
    plans = [make_segment_plan(partition, cr=cr) for cr in crs] + [make_segment_plan(partition, segments=L)
                                                                    for L in segments]
    seen = set()
    for request, plan in enumerate(plans):
        if plan.segments not in seen:
            seen.add(plan.segments)
            configs.append(ConfigPlan.of(Mode.PRISM, plan, request))
    return configs


def _require_matching_buckets(configs: list[ConfigPlan], shorter: dict[int, list[ConfigPlan]]) -> None:
    """Every sequence bucket must hold the same chains, in the same order: the runtime maps a chain
    across buckets by its position (:mod:`..engines.buckets`). :func:`config_plans` drops a CR whose
    L repeats an earlier one's, so CRs that collapse to one L in a short bucket (and not in a long
    one) are refused here, before anything is written."""
    def chains(plans: list[ConfigPlan]) -> list[tuple[Mode, int | None]]:
        return [(c.mode, c.request) for c in plans]

    if any(chains(plans) != chains(configs) for plans in shorter.values()):
        counts = {length: len(plans) for length, plans in shorter.items()}
        counts[configs[0].plan.partition.num_tokens] = len(configs)
        raise UsageError(f"the requested CRs give different chains per --seq-len (chains per length: {counts}): in a "
                         f"short sequence several CRs round to the same segment count L; ask for fewer CRs, give "
                         f"--segments instead, or raise the shortest --seq-len")


def _previous_stages(rank_dir: Path) -> dict[tuple[str, str], StageEntry]:
    """Stage entries of an earlier build in the same directory, to skip unchanged work."""
    try:
        manifest = Manifest.read(rank_dir)
    except ManifestError:
        return {}
    entries = {(config.name, stage.name): stage for config in manifest.configs for stage in config.stages}
    if manifest.monolithic is not None:
        entries[("local", "model")] = manifest.monolithic
    return entries


def _unchanged(rank_dir: Path, key: str, found: str | None, relative: str | None, recorded: str | None) -> bool:
    """The recorded key matches and the file on disk still has the recorded hash."""
    if found != key or relative is None:
        return False
    path = rank_dir / relative
    return path.is_file() and sha256_file(path) == recorded


@contextlib.contextmanager
def _one_torch_thread():
    """Torch on one intra-op thread while the stages are traced and their references run: these are
    many small ops on small tensors, which several threads mostly spend waiting on each other for
    (a first MNIST build took 3x the CPU time with two). The engines' own threads are the
    backend's (--threads); the files written do not depend on this."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Builder:
    """Builds the engine directories of one model for every rank."""

    def __init__(self, model: PrismViT | PrismText, source: dict, backend: Backend, options: BuildOptions,
                 means_source: MeansSource = "ln1", exporter: str = "auto", verify: bool = True):
        self.model, self.source, self.backend, self.options = model, source, backend, options
        self.means_source, self.exporter, self.verify = means_source, resolve_exporter(exporter), verify
        self.weights_sha256 = weights_hash(model)
        self.onnx_format = backend.onnx_format()
        self.backend_record = BackendRecord(backend.name, backend.version(), backend.device(),
                                            getattr(backend, "provider", None))
        # The ONNX file needs a check of its own only where the engine check does not run it at fp32 on the CPU.
        self.check_export_separately = options.precision != "fp32" or backend.runs_on_cuda

    def build(self, out_dir: Path, ranks: int, configs: list[ConfigPlan], progress: bool = True,
              shorter: dict[int, list[ConfigPlan]] | None = None) -> BuildResult:
        """Every rank's engines for ``configs``; ``shorter``: a text build's shorter sequence
        buckets (length -> the same chains planned for it), built into ``rankN/seqM/`` first."""
        started = time.perf_counter()
        out_dir = Path(out_dir)
        shorter = dict(sorted((shorter or {}).items()))
        _require_matching_buckets(configs, shorter)
        result = BuildResult(out_dir, [out_dir / f"rank{r}" for r in range(ranks)])
        sets = [*((length, plans) for length, plans in shorter.items()), (None, configs)]
        work = [(r, c) for _, plans in sets for r in range(ranks) for c in plans if c.mode is not Mode.LOCAL or r == 0]
        depth = self.model.spec.depth
        total = sum(depth + 1 + (rank == 0) for rank, _ in work) + len(sets)  # + each set's monolithic
        with tqdm(total=total, unit="stage", disable=not progress, desc="build") as bar, _one_torch_thread():
            for length, plans in sets:
                for rank in range(ranks):
                    rank_dir = out_dir / f"rank{rank}"
                    rank_configs = [c for c in plans if c.mode is not Mode.LOCAL or rank == 0]
                    if length is None:
                        self._build_rank(result, rank_dir, rank, ranks, rank_configs, bar, tuple(shorter))
                    else:
                        self._build_rank(result, bucket_directory(rank_dir, length), rank, ranks, rank_configs, bar)
        write_json_atomic(out_dir / "build.json", {
            "schema_version": SCHEMA_VERSION, "tool_version": __version__, "world_size": ranks,
            "ranks": [f"rank{r}" for r in range(ranks)], "model": self.source, "backend": self.backend_record.to_dict(),
            "configs": [c.name for c in configs], "sequence_buckets": list(shorter)})
        result.seconds = time.perf_counter() - started
        return result

    def _build_rank(self, result: BuildResult, rank_dir: Path, rank: int, ranks: int, configs: list[ConfigPlan],
                    bar: tqdm, sequence_buckets: tuple[int, ...] = ()) -> None:
        previous = _previous_stages(rank_dir)
        num_tokens = configs[0].plan.partition.num_tokens
        record = ModelRecord.of(self.source, Modality.of_spec(self.model.spec, num_tokens), self.weights_sha256)
        manifest = Manifest(
            rank=rank, world_size=ranks, means_source=self.means_source, model=record, backend=self.backend_record,
            build_options=self.options,
            export={"exporter": self.exporter, **self.onnx_format.to_dict(), "torch": torch.__version__},
            tool={"name": "prism-trt", "version": __version__}, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            sequence_buckets=sequence_buckets)
        for config in configs:
            stage_rank = 0 if config.mode is Mode.LOCAL else rank
            entries = tuple(self._stage(result, rank_dir, rank, config, stage, module, previous, manifest, bar)
                            for stage, module in rank_stages(self.model, config.plan, stage_rank, self.means_source))
            manifest.configs.append(dataclasses.replace(config.chain, stages=entries))
            if config.mode is Mode.LOCAL and rank == 0:
                stage, module = monolithic_stage(self.model, num_tokens)
                manifest.monolithic = self._stage(result, rank_dir, rank, config, stage, module, previous, manifest,
                                                  bar)
            manifest.save(rank_dir)  # progress survives an interrupted build

    def _stage(self, result: BuildResult, rank_dir: Path, rank: int, config: ConfigPlan, stage: StageSpec, module,
               previous: dict[tuple[str, str], StageEntry], manifest: Manifest, bar: tqdm) -> StageEntry:
        bucket = rank_dir.name + "/" if rank_dir.name.startswith(BUCKET_PREFIX) else ""  # a shorter --seq-len
        bar.set_postfix_str(f"rank{rank}/{bucket}{config.name}/{stage.name}")
        old = previous.get((config.name, stage.name))
        onnx_rel = f"{config.name}/{stage.name}.onnx"
        engine_rel = f"{config.name}/{stage.name}{self.backend.engine_suffix}"
        export_key = sha256_json({"weights": self.weights_sha256, "spec": self.model.spec.to_dict(),
                                  "config": config.chain.plan_dict(), "rank": rank, "stage": stage.to_dict(),
                                  "means_source": self.means_source, "exporter": self.exporter,
                                  "format": self.onnx_format.to_dict(), "torch": torch.__version__,
                                  "tool": __version__})
        onnx_path, engine_path = rank_dir / onnx_rel, rank_dir / engine_rel
        exported = old is None or not _unchanged(rank_dir, export_key, old.export_key, old.onnx, old.onnx_sha256)
        if exported:
            export_stage(module, stage, onnx_path, self.exporter, self.options.max_batch, self.onnx_format.opset)
            check_onnx(onnx_path, stage)
        onnx_sha = sha256_file(onnx_path)
        cache_key = sha256_json({"onnx": onnx_sha, "backend": self.backend_record.to_dict(),
                                 "options": self.options.to_dict()})
        built = old is None or not _unchanged(rank_dir, cache_key, old.cache_key, old.engine, old.engine_sha256)
        if built:
            self.backend.build(onnx_path, engine_path, list(stage.inputs), self.options)
        verification = None if built else old.verification
        if built and self.verify:
            verification = self._verify(module, stage, onnx_path, engine_path, f"rank{rank}/{bucket}{config.name}/")
        entry = StageEntry(stage, onnx_rel, onnx_sha, engine_rel, sha256_file(engine_path), export_key, cache_key,
                           verification)
        manifest.files[onnx_rel] = onnx_sha
        manifest.files[engine_rel] = entry.engine_sha256
        engine_check = verification.engine if verification else None
        result.stages.append(StageReport(rank, bucket + config.name, stage.name, exported, built, engine_check,
                                         onnx_path.stat().st_size + engine_path.stat().st_size))
        bar.update(1)
        return entry

    def _verify(self, module, stage: StageSpec, onnx_path: Path, engine_path: Path, where: str) -> StageVerification:
        """The engine on its target at the build's precision (and the ONNX file on the CPU at fp32
        where the engine check does not cover it); raises VerificationError naming the culprit."""
        cases = reference_cases(module, stage, verification_batches(self.options))
        export_check = None
        if self.check_export_separately:
            export_check = verify_onnx(onnx_path, module, stage, cases=cases)
            require_passed(export_check, f"{where}{onnx_path.name} (exported ONNX, onnxruntime CPU, fp32)",
                           "The export itself is wrong, whatever the engine's precision; please report it.")
        engine_check = verify_engine(self.backend, engine_path, stage, self.options, cases)
        precision = self.options.precision
        hint = (f"The fp32 ONNX passed, so {precision} is too coarse for this stage: build it with a wider "
                f"--precision." if export_check is not None else
                "The exported graph does not compute what the model does; please report it.")
        require_passed(engine_check, f"{where}{engine_path.name} ({self.backend.name} on {self.backend_record.device}, "
                                     f"{precision})", hint)
        return StageVerification(tuple(case.batch for case in cases), self.backend_record.device,
                                 engine_check, export_check)
