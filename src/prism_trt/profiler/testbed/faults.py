"""Link faults against a running cluster on the testbed: a served cluster in the namespaces, a bounded
load inside rank 0's namespace, the faults themselves, and what the load saw.

- :func:`set_link` takes a rank's link down or up (the hub end of its veth: the rank loses carrier, as a
  board loses its access point; packets in flight are dropped, sockets stay open). :func:`flap` repeats
  that for short bursts of total loss, the loss bursts a testbed without ``netem`` can make.
  :meth:`~.testbed.Testbed.set_bandwidth` changes the rate.
- :class:`ServedCluster` runs ``prism-trt serve`` on every rank inside the testbed, logging to files.
- :class:`LoadRun` runs :data:`LOAD_CLIENT` in rank 0's namespace (where the server's 127.0.0.1 is):
  ``clients`` threads send one request each at a time, at most ``limit`` requests and ``limit_s`` seconds,
  and one thread polls readiness; every answer and every readiness reading is a JSON line with its
  ``time.monotonic()`` (one clock for all namespaces), so :func:`fault_report` can line them up with the
  faults this process made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .namespaces import TestbedError, run_command
from .testbed import Testbed


def set_link(testbed: Testbed, rank: int, up: bool) -> float:
    """Take ``rank``'s link down or bring it up; returns the ``time.monotonic()`` it took effect."""
    run_command(["ip", "-n", testbed.hub_netns, "link", "set", "dev", testbed.hub_iface(rank),
                 "up" if up else "down"])
    return time.monotonic()


def flap(testbed: Testbed, rank: int, down_s: float, up_s: float, count: int) -> list[tuple[float, float]]:
    """``count`` bursts of total loss on ``rank``'s link, ``down_s`` each, ``up_s`` apart; returns the
    (down, up) times. The link is up again when this returns, whatever happened."""
    if not (0 < down_s <= 60 and 0 <= up_s <= 60 and 1 <= count <= 100):
        raise TestbedError(f"expected 0 < down_s <= 60, 0 <= up_s <= 60, 1 <= count <= 100; found {down_s}, "
                           f"{up_s}, {count}")
    bursts = []
    try:
        for _ in range(count):
            down = set_link(testbed, rank, up=False)
            time.sleep(down_s)
            bursts.append((down, set_link(testbed, rank, up=True)))
            time.sleep(up_s)
    finally:
        set_link(testbed, rank, up=True)
    return bursts


class ServedCluster:
    """``prism-trt serve`` on every rank of ``testbed`` (workers first), each logging to ``logs/rankN.log``.

    ``common``: the arguments of every rank (engines, timeout, threads); ``rank0``: rank 0's own (mode,
    map, port). A context manager: on exit rank 0 gets SIGTERM (it stops the workers), and anything
    still running after ``stop_s`` is killed."""

    def __init__(self, testbed: Testbed, common: Sequence[str], rank0: Sequence[str], logs: Path,
                 env: dict[str, str] | None = None, master_port: int = 29500, stop_s: float = 30.0):
        self.testbed, self.logs, self.stop_s = testbed, Path(logs), stop_s
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {"PYTHONUNBUFFERED": "1", **(env or {})}
        base = [sys.executable, "-m", "prism_trt.cli", "serve", *common, "--world-size", str(testbed.ranks),
                "--master-addr", testbed.address(0), "--master-port", str(master_port)]
        self.argv = {rank: [*base, "--rank", str(rank), *(rank0 if rank == 0 else [])] for rank in range(testbed.ranks)}
        self.processes: dict[int, subprocess.Popen] = {}

    def __enter__(self) -> ServedCluster:
        try:
            for rank in sorted(self.argv, reverse=True):
                self.start(rank)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, rank: int) -> subprocess.Popen:
        with (self.logs / f"rank{rank}.log").open("a") as log:
            self.processes[rank] = subprocess.Popen(self.testbed.command(rank, self.argv[rank], self.env), stdout=log,
                                                    stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        return self.processes[rank]

    def alive(self) -> dict[int, bool]:
        return {rank: process.poll() is None for rank, process in self.processes.items()}

    def log(self, rank: int) -> str:
        path = self.logs / f"rank{rank}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> dict[int, int | None]:
        """SIGTERM to rank 0, then wait for every rank (killed after ``stop_s``); returns the exit codes."""
        if 0 in self.processes and self.processes[0].poll() is None:
            self.processes[0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_s
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        return {rank: process.returncode for rank, process in self.processes.items()}


# The load runs as `python -I -c` inside rank 0's namespace: the standard library only, so it starts fast.
LOAD_CLIENT = r"""
import http.client, json, sys, threading, time
port, model, inputs_path, out_path, clients, limit, limit_s, stop_path, pause_s = sys.argv[1:10]
port, clients, limit, limit_s, pause_s = int(port), int(clients), int(limit), float(limit_s), float(pause_s)
inputs = json.load(open(inputs_path))  # {"shape": [1, C, H, W], "images": [[...], ...]}
deadline = time.monotonic() + limit_s
lock, sent, done = threading.Lock(), [0], threading.Event()
sink = open(out_path, "w")

def record(entry):
    with lock:
        sink.write(json.dumps(entry) + "\n")

def stopped():
    if done.is_set() or time.monotonic() > deadline:
        return True
    try:
        open(stop_path).close()
        return True
    except OSError:
        return False

def next_index():
    with lock:
        if sent[0] >= limit:
            return None
        sent[0] += 1
        return sent[0] - 1

def client():
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while not stopped() and (index := next_index()) is not None:
        image = inputs["images"][index % len(inputs["images"])]
        body = json.dumps({"id": str(index), "inputs": [{"name": "input", "shape": inputs["shape"],
                                                        "datatype": "FP32", "data": image}]})
        start = time.monotonic()
        entry = {"kind": "answer", "id": index, "sent": start}
        try:
            connection.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            entry["status"] = response.status
            if response.status == 200:
                answer = json.loads(payload)
                parameters = answer.get("parameters", {})
                entry.update(answer_id=answer.get("id"), mode=parameters.get("mode"),
                             choice=parameters.get("choice"), segments=parameters.get("segments"),
                             fell_back=parameters.get("fell_back"),
                             logits=answer["outputs"][0]["data"])
            else:
                entry["error"] = payload[:300].decode(errors="replace")
        except (OSError, http.client.HTTPException) as error:
            entry["status"], entry["error"] = None, repr(error)
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        entry["answered"] = time.monotonic()
        record(entry)
        time.sleep(pause_s)

def readiness():
    while not stopped():
        start = time.monotonic()
        entry = {"kind": "health", "t": start}
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v2/health/ready")
            response = connection.getresponse()
            entry.update(json.loads(response.read()), status=response.status)
            connection.close()
        except (OSError, http.client.HTTPException, ValueError) as error:
            entry.update(status=None, error=repr(error))
        record(entry)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - start)))

while not stopped():  # the server first: a refused connection before it listens is no answer
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/v2/health/ready")
        if connection.getresponse().status == 200:
            break
    except (OSError, http.client.HTTPException):
        pass
    time.sleep(0.2)
threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=readiness)]
for thread in threads:
    thread.start()
for thread in threads[:-1]:
    thread.join()
done.set()
threads[-1].join()
sink.close()
"""


class LoadRun:
    """:data:`LOAD_CLIENT` in rank 0's namespace against the server on ``port``: at most ``limit``
    requests and ``limit_s`` seconds, until :meth:`stop`; each client pauses ``pause_s`` after every
    answer. ``images``: a list of flat images of ``shape`` [1, C, H, W]; request ``i`` sends image
    ``i % len(images)`` with id ``i``."""

    def __init__(self, testbed: Testbed, port: int, model: str, images: list[list[float]], shape: Sequence[int],
                 workdir: Path, clients: int = 2, limit: int = 5000, limit_s: float = 120.0, pause_s: float = 0.01):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.events_path, self.stop_path = self.workdir / "load.jsonl", self.workdir / "load.stop"
        self.stop_path.unlink(missing_ok=True)
        inputs = self.workdir / "inputs.json"
        inputs.write_text(json.dumps({"shape": list(shape), "images": images}))
        self.limit_s = limit_s
        argv = [sys.executable, "-I", "-c", LOAD_CLIENT, str(port), model, str(inputs), str(self.events_path),
                str(clients), str(limit), str(limit_s), str(self.stop_path), str(pause_s)]
        self.process = subprocess.Popen(testbed.command(0, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)

    def events(self) -> list[dict[str, Any]]:
        """Every line written so far (a last, partly written line is left for later)."""
        if not self.events_path.exists():
            return []
        events = []
        for line in self.events_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                break
        return events

    def answered(self) -> int:
        return sum(1 for event in self.events() if event["kind"] == "answer")

    def wait_for(self, predicate, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Poll ``predicate(events)`` until it holds (True) or ``timeout_s`` passes or the load ended (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return True
            if self.process.poll() is not None:
                return predicate(self.events())
            time.sleep(poll_s)
        return False

    def stop(self, timeout_s: float = 180.0) -> list[dict[str, Any]]:
        """Stop sending, wait for the answers still outstanding (killed after ``timeout_s``); all events."""
        self.stop_path.touch()
        try:
            output, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate(timeout=10)
        if self.process.returncode != 0:
            raise TestbedError(f"the load client exited with {self.process.returncode}: {output[-2000:]}")
        return self.events()


@dataclass(frozen=True)
class FaultReport:
    """What the load saw around one fault (seconds from the ``time.monotonic()`` marks given).

    degrade_s: fault start to the first readiness reading that says degraded (None: never degraded);
    recover_s: link back to the first request sent after it that ran distributed, on a chain of
    ``modes`` (None: never in the window); ready_s: link back to the first reading ready and not
    degraded from which it stays so; p99_fault_ms / max_fault_ms: latency of the requests in flight
    at some time between fault start and link back (sent before the link was back, answered after
    the fault began); requests, errors, lost (sent, never answered), duplicated (answered twice)
    and unknown_ids (answers naming another request) over the whole run; fell_back (answered
    locally after a failed distributed run) and modes (answers per mode) of the requests sent from
    the fault's start to ``end``."""

    kind: str
    start: float
    back: float
    degrade_s: float | None
    ready_s: float | None
    recover_s: float | None
    p99_fault_ms: float | None
    max_fault_ms: float | None
    requests: int
    errors: int
    lost: int
    duplicated: int
    unknown_ids: int
    fell_back: int
    modes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def fault_report(kind: str, events: list[dict[str, Any]], start: float, back: float, end: float,
                 distributed: Sequence[str] = ("prism", "voltage")) -> FaultReport:
    """The figures of one fault from ``start`` (link down, rate dropped) to ``back`` (link restored),
    the events looked at up to ``end``; requests are counted over all ``events``."""
    answers = [e for e in events if e["kind"] == "answer"]
    health = sorted((e for e in events if e["kind"] == "health" and start <= e["t"] <= end), key=lambda e: e["t"])
    ids = [e["id"] for e in answers]
    ok = [e for e in answers if e.get("status") == 200]
    degraded = next((e["t"] for e in health if e.get("degraded")), None)
    settled = None
    for event in health:
        if event["t"] < back:
            continue
        if event.get("status") == 200 and event.get("ready") and not event.get("degraded"):
            settled = event["t"] if settled is None else settled
        else:
            settled = None
    resumed = min((e["sent"] for e in ok if back <= e["sent"] <= end and e.get("mode") in distributed
                   and not e.get("fell_back")), default=None)
    during = [(e["answered"] - e["sent"]) * 1e3 for e in answers if e["sent"] < back and e["answered"] >= start]
    window = [e for e in ok if start <= e["sent"] < end]
    modes: dict[str, int] = {}
    for event in window:
        modes[str(event.get("mode"))] = modes.get(str(event.get("mode")), 0) + 1
    return FaultReport(
        kind, start, back, None if degraded is None else degraded - start, None if settled is None else settled - back,
        None if resumed is None else resumed - back, _percentile(during, 0.99), max(during, default=None),
        len(answers), len(answers) - len(ok), (max(ids) + 1 - len(set(ids))) if ids else 0, len(ids) - len(set(ids)),
        sum(1 for e in ok if e.get("answer_id") != str(e["id"])), sum(1 for e in window if e.get("fell_back")), modes)
