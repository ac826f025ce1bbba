"""The network testbed with real namespaces, veths, bridges and tc (no mocks); skipped without root or ip/tc.

Every testbed here has a name unique to this test process, and a fixture removes its namespaces whatever
happens, so parallel runs and failures leave nothing behind. Transfers are a few MB at 20-50 Mbit/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from prism_trt.cli.testbed_cmds import testbed as bed_cli
from prism_trt.profiler.testbed import (
    TESTBED_PREFIX,
    Testbed,
    TestbedError,
    cleanup_stale,
    format_rate,
    list_namespaces,
    netem_available,
    parse_delay,
    parse_rate,
    root_available,
    tbf_parameters,
)
from prism_trt.profiler.testbed import (
    testbed_support as probe_testbed,  # aliased: pytest collects any module-level name starting with "test"
)


def namespaces_of(name: str) -> list[str]:
    return [namespace for namespace in list_namespaces() if namespace.startswith(f"{TESTBED_PREFIX}{name}-")]


def tbf_rates(bed: Testbed) -> dict[str, int]:
    """bit/s of the tbf on every link end, keyed 'namespace/iface'."""
    rates = {}
    for where, qdiscs in bed.qdiscs().items():
        tbf = [qdisc for qdisc in qdiscs if qdisc["kind"] == "tbf"]
        rates[where] = tbf[0]["options"]["rate"] * 8 if tbf else None
    return rates


# ---------------------------------------------------------------- no root needed


def test_parse_rate_accepts_tc_units_and_plain_megabits():
    assert parse_rate("900mbit") == 900_000_000
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("1.5GBit") == 1_500_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate("200") == 200_000_000
    assert parse_rate(50) == 50_000_000
    assert format_rate(parse_rate("900mbit")) == "900mbit"
    assert format_rate(1_500_000_000) == "1500mbit"


@pytest.mark.parametrize("bad", ["fast", "100mbps", "10MB", "", "-5mbit", "1kbit", "1000gbit", True])
def test_parse_rate_rejects_ambiguous_or_out_of_range(bad):
    with pytest.raises(TestbedError, match="expected a rate"):
        parse_rate(bad)


def test_parse_delay():
    assert parse_delay("2ms") == pytest.approx(0.002)
    assert parse_delay("500us") == pytest.approx(0.0005)
    assert parse_delay(3) == pytest.approx(0.003)
    with pytest.raises(TestbedError, match="expected a delay"):
        parse_delay("soon")


def test_tbf_parameters_scale_with_rate_and_hold_full_frames():
    slow, fast = tbf_parameters(500_000), tbf_parameters(900_000_000)
    assert slow["burst"] >= 2 * 1514 and slow["limit"] > slow["burst"]
    assert fast["burst"] == int(900e6 / 8 * 0.005) and fast["limit"] > fast["burst"]


def test_construction_validates_without_touching_the_system():
    with pytest.raises(TestbedError, match="1 to 253 ranks"):
        Testbed(0)
    with pytest.raises(TestbedError, match="testbed name"):
        Testbed(2, name="much-too-long-name")
    with pytest.raises(TestbedError, match="expected a rate"):
        Testbed(2, bandwidth="100mbps")
    bed = Testbed(4, cpus_per_rank=1, name="nocores")
    cores = sorted(os.sched_getaffinity(0))
    assert bed.cpus(0) == [cores[0]]
    assert all(cpu in cores for rank in range(4) for cpu in bed.cpus(rank))
    assert (bed.cpu_note is not None) == (len(cores) < 4)
    with pytest.raises(TestbedError, match="call up"):
        bed.address(0)


def test_helpers_report_plainly():
    ok, reason = root_available()
    assert isinstance(ok, bool) and reason
    supported, why = probe_testbed()
    assert isinstance(supported, bool) and why and (ok or not supported)
    assert isinstance(netem_available(), bool) and (supported or not netem_available())


def test_missing_tools_are_detected_not_crashed_on(monkeypatch):
    # As on a machine (or container) without iproute2: the probe says so instead of raising.
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        ok, reason = root_available()
        assert not ok and "missing tools: ip, tc, taskset" in reason
        supported, why = probe_testbed(refresh=True)
        assert not supported and "missing tools" in why
        assert netem_available() is False
    finally:
        monkeypatch.undo()
        probe_testbed(refresh=True)  # the real answer again for the tests that follow


def test_cleanup_stale_refuses_foreign_prefixes():
    with pytest.raises(TestbedError, match="only testbed namespaces"):
        cleanup_stale("")
    with pytest.raises(TestbedError, match="only testbed namespaces"):
        cleanup_stale("netns-of-someone-else")


# ---------------------------------------------------------------- real namespaces


@pytest.mark.timeout(30)
def test_up_builds_isolated_topology_and_down_removes_everything(testbed_name):
    bed = Testbed(2, bandwidth="200mbit", name=testbed_name)
    bed.up()
    try:
        assert sorted(namespaces_of(testbed_name)) == sorted(bed.namespaces())
        hub_links = subprocess.run(["ip", "-n", bed.hub_netns, "-j", "link", "show"], capture_output=True,
                                   text=True, check=True)
        names = {link["ifname"]: link for link in json.loads(hub_links.stdout)}
        assert {bed.bridge, bed.hub_iface(0), bed.hub_iface(1)} <= set(names)
        assert all(names[bed.hub_iface(rank)].get("master") == bed.bridge for rank in range(2))
        for rank in range(2):
            rank_links = subprocess.run(["ip", "-n", bed.netns(rank), "-j", "addr", "show"], capture_output=True,
                                        text=True, check=True)
            links = {link["ifname"]: link for link in json.loads(rank_links.stdout)}
            assert set(links) == {"lo", bed.iface(rank)}  # nothing from the root namespace is visible
            assert links["lo"]["operstate"] == "UNKNOWN" and "UP" in links["lo"]["flags"]
            addresses = [info["local"] for info in links[bed.iface(rank)]["addr_info"] if info["family"] == "inet"]
            assert addresses == [bed.address(rank)]
            assert bed.address(rank).endswith(f".{rank + 1}")
    finally:
        deleted = bed.down()
    assert sorted(deleted) == sorted(bed.namespaces())
    assert namespaces_of(testbed_name) == []
    gone = subprocess.run(["ip", "-n", bed.hub_netns, "link"], capture_output=True, text=True)
    assert gone.returncode != 0
    assert bed.down() == []  # idempotent


@pytest.mark.timeout(30)
def test_tbf_shapes_both_ends_of_every_link(testbed_name):
    with Testbed(2, bandwidth="200mbit", name=testbed_name) as bed:
        rates = tbf_rates(bed)
        assert len(rates) == 4  # rank side and hub side, for each rank
        assert set(rates.values()) == {200_000_000}, rates
        bed.set_bandwidth("1gbit")
        assert set(tbf_rates(bed).values()) == {10**9}


@pytest.mark.timeout(40)
def test_measured_bandwidth_follows_the_shaping(testbed_name):
    with Testbed(2, bandwidth="50mbit", name=testbed_name) as bed:
        first = bed.measure_bandwidth(0, 1, megabytes=3, timeout_s=10)
        assert 0.5 * 50 <= first <= 1.2 * 50, f"measured {first:.1f} Mbit/s on a 50mbit link"
        backwards = bed.measure_bandwidth(1, 0, megabytes=3, timeout_s=10)
        assert 0.5 * 50 <= backwards <= 1.2 * 50, f"measured {backwards:.1f} Mbit/s on a 50mbit link (1->0)"

        bed.set_bandwidth("20mbit")
        assert set(tbf_rates(bed).values()) == {20_000_000}
        second = bed.measure_bandwidth(0, 1, megabytes=2, timeout_s=10)
        assert 0.5 * 20 <= second <= 1.2 * 20, f"measured {second:.1f} Mbit/s on a 20mbit link"
        assert second < 0.7 * first

        description = bed.describe()
        assert description["measured"]["0->1"]["mbit_s"] == pytest.approx(second, rel=1e-3)
        assert description["measured"]["0->1"]["configured_mbit_s"] == 20
        assert description["measured"]["1->0"]["configured_mbit_s"] == 50
        assert description["rate"] == "20mbit" and description["ranks"] == 2
        assert description["addresses"] == [bed.address(0), bed.address(1)]
        assert isinstance(description["netem_available"], bool)
        print(f"\nmeasured 50mbit: 0->1 {first:.1f}, 1->0 {backwards:.1f}; 20mbit: 0->1 {second:.1f} Mbit/s")


@pytest.mark.timeout(30)
def test_command_runs_inside_the_rank_namespace_pinned_with_its_environment(testbed_name):
    with Testbed(2, bandwidth="100mbit", name=testbed_name) as bed:
        for rank in range(2):
            shown = subprocess.run(bed.command(rank, ["ip", "addr"]), capture_output=True, text=True, timeout=10)
            assert shown.returncode == 0, shown.stderr
            assert f"{bed.address(rank)}/24" in shown.stdout
            other = bed.address(1 - rank)
            assert f"{other}/24" not in shown.stdout
        probe = ("import json, os; print(json.dumps({'env': dict(os.environ), "
                 "'cpus': sorted(os.sched_getaffinity(0))}))")
        result = subprocess.run(bed.command(1, [sys.executable, "-c", probe], env={"EXTRA": "yes"}),
                                capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["cpus"] == bed.cpus(1)
        assert seen["env"]["GLOO_SOCKET_IFNAME"] == bed.iface(1)
        assert seen["env"]["OMP_NUM_THREADS"] == "1"
        assert seen["env"]["EXTRA"] == "yes"
        assert bed.group_env(1)["MASTER_ADDR"] == bed.address(0)


_ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 0))
server.settimeout(10)
print(server.getsockname()[1], flush=True)
connection, peer = server.accept()
connection.settimeout(10)
connection.sendall(connection.recv(100).upper() + b" from " + peer[0].encode())
connection.close()
"""

_ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as connection:
    connection.sendall(b"hello")
    print(connection.recv(100).decode())
"""


@pytest.mark.timeout(30)
def test_tcp_connection_between_two_rank_namespaces(testbed_name):
    with Testbed(3, bandwidth="100mbit", name=testbed_name) as bed:
        server = subprocess.Popen(bed.command(2, [sys.executable, "-c", _ECHO_SERVER, bed.address(2)]),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            client = subprocess.run(bed.command(0, [sys.executable, "-c", _ECHO_CLIENT, bed.address(2), port]),
                                    capture_output=True, text=True, timeout=15)
            assert client.returncode == 0, client.stderr
            assert client.stdout.strip() == f"HELLO from {bed.address(0)}"
            assert server.wait(timeout=10) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


@pytest.mark.timeout(30)
def test_failed_up_with_a_conflicting_name_removes_only_what_it_made(testbed_name):
    conflicting = f"{TESTBED_PREFIX}{testbed_name}-r1"
    subprocess.run(["ip", "netns", "add", conflicting], check=True, capture_output=True)
    try:
        bed = Testbed(3, bandwidth="100mbit", name=testbed_name)
        with pytest.raises(TestbedError, match="already exists"):
            bed.up()
        assert namespaces_of(testbed_name) == [conflicting]  # hub and r0 were removed, the foreign r1 kept
        assert not bed.is_up
    finally:  # the test's own namespace goes even when an assertion fails
        subprocess.run(["ip", "netns", "delete", conflicting], check=True, capture_output=True)


class _FailsWhileShaping(Testbed):
    """Fails on the last rank's shaping, after namespaces, veths, bridge and earlier qdiscs exist."""

    def _shape(self, rank: int) -> None:
        if rank == self.ranks - 1:
            raise TestbedError("provoked failure in the middle of up()")
        super()._shape(rank)


@pytest.mark.timeout(30)
def test_failure_in_the_middle_of_up_leaves_nothing(testbed_name):
    bed = _FailsWhileShaping(3, bandwidth="100mbit", name=testbed_name)
    with pytest.raises(TestbedError, match="provoked"):
        bed.up()
    assert namespaces_of(testbed_name) == []
    assert bed.down() == []


@pytest.mark.timeout(30)
def test_context_manager_cleans_up_on_exception(testbed_name):
    with pytest.raises(ZeroDivisionError):
        with Testbed(2, bandwidth="100mbit", name=testbed_name) as bed:
            assert sorted(namespaces_of(testbed_name)) == sorted(bed.namespaces())
            1 / 0  # noqa: B018
    assert namespaces_of(testbed_name) == []


@pytest.mark.timeout(30)
def test_delay_uses_netem_or_says_it_is_missing(testbed_name):
    bed = Testbed(2, bandwidth="100mbit", delay="2ms", name=testbed_name)
    if not netem_available():
        with pytest.raises(TestbedError, match="netem qdisc.*lacks it"):
            bed.up()
        assert namespaces_of(testbed_name) == []
        return
    with bed:
        rank_side = bed.qdiscs()[f"{bed.netns(0)}/{bed.iface(0)}"]
        assert {qdisc["kind"] for qdisc in rank_side} == {"netem", "tbf"}
        bed.set_bandwidth("50mbit")
        assert set(tbf_rates(bed).values()) == {50_000_000}


@pytest.mark.timeout(30)
def test_cleanup_stale_removes_a_forgotten_testbed(testbed_name):
    leftover = Testbed(2, bandwidth="100mbit", name=testbed_name).up()  # never brought down
    assert sorted(namespaces_of(testbed_name)) == sorted(leftover.namespaces())
    deleted = cleanup_stale(f"{TESTBED_PREFIX}{testbed_name}-")
    assert sorted(deleted) == sorted(leftover.namespaces())
    assert namespaces_of(testbed_name) == []


@pytest.mark.timeout(40)
def test_cli_up_status_set_bandwidth_down(testbed_name, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_TRT_TESTBED_DIR", str(tmp_path))
    runner = CliRunner()
    created = runner.invoke(bed_cli, ["up", "--ranks", "2", "--bandwidth", "100mbit", "--name", testbed_name])
    assert created.exit_code == 0, created.output
    assert "ip netns exec" in created.output and "--master-addr 10.77." in created.output
    assert (tmp_path / f"testbed-{testbed_name}.json").is_file()

    again = runner.invoke(bed_cli, ["up", "--ranks", "2", "--name", testbed_name])
    assert again.exit_code != 0 and "already" in again.output
    assert len(namespaces_of(testbed_name)) == 3  # the failed second `up` did not touch the first

    changed = runner.invoke(bed_cli, ["set-bandwidth", "--name", testbed_name, "30mbit"])
    assert changed.exit_code == 0, changed.output
    shown = runner.invoke(bed_cli, ["status", "--name", testbed_name, "--json"])
    assert shown.exit_code == 0, shown.output
    description = json.loads(shown.output)["testbeds"][0]
    assert description["rate"] == "30mbit" and description["up"]
    assert set(tbf_rates(Testbed.attach(testbed_name)).values()) == {30_000_000}

    removed = runner.invoke(bed_cli, ["down", "--name", testbed_name])
    assert removed.exit_code == 0, removed.output
    assert namespaces_of(testbed_name) == []
    assert not (tmp_path / f"testbed-{testbed_name}.json").exists()
    assert runner.invoke(bed_cli, ["down", "--name", testbed_name]).exit_code == 0  # repeatable


@pytest.mark.timeout(30)
def test_cli_up_failure_cleans_up(testbed_name, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_TRT_TESTBED_DIR", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(bed_cli, ["up", "--ranks", "2", "--bandwidth", "lots", "--name", testbed_name])
    assert result.exit_code != 0 and "expected a rate" in result.output
    if not netem_available():
        result = runner.invoke(bed_cli, ["up", "--ranks", "2", "--delay", "2ms", "--name", testbed_name])
        assert result.exit_code != 0 and "netem" in result.output
    assert namespaces_of(testbed_name) == []
    assert list(tmp_path.iterdir()) == []
