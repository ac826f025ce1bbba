"""`prism-trt profile`: sweep batch x CR x bandwidth on the real setup into a performance map.

For every bandwidth the cluster is started once (workers, then rank 0, each as a process; inside
their network namespaces when a testbed shapes the links) and rank 0 measures every missing point
with a barrier before each collective, so comm and skew are separate. Points already in the map
are skipped (resumable); the map is written atomically after every point.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..runtime.group import free_port
from . import perfmap

SEED_BUDGET_PASSES = 2000  # seed 000 section 3.3: "approximately 2000 inference passes"


@dataclass
class SweepPlan:
    batches: list[int]
    crs: list[float]
    bandwidths: list[float | None]  # None: unshaped loopback
    warmup: int = 3
    repeat: int = 20

    def points_for(self, bandwidth: float | None, include_local: bool) -> list[tuple]:
        points = [("local", None, b) for b in self.batches] if include_local else []
        for batch in self.batches:
            points.append(("voltage", None, batch))
            points += [("prism", cr, batch) for cr in self.crs]
        return points

    def total_passes(self) -> int:
        count = sum(len(self.points_for(bw, i == 0)) for i, bw in enumerate(self.bandwidths))
        return count * (self.warmup + self.repeat)


@dataclass
class Launcher:
    """How to start rank r's process: plainly on loopback, or through a testbed's `command`."""

    world_size: int
    master_addr: str = "127.0.0.1"
    iface: str | None = None
    wrap: Callable[[int, list[str]], list[str]] = field(default=lambda rank, argv: argv)
    set_bandwidth: Callable[[float], float | None] | None = None  # returns the measured Mbit/s

    @classmethod
    def on_testbed(cls, testbed) -> Launcher:
        """Ranks inside a testbed's namespaces; setting a rate re-shapes every link and measures it."""
        def set_rate(rate: float) -> float | None:
            testbed.set_bandwidth(f"{rate:g}mbit")
            return testbed.measure_bandwidth(1, 0)

        return cls(testbed.ranks, testbed.address(0), None, testbed.command, set_rate)


def _worker_argv(engines: Path, rank: int, launcher: Launcher, port: int, threads: int, timeout: float) -> list[str]:
    argv = [sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines), "--rank", str(rank),
            "--world-size", str(launcher.world_size), "--master-addr", launcher.master_addr,
            "--master-port", str(port), "--threads", str(threads), "--timeout", str(timeout)]
    return argv + (["--iface", launcher.iface] if launcher.iface else [])


def run_cluster(engines: Path, launcher: Launcher, points: list[tuple], threads: int, warmup: int, repeat: int,
                timeout: float, on_result: Callable[[dict], None], energy: str | None = None) -> None:
    """Start workers and rank 0 for one bandwidth, feed ``on_result`` as each point lands."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    workers = [subprocess.Popen(launcher.wrap(r, _worker_argv(engines, r, launcher, port, threads, timeout)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
               for r in range(1, launcher.world_size)]
    with tempfile.TemporaryDirectory(prefix="prism-sweep-") as scratch:
        lines = Path(scratch) / "points.jsonl"
        lines.touch()
        argv = [sys.executable, "-m", "prism_trt.profiler.rank0", "--engines", str(engines), "--world-size",
                str(launcher.world_size), "--master-addr", launcher.master_addr, "--master-port", str(port),
                "--threads", str(threads), "--warmup", str(warmup), "--repeat", str(repeat), "--timeout",
                str(timeout), "--points", json.dumps(points), "--out", str(lines)]
        argv += (["--iface", launcher.iface] if launcher.iface else []) + (["--energy", energy] if energy else [])
        rank0 = subprocess.Popen(launcher.wrap(0, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        seen = 0
        try:
            while True:
                done = rank0.poll() is not None
                results = lines.read_text().splitlines()
                for line in results[seen:]:
                    on_result(json.loads(line))
                seen = len(results)
                if done:
                    break
                time.sleep(0.2)
            if rank0.returncode != 0:
                raise RuntimeError(f"rank 0 of the sweep failed (exit {rank0.returncode}): "
                                   f"{rank0.stderr.read()[-2000:]}")
        finally:
            for process in [rank0, *workers]:
                if process.poll() is None:
                    try:
                        process.wait(timeout=timeout + 30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()


def hardware_description(launcher: Launcher, threads: int) -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}", "threads_per_rank": threads,
            "network": "testbed (tc-shaped network namespaces)" if launcher.set_bandwidth else "loopback, unshaped"}


def profile(engines: Path, out: Path, plan: SweepPlan, launcher: Launcher, threads: int = 1, timeout: float = 60.0,
            energy: str | None = None, progress: bool = True, accuracy: list[dict] | None = None) -> dict:
    """Measure every missing point of ``plan`` into the map at ``out``; returns the map."""
    fingerprint = perfmap.engines_fingerprint(engines)
    if out.is_file():
        data = perfmap.load(out, engines_dir=engines, strict=True)
    else:
        data = perfmap.new_map(fingerprint, hardware_description(launcher, threads), launcher.world_size, threads,
                               plan.warmup, plan.repeat, None)
    if accuracy is not None:
        data["accuracy"] = accuracy
    todo = []
    for index, bandwidth in enumerate(plan.bandwidths):
        missing = [p for p in plan.points_for(bandwidth, include_local=index == 0)
                   if perfmap.find_point(data, p[0], p[1], p[2], bandwidth) is None]
        todo.append((bandwidth, missing))
    total = sum(len(m) for _, m in todo)
    with tqdm(total=total, unit="point", disable=not progress, desc="profile") as bar:
        for bandwidth, missing in todo:
            if not missing:
                continue
            measured = launcher.set_bandwidth(bandwidth) if launcher.set_bandwidth and bandwidth else None

            def store(result: dict, bandwidth=bandwidth, measured=measured) -> None:
                point = {"mode": result["mode"], "cr": result["cr"], "batch": result["batch"],
                         "bandwidth_mbit": None if result["mode"] == "local" else bandwidth,
                         "measured_mbit": measured, "latency": {k: result["latency"][k] for k in perfmap.LATENCY_FIELDS},
                         "per_rank": result["per_rank"], "energy_j": result["energy_j"],
                         "energy_per_sample_j": result["energy_per_sample_j"], "fell_back": result["fell_back"]}
                data["metadata"]["energy_meter"] = result.get("energy_meter")
                perfmap.upsert_point(data, point)
                perfmap.save(out, data)
                bar.set_postfix_str(f"{result['mode']} cr={result['cr']} B={result['batch']} bw={bandwidth}")
                bar.update(1)

            run_cluster(engines, launcher, [list(p) for p in missing], threads, plan.warmup, plan.repeat, timeout,
                        store, energy)
    if not out.is_file():
        perfmap.save(out, data)
    return data
