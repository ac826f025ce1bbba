"""The package's shape, checked: layers import only downwards, and the JSON records have one home."""

import ast
from pathlib import Path

import prism_trt

ROOT = Path(prism_trt.__file__).parent

# Each unit may import only units of a lower layer (the model -> core -> engines -> export/runtime ->
# serve/adaptive -> profiler -> workflows -> cli order of the README's architecture picture). The testbed is a
# leaf: it knows nothing of models or engines.
LAYER = {"__init__": 0, "errors": 0, "model": 1, "data": 1, "report": 1, "profiler.testbed": 1, "core": 2,
         "engines": 3, "export": 4, "runtime": 4, "serve": 5, "profiler.adaptive": 5, "profiler": 6, "workflows": 7,
         "cli": 8, "cli_reference": 9}

# Modules that parse JSON, and what they parse: none of them a manifest or a performance map,
# which only their typed records in engines/ read (through engines/json_record.py).
JSON_READERS = {
    "engines/json_record.py": "manifest.json and perfmap.json, for engines/manifest.py and engines/perfmap.py",
    "serve/kserve.py": "KServe v2 request bodies",
    "profiler/sweep.py": "rank 0's result lines during a sweep",
    "cli/profile_cmds.py": "the sweep's --points argument to its rank-0 process",
    "profiler/testbed/namespaces.py": "`ip -j` output",
    "profiler/testbed/testbed.py": "`ip -j` output and the testbed's own state file",
    "profiler/testbed/bandwidth.py": "the bandwidth probe's report line",
    "profiler/testbed/faults.py": "the fault load's answer and readiness lines, and (in the load client) its inputs",
    "runtime/rendezvous.py": "join requests and answers in rank 0's rendezvous store",
    "data/text_corpus.py": "the bundled tiny GPT-2's meta.json (corpus SHA-256s, recorded held-out figures)",
}


def _unit(parts: tuple[str, ...]) -> str:
    if parts[0] == "profiler" and len(parts) > 2 and parts[1] in ("testbed", "adaptive"):
        return f"profiler.{parts[1]}"
    return parts[0].removesuffix(".py")


def _imports() -> list[tuple[str, str, str]]:
    """(importing file, its unit, imported unit) for every relative import in the package."""
    found = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        package = relative.parent.parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                # `from .. import x`: x is a name of that package (its __init__) or one of its modules
                target = list(package[: len(package) - node.level + 1]) + (node.module or "").split(".")
                target = [part for part in target if part]
                found.append((str(relative), _unit(relative.parts), _unit(tuple(target)) if target else "__init__"))
    return found


def test_every_unit_has_a_layer():
    units = {_unit(p.relative_to(ROOT).parts) for p in ROOT.rglob("*.py")}
    assert units <= set(LAYER), units - set(LAYER)


def test_layers_import_only_downwards():
    upward = [f"{path} ({unit}) imports {target}" for path, unit, target in _imports()
              if target != unit and LAYER[target] >= LAYER[unit]]
    assert not upward, "\n".join(upward)


def test_runtime_does_not_depend_on_the_exporter():
    assert not [path for path, unit, target in _imports() if unit == "runtime" and target == "export"]


def test_only_the_typed_records_read_their_json():
    readers = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "json.load" in p.read_text()}
    assert readers == set(JSON_READERS), readers ^ set(JSON_READERS)


def test_expected_errors_print_as_one_line_with_their_exit_code(tmp_path):
    """Every PrismError reaching the CLI is `Error: <what to do>` and an exit code, never a traceback."""
    from click.testing import CliRunner

    from prism_trt.cli import main

    binary = tmp_path / "map.json"
    binary.write_bytes(bytes(range(256)))
    cases = [
        (["flops", "--model", "vit_tiny_patch16_224", "--cr", "150"], 1, "CR must be between 1"),  # PlanError
        (["info", "--model", "resnet50"], 1, "expected a timm VisionTransformer"),  # UnsupportedModelError
        (["inspect", str(tmp_path)], 1, "is not an engine directory"),  # ManifestError
        (["select", "--map", str(binary), "--batch", "1"], 1, "not a text file"),  # PerfMapError
        (["accuracy", "--checkpoint", str(tmp_path / "absent.pt")], 1, "checkpoint not found"),  # MissingFileError
    ]
    for argv, code, message in cases:
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == code, (argv, result.output)
        assert "Error: " in result.output and message in result.output, (argv, result.output)
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), argv
