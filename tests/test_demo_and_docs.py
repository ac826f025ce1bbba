"""`prism-trt demo --quick` end to end, and the README's CLI reference kept in sync with --help."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prism_trt.cli_reference import BEGIN, END, reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cli_reference_matches_help():
    text = README.read_text()
    assert BEGIN in text and END in text, "README.md lacks the generated CLI reference markers"
    current = text[text.index(BEGIN): text.index(END) + len(END)]
    assert current == reference(), "README CLI reference is stale: run `python -m prism_trt.cli_reference` " \
                                   "and paste its output between the markers"


@pytest.mark.timeout(900)
def _testbed_namespaces() -> set[str]:
    if not shutil.which("ip"):
        return set()
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.startswith("prism-tb")}


def test_demo_quick(tmp_path, mnist_dir):
    before = _testbed_namespaces()
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "demo", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    served = summary["served"]
    assert served["images"] == 24 and sum(served["modes"].values()) == 24  # every request answered once
    assert summary["weights"] == "MNIST checkpoint"
    # the selector only picks exact modes or CRs with >= 0.99 agreement: the sample's accuracy is the local one's
    assert served["correct"] == served["local_correct"]
    for path in [summary["perfmap"], *summary["plots"], tmp_path / "engines" / "rank1" / "manifest.json"]:
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    assert "6/6 summary" in result.stdout
    assert _testbed_namespaces() <= before  # the demo's testbed (if any) was torn down


@pytest.mark.timeout(900)
def test_demo_quick_without_iproute2(tmp_path, mnist_dir):
    """As root on a machine without `ip`/`tc` (the GPU image): loopback, said plainly, no traceback."""
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "demo", "--quick", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=880, env={**os.environ, "PATH": str(empty)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no testbed: missing tools: ip, tc, taskset" in result.stdout and "loopback" in result.stdout
    assert "Traceback" not in result.stderr
