"""Results cross modules as typed records with one home: the phase names are listed once, the
package has no import cycle, the records hold no string-keyed dicts, and each record's JSON reads
back as the same record and writes out unchanged (perf-map points, measurements, verification
reports, a built manifest)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
from conftest import build_engines, random_model, small_spec

import prism_trt
from prism_trt.core.precision import compare
from prism_trt.engines import ChainKey, Manifest, ManifestError, PerfMap, PerfMapError, PerfPoint
from prism_trt.engines.json_record import Fields
from prism_trt.engines.manifest import StageEntry
from prism_trt.engines.measured import PHASES, LatencyStats, OnlineStats, PhaseTimes, SampleStats
from prism_trt.engines.verification import StageVerification, VerificationReport
from prism_trt.export.build import StageReport
from prism_trt.runtime.measure import Measurement, summarize_runs

ROOT = Path(prism_trt.__file__).parent
RECORDS = [PhaseTimes, LatencyStats, SampleStats, OnlineStats, PerfPoint, Measurement, VerificationReport,
           StageVerification, StageEntry, StageReport]


def _modules() -> dict[str, ast.Module]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts): ast.parse(p.read_text())
            for p in ROOT.rglob("*.py")}


def test_the_phase_names_are_listed_in_one_module():
    """A literal naming four or more phases is a list of them; only engines/measured.py has one (the
    latency model's terms share three names with the phases and are a list of their own)."""
    listing = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(names & set(PHASES)) >= 4:
                    listing.append(module)
    assert listing == ["prism_trt.engines.measured"], listing


def _imports(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere (at its top, in a function, for type
    checking alone: a loop through any of them is a cycle in the design)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            target = ".".join(base)
            for alias in node.names:  # `from . import x`: x may be a module of that package
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return found - {module}


def test_the_package_has_no_import_cycle():
    trees = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"):
             (ast.parse(p.read_text()), p.name == "__init__.py") for p in ROOT.rglob("*.py")}
    known = set(trees)
    graph = {m: _imports(tree, m, package, known) & known for m, (tree, package) in trees.items()}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_records_hold_no_string_keyed_dicts():
    for record in RECORDS:
        for field in dataclasses.fields(record):
            annotation = str(field.type)
            assert "dict" not in annotation and "Any" not in annotation, f"{record.__name__}.{field.name}: {annotation}"


def _point(request: float | None = 0.4) -> PerfPoint:
    rank0 = PhaseTimes(compute=10.5, request=request or 0.0, d2h=0.25, h2d=0.25, wait=1.5, comm=2.0, other=0.5,
                       total=15.0, bytes_sent=4096, bytes_received=4096, collectives=12)
    samples = SampleStats(5, 15.0, 0.5, 0.2, 14.5, 15.5, 0.0333, 1, (19.0,), "converged", (0.1, 0.2))
    return PerfPoint(ChainKey.prism(5, 50, 2), 4, 500.0, LatencyStats(15.0, 15.0, 16.0, 0.4, 3.75),
                     [rank0, PhaseTimes(compute=11.0, wait=0.0, total=15.0, collectives=12)], 480.0, None, None,
                     False, samples, [0.8, 0.9], OnlineStats(3, 0.2, "2026-12-04T20:00:00+0000"))


def _map(*points: PerfPoint) -> PerfMap:
    fingerprint = {"manifest_sha256": "0" * 64, "backend": "onnxruntime", "device": "cpu", "model": "test",
                   "weights_sha256": "1" * 64}
    return PerfMap(PerfMap.new(fingerprint, {}, 2, 1, 1, 5).metadata, [], list(points))


def test_a_perf_map_point_reads_back_as_the_same_records_and_writes_out_unchanged(tmp_path):
    path = tmp_path / "map.json"
    _map(_point()).save(path)
    written = json.loads(path.read_text())
    loaded = PerfMap.load(path)
    assert loaded.points == [_point()]
    assert isinstance(loaded.points[0].per_rank[0], PhaseTimes) and loaded.points[0].samples.stopped == "converged"
    assert loaded.to_dict() == written
    per_rank = written["points"][0]["per_rank"][0]
    assert list(per_rank) == [f.name for f in dataclasses.fields(PhaseTimes)]  # the layout, key for key
    assert isinstance(per_rank["bytes_sent"], int)  # an integer stays one


def test_a_map_from_before_the_request_was_timed_loads():
    data = _map(_point()).to_dict()
    for rank in data["points"][0]["per_rank"]:
        del rank["request"]
    assert PerfMap.from_dict(data).points[0].per_rank[0].request == 0.0


@pytest.mark.parametrize("change,message", [
    (lambda p: p["per_rank"][0].pop("compute"), r"per_rank\[0\]: required field 'compute'"),
    (lambda p: p["per_rank"][1].update(comm=-1.0), r"per_rank\[1\]\.comm: must be >= 0"),
    (lambda p: p["latency"].pop("p90_ms"), r"latency: required field 'p90_ms'"),
    (lambda p: p["online"].update(observations=0), r"online\.observations: must be >= 1"),
])
def test_a_bad_record_in_a_map_is_named(change, message):
    data = _map(_point()).to_dict()
    change(data["points"][0])
    with pytest.raises(PerfMapError, match=message):
        PerfMap.from_dict(data)


def test_a_measurement_round_trips_and_becomes_its_point():
    runs = [[PhaseTimes(compute=c, total=t, collectives=4), PhaseTimes(compute=c + 1, total=t)]
            for c, t in ((8.0, 10.0), (9.0, 12.0), (7.0, 11.0))]
    measured = summarize_runs(ChainKey.voltage(), 2, 1, runs, False, 3.0)
    assert measured.samples_ms == (10.0, 12.0, 11.0) and measured.repeat == 3
    assert measured.latency.mean_ms == pytest.approx(11.0) and measured.latency.per_sample_ms == pytest.approx(5.5)
    assert measured.per_rank[1].compute == pytest.approx(9.0) and measured.energy_per_sample_j == pytest.approx(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        measured.batch = 3
    line = json.loads(json.dumps(measured.to_dict()))
    assert line["latency"]["samples_ms"] == [10.0, 12.0, 11.0] and line["phases"] == list(PHASES)
    assert Measurement.from_dict(line) == measured
    point = measured.point(500.0, 480.0)
    assert (point.bandwidth_mbit, point.measured_mbit, point.latency) == (500.0, 480.0, measured.latency)
    assert summarize_runs(ChainKey.local(), 2, 1, [r[:1] for r in runs], False,
                          None).point(500.0).bandwidth_mbit is None


def _report(precision: str = "fp32") -> VerificationReport:
    want = {"logits": [[1.0, 2.0, 3.0]], "means": [[0.5, -0.5]]}
    got = {"logits": [[1.0, 2.0, 3.0000002]], "means": [[0.5, -0.5]]}
    return VerificationReport.of([compare(got[n], want[n], precision, n) for n in want])


def test_a_verification_report_round_trips_field_for_field():
    stage = StageVerification((1, 3), "cpu", _report(), _report())
    data = json.loads(json.dumps(stage.to_dict()))
    assert list(data) == ["batches", "device", "engine", "export"]
    assert list(data["engine"]) == ["precision", "passed", "used", "max_abs_error", "outputs"]
    assert data["engine"]["passed"] and data["engine"]["used"] == max(o["used"] for o in data["engine"]["outputs"])
    parsed = StageVerification.parse(Fields(data, "verification", ManifestError))
    assert parsed == stage and parsed.to_dict() == data
    data["engine"]["used"] = 0.0  # a summary that does not follow from its outputs
    with pytest.raises(ManifestError, match=r"engine\.used: .* rebuild"):
        StageVerification.parse(Fields(data, "verification", ManifestError))


def test_a_built_manifest_reads_back_and_writes_out_unchanged(tmp_path):
    build_engines(random_model(small_spec(depth=1)), tmp_path, 1)
    raw = json.loads((tmp_path / "rank0" / "manifest.json").read_text())
    manifest = Manifest.read(tmp_path / "rank0")
    stages = [s for c in manifest.configs for s in c.stages]
    assert stages and all(isinstance(s.verification, StageVerification) and s.verification.engine.passed
                          for s in stages)
    assert json.loads(json.dumps(manifest.to_dict())) == raw  # as JSON: tuples of the model's spec are lists there

