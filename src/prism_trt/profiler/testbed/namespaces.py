"""Namespace plumbing for the testbed: commands, capability checks, namespaces, subnets, state files."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ...errors import PrismError

log = logging.getLogger(__name__)

#: Every namespace a testbed creates starts with this; ``cleanup_stale`` refuses any other prefix.
TESTBED_PREFIX = "prism-tb-"
#: Addresses are 10.77.X.(rank + 1)/24 with X in 1..254 picked per testbed.
SUBNET_BASE = "10.77"
MAX_RANKS = 253
#: How long one ip/tc command (or a namespace process's start) may take.
COMMAND_TIMEOUT_S = 20.0
_instance_counter = itertools.count()
_netem_cache: bool | None = None
_support_cache: tuple[bool, str] | None = None


class TestbedError(PrismError, RuntimeError):
    """A testbed could not be built, changed, measured or removed; the message says what to do."""

    __test__ = False  # not a pytest test class despite the name


def next_instance() -> int:
    """A number unique within this process, for names of probe namespaces and unnamed testbeds."""
    return next(_instance_counter)


def run_command(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT_S,
                input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run a command without a shell; on failure raise with the command line and its stderr."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input_text)
    except FileNotFoundError as error:
        raise TestbedError(f"`{argv[0]}` not found: {error}. Install iproute2 (ip, tc) and util-linux (taskset).") \
            from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed with exit code {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def _effective_capabilities() -> int | None:
    """The CapEff mask of this process, or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def root_available() -> tuple[bool, str]:
    """Whether this process can build a testbed, and if not, what is missing (in words)."""
    missing = [tool for tool in ("ip", "tc", "taskset") if shutil.which(tool) is None]
    problems = []
    if missing:
        problems.append(f"missing tools: {', '.join(missing)} (install iproute2 and util-linux)")
    cap_net_admin, cap_sys_admin = 1 << 12, 1 << 21
    capabilities = _effective_capabilities()
    # Capabilities, not the uid, decide: root in a locked-down container may lack them, and a non-root
    # process granted both can do everything needed.
    if capabilities is None:
        privileged = os.geteuid() == 0
    else:
        privileged = bool(capabilities & cap_net_admin and capabilities & cap_sys_admin)
    if not privileged:
        problems.append(f"no CAP_NET_ADMIN + CAP_SYS_ADMIN (euid {os.geteuid()}); network namespaces and tc "
                        "need them: run as root (sudo), or in a container add NET_ADMIN and SYS_ADMIN")
    if problems:
        return False, "; ".join(problems)
    return True, "root and ip/tc/taskset available"


def require_root() -> None:
    """Raise unless :func:`testbed_support` says a testbed can be built here."""
    ok, reason = testbed_support()
    if not ok:
        raise TestbedError(f"cannot build a network testbed: {reason}")


def list_namespaces() -> list[str]:
    """Names of all network namespaces under /run/netns (only read; used to find testbed ones)."""
    result = run_command(["ip", "-j", "netns", "list"], check=False)
    if result.returncode != 0:
        raise TestbedError(f"`ip -j netns list` failed: {result.stderr.strip()}")
    text = result.stdout.strip()
    if not text:
        return []
    return [entry["name"] for entry in json.loads(text)]


def delete_namespace(namespace: str) -> bool:
    """Delete one namespace; a missing one is fine (down must tolerate partial state)."""
    result = run_command(["ip", "netns", "delete", namespace], check=False)
    if result.returncode == 0:
        return True
    if namespace not in list_namespaces():
        return False
    raise TestbedError(f"`ip netns delete {namespace}` failed: {result.stderr.strip()}")


def _probe_namespace() -> tuple[bool, str, bool]:
    """Create a scratch namespace with a veth pair and a tbf qdisc, try netem, remove it all.

    Returns (namespaces and tbf work, why not, netem works). Tools and privileges are not enough:
    a container may grant CAP_NET_ADMIN yet forbid mounting /run/netns, or lack the veth module.
    """
    namespace = f"{TESTBED_PREFIX}probe-{os.getpid()}-{next_instance()}"
    try:
        run_command(["ip", "netns", "add", namespace])
        run_command(["ip", "-n", namespace, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"])
        run_command(["tc", "-n", namespace, "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "1mbit",
                     "burst", "32kbit", "latency", "50ms"])
        netem = run_command(["tc", "-n", namespace, "qdisc", "add", "dev", "probe1", "root", "netem", "delay",
                             "1ms"], check=False)
        if netem.returncode != 0:
            log.info("netem is not available: %s", netem.stderr.strip())
        return True, "", netem.returncode == 0
    except TestbedError as error:
        return False, f"network namespaces with veth and tc tbf do not work here ({error})", False
    finally:
        try:
            delete_namespace(namespace)
        except TestbedError as error:  # the probe namespace may never have been created
            log.info("probe namespace %s: %s", namespace, error)


def testbed_support(refresh: bool = False) -> tuple[bool, str]:
    """Whether this process can build a testbed here, and if not why (in words), probed once per
    process: tools and privileges (:func:`root_available`), then a real namespace, veth and tbf."""
    global _support_cache, _netem_cache
    if _support_cache is not None and not refresh:
        return _support_cache
    ok, reason = root_available()
    if ok:
        ok, problem, _netem_cache = _probe_namespace()
        reason = problem or "root, ip/tc/taskset and network namespaces with veth and tbf available"
    else:
        _netem_cache = False
    _support_cache = (ok, reason)
    return _support_cache


def netem_available(refresh: bool = False) -> bool:
    """Whether this kernel has the netem qdisc (needed for ``delay``), probed with :func:`testbed_support`.
    Without a working testbed the probe cannot run and the answer is False."""
    testbed_support(refresh)
    return bool(_netem_cache)


def state_dir() -> Path:
    """Where the CLI keeps testbed state: $PRISM_TRT_TESTBED_DIR, /run/prism-trt as root, else the runtime dir."""
    if os.environ.get("PRISM_TRT_TESTBED_DIR"):
        return Path(os.environ["PRISM_TRT_TESTBED_DIR"])
    if os.geteuid() == 0 and Path("/run").is_dir():
        return Path("/run/prism-trt")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "prism-trt" if runtime else Path("/tmp") / f"prism-trt-{os.geteuid()}"


def state_path(name: str) -> Path:
    return state_dir() / f"testbed-{name}.json"


def cleanup_stale(prefix: str = TESTBED_PREFIX) -> list[str]:
    """Delete every network namespace whose name starts with ``prefix`` (a testbed prefix) and its state files.

    Returns the deleted namespaces. The prefix must start with ``TESTBED_PREFIX`` so this can never touch
    namespaces that other tools created. Live testbeds that match are removed too; that is what --all means.
    """
    if not prefix.startswith(TESTBED_PREFIX):
        raise TestbedError(f"expected a prefix starting with {TESTBED_PREFIX!r}, found {prefix!r}; "
                           "only testbed namespaces may be cleaned up")
    require_root()
    deleted = [namespace for namespace in list_namespaces()
               if namespace.startswith(prefix) and delete_namespace(namespace)]
    directory = state_dir()
    if directory.is_dir():
        for path in directory.glob("testbed-*.json"):
            name = path.stem.removeprefix("testbed-")
            if f"{TESTBED_PREFIX}{name}-".startswith(prefix):
                path.unlink(missing_ok=True)
    return deleted


def used_subnets(exclude_name: str) -> set[int]:
    """Third octets already used by other testbeds (read from their rank-0 namespaces)."""
    used = set()
    for namespace in list_namespaces():
        if not (namespace.startswith(TESTBED_PREFIX) and namespace.endswith("-r0")):
            continue
        if namespace == f"{TESTBED_PREFIX}{exclude_name}-r0":
            continue
        result = run_command(["ip", "-n", namespace, "-j", "-4", "addr", "show"], check=False)
        if result.returncode != 0 or not result.stdout.strip():
            continue
        for link in json.loads(result.stdout):
            for info in link.get("addr_info", []):
                parts = info.get("local", "").split(".")
                if len(parts) == 4 and ".".join(parts[:2]) == SUBNET_BASE:
                    used.add(int(parts[2]))
    return used
