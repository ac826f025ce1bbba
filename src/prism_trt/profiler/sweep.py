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

from ..engines.chain_key import ChainKey
from ..engines.manifest import Manifest, rank_directory
from ..engines.perfmap import LATENCY_FIELDS, AccuracyEntry, PerfMap, PerfMapError, PerfPoint
from ..runtime.group import ClusterError, free_port

SEED_BUDGET_PASSES = 2000  # seed 000 section 3.3: "approximately 2000 inference passes"


@dataclass
class SweepPlan:
    """What to measure: every batch of the local chain (once), and of voltage and each prism chain
    at every bandwidth. ``prism``: the prism chains, e.g. from :meth:`for_build`."""

    batches: list[int]
    prism: list[ChainKey]
    bandwidths: list[float | None]  # None: unshaped loopback
    warmup: int = 3
    repeat: int = 20

    @classmethod
    def for_build(cls, engines: Path, batches: list[int], crs: list[float] | None, bandwidths: list[float | None],
                  warmup: int = 3, repeat: int = 20) -> SweepPlan:
        """A plan over the prism chains of a build: the requested CRs, each mapped to the segment
        count it stands for (an error names the built ones when it was not built), or every one."""
        manifest = Manifest.read(rank_directory(engines))
        built = [key for key in manifest.keys() if key.mode == "prism"]
        chains = built if crs is None else list(dict.fromkeys(manifest.key_for("prism", cr) for cr in crs))
        return cls(batches, chains, bandwidths, warmup, repeat)

    def points_for(self, bandwidth: float | None, include_local: bool) -> list[tuple[ChainKey, int]]:
        points = [(ChainKey.local(), b) for b in self.batches] if include_local else []
        for batch in self.batches:
            points.append((ChainKey.voltage(), batch))
            points += [(key, batch) for key in self.prism]
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


def run_cluster(engines: Path, launcher: Launcher, points: list[tuple[ChainKey, int]], threads: int, warmup: int, repeat: int,
                timeout: float, on_result: Callable[[dict], None], energy: str | None = None) -> None:
    """Start workers and rank 0 for one bandwidth, feed ``on_result`` as each point lands."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    # No pipes: a process whose stderr pipe nobody reads blocks once the pipe is full. Each rank
    # logs to a file, read back only to explain a failure.
    with tempfile.TemporaryDirectory(prefix="prism-sweep-") as scratch:
        logs = [Path(scratch) / f"rank{r}.log" for r in range(launcher.world_size)]
        workers = []
        for r in range(1, launcher.world_size):
            with open(logs[r], "w") as log:
                workers.append(subprocess.Popen(launcher.wrap(r, _worker_argv(engines, r, launcher, port, threads, timeout)),
                                                stdout=log, stderr=subprocess.STDOUT, env=env))
        lines = Path(scratch) / "points.jsonl"
        lines.touch()
        argv = [sys.executable, "-m", "prism_trt.cli", "sweep-rank0", "--engines", str(engines), "--rank", "0",
                "--world-size", str(launcher.world_size), "--master-addr", launcher.master_addr, "--master-port",
                str(port), "--threads", str(threads), "--warmup", str(warmup), "--repeat", str(repeat), "--timeout",
                str(timeout), "--points", json.dumps([[key.to_dict(), batch] for key, batch in points]),
                "--out", str(lines)]
        argv += (["--iface", launcher.iface] if launcher.iface else []) + (["--energy", energy] if energy else [])
        with open(logs[0], "w") as log:
            rank0 = subprocess.Popen(launcher.wrap(0, argv), stdout=log, stderr=subprocess.STDOUT, env=env)
        # Joining, and every collective, give up after `timeout`; rank 0 then falls back and goes on.
        # A sweep with no new point for longer than this is stuck, not slow.
        stall_s = 3 * timeout + 60
        seen, progress = 0, time.monotonic()
        try:
            while True:
                done = rank0.poll() is not None
                results = lines.read_text().splitlines()
                for line in results[seen:]:
                    on_result(json.loads(line))
                if len(results) > seen:
                    seen, progress = len(results), time.monotonic()
                if done:
                    break
                if time.monotonic() - progress > stall_s:
                    raise ClusterError(f"the sweep made no progress for {stall_s:.0f} s ({seen} of {len(points)} "
                                       f"points measured); rank 0's log ends with:\n{_tail(logs[0])}")
                time.sleep(0.2)
            if rank0.returncode != 0:
                raise ClusterError(f"rank 0 of the sweep failed (exit {rank0.returncode}); its log ends with:\n"
                                   f"{_tail(logs[0])}")
        finally:
            for process in [rank0, *workers]:
                if process.poll() is None:
                    try:
                        process.wait(timeout=timeout + 30 if process is not rank0 or done else 0.1)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()


def _tail(path: Path, chars: int = 2000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:] or "(empty)"


def hardware_description(launcher: Launcher, threads: int) -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}", "threads_per_rank": threads,
            "network": "testbed (tc-shaped network namespaces)" if launcher.set_bandwidth else "loopback, unshaped"}


def profile(engines: Path, out: Path, plan: SweepPlan, launcher: Launcher, threads: int = 1, timeout: float = 60.0,
            energy: str | None = None, progress: bool = True, accuracy: list[AccuracyEntry] | None = None) -> PerfMap:
    """Measure every missing point of ``plan`` into the map at ``out``; returns the map. A map
    resumed must have been measured with the same warm-up and repeat count."""
    fingerprint = Manifest.read(rank_directory(engines)).fingerprint()
    if out.is_file():
        data = PerfMap.load(out, engines_dir=engines, strict=True)
        was = (data.metadata.get("warmup"), data.metadata["repeat"])
        if was != (plan.warmup, plan.repeat):
            raise PerfMapError(f"{out} was measured with --warmup {was[0]} --repeat {was[1]}; resume it with the same "
                               f"values, or write a new map (asked for --warmup {plan.warmup} --repeat {plan.repeat})")
    else:
        data = PerfMap.new(fingerprint, hardware_description(launcher, threads), launcher.world_size, threads,
                           plan.warmup, plan.repeat, None)
    if accuracy is not None:
        data.accuracy = accuracy
    todo = []
    for index, bandwidth in enumerate(plan.bandwidths):
        missing = [(key, batch) for key, batch in plan.points_for(bandwidth, include_local=index == 0)
                   if data.find(key, batch, bandwidth) is None]
        todo.append((bandwidth, missing))
    total = sum(len(m) for _, m in todo)
    with tqdm(total=total, unit="point", disable=not progress, desc="profile") as bar:
        for bandwidth, missing in todo:
            if not missing:
                continue
            measured = launcher.set_bandwidth(bandwidth) if launcher.set_bandwidth and bandwidth else None

            def store(result: dict, bandwidth=bandwidth, measured=measured) -> None:
                key = ChainKey.from_dict(result)
                data.upsert(PerfPoint(key, result["batch"], None if key.mode == "local" else bandwidth,
                                      {k: result["latency"][k] for k in LATENCY_FIELDS}, result["per_rank"], measured,
                                      result["energy_j"], result["energy_per_sample_j"], result["fell_back"]))
                data.metadata["energy_meter"] = result.get("energy_meter")
                data.save(out)
                bar.set_postfix_str(f"{key.label} B={result['batch']} bw={bandwidth}")
                bar.update(1)

            run_cluster(engines, launcher, missing, threads, plan.warmup, plan.repeat, timeout, store, energy)
    if not out.is_file():
        data.save(out)
    return data
