"""The intra-op threads a rank's engines get when ``--threads`` is not given.

Ranks that share one host split its cores: left to the backend's default, every rank starts one
thread per core, and two ranks on a 2-core host then fight over the cores (measured: rank 0's
compute nearly doubled at batch 2). The ranks on this host are known from the launch: torchrun
says so (``LOCAL_WORLD_SIZE``); a group whose rank 0 is on loopback runs every rank here; any
other group is taken as one rank per board. ``--threads`` overrides the rule.
"""

from __future__ import annotations

import os

from .group import GroupConfig, is_loopback

#: torchrun's count of the ranks it started on this host.
LOCAL_WORLD_SIZE_ENV = "LOCAL_WORLD_SIZE"


def ranks_on_this_host(group: GroupConfig) -> int:
    """How many of the group's ranks run on this host (see the module docstring)."""
    launched = os.environ.get(LOCAL_WORLD_SIZE_ENV, "")
    if launched.isascii() and launched.isdigit() and int(launched) >= 1:
        return min(int(launched), group.world_size)
    return group.world_size if group.world_size > 1 and is_loopback(group.master_addr) else 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a taskset or cpuset counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(group: GroupConfig) -> int | None:
    """Intra-op threads for one rank of ``group``: the usable cores split among the ranks on this
    host (at least one each), or None (the backend's default) for a rank alone on its host."""
    ranks = ranks_on_this_host(group)
    return None if ranks <= 1 else max(1, usable_cores() // ranks)
