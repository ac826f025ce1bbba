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
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bandwidth import measure_goodput
from .namespaces import (
    MAX_RANKS,
    SUBNET_BASE,
    TESTBED_PREFIX,
    TestbedError,
    delete_namespace,
    list_namespaces,
    netem_available,
    next_instance,
    require_root,
    run_command,
    state_path,
    used_subnets,
)
from .shaping import format_rate, parse_delay, parse_rate, shape_link, tbf_parameters

#: Variables that size a rank's thread pools; each gets the rank's core count.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS")
# Interface names are at most 15 bytes: NAME (<= 10) + "-r" + rank (<= 3 digits). "probe" is reserved for the
# scratch namespaces of testbed_support.
_NAME_PATTERN = re.compile(r"^[a-z0-9]{1,10}$")
_RESERVED_NAMES = {"probe"}

log = logging.getLogger(__name__)


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
            name = f"{os.getpid():x}n{next_instance()}"
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
        require_root()
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
        result = run_command(["ip", "netns", "add", namespace], check=False)
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
        run_command(["ip", "-n", hub, "link", "add", self.bridge, "type", "bridge", "stp_state", "0"])
        run_command(["ip", "-n", hub, "link", "set", "dev", self.bridge, "up"])
        run_command(["ip", "-n", hub, "link", "set", "dev", "lo", "up"])
        for rank in range(self.ranks):
            namespace, iface, hub_iface = self.netns(rank), self.iface(rank), self.hub_iface(rank)
            # Created directly across namespaces so no interface ever appears in the root namespace.
            run_command(["ip", "-n", hub, "link", "add", hub_iface, "type", "veth", "peer", "name", iface,
                         "netns", namespace])
            run_command(["ip", "-n", hub, "link", "set", "dev", hub_iface, "master", self.bridge, "up"])
            run_command(["ip", "-n", namespace, "link", "set", "dev", "lo", "up"])
            run_command(["ip", "-n", namespace, "addr", "add", f"{self.address(rank)}/24", "dev", iface])
            run_command(["ip", "-n", namespace, "link", "set", "dev", iface, "up"])
            self._shape(rank)

    def _pick_subnet(self) -> int:
        """A third octet no other live testbed uses; a stable start per name keeps addresses predictable."""
        used = used_subnets(self.name)
        start = int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % 254
        for offset in range(254):
            candidate = (start + offset) % 254 + 1
            if candidate not in used:
                return candidate
        raise TestbedError("all 254 subnets 10.77.1-254.0/24 are in use by other testbeds; run "
                           "`prism-trt testbed down --all` to remove stale ones")

    def _shape(self, rank: int) -> None:
        """Rate limit both ends of the rank's veth; delay (netem) only on the rank's own egress."""
        shape_link(self.hub_netns, self.hub_iface(rank), self.netns(rank), self.iface(rank), self.rate_bit_s,
                   self.delay_s)

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
                if delete_namespace(namespace):
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
                result = run_command(["tc", "-n", namespace, "-j", "qdisc", "show", "dev", iface])
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
        report = measure_goodput(self.netns(src_rank), self.netns(dst_rank), self.address(dst_rank), total,
                                 timeout_s, label=f"{src_rank}->{dst_rank}")
        mbit_s = report["timed_bytes"] * 8 / report["timed_seconds"] / 1e6
        self.measured[f"{src_rank}->{dst_rank}"] = {
            "mbit_s": round(mbit_s, 3), "configured_mbit_s": self.rate_bit_s / 1e6, "bytes": report["bytes"],
            "seconds": round(report["seconds"], 4), "complete": report["bytes"] >= total}
        return mbit_s
