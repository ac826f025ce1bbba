"""A network testbed on one Linux host: one network namespace per rank ("board"), shaped links, pinned cores.

Topology (nothing is added to the root namespace; every object lives in a namespace this module created)::

    prism-tb-NAME-r0  [NAME-r0 10.77.X.1/24]  --veth--  [NAME-h0]  \\
    prism-tb-NAME-r1  [NAME-r1 10.77.X.2/24]  --veth--  [NAME-h1]  --  bridge NAME-br in prism-tb-NAME-hub
    ...                                                            /

Every veth is shaped with ``tbf`` at the same rate on the egress of both of its ends, so rank -> rank traffic
meets the rate once in each direction (the two queues in series run at the same rate). With ``delay``, a
``netem`` qdisc sits above the rank-side ``tbf``, which makes ``delay`` the one-way latency between two
ranks (round trip 2 x delay). Deleting the namespaces deletes the veths and the bridge with them, which is
why ``down()`` only has namespaces to remove.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` and ``tc`` (iproute2) and ``taskset``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Every namespace a testbed creates starts with this; ``cleanup_stale`` refuses any other prefix.
TESTBED_PREFIX = "prism-tb-"
#: Addresses are 10.77.X.(rank + 1)/24 with X in 1..254 picked per testbed.
SUBNET_BASE = "10.77"
MAX_RANKS = 253
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS")
# Interface names are at most 15 bytes: NAME (<= 10) + "-r" + rank (<= 3 digits).
_NAME_PATTERN = re.compile(r"^[a-z0-9]{1,10}$")
_RESERVED_NAMES = {"probe"}
_COMMAND_TIMEOUT_S = 20.0
_instance_counter = itertools.count()
_netem_cache: bool | None = None


class TestbedError(RuntimeError):
    """A testbed could not be built, changed, measured or removed; the message says what to do."""

    __test__ = False  # not a pytest test class despite the name


# ---------------------------------------------------------------- parsing


_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_DELAY_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0}


def parse_rate(rate: str | int | float) -> int:
    """A rate in bit/s from "900mbit", "1gbit", "500kbit", "1.5gbit" or a plain number meaning Mbit/s.

    Units are SI (kbit = 1000 bit), as in tc. Byte-based spellings ("mbps", "MB") are refused because tc
    reads "mbps" as megaBYTES per second while most people mean megabits.
    """
    if isinstance(rate, bool):
        raise TestbedError(f"expected a rate such as '900mbit' or a number of Mbit/s, found {rate!r}")
    if isinstance(rate, (int, float)):
        bits = float(rate) * 10**6
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(rate))
        unit = match.group(2).lower() if match else ""
        if not match or (unit and unit not in _RATE_UNITS):
            raise TestbedError(f"expected a rate such as '900mbit', '1gbit', '500kbit' or a number of Mbit/s, "
                               f"found {rate!r} (units: {', '.join(_RATE_UNITS)}; byte units like 'mbps' are "
                               "ambiguous in tc and not accepted)")
        bits = float(match.group(1)) * (_RATE_UNITS[unit] if unit else 10**6)
    if not 8_000 <= bits <= 100 * 10**9:
        raise TestbedError(f"expected a rate between 8kbit and 100gbit, found {rate!r} ({bits:.0f} bit/s)")
    return int(round(bits))


def format_rate(bits_per_s: int) -> str:
    """The shortest exact spelling of a rate: 900000000 -> '900mbit'."""
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        scale = _RATE_UNITS[unit]
        if bits_per_s % scale == 0:
            return f"{bits_per_s // scale}{unit}"
    return f"{bits_per_s}bit"


def parse_delay(delay: str | int | float) -> float:
    """A one-way delay in seconds from "2ms", "500us", "0.1s" or a plain number meaning milliseconds."""
    if isinstance(delay, bool):
        raise TestbedError(f"expected a delay such as '2ms', found {delay!r}")
    if isinstance(delay, (int, float)):
        seconds = float(delay) * 1e-3
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(delay))
        unit = match.group(2).lower() if match else ""
        if not match or (unit and unit not in _DELAY_UNITS):
            raise TestbedError(f"expected a delay such as '2ms', '500us', '0.1s' or a number of ms, found {delay!r}")
        seconds = float(match.group(1)) * (_DELAY_UNITS[unit] if unit else 1e-3)
    if not 0 <= seconds <= 10:
        raise TestbedError(f"expected a delay between 0 and 10 s, found {delay!r}")
    return seconds


def tbf_parameters(bits_per_s: int, mtu: int = 1500) -> dict[str, int]:
    """Burst and queue limit (bytes) for a tbf at this rate.

    The bucket holds 5 ms of traffic (at least two full frames) so the shaper does not throttle below the
    rate on coarse timers, yet stays small next to any transfer worth measuring. The queue holds 50 ms
    more, about what an edge switch buffers, so TCP sees drops instead of seconds of bufferbloat.
    """
    bytes_per_s = bits_per_s / 8
    burst = max(2 * (mtu + 14), int(bytes_per_s * 0.005))
    limit = burst + max(2 * (mtu + 14), int(bytes_per_s * 0.050))
    return {"burst": burst, "limit": limit}


# ---------------------------------------------------------------- system helpers


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = _COMMAND_TIMEOUT_S,
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


def _require_root() -> None:
    ok, reason = root_available()
    if not ok:
        raise TestbedError(f"cannot build a network testbed: {reason}")


def list_namespaces() -> list[str]:
    """Names of all network namespaces under /run/netns (only read; used to find testbed ones)."""
    result = _run(["ip", "-j", "netns", "list"], check=False)
    if result.returncode != 0:
        raise TestbedError(f"`ip -j netns list` failed: {result.stderr.strip()}")
    text = result.stdout.strip()
    if not text:
        return []
    return [entry["name"] for entry in json.loads(text)]


def _delete_namespace(namespace: str) -> bool:
    """Delete one namespace; a missing one is fine (down must tolerate partial state)."""
    result = _run(["ip", "netns", "delete", namespace], check=False)
    if result.returncode == 0:
        return True
    if namespace not in list_namespaces():
        return False
    raise TestbedError(f"`ip netns delete {namespace}` failed: {result.stderr.strip()}")


def netem_available(refresh: bool = False) -> bool:
    """Whether this kernel has the netem qdisc (needed for ``delay``), probed once per process.

    The probe adds netem to a veth in a scratch namespace of its own and removes it again. Without root the
    probe cannot run and the answer is False.
    """
    global _netem_cache
    if _netem_cache is not None and not refresh:
        return _netem_cache
    if not root_available()[0]:
        return False
    namespace = f"{TESTBED_PREFIX}probe-{os.getpid()}-{next(_instance_counter)}"
    try:
        _run(["ip", "netns", "add", namespace])
        _run(["ip", "-n", namespace, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"])
        result = _run(["tc", "-n", namespace, "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms"],
                      check=False)
        _netem_cache = result.returncode == 0
        if not _netem_cache:
            log.info("netem is not available: %s", result.stderr.strip())
    finally:
        _delete_namespace(namespace)
    return _netem_cache


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
    _require_root()
    deleted = [namespace for namespace in list_namespaces()
               if namespace.startswith(prefix) and _delete_namespace(namespace)]
    directory = state_dir()
    if directory.is_dir():
        for path in directory.glob("testbed-*.json"):
            name = path.stem.removeprefix("testbed-")
            if f"{TESTBED_PREFIX}{name}-".startswith(prefix):
                path.unlink(missing_ok=True)
    return deleted


def _used_subnets(exclude_name: str) -> set[int]:
    """Third octets already used by other testbeds (read from their rank-0 namespaces)."""
    used = set()
    for namespace in list_namespaces():
        if not (namespace.startswith(TESTBED_PREFIX) and namespace.endswith("-r0")):
            continue
        if namespace == f"{TESTBED_PREFIX}{exclude_name}-r0":
            continue
        result = _run(["ip", "-n", namespace, "-j", "-4", "addr", "show"], check=False)
        if result.returncode != 0 or not result.stdout.strip():
            continue
        for link in json.loads(result.stdout):
            for info in link.get("addr_info", []):
                parts = info.get("local", "").split(".")
                if len(parts) == 4 and ".".join(parts[:2]) == SUBNET_BASE:
                    used.add(int(parts[2]))
    return used


# ---------------------------------------------------------------- the testbed


class Testbed:
    """Ranks in network namespaces joined by rate-limited veths to a bridge; a context manager.

    >>> with Testbed(ranks=2, bandwidth="200mbit") as bed:          # doctest: +SKIP
    ...     subprocess.run(bed.command(0, ["ip", "addr"]))
    ...     bed.measure_bandwidth(0, 1, megabytes=8)
    """

    __test__ = False

    def __init__(self, ranks: int, bandwidth: str | int | float = "900mbit", delay: str | int | float | None = None,
                 cpus_per_rank: int = 1, name: str | None = None) -> None:
        if not isinstance(ranks, int) or not 1 <= ranks <= MAX_RANKS:
            raise TestbedError(f"expected 1 to {MAX_RANKS} ranks, found {ranks!r}")
        if not isinstance(cpus_per_rank, int) or cpus_per_rank < 1:
            raise TestbedError(f"expected cpus_per_rank >= 1, found {cpus_per_rank!r}")
        if name is None:
            name = f"{os.getpid():x}n{next(_instance_counter)}"
        if not _NAME_PATTERN.match(name) or name in _RESERVED_NAMES:
            raise TestbedError(f"expected a testbed name of 1-10 lowercase letters or digits (not "
                               f"{', '.join(sorted(_RESERVED_NAMES))}), found {name!r}; interface names are "
                               "built from it and Linux allows 15 characters")
        self.name = name
        self.ranks = ranks
        self.rate_bit_s = parse_rate(bandwidth)
        self.delay_s = None if delay is None else parse_delay(delay)
        self.delay = None if delay is None else (f"{delay}ms" if isinstance(delay, (int, float)) else str(delay))
        self.cpus_per_rank = cpus_per_rank
        self.subnet_octet: int | None = None
        self.measured: dict[str, dict[str, Any]] = {}
        self._owned: list[str] = []  # namespaces this object created (or adopted from saved state)
        self._is_up = False
        available = sorted(os.sched_getaffinity(0))
        self._available_cpus = available or list(range(os.cpu_count() or 1))
        needed = ranks * cpus_per_rank
        self.cpu_note = None
        if needed > len(self._available_cpus):
            self.cpu_note = (f"{ranks} ranks x {cpus_per_rank} cpus need {needed} cores but only "
                             f"{len(self._available_cpus)} are available ({self._available_cpus}); ranks share "
                             "cores, so compute times are slower than on separate boards")

    # ---- names

    @property
    def hub_netns(self) -> str:
        return f"{TESTBED_PREFIX}{self.name}-hub"

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    def netns(self, rank: int) -> str:
        """The network namespace of a rank, for `ip netns exec`."""
        self._check_rank(rank)
        return f"{TESTBED_PREFIX}{self.name}-r{rank}"

    def iface(self, rank: int) -> str:
        """The rank's interface inside its namespace (GLOO_SOCKET_IFNAME / --iface)."""
        self._check_rank(rank)
        return f"{self.name}-r{rank}"

    def hub_iface(self, rank: int) -> str:
        """The hub-side end of the rank's veth (in the hub namespace)."""
        self._check_rank(rank)
        return f"{self.name}-h{rank}"

    def address(self, rank: int) -> str:
        """The rank's IPv4 address (rank 0's is the master address)."""
        self._check_rank(rank)
        if self.subnet_octet is None:
            raise TestbedError("the testbed has no addresses yet; call up() first")
        return f"{SUBNET_BASE}.{self.subnet_octet}.{rank + 1}"

    @property
    def subnet(self) -> str | None:
        return None if self.subnet_octet is None else f"{SUBNET_BASE}.{self.subnet_octet}.0/24"

    @property
    def rate(self) -> str:
        return format_rate(self.rate_bit_s)

    def cpus(self, rank: int) -> list[int]:
        """Cores a rank is pinned to: the rank's own block of cpus_per_rank, wrapping when cores run out."""
        self._check_rank(rank)
        cores = self._available_cpus
        picked = [cores[(rank * self.cpus_per_rank + i) % len(cores)] for i in range(self.cpus_per_rank)]
        return sorted(set(picked))

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.ranks:
            raise TestbedError(f"expected a rank in 0..{self.ranks - 1}, found {rank!r}")

    # ---- processes in the testbed

    def rank_env(self, rank: int, env: dict[str, str] | None = None) -> dict[str, str]:
        """Variables a rank's process gets: thread counts = cpus_per_rank, GLOO_SOCKET_IFNAME, then ``env``."""
        threads = str(len(self.cpus(rank)))
        merged = {var: threads for var in THREAD_ENV_VARS}
        merged["GLOO_SOCKET_IFNAME"] = self.iface(rank)
        merged.update({str(key): str(value) for key, value in (env or {}).items()})
        return merged

    def group_env(self, rank: int, master_port: int = 29500) -> dict[str, str]:
        """torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, which `prism-trt run` reads."""
        return {"RANK": str(rank), "WORLD_SIZE": str(self.ranks), "LOCAL_RANK": "0",
                "MASTER_ADDR": self.address(0), "MASTER_PORT": str(master_port)}

    def command(self, rank: int, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        """The argv that runs ``argv`` inside the rank's namespace, pinned to its cores, with its environment.

        The process inherits the caller's environment (PATH, the virtualenv) plus ``rank_env``.
        """
        if not argv:
            raise TestbedError("expected a command to run, found an empty argv")
        assignments = [f"{key}={value}" for key, value in self.rank_env(rank, env).items()]
        cpu_list = ",".join(map(str, self.cpus(rank)))
        return ["ip", "netns", "exec", self.netns(rank), "env", *assignments, "taskset", "-c", cpu_list, *argv]

    # ---- lifecycle

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc_info) -> None:
        self.down()

    @property
    def is_up(self) -> bool:
        return self._is_up

    @property
    def owned_namespaces(self) -> list[str]:
        """Namespaces this object created or adopted, i.e. what down() will delete."""
        return list(self._owned)

    def namespaces(self) -> list[str]:
        return [self.hub_netns] + [self.netns(rank) for rank in range(self.ranks)]

    def up(self) -> Testbed:
        """Create the namespaces, veths, bridge, addresses and shaping. On any failure, remove what it made."""
        if self._is_up:
            return self
        _require_root()
        if self.cpu_note:
            log.warning(self.cpu_note)
        if self.delay_s is not None and not netem_available():
            raise TestbedError(f"delay={self.delay!r} needs the netem qdisc, but this kernel lacks it "
                               "(`tc qdisc add ... netem` answers 'Specified qdisc kind is unknown'). Use a kernel "
                               "with CONFIG_NET_SCH_NETEM (module sch_netem) or leave the delay unset.")
        try:
            self._build()
        except BaseException:
            # BaseException too: a Ctrl-C in the middle of up() must not leave namespaces behind. A failing
            # cleanup is logged rather than raised so the caller sees why up() failed in the first place.
            try:
                self.down()
            except TestbedError as cleanup_error:
                log.error("cleanup after the failed up() of testbed %r was incomplete: %s", self.name, cleanup_error)
            raise
        self._is_up = True
        return self

    def _create_namespace(self, namespace: str) -> None:
        result = _run(["ip", "netns", "add", namespace], check=False)
        if result.returncode != 0:
            exists = "exist" in result.stderr.lower() or namespace in list_namespaces()
            hint = (f"a namespace named {namespace} already exists (another testbed named {self.name!r} or a "
                    f"leftover); remove it with `prism-trt testbed down --name {self.name}` or pick another name"
                    if exists else "check that you are root and /run/netns is writable")
            raise TestbedError(f"`ip netns add {namespace}` failed: {result.stderr.strip()}; {hint}")
        self._owned.append(namespace)

    def _build(self) -> None:
        self.subnet_octet = self._pick_subnet()
        self._create_namespace(self.hub_netns)
        for rank in range(self.ranks):
            self._create_namespace(self.netns(rank))
        hub = self.hub_netns
        _run(["ip", "-n", hub, "link", "add", self.bridge, "type", "bridge", "stp_state", "0"])
        _run(["ip", "-n", hub, "link", "set", "dev", self.bridge, "up"])
        _run(["ip", "-n", hub, "link", "set", "dev", "lo", "up"])
        for rank in range(self.ranks):
            namespace, iface, hub_iface = self.netns(rank), self.iface(rank), self.hub_iface(rank)
            # Created directly across namespaces so no interface ever appears in the root namespace.
            _run(["ip", "-n", hub, "link", "add", hub_iface, "type", "veth", "peer", "name", iface,
                  "netns", namespace])
            _run(["ip", "-n", hub, "link", "set", "dev", hub_iface, "master", self.bridge, "up"])
            _run(["ip", "-n", namespace, "link", "set", "dev", "lo", "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{self.address(rank)}/24", "dev", iface])
            _run(["ip", "-n", namespace, "link", "set", "dev", iface, "up"])
            self._shape(rank)

    def _pick_subnet(self) -> int:
        """A third octet no other live testbed uses; a stable start per name keeps addresses predictable."""
        used = _used_subnets(self.name)
        start = int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % 254
        for offset in range(254):
            candidate = (start + offset) % 254 + 1
            if candidate not in used:
                return candidate
        raise TestbedError("all 254 subnets 10.77.1-254.0/24 are in use by other testbeds; run "
                           "`prism-trt testbed down --all` to remove stale ones")

    def _tbf_args(self) -> list[str]:
        params = tbf_parameters(self.rate_bit_s)
        return ["tbf", "rate", f"{self.rate_bit_s}bit", "burst", str(params["burst"]), "limit", str(params["limit"])]

    def _shape(self, rank: int) -> None:
        """Rate limit both ends of the rank's veth; delay (netem) only on the rank's own egress."""
        hub, namespace = self.hub_netns, self.netns(rank)
        _run(["tc", "-n", hub, "qdisc", "replace", "dev", self.hub_iface(rank), "root", "handle", "1:",
              *self._tbf_args()])
        if self.delay_s is None:
            _run(["tc", "-n", namespace, "qdisc", "replace", "dev", self.iface(rank), "root", "handle", "1:",
                  *self._tbf_args()])
            return
        # netem on top and tbf as its child: packets are delayed, then leave at the rate (the layout the
        # netem documentation recommends). netem's own queue must hold a delay's worth of traffic at the rate.
        delay_us = max(1, round(self.delay_s * 1e6))
        netem_limit = max(1000, int(self.rate_bit_s / 8 * self.delay_s / 1000) * 4)
        _run(["tc", "-n", namespace, "qdisc", "replace", "dev", self.iface(rank), "root", "handle", "1:",
              "netem", "delay", f"{delay_us}us", "limit", str(netem_limit)])
        _run(["tc", "-n", namespace, "qdisc", "replace", "dev", self.iface(rank), "parent", "1:1", "handle", "10:",
              *self._tbf_args()])

    def set_bandwidth(self, rate: str | int | float) -> None:
        """Change the rate of every link in both directions while the testbed runs (tc qdisc replace)."""
        new_rate = parse_rate(rate)
        if not self._is_up:
            raise TestbedError("the testbed is not up; call up() before set_bandwidth()")
        previous = self.rate_bit_s
        self.rate_bit_s = new_rate
        try:
            for rank in range(self.ranks):
                self._shape(rank)
        except TestbedError:
            self.rate_bit_s = previous
            for rank in range(self.ranks):  # leave every link at one rate rather than a mix
                try:
                    self._shape(rank)
                except TestbedError as error:
                    log.warning("could not restore %s on rank %d: %s", format_rate(previous), rank, error)
            raise

    def down(self) -> list[str]:
        """Remove every namespace this testbed owns (veths and bridge go with them). Idempotent.

        Returns the namespaces actually deleted. Only namespaces this object created, or adopted from saved
        state with ``attach``, are touched, so a failed up() never deletes someone else's conflicting name.
        """
        deleted, errors = [], []
        for namespace in reversed(self._owned):
            try:
                if _delete_namespace(namespace):
                    deleted.append(namespace)
            except TestbedError as error:
                errors.append(str(error))
        self._owned = []
        self._is_up = False
        if errors:
            raise TestbedError("could not remove every testbed namespace: " + "; ".join(errors))
        return deleted

    # ---- inspection

    def qdiscs(self) -> dict[str, list[dict[str, Any]]]:
        """tc's JSON view of the qdiscs on every testbed link, keyed by 'namespace/interface'."""
        views = {}
        for rank in range(self.ranks):
            for namespace, iface in ((self.netns(rank), self.iface(rank)), (self.hub_netns, self.hub_iface(rank))):
                result = _run(["tc", "-n", namespace, "-j", "qdisc", "show", "dev", iface])
                views[f"{namespace}/{iface}"] = json.loads(result.stdout or "[]")
        return views

    def describe(self) -> dict[str, Any]:
        """Everything a report needs: ranks, rate, delay, netem availability, addresses, cpus, measured rates."""
        addresses = [self.address(rank) for rank in range(self.ranks)] if self.subnet_octet is not None else None
        return {
            "name": self.name,
            "up": self._is_up,
            "ranks": self.ranks,
            "rate": self.rate,
            "rate_bit_s": self.rate_bit_s,
            "tbf": tbf_parameters(self.rate_bit_s),
            "delay": self.delay,
            "delay_s": self.delay_s,
            "netem_available": netem_available(),
            "subnet": self.subnet,
            "hub_netns": self.hub_netns,
            "netns": [self.netns(rank) for rank in range(self.ranks)],
            "ifaces": [self.iface(rank) for rank in range(self.ranks)],
            "addresses": addresses,
            "master_addr": addresses[0] if addresses else None,
            "cpus_per_rank": self.cpus_per_rank,
            "cpus": [self.cpus(rank) for rank in range(self.ranks)],
            "cpu_note": self.cpu_note,
            "measured": dict(self.measured),
        }

    # ---- saved state (for the CLI: up in one process, down in another)

    def save(self, path: Path | None = None) -> Path:
        path = path or state_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"name": self.name, "ranks": self.ranks, "rate_bit_s": self.rate_bit_s, "delay": self.delay,
                 "cpus_per_rank": self.cpus_per_rank, "subnet_octet": self.subnet_octet,
                 "measured": self.measured, "created_by_pid": os.getpid(), "saved_at": time.time()}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        temporary.replace(path)
        return path

    @classmethod
    def attach(cls, name: str, path: Path | None = None) -> Testbed:
        """The testbed named ``name`` as saved by ``save`` (e.g. by `prism-trt testbed up`), owning its namespaces."""
        path = path or state_path(name)
        if not path.is_file():
            raise TestbedError(f"no saved testbed named {name!r} (expected {path}); create it with "
                               f"`prism-trt testbed up --name {name} ...` or list namespaces with `ip netns list`")
        try:
            state = json.loads(path.read_text())
            bed = cls(ranks=state["ranks"], bandwidth=f"{state['rate_bit_s']}bit", delay=state.get("delay"),
                      cpus_per_rank=state["cpus_per_rank"], name=state["name"])
        except (ValueError, KeyError, TypeError) as error:
            raise TestbedError(f"saved testbed state {path} is unreadable ({error}); remove the testbed with "
                               f"`prism-trt testbed down --name {name}`") from None
        bed.subnet_octet = state.get("subnet_octet")
        bed.measured = state.get("measured", {})
        existing = set(list_namespaces())
        bed._owned = [namespace for namespace in bed.namespaces() if namespace in existing]
        bed._is_up = len(bed._owned) == len(bed.namespaces())
        return bed

    # ---- measurement

    def measure_bandwidth(self, src_rank: int, dst_rank: int, megabytes: float | None = None,
                          timeout_s: float = 10.0) -> float:
        """Achieved TCP goodput in Mbit/s from src to dst: a bounded one-connection transfer, iperf-style.

        A receiver in dst's namespace and a sender in src's each stop after ``megabytes`` (default: about
        one second at the configured rate, 1 to 128 MB) or ``timeout_s``, whichever comes first; both are
        killed if still alive at the end. The first quarter of the bytes is not timed (bucket bursts, slow
        start). Goodput excludes TCP/IP headers, so expect about 95 % of the shaped rate. The result is also
        kept in ``measured['src->dst']``.
        """
        if megabytes is None:
            megabytes = min(128.0, max(1.0, self.rate_bit_s / 8e6))
        if src_rank == dst_rank:
            raise TestbedError(f"expected two different ranks, found src_rank = dst_rank = {src_rank}")
        if not 0 < megabytes <= 1024:
            raise TestbedError(f"expected 0 < megabytes <= 1024, found {megabytes}")
        if not 0 < timeout_s <= 300:
            raise TestbedError(f"expected 0 < timeout_s <= 300, found {timeout_s}")
        if not self._is_up:
            raise TestbedError("the testbed is not up; call up() before measure_bandwidth()")
        total = int(megabytes * 1e6)
        processes: list[subprocess.Popen] = []
        try:
            receiver = subprocess.Popen(
                ["ip", "netns", "exec", self.netns(dst_rank), sys.executable, "-I", "-c", _RECEIVER,
                 self.address(dst_rank), str(total), str(timeout_s)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            processes.append(receiver)
            port = _read_port(receiver, timeout=_COMMAND_TIMEOUT_S)
            sender = subprocess.Popen(
                ["ip", "netns", "exec", self.netns(src_rank), sys.executable, "-I", "-c", _SENDER,
                 self.address(dst_rank), str(port), str(total), str(timeout_s)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            processes.append(sender)
            grace = timeout_s + _COMMAND_TIMEOUT_S
            sender_out, sender_err = sender.communicate(timeout=grace)
            receiver_out, receiver_err = receiver.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            raise TestbedError(f"bandwidth measurement {src_rank}->{dst_rank} outlived its {timeout_s} s bound "
                               "plus grace; both ends were killed") from None
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if sender.returncode != 0 or receiver.returncode != 0:
            raise TestbedError(f"bandwidth measurement {src_rank}->{dst_rank} failed: sender exit "
                               f"{sender.returncode} ({sender_err.strip()}), receiver exit {receiver.returncode} "
                               f"({receiver_err.strip()})")
        report = json.loads(receiver_out.strip().splitlines()[-1])
        if report["bytes"] < 64 * 1024 or report["timed_seconds"] <= 0:
            raise TestbedError(f"bandwidth measurement {src_rank}->{dst_rank} moved only {report['bytes']} bytes "
                               f"in {report['seconds']:.3f} s; the link may be down (sender said: {sender_out})")
        mbit_s = report["timed_bytes"] * 8 / report["timed_seconds"] / 1e6
        self.measured[f"{src_rank}->{dst_rank}"] = {
            "mbit_s": round(mbit_s, 3), "configured_mbit_s": self.rate_bit_s / 1e6, "bytes": report["bytes"],
            "seconds": round(report["seconds"], 4), "complete": report["bytes"] >= total}
        return mbit_s


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
