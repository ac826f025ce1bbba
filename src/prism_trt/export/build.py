"""`prism-trt build`: export every rank's stages, verify them, compile engines, write manifests.

Layout of a build directory (one sub-directory per board; copy ``rankN/`` to board N)::

    OUT/build.json                    what was built, for which ranks
    OUT/rank0/manifest.json           schema, model, plans, stages, backend/device, SHA-256 of every file
    OUT/rank0/local/embed.onnx ...    rank 0's P=1 chain (the fallback) and the monolithic model.onnx
    OUT/rank0/voltage/...             CR = 1
    OUT/rank0/prism-cr9.9/...         one directory per compression rate
    OUT/rank1/...

A stage is re-exported only when its export key (weights, spec, plan, rank, exporter, versions)
changed, and its engine rebuilt only when its cache key (ONNX hash, backend, version, device,
build options) changed and the files on disk still match the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..core.plan import SegmentPlan, make_partition_plan, make_segment_plan, voltage_plan
from ..engines.base import Backend, BuildOptions
from ..engines.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ManifestError,
    read_manifest,
    sha256_file,
    sha256_json,
    write_json_atomic,
)
from ..model import PrismViT, weights_hash
from ..model.vit import MeansSource
from .onnx_export import OPSET, check_onnx, export_stage, verify_onnx
from .stages import StageSpec, monolithic_stage, rank_stages

FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ConfigPlan:
    """One chain a rank can run: local (P=1), voltage (CR=1) or prism at one CR."""

    name: str
    mode: str
    plan: SegmentPlan

    def to_dict(self) -> dict:
        plan = self.plan
        distributed = plan.ranks > 1
        return {"name": self.name, "mode": self.mode, "ranks": plan.ranks, "partition": list(plan.partition.sizes),
                "segments": plan.segments if distributed else None, "cr": plan.cr if distributed else None,
                "counts": list(plan.counts), "segment_sizes": [list(s) for s in plan.segment_sizes]}


@dataclass
class StageReport:
    rank: int
    config: str
    stage: str
    exported: bool
    built: bool
    max_abs_diff: float | None
    bytes: int


@dataclass
class BuildResult:
    out_dir: Path
    rank_dirs: list[Path]
    stages: list[StageReport] = field(default_factory=list)
    seconds: float = 0.0


def config_plans(num_tokens: int, num_prefix: int, ranks: int, crs: list[float], segments: list[int],
                 weights: list[float] | None = None, include_voltage: bool = True) -> list[ConfigPlan]:
    """The chains a build holds: local, then voltage and one prism chain per CR / segment count."""
    configs = [ConfigPlan("local", "local", voltage_plan(make_partition_plan(num_tokens, num_prefix, 1)))]
    if ranks == 1:
        return configs
    partition = make_partition_plan(num_tokens, num_prefix, ranks, weights)
    if include_voltage:
        configs.append(ConfigPlan("voltage", "voltage", voltage_plan(partition)))
    plans = [make_segment_plan(partition, cr=cr) for cr in crs] + [make_segment_plan(partition, segments=L)
                                                                    for L in segments]
    seen = set()
    for plan in plans:
        if plan.segments not in seen:
            seen.add(plan.segments)
            configs.append(ConfigPlan(f"prism-cr{plan.cr:.3g}", "prism", plan))
    return configs


def _previous_stages(rank_dir: Path) -> dict[tuple[str, str], dict]:
    """Stage entries of an earlier build in the same directory, to skip unchanged work."""
    try:
        manifest = read_manifest(rank_dir)
    except ManifestError:
        return {}
    entries = {}
    for config in manifest["configs"]:
        for stage in config["stages"]:
            entries[(config["name"], stage["name"])] = stage
    if manifest.get("monolithic"):
        entries[("local", "model")] = manifest["monolithic"]
    return entries


def _unchanged(rank_dir: Path, entry: dict | None, key_field: str, key: str, file_field: str) -> bool:
    if not entry or entry.get(key_field) != key:
        return False
    path = rank_dir / entry[file_field]
    return path.is_file() and sha256_file(path) == entry.get(f"{file_field}_sha256")


class Builder:
    """Builds the engine directories of one model for every rank."""

    def __init__(self, model: PrismViT, source: dict, backend: Backend, options: BuildOptions,
                 means_source: MeansSource = "ln1", exporter: str = "dynamo", verify: bool = True):
        self.model, self.source, self.backend, self.options = model, source, backend, options
        self.means_source, self.exporter, self.verify = means_source, exporter, verify
        self.weights_sha256 = weights_hash(model)
        self.backend_info = {"name": backend.name, "version": backend.version(), "device": backend.device(),
                             "provider": getattr(backend, "provider", None)}

    def build(self, out_dir: Path, ranks: int, configs: list[ConfigPlan], progress: bool = True) -> BuildResult:
        started = time.perf_counter()
        out_dir = Path(out_dir)
        result = BuildResult(out_dir, [out_dir / f"rank{r}" for r in range(ranks)])
        work = [(r, c) for r in range(ranks) for c in configs if c.mode != "local" or r == 0]
        depth = self.model.spec.depth
        total = sum(depth + 1 + (rank == 0) for rank, _ in work) + 1  # embed + blocks (+ head), + monolithic
        with tqdm(total=total, unit="stage", disable=not progress, desc="build") as bar:
            for rank in range(ranks):
                rank_configs = [c for c in configs if c.mode != "local" or rank == 0]
                self._build_rank(result, out_dir / f"rank{rank}", rank, ranks, rank_configs, bar)
        write_json_atomic(out_dir / "build.json", {
            "schema_version": SCHEMA_VERSION, "tool_version": __version__, "world_size": ranks,
            "ranks": [f"rank{r}" for r in range(ranks)], "model": self.source, "backend": self.backend_info,
            "configs": [c.name for c in configs]})
        result.seconds = time.perf_counter() - started
        return result

    def _build_rank(self, result: BuildResult, rank_dir: Path, rank: int, ranks: int, configs: list[ConfigPlan],
                    bar: tqdm) -> None:
        previous = _previous_stages(rank_dir)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "prism-trt", "version": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rank": rank, "world_size": ranks, "means_source": self.means_source,
            "model": {"source": self.source, "spec": self.model.spec.to_dict(), "weights_sha256": self.weights_sha256},
            "backend": self.backend_info, "build_options": self.options.to_dict(),
            "export": {"exporter": self.exporter, "opset": OPSET, "torch": torch.__version__},
            "configs": [], "monolithic": None, "files": {},
        }
        for config in configs:
            stage_rank = 0 if config.mode == "local" else rank
            entries = []
            for stage, module in rank_stages(self.model, config.plan, stage_rank, self.means_source):
                entries.append(self._stage(result, rank_dir, rank, config, stage, module, previous, manifest, bar))
            manifest["configs"].append({**config.to_dict(), "stages": entries})
            if config.mode == "local" and rank == 0:
                stage, module = monolithic_stage(self.model)
                manifest["monolithic"] = self._stage(result, rank_dir, rank, config, stage, module, previous,
                                                     manifest, bar)
            write_json_atomic(rank_dir / MANIFEST_NAME, manifest)  # progress survives an interrupted build

    def _stage(self, result: BuildResult, rank_dir: Path, rank: int, config: ConfigPlan, stage: StageSpec, module,
               previous: dict, manifest: dict, bar: tqdm) -> dict:
        bar.set_postfix_str(f"rank{rank}/{config.name}/{stage.name}")
        old = previous.get((config.name, stage.name))
        onnx_rel = f"{config.name}/{stage.name}.onnx"
        engine_rel = f"{config.name}/{stage.name}{self.backend.engine_suffix}"
        export_key = sha256_json({"weights": self.weights_sha256, "spec": self.model.spec.to_dict(),
                                  "config": config.to_dict(), "rank": rank, "stage": stage.to_dict(),
                                  "means_source": self.means_source, "exporter": self.exporter, "opset": OPSET,
                                  "torch": torch.__version__, "tool": __version__})
        onnx_path, engine_path = rank_dir / onnx_rel, rank_dir / engine_rel
        exported = not _unchanged(rank_dir, old, "export_key", export_key, "onnx")
        max_abs_diff = None if exported else old.get("max_abs_diff")
        if exported:
            export_stage(module, stage, onnx_path, self.exporter, self.options.max_batch)
            check_onnx(onnx_path, stage)
            if self.verify:
                max_abs_diff = verify_onnx(onnx_path, module, stage)
                if max_abs_diff > FP32_TOLERANCE:
                    raise ManifestError(f"{onnx_path}: onnxruntime differs from the reference by {max_abs_diff:.3g} "
                                        f"(> {FP32_TOLERANCE})")
        onnx_sha = sha256_file(onnx_path)
        cache_key = sha256_json({"onnx": onnx_sha, "backend": self.backend_info, "options": self.options.to_dict()})
        built = not _unchanged(rank_dir, old, "cache_key", cache_key, "engine")
        if built:
            self.backend.build(onnx_path, engine_path, list(stage.inputs), self.options)
        entry = {**stage.to_dict(), "onnx": onnx_rel, "onnx_sha256": onnx_sha, "engine": engine_rel,
                 "engine_sha256": sha256_file(engine_path), "export_key": export_key, "cache_key": cache_key,
                 "max_abs_diff": max_abs_diff}
        manifest["files"][onnx_rel] = onnx_sha
        manifest["files"][engine_rel] = entry["engine_sha256"]
        result.stages.append(StageReport(rank, config.name, stage.name, exported, built, max_abs_diff,
                                         onnx_path.stat().st_size + engine_path.stat().st_size))
        bar.update(1)
        return entry
