"""Which chain runs has one home: ChainKey and Mode in core/chain_key.py, one CR -> L rule and one
L -> CR rule in core/plan.py, and a ChainConfig that holds its key and plan (written to
manifest.json exactly as before)."""

import ast
import json
import math
from pathlib import Path

import pytest
from conftest import build_engines, random_model, small_spec

import prism_trt
from prism_trt.core import (
    ChainKey,
    Mode,
    PlanError,
    cr_for_segments,
    make_partition_plan,
    make_segment_plan,
    segments_for_cr,
)
from prism_trt.engines import ChainConfig, Manifest, ManifestError
from prism_trt.engines.json_record import Fields
from prism_trt.export.build import config_plans

ROOT = Path(prism_trt.__file__).parent


def _trees():
    for path in sorted(ROOT.rglob("*.py")):
        yield str(path.relative_to(ROOT)), ast.parse(path.read_text())


def _divisions():
    """(file, numerator, denominator) of every ``/`` in the package, as source text."""
    for name, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                yield name, ast.unparse(node.left), ast.unparse(node.right)


def test_one_site_computes_each_rule():
    divisions = list(_divisions())
    per_rank = [(f, a, b) for f, a, b in divisions if "num_tokens" in a and "ranks" in b]
    assert per_rank == [("core/plan.py", "num_tokens", "ranks")]  # ceil(N/P), in tokens_per_rank
    cr_to_segments = [(f, a, b) for f, a, b in divisions if b == "cr" or b.endswith(".cr")]
    assert cr_to_segments == [("core/plan.py", "per_rank", "cr")]  # segments_for_cr
    segments_to_cr = [(f, a, b) for f, a, b in divisions if b == "segments" or b.endswith(".segments")]
    assert segments_to_cr == [("core/plan.py", "tokens_per_rank(num_tokens, ranks)", "segments")]  # cr_for_segments


def test_only_core_chain_key_defines_the_identity():
    defined = {(name, node.name) for name, tree in _trees() for node in ast.walk(tree)
               if isinstance(node, (ast.ClassDef, ast.FunctionDef))
               and node.name in ("ChainKey", "Mode", "segments_for_cr", "cr_for_segments")}
    assert defined == {("core/chain_key.py", "ChainKey"), ("core/chain_key.py", "Mode"),
                       ("core/plan.py", "segments_for_cr"), ("core/plan.py", "cr_for_segments")}
    assert not (ROOT / "engines" / "chain_key.py").exists()


@pytest.mark.parametrize("tokens, ranks", [(17, 2), (50, 2), (197, 2), (197, 3), (128, 4), (8, 2)])
def test_segments_and_cr_round_trip(tokens, ranks):
    for segments in range(1, math.ceil(tokens / ranks) + 1):
        cr = cr_for_segments(tokens, ranks, segments)
        assert segments_for_cr(tokens, ranks, cr) == segments
        key = ChainKey.for_cr(cr, tokens, ranks)
        assert key == ChainKey.prism(segments, tokens, ranks) and key.cr == cr
        plan = make_segment_plan(make_partition_plan(tokens, 1, ranks), cr=cr)
        assert plan.segments == segments and plan.cr == cr
    for typed in (1, 1.5, 2, 2.5, 3.3, 4.95, 9.9):
        if typed <= math.ceil(tokens / ranks):  # a typed CR stands for the L whose CR maps back to it
            segments = segments_for_cr(tokens, ranks, typed)
            assert segments_for_cr(tokens, ranks, cr_for_segments(tokens, ranks, segments)) == segments


@pytest.mark.parametrize("cr", [0.5, 100, float("inf"), float("nan"), True, "2"])
def test_a_bad_cr_is_one_error_from_every_entry(cr):
    partition = make_partition_plan(197, 1, 2)
    entries = [lambda: segments_for_cr(197, 2, cr), lambda: ChainKey.for_cr(cr, 197, 2),
               lambda: ChainKey.parse("prism", cr, 197, 2), lambda: ChainKey.parse(Mode.PRISM, cr, 197, 2),
               lambda: make_segment_plan(partition, cr=cr)]
    messages = set()
    for entry in entries:
        with pytest.raises(PlanError, match=r"CR must be between 1 \(no compression\) and ceil\(N/P\) = 99") as error:
            entry()
        messages.add(str(error.value))
    assert len(messages) == 1


def test_mode_is_a_str_enum_that_reads_and_prints_as_its_value():
    assert [str(m) for m in Mode] == ["local", "voltage", "prism"]
    assert f"{Mode.PRISM}" == "prism" and Mode.LOCAL == "local"
    assert ChainKey("voltage", cr=1.0) == ChainKey.voltage() and ChainKey.voltage().mode is Mode.VOLTAGE
    assert ChainKey.from_dict({"mode": "prism", "segments": 3, "cr": 3.0}).mode is Mode.PRISM
    assert json.dumps(ChainKey.prism(3, 17, 2).to_dict()) == '{"mode": "prism", "segments": 3, "cr": 3.0}'


# What the build wrote to manifest.json for these plans before ChainConfig held its plan and key.
TODAY = {
    (17, 1, 2, (3.0,), (2,), None): [
        {"name": "local", "mode": "local", "ranks": 1, "partition": [17], "segments": None, "cr": None,
         "counts": [17], "segment_sizes": [[1] * 17]},
        {"name": "voltage", "mode": "voltage", "ranks": 2, "partition": [9, 8], "segments": 9, "cr": 1.0,
         "counts": [9, 8], "segment_sizes": [[1] * 9, [1] * 8]},
        {"name": "prism-cr3", "mode": "prism", "ranks": 2, "partition": [9, 8], "segments": 3, "cr": 3.0,
         "counts": [4, 3], "segment_sizes": [[1, 3, 3, 2], [3, 3, 2]]},
        {"name": "prism-cr4.5", "mode": "prism", "ranks": 2, "partition": [9, 8], "segments": 2, "cr": 4.5,
         "counts": [3, 2], "segment_sizes": [[1, 4, 4], [4, 4]]}],
    (20, 1, 3, (3.0,), (), (1.0, 2.0, 1.0)): [
        {"name": "local", "mode": "local", "ranks": 1, "partition": [20], "segments": None, "cr": None,
         "counts": [20], "segment_sizes": [[1] * 20]},
        {"name": "voltage", "mode": "voltage", "ranks": 3, "partition": [5, 10, 5], "segments": 10, "cr": 1.0,
         "counts": [5, 10, 5], "segment_sizes": [[1] * 5, [1] * 10, [1] * 5]},
        {"name": "prism-cr3.5", "mode": "prism", "ranks": 3, "partition": [5, 10, 5], "segments": 2, "cr": 3.5,
         "counts": [3, 2, 2], "segment_sizes": [[1, 2, 2], [5, 5], [3, 2]]}],
    (8, 0, 2, (2.0,), (), None): [
        {"name": "local", "mode": "local", "ranks": 1, "partition": [8], "segments": None, "cr": None,
         "counts": [8], "segment_sizes": [[1] * 8]},
        {"name": "voltage", "mode": "voltage", "ranks": 2, "partition": [4, 4], "segments": 4, "cr": 1.0,
         "counts": [4, 4], "segment_sizes": [[1] * 4, [1] * 4]},
        {"name": "prism-cr2", "mode": "prism", "ranks": 2, "partition": [4, 4], "segments": 2, "cr": 2.0,
         "counts": [2, 2], "segment_sizes": [[2, 2], [2, 2]]}],
}


@pytest.mark.parametrize("args", list(TODAY))
def test_chain_config_writes_and_reads_todays_fields(args):
    tokens, prefix, ranks, crs, segments, weights = args
    configs = [c.chain for c in config_plans(tokens, prefix, ranks, list(crs), list(segments), weights)]
    written = [c.plan_dict() for c in configs]
    assert json.dumps(written) == json.dumps(TODAY[args])
    for config, data in zip(configs, written):
        read = ChainConfig.parse(Fields({**data, "stages": []}, "config", ManifestError), tokens, prefix)
        assert read == config and read.key == config.key and read.plan == config.plan


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(segment_sizes=[[1, 2, 3, 3], [3, 3, 2]]), "recorded plan is not the one"),
    (lambda c: c.update(counts=[3, 3]), "recorded plan is not the one"),
    (lambda c: c.update(cr=2.5), "recorded plan is not the one"),
    (lambda c: c.update(name="prism-cr9"), "recorded plan is not the one"),
    (lambda c: c.update(partition=[10, 8]), "not a plan of 17 tokens"),
    (lambda c: c.update(segments=50), "not a plan of 17 tokens"),
])
def test_a_plan_that_its_fields_do_not_make_is_refused(change, message):
    data = {**TODAY[17, 1, 2, (3.0,), (2,), None][2], "stages": []}
    change(data)
    with pytest.raises(ManifestError, match=message):
        ChainConfig.parse(Fields(data, "config", ManifestError), 17, 1)


def test_built_manifests_read_back_byte_identical(tmp_path):
    build_engines(random_model(small_spec(img=32, depth=1)), tmp_path, 2, [3.0], source={"timm": "test"})
    for rank in (0, 1):
        path = tmp_path / f"rank{rank}" / "manifest.json"
        manifest = Manifest.read(path.parent)
        assert json.dumps(manifest.to_dict(), indent=2) + "\n" == path.read_text()
        expected = TODAY[17, 1, 2, (3.0,), (2,), None][:3][rank:]  # rank 1 has no local chain
        assert [c.plan_dict() for c in manifest.configs] == expected
        assert manifest.configs[-1].plan.cr == 3.0 and manifest.configs[-1].key == ChainKey.for_cr(3, 17, 2)
