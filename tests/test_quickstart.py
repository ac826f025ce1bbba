"""The README's quickstart, run as written: its fenced bash blocks in order (python blocks through
`python -`), in a fresh folder, on free ports, with a real two-rank build, run and serve over loopback,
real curl requests and tritonclient."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = Path(__file__).resolve().parents[1] / "src"
HTTP_PORT = "8000"  # the port the quickstart names; the test serves on a free one instead
SCRIPT_TIMEOUT_S = 280


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, code) of the fenced bash and python blocks of the README's Quickstart section."""
    text = README.read_text()
    start = text.index("\n## Quickstart")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", text[start:end], flags=re.M | re.S)
    return [(language, code) for language, code in blocks if language in ("bash", "python")]


def quickstart_script(http_port: int) -> str:
    """One bash script of the quickstart; the python blocks run through `python -`."""
    parts = ["set -euo pipefail"]
    for language, code in quickstart_blocks():
        parts.append(code if language == "bash" else f"python - <<'PYTHON'\n{code}PYTHON\n")
    return re.sub(rf"\b{HTTP_PORT}\b", str(http_port), "\n".join(parts))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shims(folder: Path) -> Path:
    """`prism-trt` and `python` as the quickstart's reader has them after `pip install -e .`: this
    interpreter and this checkout's package."""
    folder.mkdir()
    for name, command in (("prism-trt", f'"{sys.executable}" -m prism_trt.cli'), ("python", f'"{sys.executable}"')):
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    return folder


def test_quickstart_blocks_are_found():
    blocks = quickstart_blocks()
    script = quickstart_script(12345)
    assert [language for language, _ in blocks].count("python") == 1
    for step in ("prism-trt build", "prism-trt inspect", "prism-trt run", "prism-trt serve", "/infer/image", "/infer "):
        assert step in script, step
    assert HTTP_PORT not in script and "../shared" not in script


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 30)
def test_quickstart_runs_as_written(tmp_path):
    timm = pytest.importorskip("timm")
    if not timm.list_models("test_vit"):
        pytest.skip(f"timm {timm.__version__} has no test_vit (timm >= 1.0.8 has): the quickstart's model")
    pytest.importorskip("tritonclient.http", reason="the quickstart's last step needs tritonclient[http]")
    if not shutil.which("curl"):
        pytest.skip("the quickstart needs curl")
    work = tmp_path / "clone"
    work.mkdir()
    http_port = free_port()
    env = {**os.environ, "PATH": f"{shims(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "MASTER_PORT": str(free_port()), "PRISM_TRT_DATA": str(tmp_path / "no-data")}
    process = subprocess.Popen(["bash", "-c", quickstart_script(http_port)], cwd=work, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the quickstart took over {SCRIPT_TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        try:  # anything the script left behind (a serve rank) goes with its process group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    assert "SHA-256 verified" in output  # inspect
    assert "prism-cr3 batch 8" in output and "rank 1: ran" in output  # run, both ranks
    assert '{"ready":true' in output
    assert output.count('"choice":"prism-cr3"') == 2, output[-6000:]  # the JSON request and the image
    assert re.search(r"labels \[(\d+\s*){4}\] chain prism-cr3", output), output[-3000:]  # tritonclient
    assert "rank 1: served" in output and "stopped by rank 0" in output  # kill $SERVER stopped both ranks
    assert (work / "engines" / "rank1" / "manifest.json").is_file()
