"""A bounded fuzz run against a real server over raw sockets: about 1,500 generated requests
(request lines, header names and values, byte counts, bodies: JSON, binary, image bytes, garbage),
each on its own connection, closed for writing once sent. Every answer is a response below 500
(505 for an HTTP version other than 1.0 and 1.1), or the server closing the connection; never a 5xx, never a hang."""

from __future__ import annotations

import json
import socket
from contextlib import closing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import LOCAL, running

from prism_trt.runtime.api import FixedSelector
from prism_trt.serve import HttpLimits, create_app

pytestmark = pytest.mark.timeout(600)

LIMITS = HttpLimits(header_timeout_s=2, body_timeout_s=2, keep_alive_s=2, max_connections=32)
PATHS = ["/v2/models/tiny-test/infer", "/v2/models/tiny-test/infer/image", "/v2/models/tiny-test", "/v2/health/ready",
         "/v2", "/metrics", "/v2/models/other/infer", "/%zz", "/" + "a" * 300, "*"]
HEADER_NAMES = ["Content-Type", "Inference-Header-Content-Length", "Content-Length", "Transfer-Encoding",
                "Content-Encoding", "Authorization", "Connection", "Expect", "X-Fuzz"]
VALUES = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=30) \
    | st.integers(-5, 10**6).map(str) | st.sampled_from(["application/json", "application/octet-stream", "image/png",
                                                         "chunked", "gzip", "\u00b2", "9" * 5000, "0" * 4400 + "12",
                                                         "100-continue", "close", "Bearer x"])
TENSOR = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32"}
BODIES = st.sampled_from([b"", b"{}", json.dumps({"inputs": [{**TENSOR, "data": [0.0] * 3072}]}).encode(),
                          json.dumps({"inputs": [{**TENSOR, "parameters": {"binary_data_size": 12288}}]}).encode()
                          + bytes(12288), b"\x89PNG\r\n\x1a\n" + bytes(40), b"\xff\xd8\xff\xe0" + bytes(40)]) \
    | st.binary(max_size=300) | st.recursive(st.none() | st.floats() | st.text(max_size=5),
                                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                                 st.sampled_from(["inputs", "outputs", "data", "shape", "id"]),
                                                 inner, max_size=3)).map(lambda v: json.dumps(v).encode())


@pytest.fixture(scope="module")
def address(serve_executor):
    with running(create_app(serve_executor, FixedSelector(LOCAL), max_wait_ms=1), LIMITS) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


@st.composite
def raw_requests(draw) -> bytes:
    method = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE", "OPTIONS", "POST", "P\u00d6ST", ""]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/9.9", "HTTP/1", "http/1.1"]))
    body = draw(BODIES)
    headers = [("Host", "fuzz")]
    if draw(st.booleans()):
        headers.append(("Content-Length", str(len(body))))
    headers += draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES), VALUES), max_size=4))
    head = f"{method} {draw(st.sampled_from(PATHS))} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


def exchange(address: tuple[str, int], request: bytes) -> bytes:
    with closing(socket.create_connection(address, timeout=10)) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before the whole request was sent
            pass
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw_requests())
def test_generated_requests_get_no_5xx(address, request):
    answer = exchange(address, request)
    if not answer:
        return  # closed without a word: an incomplete request the client stopped sending
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    status = int(answer.split(b" ", 2)[1])
    version = request.split(b"\r\n", 1)[0].rsplit(b" ", 1)[-1]
    assert status < 500 or status == 505 and version not in (b"HTTP/1.0", b"HTTP/1.1"), answer[:400]
