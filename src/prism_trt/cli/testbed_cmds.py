"""`prism-trt testbed ...`: build, reshape, inspect and remove a shaped multi-namespace network on one host.

``prism_trt.cli`` registers it with ``main.add_command(testbed)``. State lives in a small JSON file per
testbed (see ``prism_trt.profiler.testbed.state_dir``) so that `up`, `set-bandwidth`, `status` and `down`
can run as separate commands.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import click

from ..profiler.testbed import (
    TESTBED_PREFIX,
    Testbed,
    TestbedError,
    cleanup_stale,
    list_namespaces,
    netem_available,
    root_available,
    state_dir,
    state_path,
)
from .common import PrismGroup

DEFAULT_NAME = "default"


def _prism_trt_executable() -> str:
    """The prism-trt next to this Python (a virtualenv's bin/) so the printed commands work under `ip netns exec`."""
    candidate = Path(sys.executable).parent / "prism-trt"
    return str(candidate) if candidate.exists() else "prism-trt"


def _summary(bed: Testbed) -> str:
    info = bed.describe()
    lines = [f"testbed {bed.name!r}: {bed.ranks} ranks, {info['rate']} per link in both directions"
             + (f", one-way delay {info['delay']}" if info["delay"] else "")
             + f" (tbf burst {info['tbf']['burst']} B, queue {info['tbf']['limit']} B)",
             f"  subnet {info['subnet']}, bridge {bed.bridge} in namespace {bed.hub_netns}; "
             f"netem {'available' if info['netem_available'] else 'NOT available in this kernel (no --delay)'}"]
    for rank in range(bed.ranks):
        lines.append(f"  rank {rank}: netns {bed.netns(rank):<24} iface {bed.iface(rank):<15} "
                     f"addr {bed.address(rank):<14} cpus {','.join(map(str, bed.cpus(rank)))}")
    if info["cpu_note"]:
        lines.append(f"  note: {info['cpu_note']}")
    for pair, result in sorted(info["measured"].items()):
        lines.append(f"  measured {pair}: {result['mbit_s']:.1f} Mbit/s TCP goodput "
                     f"(configured {result['configured_mbit_s']:g} Mbit/s, {result['bytes']} B in "
                     f"{result['seconds']:.2f} s{'' if result['complete'] else ', cut short by the time bound'})")
    return "\n".join(lines)


def _how_to_run(bed: Testbed) -> str:
    executable = _prism_trt_executable()
    lines = ["Run one process per rank inside the testbed (highest rank first, rank 0 last; each in its own shell or "
             "with &), every one with the same cluster secret, since the ranks talk over the testbed's network:",
             "  export PRISM_TRT_CLUSTER_TOKEN=SECRET   # one secret for all shells, e.g. from "
             "python3 -c 'import secrets; print(secrets.token_hex(16))'"]
    for rank in reversed(range(bed.ranks)):
        argv = [executable, "run", "--engines", "DIR", "--rank", str(rank), "--world-size", str(bed.ranks),
                "--master-addr", bed.address(0), "--iface", bed.iface(rank)]
        lines.append("  " + shlex.join(bed.command(rank, argv)))
    lines.append(f"Or: prism-trt testbed exec --name {bed.name} --rank R -- COMMAND... "
                 "(namespace, cores, thread and GLOO variables set for you)")
    return "\n".join(lines)


def _attach(name: str) -> Testbed:
    try:
        return Testbed.attach(name)
    except TestbedError as error:
        raise click.ClickException(str(error)) from None


@click.group(cls=PrismGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def testbed() -> None:
    """Emulate P networked boards on this host: one network namespace per rank, shaped links, pinned cores.

    Each rank gets a namespace with a veth to a bridge in a hub namespace, an address 10.77.X.(rank+1)/24,
    its own cores, and tbf rate limiting on both ends of its link. Nothing is added to the root namespace;
    `down` removes it all. Needs root, ip and tc (iproute2) and taskset.

    \b
      prism-trt testbed up --ranks 2 --bandwidth 200mbit --measure
      prism-trt testbed set-bandwidth --name default 50mbit
      prism-trt testbed status
      prism-trt testbed down --name default
    """


@testbed.command()
@click.option("--ranks", "-P", type=click.IntRange(1, 253), required=True, help="Number of boards (namespaces).")
@click.option("--bandwidth", default="900mbit", show_default=True,
              help="Rate of every link, each direction: 900mbit, 1gbit, 500kbit, or a number of Mbit/s.")
@click.option("--delay", default=None,
              help="One-way delay between ranks (2ms, 500us); needs the netem qdisc in the kernel.")
@click.option("--cpus-per-rank", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cores pinned per rank (rank r gets cores r*N.. wrapping); also sets OMP_NUM_THREADS etc.")
@click.option("--name", default=DEFAULT_NAME, show_default=True,
              help="Testbed name, 1-10 lowercase letters/digits; namespaces are prism-tb-NAME-*.")
@click.option("--measure", is_flag=True, help="Measure TCP goodput rank 0 -> rank 1 and back after building it.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON instead of the summary.")
def up(ranks, bandwidth, delay, cpus_per_rank, name, measure, as_json):
    """Build a testbed and print how to run ranks in it. On any failure, everything it built is removed."""
    try:
        bed = Testbed(ranks, bandwidth=bandwidth, delay=delay, cpus_per_rank=cpus_per_rank, name=name)
    except TestbedError as error:
        raise click.UsageError(str(error)) from None
    if state_path(name).exists():
        raise click.ClickException(f"a testbed named {name!r} is already recorded in {state_path(name)}; "
                                   f"remove it with `prism-trt testbed down --name {name}` or pick another --name")
    try:
        bed.up()
        if measure and ranks >= 2:
            bed.measure_bandwidth(0, 1, timeout_s=10)
            bed.measure_bandwidth(1, 0, timeout_s=10)
        path = bed.save()
    except BaseException as error:
        try:
            bed.down()
        except TestbedError as cleanup_error:
            click.echo(f"warning: cleanup after the failure was incomplete: {cleanup_error}", err=True)
        state_path(name).unlink(missing_ok=True)
        if isinstance(error, TestbedError):
            raise click.ClickException(str(error)) from None
        raise
    if as_json:
        click.echo(json.dumps(bed.describe(), indent=2))
        return
    click.echo(_summary(bed))
    if measure and ranks < 2:
        click.echo("  (--measure needs at least 2 ranks; nothing measured)")
    click.echo(f"State saved to {path}.")
    click.echo(_how_to_run(bed))
    click.echo(f"Remove it with: prism-trt testbed down --name {name}")


@testbed.command("set-bandwidth")
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="Which testbed.")
@click.argument("rate")
def set_bandwidth(name, rate):
    """Change every link's rate (both directions) of a running testbed, e.g. `set-bandwidth 200mbit`.

    If tc fails midway, the previous rate is put back on every link.
    """
    bed = _attach(name)
    try:
        bed.set_bandwidth(rate)
        bed.save()
    except TestbedError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"testbed {name!r}: every link now {bed.rate} in both directions")


@testbed.command()
@click.option("--name", default=None, help="One testbed; without it, every recorded testbed and stray namespaces.")
@click.option("--measure", is_flag=True, help="Also measure TCP goodput rank 0 -> rank 1 now.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(name, measure, as_json):
    """Show a testbed (addresses, cores, rates, qdiscs present) or list them all."""
    names = [name] if name else sorted(path.stem.removeprefix("testbed-")
                                       for path in state_dir().glob("testbed-*.json"))
    descriptions = []
    for each in names:
        bed = _attach(each)
        if measure and bed.is_up and bed.ranks >= 2:
            try:
                bed.measure_bandwidth(0, 1, timeout_s=10)
                bed.save()
            except TestbedError as error:
                raise click.ClickException(str(error)) from None
        descriptions.append(bed)
    known = {namespace for bed in descriptions for namespace in bed.namespaces()}
    stray = [namespace for namespace in list_namespaces() if namespace.startswith(TESTBED_PREFIX)
             and namespace not in known] if not name else []
    if as_json:
        click.echo(json.dumps({"testbeds": [bed.describe() for bed in descriptions], "stray_namespaces": stray,
                               "netem_available": netem_available(), "root": root_available()[1]}, indent=2))
        return
    if not descriptions:
        click.echo("no recorded testbeds")
    for bed in descriptions:
        if not bed.is_up:
            click.echo(f"testbed {bed.name!r}: DOWN or partial (namespaces present: {bed.owned_namespaces or 'none'}); "
                       f"remove with `prism-trt testbed down --name {bed.name}`")
            continue
        click.echo(_summary(bed))
        try:
            shaped = sum(1 for qdiscs in bed.qdiscs().values()
                         if any(qdisc.get("kind") == "tbf" for qdisc in qdiscs))
            click.echo(f"  tbf present on {shaped} of {2 * bed.ranks} link ends")
        except TestbedError as error:
            click.echo(f"  could not read qdiscs: {error}")
    if stray:
        click.echo(f"stray testbed namespaces without state: {', '.join(stray)} "
                   "(remove with `prism-trt testbed down --all`)")


@testbed.command()
@click.option("--name", default=None, help="The testbed to remove (default: 'default').")
@click.option("--all", "remove_all", is_flag=True,
              help=f"Remove every namespace named {TESTBED_PREFIX}* and all testbed state files, live or stale.")
def down(name, remove_all):
    """Remove a testbed (its namespaces take the veths and bridge with them). Safe to repeat."""
    if name and remove_all:
        raise click.UsageError("give --name NAME or --all, not both")
    try:
        if remove_all:
            deleted = cleanup_stale(TESTBED_PREFIX)
        else:
            name = name or DEFAULT_NAME
            if state_path(name).exists():
                deleted = _attach(name).down()
            else:
                deleted = []
            # Namespaces of a half-built or unrecorded testbed with this name go too.
            deleted += cleanup_stale(f"{TESTBED_PREFIX}{name}-")
            state_path(name).unlink(missing_ok=True)
    except TestbedError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"removed {len(deleted)} namespaces" + (f": {', '.join(deleted)}" if deleted else " (nothing left)"))


@testbed.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="Which testbed.")
@click.option("--rank", type=click.IntRange(min=0), required=True, help="Run inside this rank's namespace.")
@click.option("--group-env", is_flag=True,
              help="Also set RANK, WORLD_SIZE, MASTER_ADDR (rank 0's address) and MASTER_PORT=29500 as torchrun does.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name, rank, group_env, argv):
    """Run a command as rank R: in its namespace, pinned to its cores, with thread and GLOO variables set.

    \b
      prism-trt testbed exec --rank 1 --group-env -- prism-trt run --engines engines/ &
      prism-trt testbed exec --rank 0 --group-env -- prism-trt run --engines engines/ --mode prism --cr 9.9
    """
    bed = _attach(name)
    try:
        command = bed.command(rank, list(argv), env=bed.group_env(rank) if group_env else None)
    except TestbedError as error:
        raise click.UsageError(str(error)) from None
    sys.exit(subprocess.call(command))
