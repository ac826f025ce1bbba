"""Client-side helpers for a running `prism-trt serve`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence

import httpx


def wait_until_ready(url: str, processes: Sequence[subprocess.Popen] = (), timeout_s: float = 120.0,
                     poll_s: float = 0.3) -> bool:
    """Poll ``url``/v2/health/ready until it answers 200 (True), a process in ``processes`` exits or
    ``timeout_s`` passes (False). Bounded in time; sleeps between polls whatever the answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            return False
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    return False
