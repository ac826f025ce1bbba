"""A bounded, iperf-like TCP transfer between two testbed namespaces: receiver and sender scripts, and the run."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from typing import Any

from .namespaces import COMMAND_TIMEOUT_S, TestbedError


def _read_port(process: subprocess.Popen, timeout: float) -> int:
    """The first stdout line of the receiver: its port, or an error naming what the receiver said."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    try:
        return int(line)
    except ValueError:
        process.kill()
        _, stderr = process.communicate(timeout=5)
        raise TestbedError(f"bandwidth receiver did not start (said {line.strip()!r}, stderr {stderr.strip()!r})") \
            from None


# The two ends run as `python -I -c` inside the namespaces: self-contained, so they start fast without
# importing this package (or torch) and work whatever the namespace's mounts look like.
_RECEIVER = """
import json, socket, sys, time
host, limit, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
server = socket.create_server((host, 0))
server.settimeout(timeout)
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
server.close()
start = last = time.monotonic()
received = 0
# Timing starts after the first quarter: by then the token buckets' bursts and TCP slow start are spent,
# which otherwise inflate short transfers on fast links.
warm_bytes, warm_time = 0, start
with connection:
    while received < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(min(1 << 20, limit - received))
        except socket.timeout:
            break
        if not chunk:
            break
        if received < limit // 4 <= received + len(chunk):
            warm_bytes, warm_time = received + len(chunk), time.monotonic()
        received += len(chunk)
        last = time.monotonic()
if received - warm_bytes < limit // 4:  # cut short by the time bound: use the whole transfer
    warm_bytes, warm_time = 0, start
print(json.dumps({"bytes": received, "seconds": last - start, "timed_bytes": received - warm_bytes,
                  "timed_seconds": last - warm_time}), flush=True)
"""

_SENDER = """
import socket, sys, time
host, port, total, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
block = bytes(256 * 1024)
sent = 0
with socket.create_connection((host, port), timeout=timeout) as connection:
    while sent < total:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        connection.settimeout(remaining)
        piece = block[:min(len(block), total - sent)]
        try:
            connection.sendall(piece)
        except (socket.timeout, BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
print(sent, flush=True)
"""


def measure_goodput(src_namespace: str, dst_namespace: str, dst_address: str, total_bytes: int,
                    timeout_s: float, label: str) -> dict[str, Any]:
    """Send ``total_bytes`` over one TCP connection from ``src_namespace`` to a receiver at ``dst_address`` in
    ``dst_namespace``; both ends stop at ``timeout_s`` and are killed if still alive at the end.

    Returns the receiver's report: ``bytes`` and ``seconds`` of the whole transfer, ``timed_bytes`` and
    ``timed_seconds`` without its first quarter. ``label`` (e.g. '0->1') names the transfer in errors.
    """
    processes: list[subprocess.Popen] = []
    try:
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", dst_namespace, sys.executable, "-I", "-c", _RECEIVER,
             dst_address, str(total_bytes), str(timeout_s)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(receiver)
        port = _read_port(receiver, timeout=COMMAND_TIMEOUT_S)
        sender = subprocess.Popen(
            ["ip", "netns", "exec", src_namespace, sys.executable, "-I", "-c", _SENDER,
             dst_address, str(port), str(total_bytes), str(timeout_s)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(sender)
        grace = timeout_s + COMMAND_TIMEOUT_S
        sender_out, sender_err = sender.communicate(timeout=grace)
        receiver_out, receiver_err = receiver.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"bandwidth measurement {label} outlived its {timeout_s} s bound "
                           "plus grace; both ends were killed") from None
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if sender.returncode != 0 or receiver.returncode != 0:
        raise TestbedError(f"bandwidth measurement {label} failed: sender exit "
                           f"{sender.returncode} ({sender_err.strip()}), receiver exit {receiver.returncode} "
                           f"({receiver_err.strip()})")
    report = json.loads(receiver_out.strip().splitlines()[-1])
    if report["bytes"] < 64 * 1024 or report["timed_seconds"] <= 0:
        raise TestbedError(f"bandwidth measurement {label} moved only {report['bytes']} bytes "
                           f"in {report['seconds']:.3f} s; the link may be down (sender said: {sender_out})")
    return report
