"""Link shaping: rates and delays as people write them, tbf sizing, and the tc qdiscs on a rank's veth."""

from __future__ import annotations

import re

from .namespaces import TestbedError, run_command

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


def tbf_args(bits_per_s: int) -> list[str]:
    """The tc arguments of a tbf qdisc at this rate, sized by :func:`tbf_parameters`."""
    params = tbf_parameters(bits_per_s)
    return ["tbf", "rate", f"{bits_per_s}bit", "burst", str(params["burst"]), "limit", str(params["limit"])]


def shape_link(hub: str, hub_iface: str, namespace: str, iface: str, bits_per_s: int,
               delay_s: float | None) -> None:
    """Rate limit both ends of a rank's veth; delay (netem) only on the rank's own egress.

    ``hub``/``hub_iface`` is the bridge side of the veth, ``namespace``/``iface`` the rank side. Every qdisc is
    set with ``tc qdisc replace``, so the same call builds the shaping and changes it later.
    """
    run_command(["tc", "-n", hub, "qdisc", "replace", "dev", hub_iface, "root", "handle", "1:",
                 *tbf_args(bits_per_s)])
    if delay_s is None:
        run_command(["tc", "-n", namespace, "qdisc", "replace", "dev", iface, "root", "handle", "1:",
                     *tbf_args(bits_per_s)])
        return
    # netem on top and tbf as its child: packets are delayed, then leave at the rate (the layout the
    # netem documentation recommends). netem's own queue must hold a delay's worth of traffic at the rate.
    delay_us = max(1, round(delay_s * 1e6))
    netem_limit = max(1000, int(bits_per_s / 8 * delay_s / 1000) * 4)
    run_command(["tc", "-n", namespace, "qdisc", "replace", "dev", iface, "root", "handle", "1:",
                 "netem", "delay", f"{delay_us}us", "limit", str(netem_limit)])
    run_command(["tc", "-n", namespace, "qdisc", "replace", "dev", iface, "parent", "1:1", "handle", "10:",
                 *tbf_args(bits_per_s)])
