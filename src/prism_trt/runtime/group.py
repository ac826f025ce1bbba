"""The GLOO group's configuration: torchrun-compatible (env://) or explicit flags, enforced
timeouts, the cluster token, and which interface the group's sockets bind. Forming the group is
:mod:`.rendezvous`'s work."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from ..errors import PrismError, UsageError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TOKEN_ENV = "PRISM_TRT_CLUSTER_TOKEN"


class ClusterError(PrismError, RuntimeError):
    """Ranks that cannot form or keep a group: unreachable rank 0, mismatched engines, lost peers."""


@dataclass(frozen=True)
class GroupConfig:
    """rank / world_size / master address and port as torchrun sets them; timeout for every
    collective (a dead or stuck peer surfaces as an error after this long); iface becomes
    GLOO_SOCKET_IFNAME (the interface GLOO binds, e.g. the board's wlan0 or a testbed veth;
    default: the one that routes to rank 0); token: the shared secret a rank must know to join,
    required unless the rendezvous is on loopback (see :mod:`.rendezvous`)."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = 30.0
    iface: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if not 0 < self.master_port < 65536:
            raise UsageError(f"master port {self.master_port} is not a TCP port")
        if self.timeout_s <= 0:
            raise UsageError(f"timeout must be > 0 s, got {self.timeout_s}")
        if self.token is not None and not self.token.strip():
            raise UsageError(f"the cluster token is empty (--cluster-token or {TOKEN_ENV}); an empty token "
                             f"would let any process join; give a real secret or leave it unset on loopback")
        if self.world_size > 1 and self.token is None and not is_loopback(self.master_addr):
            raise UsageError(f"the group's rendezvous at {self.master_addr} is reachable from the network, so "
                             f"every rank needs the same secret: pass --cluster-token or set {TOKEN_ENV} "
                             f"(e.g. to the output of `python -c 'import secrets; print(secrets.token_hex(16))'`)")

    @classmethod
    def from_env_or_flags(cls, rank: int | None = None, world_size: int | None = None, master_addr: str | None = None,
                          master_port: int | None = None, timeout_s: float = 30.0, iface: str | None = None,
                          token: str | None = None) -> GroupConfig:
        """Flags win; missing ones come from torchrun's environment variables (and the token from
        PRISM_TRT_CLUSTER_TOKEN, where an empty value is an error, not "no token")."""
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
                   iface=iface or env.get("GLOO_SOCKET_IFNAME"),
                   token=token if token is not None else env.get(TOKEN_ENV))


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (unresolvable: no)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def gloo_interface(config: GroupConfig) -> str | None:
    """The interface GLOO should bind: the configured one, else the one holding the local address
    that routes to rank 0 (left to GLOO's default, the host name's address, when not found)."""
    if config.iface:
        return config.iface
    try:
        family, _, _, _, address = socket.getaddrinfo(config.master_addr, config.master_port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)  # UDP: picks the route and source address, sends nothing
            local = probe.getsockname()[0]
    except OSError:
        return None
    return _interface_holding(local)


def _interface_holding(address: str) -> str | None:
    """The interface whose IPv4 address is ``address`` (Linux ioctl; None for IPv6 or elsewhere)."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                info = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(info[20:24]) == address:
                return name
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (for tests and local multi-rank runs)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
