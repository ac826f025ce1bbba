"""The GPU benchmark's CPU dry run: the script runs unchanged (build, P = 1 table, two-rank `run`,
staging) and writes its JSON and PNG with every figure null, so nothing measured on a CPU can be
read as a GPU figure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def numbers(value) -> list:
    """Every float in a JSON value (ints are counts and sizes, not figures)."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, float) else []


@pytest.mark.timeout(600)
def test_dry_run_writes_the_same_files_with_every_gpu_figure_null(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent / "src"), os.environ.get("PYTHONPATH",
                                                                                                      "")])}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--dry-run", "--results", str(tmp_path),
                             "--out", str(tmp_path / "engines")], cwd=BENCHMARKS, env=env, capture_output=True,
                            text=True, timeout=540)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert (tmp_path / "bench_gpu.png").stat().st_size > 0
    assert data["dry_run"] is True and data["gpu"] is None
    assert set(data["forward_ms"]) == {"1", "2"}
    assert all(set(row) == set(data["columns"]) for row in data["forward_ms"].values())
    assert [(r["mode"], r["batch"]) for r in data["run_modes"]] == [
        (mode, batch) for batch in (1, 2) for mode in ("local", "voltage", "prism-cr3")]
    assert data["staging"] and set(data["ratios"]) >= set(data["goals"])
    assert all(met is None for met in data["goals_met"].values())
    assert numbers({key: data[key] for key in ("forward_ms", "run_modes", "staging", "ratios")}) == []
