"""A shaped multi-namespace network on one Linux host to run ranks in ("boards"); needs root, ip, tc, taskset.

This package's public API is what it exports here. Its modules:

- ``namespaces``: ip/tc commands, capability and tool probes (:func:`testbed_support`), listing and deleting
  namespaces, subnets in use, state files, :func:`cleanup_stale`
- ``shaping``: rate and delay parsing, tbf sizing, the tc qdiscs on a rank's link
- ``bandwidth``: a bounded, iperf-like TCP goodput measurement between two namespaces
- ``testbed``: the :class:`Testbed` itself (topology, lifecycle, rank commands, saved state)
- ``faults``: link faults against a served cluster: links down, flaps, a bounded load, the figures of a fault
"""

from .faults import FaultReport, LoadRun, ServedCluster, fault_report, flap, set_link
from .namespaces import (
    MAX_RANKS,
    SUBNET_BASE,
    TESTBED_PREFIX,
    TestbedError,
    cleanup_stale,
    list_namespaces,
    netem_available,
    root_available,
    state_dir,
    state_path,
    testbed_support,
)
from .shaping import format_rate, parse_delay, parse_rate, tbf_parameters
from .testbed import THREAD_ENV_VARS, Testbed

__all__ = [
    "FaultReport",
    "LoadRun",
    "ServedCluster",
    "fault_report",
    "flap",
    "set_link",
    "MAX_RANKS",
    "SUBNET_BASE",
    "TESTBED_PREFIX",
    "THREAD_ENV_VARS",
    "Testbed",
    "TestbedError",
    "cleanup_stale",
    "format_rate",
    "list_namespaces",
    "netem_available",
    "parse_delay",
    "parse_rate",
    "root_available",
    "state_dir",
    "state_path",
    "tbf_parameters",
    "testbed_support",
]
