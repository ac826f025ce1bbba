"""`prism-trt profile`: sweep batch x CR x bandwidth on the real setup into a performance map.

For every bandwidth the cluster is started once (workers, then rank 0, each as a process; inside
their network namespaces when a testbed shapes the links) and rank 0 measures every missing point
with a barrier before each collective, so comm and skew are separate. Points already in the map
are skipped (resumable); the map is written atomically after every point.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..core.chain_key import ChainKey, Mode
from ..engines.manifest import Manifest, rank_directory
from ..engines.perfmap import AccuracyEntry, PerfMap, PerfMapError
from ..errors import PrismError
from ..runtime.group import ClusterError, free_port
from ..runtime.measure import Measurement
from .sampling import SamplingRule

SEED_BUDGET_PASSES = 2000  # seed 000 section 3.3: "approximately 2000 inference passes"
# After a signal, how long the ranks get to leave on their own before SIGKILL. Rank 0 has its
# --timeout to finish the point in progress first; workers then only have to exit.
WORKER_GRACE_S = 10.0
#: After the last point, how long past its collective timeout rank 0 gets to tell the workers to
#: stop and leave the group before the driver stops it (every point is in the map by then).
EXIT_GRACE_S = 30.0

TOKEN_ENV = "PRISM_TRT_CLUSTER_TOKEN"  # read by the ranks' group options (`--cluster-token`)

log = logging.getLogger(__name__)


@dataclass
class SweepPlan:
    """What to measure: every batch of the local chain (once), and of voltage and each prism chain
    at every bandwidth. ``prism``: the prism chains, e.g. from :meth:`for_build`."""

    batches: list[int]
    prism: list[ChainKey]
    bandwidths: list[float | None]  # None: unshaped loopback
    warmup: int = 3
    repeat: int = 20  # the least samples per point; more until the median is tight (``sampling``)
    sampling: SamplingRule | None = None  # None: exactly ``repeat`` samples per point

    @property
    def rule(self) -> SamplingRule:
        return self.sampling or SamplingRule(self.repeat, self.repeat)

    @classmethod
    def for_build(cls, engines: Path, batches: list[int], crs: list[float] | None, bandwidths: list[float | None],
                  warmup: int = 3, repeat: int = 20, sampling: SamplingRule | None = None) -> SweepPlan:
        """A plan over the prism chains of a build: the requested CRs, each mapped to the segment
        count it stands for (an error names the built ones when it was not built), or every one."""
        manifest = Manifest.read(rank_directory(engines))
        built = [key for key in manifest.keys() if key.mode == Mode.PRISM]
        chains = built if crs is None else list(dict.fromkeys(manifest.key_for(Mode.PRISM, cr) for cr in crs))
        return cls(batches, chains, bandwidths, warmup, repeat, sampling)

    def points(self, include_local: bool) -> list[tuple[ChainKey, int]]:
        """The points measured at one link rate (the local chain's only at the first), grouped by
        batch: rank 0 times the chains of one batch interleaved."""
        points = []
        for batch in self.batches:
            points += [(ChainKey.local(), batch)] if include_local else []
            points += [(ChainKey.voltage(), batch)] + [(key, batch) for key in self.prism]
        return points

    def total_passes(self, most: bool = False) -> int:
        """Inference passes of the whole sweep: the least, or (``most``) with every point at its cap."""
        count = sum(len(self.points(include_local=i == 0)) for i in range(len(self.bandwidths)))
        return count * (self.warmup + (self.rule.max_repeat if most else self.rule.min_repeat))


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


class SweepInterrupted(PrismError):
    """SIGINT or SIGTERM stopped the sweep; every point measured before is in the map. Exits
    with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports it."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum, self.detail = signum, detail  # detail: how far the sweep got, once it is known
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" {detail}" if detail else ""))


class StopSignals:
    """SIGINT and SIGTERM turned into an orderly stop of a sweep; a context manager that installs
    its handler for both (on the main thread only: Python allows no other) and restores the old ones.

    What a signal does depends on the mode the sweep is in:

    * ``"raise"`` (outside a cluster: calibration, testbed set-up, shaping, measuring a link):
      :class:`SweepInterrupted` is raised at once, so the callers' ``finally`` blocks clean up;
    * ``"defer"`` (while rank processes run): the signal is only recorded; the sweep loop forwards
      the first to rank 0 and stops every rank at once on the second. Nothing is raised, so no
      rank can be left half-started or half-stopped, and no map half-written;
    * ``"shield"`` (while cleaning up): recorded, nothing else, so a second Ctrl-C cannot leave a
      rank process, a scratch folder or a namespace behind.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.count = 0
        self.arrived = threading.Event()  # wakes the sweep loop at once, instead of at its next poll
        self._mode = "raise"
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        self.arrived.set()
        if self.signum is None:
            self.signum = signum
        if self._mode == "raise":
            raise SweepInterrupted(self.signum)

    @contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        """Handle signals as ``mode`` ("raise", "defer" or "shield") inside the block."""
        previous, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = previous

    def check(self) -> None:
        """Raise :class:`SweepInterrupted` if a signal arrived while it could not be raised."""
        if self.signum is not None:
            raise SweepInterrupted(self.signum)


class _RankProcesses:
    """The processes of one cluster, each the leader of its own process group (session), so a
    signal sent to the group reaches the real rank whatever wraps it (`ip netns exec`, `env` and
    `taskset` exec in place; a wrapper that forks is reached too), and a Ctrl-C typed in the
    terminal reaches only the driver, which stops the ranks in order."""

    def __init__(self, scratch: Path, world_size: int) -> None:
        self.logs = [scratch / f"rank{r}.log" for r in range(world_size)]
        self.processes: dict[int, subprocess.Popen] = {}

    def start(self, rank: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        # No pipes: a process whose stderr pipe nobody reads blocks once the pipe is full. Each rank
        # logs to a file, read back only to explain a failure.
        with open(self.logs[rank], "w") as stream:
            process = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes[rank] = process
        log.info("rank %d of the sweep: pid %d, log %s", rank, process.pid, self.logs[rank])
        return process

    def signal(self, signum: int, ranks: list[int] | None = None) -> None:
        for rank, process in self.processes.items():
            if ranks is None or rank in ranks:
                try:
                    os.killpg(process.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass  # the group is gone already

    def wait(self, seconds: float, stop: StopSignals | None = None) -> bool:
        """Wait up to ``seconds`` for every rank to exit (less if a second signal arrives); whether all did."""
        deadline = time.monotonic() + seconds
        while any(process.poll() is None for process in self.processes.values()):
            if time.monotonic() > deadline or (stop is not None and stop.count >= 2):
                return False
            time.sleep(0.05)
        return True

    def finish(self, clean: bool, timeout: float, stop: StopSignals) -> None:
        """After a clean end the workers leave on rank 0's stop message: wait for them (a collective
        gives up after ``timeout``). Otherwise (an error, a signal) ask every rank to go now, and
        kill what is left after a bounded wait. Either way no rank process outlives this call."""
        if clean and self.wait(timeout + 30, stop):
            return
        if stop.count < 2:
            self.signal(signal.SIGTERM)
            self.wait(WORKER_GRACE_S, stop)
        # SIGKILL to every group, leaders gone or not: whatever a wrapper forked goes with them.
        self.signal(signal.SIGKILL)
        for process in self.processes.values():
            process.wait()


class _ResultLines:
    """Rank 0's result file, read as it grows. Only complete lines count: rank 0 killed while
    writing leaves a partial last line, which is never a point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = 0
        path.touch()

    def fresh(self) -> list[dict]:
        complete = self.path.read_text().split("\n")[:-1]
        results = [json.loads(line) for line in complete[self.seen:]]
        self.seen = len(complete)
        return results


def run_cluster(engines: Path, launcher: Launcher, points: list[tuple[ChainKey, int]], threads: int, warmup: int,
                rule: SamplingRule, timeout: float, on_result: Callable[[dict], None], energy: str | None = None,
                stop: StopSignals | None = None) -> None:
    """Start workers and rank 0 for one bandwidth, feed ``on_result`` as each point lands.

    On SIGINT/SIGTERM (with ``stop`` entered): rank 0 is asked to stop after the point in progress
    (SIGTERM), gets up to ``timeout`` seconds for it, then every rank is stopped; a second signal
    stops them at once. Every complete point is passed to ``on_result``, then
    :class:`SweepInterrupted` is raised."""
    stop = stop if stop is not None else StopSignals()
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    # A group reachable from the network (a testbed's addresses) needs a shared secret to join; the
    # sweep's own ranks share one made here, in the environment rather than on command lines.
    env.setdefault(TOKEN_ENV, secrets.token_hex(16))
    # `defer` before the scratch folder, so that removing it is not cut short by a signal either.
    with stop.mode("defer"), tempfile.TemporaryDirectory(prefix="prism-sweep-") as scratch:
        ranks = _RankProcesses(Path(scratch), launcher.world_size)
        lines = _ResultLines(Path(scratch) / "points.jsonl")
        clean = False
        try:
            for r in range(1, launcher.world_size):
                ranks.start(r, launcher.wrap(r, _worker_argv(engines, r, launcher, port, threads, timeout)), env)
            argv = [sys.executable, "-m", "prism_trt.cli", "sweep-rank0", "--engines", str(engines), "--rank", "0",
                    "--world-size", str(launcher.world_size), "--master-addr", launcher.master_addr, "--master-port",
                    str(port), "--threads", str(threads), "--warmup", str(warmup), "--repeat", str(rule.min_repeat),
                    "--max-repeat", str(rule.max_repeat), "--target-ci", str(rule.target_ci),
                    "--point-budget", str(rule.budget_s), "--timeout", str(timeout),
                    "--points", json.dumps([[key.to_dict(), batch] for key, batch in points]), "--out", str(lines.path)]
            argv += (["--iface", launcher.iface] if launcher.iface else []) + (["--energy", energy] if energy else [])
            rank0 = ranks.start(0, launcher.wrap(0, argv), env)
            hung = _follow(rank0, ranks, lines, len(points), timeout, on_result, stop)
            stop.check()
            if not hung and rank0.returncode != 0:
                raise ClusterError(f"rank 0 of the sweep failed (exit {rank0.returncode}); its log ends with:\n"
                                   f"{_tail(ranks.logs[0])}")
            clean = not hung  # a rank 0 stuck leaving is stopped with the workers, its points kept
        finally:
            with stop.mode("shield"):
                ranks.finish(clean, timeout, stop)
                if not clean:  # the last points rank 0 completed before it stopped
                    for result in lines.fresh():
                        on_result(result)
    stop.check()  # a signal that came while the cluster was taken down


def _follow(rank0: subprocess.Popen, ranks: _RankProcesses, lines: _ResultLines, count: int, timeout: float,
            on_result: Callable[[dict], None], stop: StopSignals) -> bool:
    """Pass rank 0's results on as they land, until rank 0 exits or a signal stops the sweep.
    Returns True when rank 0 measured every point but did not exit in time (then left running)."""
    # Joining, and every collective, give up after `timeout`; rank 0 then falls back and goes on.
    # A sweep with no new point for longer than this is stuck, not slow.
    stall_s = 3 * timeout + 60
    progress, stopping_until = time.monotonic(), None
    while True:
        done = rank0.poll() is not None
        results = lines.fresh()
        for result in results:
            on_result(result)
        if results:
            progress = time.monotonic()
        if done or stop.count >= 2:  # a second signal: stop now, the point in progress is lost
            return False
        if lines.seen >= count and time.monotonic() - progress > timeout + EXIT_GRACE_S:
            # Every point is in; a rank 0 stuck leaving the group must not fail the sweep. Its
            # threads' stacks (faulthandler, registered by sweep-rank0) go to its log, to say where.
            ranks.signal(signal.SIGUSR1, [0])
            time.sleep(1.0)
            log.warning("rank 0 measured all %d points but did not exit within %.0f s; stopping the ranks. "
                        "Its log ends with:\n%s", count, timeout + EXIT_GRACE_S, _tail(ranks.logs[0], 6000))
            return True
        if stop.signum is not None:
            if stopping_until is None:
                # SIGTERM whichever signal came: the ranks handle both alike, and SIGINT would raise
                # KeyboardInterrupt (a traceback) in a rank still starting up.
                ranks.signal(signal.SIGTERM, [0])
                stopping_until = time.monotonic() + timeout
            elif time.monotonic() > stopping_until:
                return False  # rank 0 did not stop in time: the ranks are stopped with it
        elif time.monotonic() - progress > stall_s:
            raise ClusterError(f"the sweep made no progress for {stall_s:.0f} s ({lines.seen} of {count} "
                               f"points measured); rank 0's log ends with:\n{_tail(ranks.logs[0])}")
        if stop.arrived.wait(0.2):
            stop.arrived.clear()


def _tail(path: Path, chars: int = 2000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:] or "(empty)"


def hardware_description(launcher: Launcher, threads: int) -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}", "threads_per_rank": threads,
            "network": "testbed (tc-shaped network namespaces)" if launcher.set_bandwidth else "loopback, unshaped"}


def profile(engines: Path, out: Path, plan: SweepPlan, launcher: Launcher, threads: int = 1, timeout: float = 60.0,
            energy: str | None = None, progress: bool = True, accuracy: list[AccuracyEntry] | None = None,
            stop: StopSignals | None = None) -> PerfMap:
    """Measure every missing point of ``plan`` into the map at ``out``; returns the map. A map
    resumed must have been measured with the same warm-up and repeat count.

    SIGINT/SIGTERM stop the sweep after the point in progress at most (see :func:`run_cluster`)
    and raise :class:`SweepInterrupted`, the map keeping every point measured. ``stop``: the
    caller's handler when it has set-up to protect too (a testbed); else one for this call."""
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
    data.metadata["sampling"] = plan.rule.to_dict()  # how the points measured from now on were sampled
    if accuracy is not None:
        data.accuracy = accuracy
    todo = []
    for index, bandwidth in enumerate(plan.bandwidths):
        missing = [(key, batch) for key, batch in plan.points(include_local=index == 0)
                   if data.find(key, batch, bandwidth) is None]
        todo.append((bandwidth, missing))
    total = sum(len(m) for _, m in todo)
    planned = sum(len(plan.points(include_local=i == 0)) for i in range(len(plan.bandwidths)))
    stored = []
    # The caller's handler, when given, is already installed (it guards a testbed's set-up too).
    own = StopSignals() if stop is None else None
    stop = stop if stop is not None else own
    try:
        bar = tqdm(total=total, unit="point", disable=not progress, desc="profile")
        with own if own is not None else nullcontext(), bar:
            for bandwidth, missing in todo:
                if not missing:
                    continue
                measured = launcher.set_bandwidth(bandwidth) if launcher.set_bandwidth and bandwidth else None

                def store(result: dict, bandwidth=bandwidth, measured=measured) -> None:
                    point = Measurement.from_dict(result, "rank 0's result").point(bandwidth, measured)
                    data.upsert(point)
                    data.metadata["energy_meter"] = result.get("energy_meter")
                    data.save(out)
                    stored.append(point.key)
                    bar.set_postfix_str(f"{point.key.label} B={point.batch} bw={bandwidth}")
                    bar.update(1)

                run_cluster(engines, launcher, missing, threads, plan.warmup, plan.rule, timeout, store, energy, stop)
    except SweepInterrupted as interrupted:
        kept = f"{out} keeps them" if out.is_file() else f"nothing was written to {out}"
        raise SweepInterrupted(interrupted.signum, f"after {planned - total + len(stored)} of {planned} points; "
                               f"{kept}; run the same command again to resume") from None
    if not out.is_file():
        data.save(out)
    return data
