"""Malformed HTTP against a real server over raw sockets: byte counts in headers that are not
plain ASCII numbers, pipelined requests with oversized heads, unknown HTTP versions and bodies
trickled too slowly. Every one gets a clear 4xx or 505, never a 500 or a served request."""

from __future__ import annotations

import json
import select
import socket
import time
from contextlib import closing

import pytest
from serving import LOCAL, connect, running

from prism_trt.runtime.api import FixedSelector
from prism_trt.serve import HttpLimits, create_app

pytestmark = pytest.mark.timeout(120)

BOUND_S = 10.0
LIMITS = HttpLimits(header_timeout_s=1, body_timeout_s=1, keep_alive_s=5, max_connections=32)
INFER = "/v2/models/tiny-test/infer"
BINARY_JSON = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                      "parameters": {"binary_data_size": 3 * 32 * 32 * 4}}]}).encode()


@pytest.fixture(scope="module")
def url(serve_executor):
    with running(create_app(serve_executor, FixedSelector(LOCAL), max_wait_ms=1), LIMITS) as address:
        yield address


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """(status, head, body) of the next response, read up to its end only (responses to pipelined
    requests can arrive in one read), leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, f"the connection closed mid-response: {data!r}"
        data += chunk
    head = data[:-4]
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    assert lengths, head
    body = b""
    while len(body) < int(lengths[0]):
        chunk = sock.recv(int(lengths[0]) - len(body))
        assert chunk, f"the connection closed mid-body: {body!r}"
        body += chunk
    return int(head.split()[1]), head, body


def request(method: str, path: str, body: bytes = b"", version: str = "HTTP/1.1", **headers: str) -> bytes:
    lines = [f"{method} {path} {version}", "Host: test", f"Content-Length: {len(body)}",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def binary_request(header_length: str) -> bytes:
    body = BINARY_JSON + bytes(3 * 32 * 32 * 4)
    head = (f"POST {INFER} HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    return head + b"Inference-Header-Content-Length: " + header_length.encode("latin-1") + b"\r\n\r\n" + body


@pytest.mark.parametrize("header_length", ["\u00b2", "9" * 5000, "0" * 4400 + str(len(BINARY_JSON)), "-5", "1e3"],
                         ids=["superscript_two", "5000_nines", "4400_zeros_then_length", "negative", "exponent"])
def test_a_binary_header_length_that_is_no_plain_byte_count_is_400(url, header_length):
    with closing(connect(url)) as sock:
        sock.sendall(binary_request(header_length))
        status, _, body = read_response(sock)
    assert status == 400, body[:300]
    assert "Inference-Header-Content-Length must be a number of bytes" in json.loads(body)["error"]


def test_a_plain_binary_header_length_is_served(url):
    with closing(connect(url)) as sock:
        sock.sendall(binary_request(str(len(BINARY_JSON))))
        status, _, body = read_response(sock)
    assert status == 200, body[:300]


@pytest.mark.parametrize("head_kib", [60, 200])
def test_a_pipelined_request_with_an_oversized_head_gets_431(url, head_kib):
    first = request("GET", "/v2/health/live")
    second = request("GET", "/v2/health/live", X_Padding="a" * (head_kib * 1024))
    with closing(connect(url)) as sock:
        sock.sendall(first + second)
        status, _, _ = read_response(sock)
        assert status == 200
        status, _, body = read_response(sock)
    assert status == 431, body[:300]
    assert f"exceed {LIMITS.max_header_bytes} bytes" in json.loads(body)["error"]


def test_pipelined_requests_within_the_limit_are_served(url):
    with closing(connect(url)) as sock:
        sock.sendall(request("GET", "/v2/health/live") + request("GET", "/v2/health/live", X_Padding="a" * 2000))
        assert read_response(sock)[0] == 200
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize("version", ["HTTP/9.9", "HTTP/2.0", "HTTP/1.2"])
def test_an_unknown_http_version_is_refused(url, version):
    with closing(connect(url)) as sock:
        sock.sendall(request("GET", "/v2/health/live", version=version))
        status, _, body = read_response(sock)
    assert status == 505, body[:300]
    assert f"{version} is not supported" in json.loads(body)["error"]


def test_http_1_0_is_still_served(url):
    with closing(connect(url)) as sock:
        sock.sendall(request("GET", "/v2/health/live", version="HTTP/1.0"))
        assert read_response(sock)[0] == 200


def test_a_body_trickled_below_the_minimum_rate_gets_408(url):
    """One byte every 0.2 s never leaves the 1 s silence bound, but falls behind the minimum rate."""
    with closing(connect(url)) as sock:
        sock.sendall(request("POST", INFER, Content_Type="application/json")[:-2]
                     .replace(b"Content-Length: 0", b"Content-Length: 100000") + b"\r\n")
        deadline, answered = time.monotonic() + BOUND_S, False
        while time.monotonic() < deadline and not answered:
            try:
                sock.sendall(b" ")
            except OSError:  # the server closed it after answering
                answered = True
                break
            answered = bool(select.select([sock], [], [], 0.2)[0])
        assert answered, f"the server kept a body trickling at 5 bytes/s open for {BOUND_S} s"
        status, _, body = read_response(sock)
    assert status == 408 and "bytes/s" in json.loads(body)["error"], body[:300]
