"""The GLOO process group: torchrun-compatible (env://) or explicit flags, enforced timeouts."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import PrismError, UsageError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ClusterError(PrismError, RuntimeError):
    """Ranks that cannot form or keep a group: unreachable rank 0, mismatched engines, lost peers."""


@dataclass(frozen=True)
class GroupConfig:
    """rank / world_size / master address and port as torchrun sets them; timeout for every
    collective (a dead or stuck peer surfaces as an error after this long); iface becomes
    GLOO_SOCKET_IFNAME (the interface GLOO binds, e.g. the board's wlan0 or a testbed veth)."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = 30.0
    iface: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if not 0 < self.master_port < 65536:
            raise UsageError(f"master port {self.master_port} is not a TCP port")
        if self.timeout_s <= 0:
            raise UsageError(f"timeout must be > 0 s, got {self.timeout_s}")

    @classmethod
    def from_env_or_flags(cls, rank: int | None = None, world_size: int | None = None, master_addr: str | None = None,
                          master_port: int | None = None, timeout_s: float = 30.0, iface: str | None = None
                          ) -> GroupConfig:
        """Flags win; missing ones come from torchrun's environment variables."""
        env = os.environ

        def pick(flag, key, cast, default=None):
            if flag is not None:
                return flag
            if key in env:
                try:
                    return cast(env[key])
                except ValueError:
                    raise UsageError(f"environment variable {key}={env[key]!r} is not a valid value") from None
            if default is None:
                raise UsageError(f"give --{key.lower().replace('_', '-')} or set {key} (as torchrun does)")
            return default

        return cls(rank=pick(rank, "RANK", int), world_size=pick(world_size, "WORLD_SIZE", int),
                   master_addr=pick(master_addr, "MASTER_ADDR", str, "127.0.0.1"),
                   master_port=pick(master_port, "MASTER_PORT", int, 29500), timeout_s=timeout_s,
                   iface=iface or env.get("GLOO_SOCKET_IFNAME"))


def init_group(config: GroupConfig) -> None:
    """Join the GLOO group (blocks until every rank has joined or the timeout passes)."""
    if config.iface:
        os.environ["GLOO_SOCKET_IFNAME"] = config.iface
    if dist.is_initialized():
        raise ClusterError("a process group is already initialised in this process")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{config.master_addr}:{config.master_port}",
                                rank=config.rank, world_size=config.world_size,
                                timeout=datetime.timedelta(seconds=config.timeout_s))
    except (RuntimeError, ValueError, OSError) as error:
        raise ClusterError(f"rank {config.rank}/{config.world_size} could not join the GLOO group at "
                           f"{config.master_addr}:{config.master_port} within {config.timeout_s:g} s: {error}") from error


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (for tests and local multi-rank runs)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
