"""`prism-trt profile` stopped by SIGTERM / Ctrl-C: real sweeps in real processes, signalled once
the map holds a point. The driver must stop its ranks (inside network namespaces too), keep every
point measured, remove its scratch folder and testbed, exit 128 + the signal, and resume later."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import build_engines

from prism_trt.engines import PerfMap
from prism_trt.profiler.sweep import Launcher, SweepInterrupted, SweepPlan, _ResultLines, profile

BATCHES = "1,2,4,8"
POINTS = 12  # local, voltage and one prism chain at 4 batches on loopback
# Enough passes per point that the sweep is still running when the test signals it after the
# first point (the rest of the sweep takes many times longer than delivering a signal).
REPEAT = 60


@pytest.fixture(scope="module")
def engines(mnist_model, mnist_dir, tmp_path_factory):
    """MNIST engines for 2 ranks; the checkpoint's full path, as `profile` calibrates from it."""
    out = tmp_path_factory.mktemp("signal-engines")
    build_engines(mnist_model, out, 2, [2.0], source={"checkpoint": str(mnist_dir / "vit_mnist.pt")}, max_batch=8)
    return out


def _profile_argv(engines: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prism_trt.cli", "profile", "--engines", str(engines), "--batch", BATCHES,
            "--cr", "2", "--warmup", "0", "--repeat", str(REPEAT), "--out", str(out), "--calib-samples", "4",
            "--timeout", "60", "-q", *extra]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still a live (not zombie) process whose command line holds ``marker``
    (a path unique to this test run, so a recycled pid of another process does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and marker in cmdline


def _points(out: Path) -> list[dict]:
    """The map's points as written (the map is replaced atomically, so never half a file)."""
    return json.loads(out.read_text())["points"] if out.is_file() else []


def _start_and_wait_for_a_point(argv: list[str], scratch: Path, logs: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start the driver with its temporary files in ``scratch``; return it and its children once
    the map holds a point (bounded: start-up, calibration and one point)."""
    scratch.mkdir()
    with open(logs, "w") as log:
        driver = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TMPDIR": str(scratch)})
    out = Path(argv[argv.index("--out") + 1])
    deadline = time.monotonic() + 180
    while not _points(out):
        assert driver.poll() is None, f"the sweep ended before its first point:\n{logs.read_text()}"
        assert time.monotonic() < deadline, f"no point within 180 s:\n{logs.read_text()}"
        time.sleep(0.05)
    ranks = _children(driver.pid)
    assert len(ranks) == 2, ranks  # rank 0 and the worker, started by the driver itself
    return driver, ranks


def _check_stopped(driver: subprocess.Popen, ranks: list[int], signum: int, engines: Path, out: Path,
                   scratch: Path, seen: int, logs: Path) -> list[dict]:
    """The driver exited 128 + signum with the message, left no rank and no scratch folder, and
    its map loads with at least the ``seen`` points; returns the points kept."""
    try:
        code = driver.wait(timeout=120)
    finally:
        left = [pid for pid in ranks if _alive(pid, str(engines))]
        for pid in left + ([driver.pid] if driver.poll() is None else []):
            os.kill(pid, signal.SIGKILL)  # leave nothing behind when the test fails
    output = logs.read_text()
    assert left == [], f"rank processes left running: {left}\n{output}"
    assert code == 128 + signum, output
    assert f"interrupted by {signal.Signals(signum).name} after" in output, output
    assert "run the same command again to resume" in output and "Traceback" not in output, output
    assert list(scratch.glob("prism-sweep-*")) == []
    kept = PerfMap.load(out, engines_dir=engines)
    assert seen <= len(kept.points) < POINTS, output
    return _points(out)


def _resume(engines: Path, out: Path, kept: list[dict]) -> None:
    """The same command again measures only what is missing: the kept points stay as they were."""
    again = subprocess.run(_profile_argv(engines, out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    points = _points(out)
    assert len(points) == POINTS
    assert all(point in points for point in kept)  # byte-for-byte: a re-measured point would differ


@pytest.mark.timeout(600)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_sweep_keeps_its_points_and_it_resumes(engines, tmp_path, signum):
    out, scratch, logs = tmp_path / "map.json", tmp_path / "tmp", tmp_path / "profile.log"
    driver, ranks = _start_and_wait_for_a_point(_profile_argv(engines, out), scratch, logs)
    seen = len(_points(out))
    driver.send_signal(signum)
    kept = _check_stopped(driver, ranks, signum, engines, out, scratch, seen, logs)
    _resume(engines, out, kept)


@pytest.mark.timeout(300)
def test_a_second_ctrl_c_stops_at_once_and_leaves_nothing(engines, tmp_path):
    out, scratch, logs = tmp_path / "map.json", tmp_path / "tmp", tmp_path / "profile.log"
    driver, ranks = _start_and_wait_for_a_point(_profile_argv(engines, out), scratch, logs)
    seen = len(_points(out))
    driver.send_signal(signal.SIGINT)
    driver.send_signal(signal.SIGINT)
    _check_stopped(driver, ranks, signal.SIGINT, engines, out, scratch, seen, logs)


@pytest.mark.timeout(600)
def test_sigterm_reaches_ranks_inside_the_testbed_and_takes_it_down(engines, tmp_path):
    """With --bandwidth the ranks run under `ip netns exec`: the signal must reach them there, and
    the driver's own testbed (named after its pid) must be gone afterwards."""
    from prism_trt.profiler.testbed import TESTBED_PREFIX, cleanup_stale, list_namespaces, testbed_support

    ok, why = testbed_support()
    if not ok:
        pytest.skip(f"no network testbed here: {why}")

    out, scratch, logs = tmp_path / "map.json", tmp_path / "tmp", tmp_path / "profile.log"
    argv = _profile_argv(engines, out, "--bandwidth", "300")
    driver, ranks = _start_and_wait_for_a_point(argv, scratch, logs)
    prefix = f"{TESTBED_PREFIX}{driver.pid:x}n"
    try:
        spaces = {subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()
                  for pid in ranks}
        assert spaces == {f"{prefix}0-r0", f"{prefix}0-r1"}, spaces  # the ranks themselves, not a wrapper
        seen = len(_points(out))
        driver.send_signal(signal.SIGTERM)
        _check_stopped(driver, ranks, signal.SIGTERM, engines, out, scratch, seen, logs)
        assert [name for name in list_namespaces() if name.startswith(prefix)] == []
    finally:
        cleanup_stale(prefix)


def test_only_complete_result_lines_are_points(tmp_path):
    """Rank 0 killed while writing leaves half a line: it must never become a point."""
    lines = _ResultLines(tmp_path / "points.jsonl")
    assert lines.fresh() == []
    with open(lines.path, "a") as stream:
        stream.write(json.dumps({"batch": 1}) + "\n" + '{"batch": 2, "lat')
    assert lines.fresh() == [{"batch": 1}]
    assert lines.fresh() == []
    with open(lines.path, "a") as stream:
        stream.write('ency": 3}\n')
    assert lines.fresh() == [{"batch": 2, "latency": 3}]


@pytest.mark.timeout(120)
def test_ranks_that_ignore_sigterm_are_killed_after_the_bounded_wait(engines, tmp_path):
    """A rank 0 stuck where it cannot honour SIGTERM (here: it ignores it) has --timeout seconds,
    then every rank gets SIGTERM, then SIGKILL: the sweep still ends, nothing is left running."""
    marker = tmp_path / "stubborn"
    stubborn = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "pathlib.Path(sys.argv[1] + sys.argv[2]).touch(); time.sleep(600)")

    def wrap(rank, argv):
        return [sys.executable, "-c", stubborn, str(marker), str(rank)]

    def stop_once_both_run():  # bounded: ranks that never start fail the test by its timeout
        while len(list(tmp_path.glob("stubborn*"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_both_run, daemon=True).start()
    plan = SweepPlan.for_build(engines, [1], [2.0], [None], warmup=0, repeat=1)
    with pytest.raises(SweepInterrupted, match="interrupted by SIGTERM after 0 of 3 points") as stopped:
        profile(engines, tmp_path / "map.json", plan, Launcher(2, wrap=wrap), threads=1, timeout=2, progress=False)
    assert stopped.value.exit_code == 143
    left = [int(path.name) for path in Path("/proc").glob("[0-9]*") if _alive(int(path.name), str(marker))]
    assert left == []


@pytest.mark.timeout(60)
def test_rank0_stuck_leaving_after_every_point_does_not_fail_the_sweep(tmp_path, monkeypatch, caplog):
    """A rank 0 that wrote every point but never exits (seen once in CI on torch 2.5: stuck leaving
    the group) is stopped after a bounded grace; the sweep keeps the points and reports where the
    rank's threads stood (faulthandler on SIGUSR1)."""
    from prism_trt.profiler import sweep as sweep_module

    monkeypatch.setattr(sweep_module, "EXIT_GRACE_S", 1.0)
    ranks = sweep_module._RankProcesses(tmp_path, 1)
    lines = _ResultLines(tmp_path / "points.jsonl")
    stuck = ("import faulthandler, json, signal, sys, time\n"
             "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
             "with open(sys.argv[1], 'a') as out:\n"
             "    out.write(json.dumps({'batch': 1}) + '\\n' + json.dumps({'batch': 2}) + '\\n')\n"
             "def leaving_the_group():\n"
             "    time.sleep(600)\n"
             "leaving_the_group()\n")
    rank0 = ranks.start(0, [sys.executable, "-c", stuck, str(lines.path)], dict(os.environ))
    seen: list[dict] = []
    stop = sweep_module.StopSignals()
    try:
        with caplog.at_level("WARNING", logger=sweep_module.__name__):
            assert sweep_module._follow(rank0, ranks, lines, 2, 1.0, seen.append, stop) is True
        assert seen == [{"batch": 1}, {"batch": 2}]
        assert rank0.poll() is None  # left for finish(), which stops it with the workers
        assert "did not exit" in caplog.text and "leaving_the_group" in caplog.text
    finally:
        ranks.finish(False, 1.0, stop)
    assert rank0.poll() is not None
