"""Slow and greedy clients against a real server (raw sockets): read timeouts, header and connection
limits, body limits derived from the model, bounded image decoding. Timeouts are configured short
(1 s) and every wait is bounded (10 s), so nothing here measures wall-clock durations."""

from __future__ import annotations

import io
import json
import resource
import select
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import replace

import httpx
import numpy as np
import pytest
from conftest import assert_close, small_spec
from PIL import Image
from prometheus_text import metric_value, scrape
from serving import LOCAL, connect, expected_logits, images, infer_body, logits_of, running

from prism_trt.engines.modality import Vision
from prism_trt.runtime.api import FixedSelector
from prism_trt.serve import (
    HttpLimits,
    VisionServing,
    create_app,
    default_max_body_bytes,
    default_max_image_bytes,
    max_image_pixels,
)

pytestmark = pytest.mark.timeout(120)

BOUND_S = 10.0  # how long a test waits for the server to act on a 1 s timeout
SHORT = HttpLimits(header_timeout_s=1, body_timeout_s=1, keep_alive_s=1, max_header_bytes=4096, max_connections=32)
PATIENT = HttpLimits(header_timeout_s=60, body_timeout_s=60, keep_alive_s=60, max_connections=32)
INFER = "/v2/models/tiny-test/infer"


@pytest.fixture(scope="module")
def short_url(serve_executor):
    """A server with 1 s header, body and keep-alive timeouts and a 4 KiB header limit."""
    with running(create_app(serve_executor, FixedSelector(LOCAL), max_wait_ms=1), SHORT) as url:
        yield url


@pytest.fixture(scope="module")
def patient_url(serve_executor):
    """A server whose read timeouts (60 s) outlast the test: slow connections stay open."""
    with running(create_app(serve_executor, FixedSelector(LOCAL), max_wait_ms=1), PATIENT) as url:
        yield url


def read_until_closed(sock: socket.socket, within_s: float = BOUND_S) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``within_s``."""
    deadline, received = time.monotonic() + within_s, b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the server kept the connection open for {within_s} s; it sent {received[:200]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def still_open(sock: socket.socket) -> bool:
    """True when the server has neither closed the connection nor sent anything on it."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def status_and_error(raw: bytes) -> tuple[int, str]:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split()[1]), json.loads(raw.partition(b"\r\n\r\n")[2])["error"]


def request_head(path: str = INFER, method: str = "POST", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------ read timeouts


def test_headers_never_completed_get_408_and_the_connection_closes(short_url):
    with closing(connect(short_url)) as sock:
        sock.sendall(b"POST /v2/models/tiny-test/infer HTTP/1.1\r\nHost: x\r\n")  # and then silence
        status, error = status_and_error(read_until_closed(sock))
    assert status == 408 and "did not arrive within 1 s" in error


def test_trickled_headers_do_not_extend_the_deadline(short_url):
    """One header byte every 0.2 s: each byte would reset an idle timer, not the head's deadline."""
    trickle = b"POST /v2/models/tiny-test/infer HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000
    with closing(connect(short_url)) as sock:
        deadline = time.monotonic() + BOUND_S
        for byte in trickle:
            assert time.monotonic() < deadline, "the trickling client was still connected after 10 s"
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if not still_open(sock):
                break
            time.sleep(0.2)
        status, error = status_and_error(read_until_closed(sock))
    assert status == 408 and "did not arrive" in error


def test_a_connection_that_sends_nothing_is_closed_silently(short_url):
    with closing(connect(short_url)) as sock:
        assert read_until_closed(sock) == b""


def test_partial_body_gets_408_and_the_connection_closes(short_url):
    with closing(connect(short_url)) as sock:
        sock.sendall(request_head(content_type="application/json", content_length="100") + b"{\"")
        status, error = status_and_error(read_until_closed(sock))
    assert status == 408 and "no request body data for 1 s" in error


def test_idle_keep_alive_connection_is_closed_and_a_busy_one_serves(short_url):
    with closing(connect(short_url)) as sock:
        for _ in range(3):  # back-to-back requests on one connection: the head deadline restarts each time
            sock.sendall(request_head("/v2/health/live", "GET"))
            assert read_response(sock) == (200, b'{"live":true}')
        assert read_until_closed(sock) == b""  # then idle past keep-alive: closed without a word


def test_oversized_headers_get_431(short_url):
    with closing(connect(short_url)) as sock:
        sock.sendall(request_head("/v2/health/live", "GET", x_big="b" * 5000))
        status, error = status_and_error(read_until_closed(sock))
    assert status == 431 and "exceed 4096 bytes" in error


def test_refusals_are_counted(short_url):
    with closing(connect(short_url)) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\n")
        read_until_closed(sock)
    with httpx.Client(base_url=short_url, timeout=BOUND_S) as client:
        families = scrape(client)
    assert metric_value(families, "prism_request_errors_total", endpoint="http", code="408",
                        reason="header_timeout") >= 1


# ------------------------------------------------------------------ connections


def test_twenty_slow_connections_do_not_hold_up_normal_clients(patient_url, serve_executor):
    with ExitStack() as stack:
        slow = [stack.enter_context(closing(connect(patient_url))) for _ in range(20)]
        for index, sock in enumerate(slow):  # half never finish their headers, half stall mid-body
            sock.sendall(b"POST /v2/models/tiny-test/infer HTTP/1.1\r\nHost: x\r\n" if index % 2 else
                         request_head(content_type="application/json", content_length="5000") + b"{\"in")

        def normal_client(seed: int) -> None:
            with httpx.Client(base_url=patient_url, timeout=BOUND_S) as client:
                for offset in range(3):
                    x = images(1 + offset, seed=seed * 10 + offset)
                    assert_close(logits_of(client.post(INFER, json=infer_body(x))), expected_logits(serve_executor, x))

        with ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(normal_client, seed) for seed in range(4)]:
                future.result(timeout=60)
        assert all(still_open(sock) for sock in slow), "the slow connections were dropped, not held"


def test_connections_past_the_limit_get_503(serve_executor):
    limits = HttpLimits(header_timeout_s=60, body_timeout_s=60, keep_alive_s=60, max_connections=3)
    with running(create_app(serve_executor, FixedSelector(LOCAL)), limits) as url, ExitStack() as stack:
        held = [stack.enter_context(closing(connect(url))) for _ in range(3)]
        with closing(connect(url)) as extra:
            extra.sendall(request_head("/v2/health/live", "GET"))
            raw = read_until_closed(extra)
        assert raw.startswith(b"HTTP/1.1 503"), raw[:200]
        for sock in held:
            sock.close()
        deadline = time.monotonic() + BOUND_S  # the server notices the closes asynchronously
        while httpx.get(f"{url}/v2/health/live", timeout=BOUND_S).status_code != 200:
            assert time.monotonic() < deadline, "still 503 after the held connections closed"
            time.sleep(0.1)


# ------------------------------------------------------------------ body limits from the model


def test_default_body_limits_fit_a_full_batch_and_little_more():
    """For the MNIST model (max batch 32 x 1 x 28 x 28) the JSON limit is well under 16 MB."""
    spec = replace(small_spec(img=28, patch=7), in_chans=1, mean=(0.5,), std=(0.5,))
    served = VisionServing(Vision(spec), spec.name, 32)
    full = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
    json_limit, binary_limit = served.max_body_bytes("json"), served.max_body_bytes("binary")
    for data in (full.reshape(-1).tolist(), full.tolist()):  # as a client writes float32 values in full
        body = json.dumps({"inputs": [{"name": "input", "shape": [32, 1, 28, 28], "datatype": "FP32", "data": data}]})
        assert len(body) < json_limit < 1 << 20
    assert full.nbytes < binary_limit < full.nbytes + (128 << 10)
    assert max_image_pixels(spec) == 4 * 1024 * 1024  # the floor: 64 x 28 x 28 is far less
    assert served.max_image_bytes() < 9 << 20


def test_default_body_limit_refuses_more_than_a_full_batch(serve_executor):
    limit = default_max_body_bytes(serve_executor)
    with running(create_app(serve_executor, FixedSelector(LOCAL))) as url, \
            httpx.Client(base_url=url, timeout=BOUND_S) as client:
        response = client.post(INFER, content=b" " * (limit + 1), headers={"content-type": "application/json"})
        assert response.status_code == 413 and f"accepts at most {limit}" in response.json()["error"]
        x = images(8, seed=3)  # a full batch (max batch 8) in JSON fits
        assert_close(logits_of(client.post(INFER, json=infer_body(x, nested=True))), expected_logits(serve_executor, x))


# ------------------------------------------------------------------ images


def blank_png(width: int, height: int, mode: str = "RGBA") -> bytes:
    """A valid all-zero PNG, compressed row by row so the test never holds the pixels."""
    channels = {"RGBA": (6, 4), "RGB": (2, 3)}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (1 + width * channels[1]), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, channels[0], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_decompression_bomb_pngs_are_refused_without_decoding(serve_client):
    bomb = blank_png(6300, 6300)
    assert len(bomb) < 200_000  # 154 KB that would decode to 159 MB of RGBA
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process

    def post(_) -> httpx.Response:
        return serve_client.post("/v2/models/tiny-test/infer/image", content=bomb,
                                 headers={"content-type": "image/png"})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    for response in responses:
        assert response.status_code == 413, response.text
        assert "6300x6300 pixels; at most 4194304 pixels" in response.json()["error"]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 100, f"peak memory grew by {grown_mb:.0f} MB for four refused images"


def test_a_12_megapixel_jpeg_decodes_reduced_and_a_png_of_that_size_is_refused(serve_client, serve_executor):
    photo = Image.new("RGB", (4000, 3000), (30, 160, 90))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    jpeg = serve_client.post("/v2/models/tiny-test/infer/image", content=buffer.getvalue(),
                             headers={"content-type": "image/jpeg"})
    # the same picture at the model's size gives the same answer: uniform colour survives any resampling
    small = io.BytesIO()
    photo.resize((32, 32)).save(small, format="PNG")
    reference = serve_client.post("/v2/models/tiny-test/infer/image", content=small.getvalue(),
                                  headers={"content-type": "image/png"})
    assert_close(logits_of(jpeg), logits_of(reference), precision="fp16")
    png = serve_client.post("/v2/models/tiny-test/infer/image", content=blank_png(4000, 3000, "RGB"),
                            headers={"content-type": "image/png"})
    assert png.status_code == 413 and "4000x3000 pixels" in png.json()["error"]


def test_image_body_limit(serve_executor):
    limit = default_max_image_bytes(serve_executor)
    with running(create_app(serve_executor, FixedSelector(LOCAL))) as url:
        response = httpx.post(f"{url}/v2/models/tiny-test/infer/image", content=b"\x89PNG" + b"\x00" * limit,
                              headers={"content-type": "image/png"}, timeout=BOUND_S)
    assert response.status_code == 413 and f"accepts at most {limit}" in response.json()["error"]
