"""`prism-trt demo --quick` end to end, and the documentation: the README and docs/ pages' links, the
generated CLI reference kept in sync with --help, and the mkdocs site building without warnings."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prism_trt.cli_reference import generated_part, reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_PAGE = DOCS / "cli.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Internal history has no place in user documentation; papers are cited by title.
HISTORY = re.compile(r"\bissue \d+|\bseed \d{3}\b|\bstop \d+\b", re.IGNORECASE)


def test_cli_reference_matches_help():
    current = generated_part(CLI_PAGE.read_text())
    assert current == reference(), "docs/cli.md is stale: run `python -m prism_trt.cli_reference --write docs/cli.md`"


def _links(page: Path):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # links in code are examples
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in _links(page):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert "../shared" not in target, f"{page.name} links {target}: a clone has no ../shared"
        assert (page.parent / path).resolve().exists(), f"{page.name} links {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_user_docs_carry_no_internal_history(page):
    text = page.read_text()
    assert not HISTORY.findall(text), f"{page.name}: {HISTORY.findall(text)}"
    assert "../shared/papers" not in text and "../shared/docs" not in text, page.name


def test_every_page_is_in_the_site_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r"^\s+- [^:]+: (\S+\.md)$", config, flags=re.M))
    assert listed == {page.name for page in DOCS.glob("*.md")}


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for command in ("pip install -e .", "make setup", "make test", "## Quickstart"):
        assert command in text, command


@pytest.mark.timeout(120)
def test_mkdocs_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (the dev extra has them)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").is_file()
    print(f"mkdocs build --strict: {time.monotonic() - started:.1f} s")


def _testbed_namespaces() -> set[str]:
    if not shutil.which("ip"):
        return set()
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.startswith("prism-tb")}


@pytest.mark.timeout(900)
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
