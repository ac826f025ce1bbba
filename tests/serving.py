"""What the serve tests share: the constants of the test engines, executors and selectors made for
the tests, a real uvicorn server on a free port, and request / answer helpers. The fixtures that
use them are in conftest.py."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import torch
import uvicorn
from conftest import assert_close

from prism_trt.engines import ChainKey
from prism_trt.runtime.api import Health
from prism_trt.runtime.local import LocalExecutor
from prism_trt.serve import HttpLimits, server_config

TOKEN = "s3cret-token"
MAX_BATCH = 8
BODY_LIMIT = 1 << 20  # a full batch of 3x32x32 as JSON is ~0.5 MiB
LOCAL = ChainKey.local()


class ReportingLocalExecutor(LocalExecutor):
    """The real local executor, reporting whatever health a test sets (a degraded or down cluster)."""

    reported: Health | None = None

    def health(self) -> Health:
        return self.reported or super().health()


class VoltageForBatchOfThree:
    """A selector that picks voltage for batches of 3 images, which the local executor refuses."""

    def choose(self, batch: int) -> ChainKey:
        return ChainKey.voltage() if batch == 3 else LOCAL


def connect(url: str, timeout_s: float = 10.0) -> socket.socket:
    """A raw TCP connection to a server started by :func:`running` (for byte-level HTTP tests)."""
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout_s)


@contextmanager
def running(app, limits: HttpLimits | None = None):
    """The bounded uvicorn server (prism_trt.serve.server_config: ``limits``, default HttpLimits())
    serving ``app`` from a background thread on a socket bound to 127.0.0.1:0."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, limits=limits, log_level="warning",
                                          on_refusal=app.state.server.count_refusal))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def infer_body(x: torch.Tensor, nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.reshape(-1).tolist()
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}], **extra}


def outputs_of(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return {out["name"]: out for out in response.json()["outputs"]}


def logits_of(response: httpx.Response) -> np.ndarray:
    logits = outputs_of(response)["logits"]
    return np.asarray(logits["data"], dtype=np.float32).reshape(logits["shape"])


def expected_logits(executor, x: torch.Tensor) -> np.ndarray:
    return executor.infer(executor.request(x), LOCAL).logits.numpy()


def assert_still_serving(client: httpx.Client, executor) -> None:
    x = images(1, seed=99)
    assert_close(logits_of(client.post("/v2/models/tiny-test/infer", json=infer_body(x))), expected_logits(executor, x))
