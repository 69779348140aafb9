"""DNS from the configuration applies to the owner alone, through the tunnel."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ALICE, BOB, CAROL, Lab

pytestmark = pytest.mark.root

SYSTEM_RESOLVER = "10.200.1.1"  # on the public side; the lab counts queries to it as leaks


def test_owner_queries_go_through_tunnel(lab: Lab) -> None:
    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    before = lab.bed.through_tunnel()

    assert lab.bed.probe(ALICE, "dns", SYSTEM_RESOLVER) == "ok"
    assert lab.bed.probe(ALICE, "dns", "127.0.0.53") == "ok"
    assert lab.bed.through_tunnel() >= before + 2
    assert lab.bed.leaked() == 0


def test_other_users_resolution_unchanged(lab: Lab) -> None:
    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))

    # Nothing listens on the public resolver address: bob's query gets there and is refused.
    assert lab.bed.probe(BOB, "dns", SYSTEM_RESOLVER) == "error: Connection refused"
    assert lab.bed.leaked() == 1


def test_owner_ipv6_queries_never_leave(lab: Lab) -> None:
    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))

    # The tunnel has no IPv6 resolver, so IPv6 queries are rejected rather than sent outside.
    assert lab.bed.probe(ALICE, "dns", "fd00:200:1::1").startswith("error")
    assert lab.bed.probe(ALICE, "dns", "::1").startswith("error")
    assert lab.bed.leaked() == 0


def test_owner_queries_blocked_by_kill_switch(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))

    subprocess.run(["ip", "-n", lab.bed.host, "link", "set", name, "down"], check=True)
    lab.wait_for_state(name, "down")

    assert lab.bed.probe(ALICE, "dns", SYSTEM_RESOLVER).startswith("error")
    assert lab.bed.leaked() == 0


def test_tunnel_without_dns_leaves_resolution_alone(lab: Lab) -> None:
    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client(), dns=None))

    assert lab.bed.probe(ALICE, "dns", SYSTEM_RESOLVER) == "error: Connection refused"


def test_oldest_dns_tunnel_wins(lab: Lab) -> None:
    first = lab.bed.client_config(lab.bed.add_client(), "10.99.0.0/25")
    second = lab.bed.client_config(lab.bed.add_client(), "10.99.0.128/25", dns="10.99.0.130")
    lab.up_ok(ALICE, first)
    lab.up_ok(ALICE, second)

    # Nothing answers at 10.99.0.130: the query must go to the first tunnel's resolver.
    assert lab.bed.probe(ALICE, "dns", SYSTEM_RESOLVER) == "ok"
    assert lab.bed.leaked() == 0


KEEP_QUERYING = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((sys.argv[1], 53))
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        sock.send(b"query")
    except OSError:
        pass
    time.sleep(0.05)
"""


def test_flow_older_than_tunnel_blocked(lab: Lab) -> None:
    # Carol's tunnel turns on connection tracking before alice's flow starts.
    lab.up_ok(CAROL, lab.bed.client_config(lab.bed.add_client()))
    script = lab.bed.directory / "keep_querying.py"
    script.write_text(KEEP_QUERYING)
    command = [*lab.bed.prefix_command(lab.bed.host, ALICE), sys.executable, str(script)]
    querying = subprocess.Popen([*command, SYSTEM_RESOLVER, "4"])
    time.sleep(0.5)

    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    after_up = lab.bed.leaked()
    querying.wait(timeout=20)

    assert after_up > 0  # the flow really ran outside the tunnel before
    assert lab.bed.leaked() == after_up
