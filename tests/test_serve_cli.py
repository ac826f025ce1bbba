"""`prism-trt serve`'s HTTP flags: empty tokens and exposed addresses without a token are refused
before anything loads (exit 2), and the read limits reach the running server (a real process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing

import httpx
import pytest
from click.testing import CliRunner
from conftest import build_engines, random_model, small_spec

from prism_trt.cli import main
from prism_trt.runtime.group import free_port

pytestmark = pytest.mark.timeout(120)


def invoke(tmp_path, *args: str, env: dict | None = None):
    """`serve` on an empty engine directory: anything that gets past the HTTP checks fails loading it."""
    environment = {"PRISM_TRT_TOKEN": None, **(env or {})}  # None: unset, whatever the caller's shell has
    return CliRunner().invoke(main, ["serve", "--engines", str(tmp_path), *args], env=environment)


@pytest.mark.parametrize("args,env,message", [
    (["--token", ""], None, "the bearer token must be non-empty printable ASCII"),
    ([], {"PRISM_TRT_TOKEN": ""}, "PRISM_TRT_TOKEN is set but empty"),
    (["--token", "two words"], None, "without spaces"),
    (["--host", "0.0.0.0"], None, "refusing to serve on 0.0.0.0 without a bearer token"),
    (["--host", "192.168.1.20"], None, "--allow-unauthenticated"),
    (["--header-timeout", "0"], None, "Invalid value for '--header-timeout'"),
], ids=["empty_flag", "empty_env", "spaces", "all_interfaces", "lan_address", "zero_timeout"])
def test_refused_before_loading(tmp_path, args, env, message):
    result = invoke(tmp_path, *args, env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output and "manifest.json" not in result.output


@pytest.mark.parametrize("args,env", [
    (["--host", "0.0.0.0", "--allow-unauthenticated"], None),
    (["--host", "0.0.0.0"], {"PRISM_TRT_TOKEN": "s3cret"}),
    (["--host", "::1"], None),
    (["--host", "localhost"], None),
], ids=["explicitly_allowed", "token_from_env", "ipv6_loopback", "localhost"])
def test_allowed_configurations_get_to_loading_the_engines(tmp_path, args, env):
    result = invoke(tmp_path, *args, env=env)
    assert result.exit_code == 1 and "manifest.json: missing" in result.output, result.output


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-engines")
    build_engines(random_model(small_spec(img=32, depth=1)), out, 1, source={"timm": "test"}, max_batch=8)
    return out


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_serve_applies_its_read_limits_and_token(engines):
    port = free_port()
    argv = [sys.executable, "-m", "prism_trt.cli", "serve", "--engines", str(engines), "--port", str(port),
            "--threads", "1", "--token", "tok", "--header-timeout", "1", "--max-header-bytes", "1024"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60  # the live probe is public: it tells when the process is up
        while not _answers(f"{url}/v2/health/live"):
            assert server.poll() is None, server.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the server did not come up within 60 s"
            time.sleep(0.3)
        assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 401
        assert httpx.get(f"{url}/v2/health/ready", headers={"Authorization": "Bearer tok"},
                         timeout=5).status_code == 200
        with closing(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
            sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
            received = b""
            while chunk := sock.recv(4096):  # the server answers and closes (socket timeout 10 s)
                received += chunk
        assert received.startswith(b"HTTP/1.1 408"), received
        big = httpx.get(f"{url}/v2/health/live", headers={"X-Big": "b" * 2000}, timeout=5)
        assert big.status_code == 431
    finally:
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out[-3000:]
