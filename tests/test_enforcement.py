"""Owner-only traffic: the owner reaches the private network, nobody else does."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ALICE, BOB, CAROL, Lab
from userbound.lab.testbed import PRIVATE_V4, PRIVATE_V6, TCP_PORT

pytestmark = pytest.mark.root


@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_owner_reaches_private_server(lab: Lab, kind: str) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))

    assert lab.bed.probe(ALICE, kind) == "ok"
    assert lab.bed.probe(ALICE, kind, PRIVATE_V6) == "ok"
    assert lab.bed.leaked() == 0
    assert lab.bed.through_tunnel() > 0
    status = json.loads(lab.bed.cli(ALICE, "status", name, "--json").stdout)
    assert status["tunnels"][0]["state"] == "up"


def test_other_user_cannot_enter_tunnel(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    before = lab.bed.through_tunnel()

    for kind in ("tcp", "udp", "icmp"):
        assert lab.bed.probe(BOB, kind, timeout=0.5).startswith("error"), kind
        assert lab.bed.probe(BOB, kind, interface=name, timeout=0.5).startswith("error"), kind
        assert lab.bed.probe(BOB, kind, PRIVATE_V6, interface=name, timeout=0.5).startswith("error")
    assert lab.bed.through_tunnel() == before


def test_curl_interface_bypass_blocked(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    url = f"http://{PRIVATE_V4}:{TCP_PORT}/"
    curl = ["curl", "--silent", "--max-time", "2", "--interface", name, url]

    bob = subprocess.run([*lab.bed.prefix_command(lab.bed.host, BOB), *curl], check=False)
    alice = subprocess.run(
        [*lab.bed.prefix_command(lab.bed.host, ALICE), *curl], capture_output=True, check=False
    )

    assert bob.returncode != 0
    assert alice.stdout == b"private\n"


def test_forwarded_traffic_not_captured(lab: Lab) -> None:
    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    ruleset = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.bed.host,
            "nft",
            "list",
            "chain",
            "inet",
            "userbound",
            "forward",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = subprocess.run(
        ["ip", "netns", "exec", lab.bed.host, "ip", "rule"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert "drop" in ruleset
    assert all("iif lo" in line for line in rules.splitlines() if "uidrange" in line)


def test_two_owners_overlapping_networks(lab: Lab) -> None:
    alice = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    carol = lab.up_ok(CAROL, lab.bed.client_config(lab.bed.add_client()))

    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.probe(CAROL, "tcp") == "ok"
    assert lab.bed.probe(ALICE, "tcp", interface=carol, timeout=0.5).startswith("error")
    assert lab.bed.probe(CAROL, "tcp", interface=alice, timeout=0.5).startswith("error")
    assert lab.bed.leaked() == 0

    assert lab.bed.cli(ALICE, "down", alice).returncode == 0
    assert lab.bed.probe(CAROL, "tcp") == "ok"
    # Without her tunnel alice's packets take the ordinary route again.
    assert lab.bed.probe(ALICE, "tcp", timeout=0.5).startswith("error")
    assert lab.bed.leaked() > 0


def test_allowed_user_enters_tunnel(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    assert lab.bed.probe(BOB, "tcp", timeout=0.5).startswith("error")

    added = lab.bed.cli(0, "allow", name, str(BOB))
    assert added.returncode == 0, added.stderr
    assert lab.bed.probe(BOB, "tcp") == "ok"

    removed = lab.bed.cli(0, "allow", name, str(BOB), "--remove")
    assert removed.returncode == 0, removed.stderr
    assert lab.bed.probe(BOB, "tcp", timeout=0.5).startswith("error")
    assert lab.bed.probe(ALICE, "tcp") == "ok"


def test_root_brings_up_tunnel_for_user(lab: Lab) -> None:
    name = lab.bed.tunnel_name()
    path = lab.bed.write_config(lab.bed.client_config(lab.bed.add_client()), 0, "root.conf")

    result = lab.bed.cli(0, "up", str(path), "--owner", str(ALICE), "--name", name)

    assert result.returncode == 0, result.stderr
    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.probe(0, "tcp", timeout=0.5).startswith("error")


def test_full_tunnel_keeps_endpoint_and_blocks_ipv6(lab: Lab) -> None:
    config = lab.bed.client_config(lab.bed.add_client(), "0.0.0.0/0")
    lab.up_ok(ALICE, config)

    assert lab.bed.probe(ALICE, "tcp") == "ok"
    # An IPv4-only full tunnel: IPv6 must not leave outside it.
    assert lab.bed.probe(ALICE, "tcp", PRIVATE_V6, timeout=0.5).startswith("error")
    assert lab.bed.leaked() == 0
    # For everyone else the tunnel does not exist.
    assert lab.bed.probe(BOB, "icmp", "10.200.1.1") == "ok"
    assert lab.bed.probe(BOB, "icmp", "fd00:200:1::1") == "ok"


def test_ipv6_endpoint_full_tunnel(lab: Lab) -> None:
    config = lab.bed.client_config(
        lab.bed.add_client(), "0.0.0.0/0, ::/0", endpoint="[fd00:200:2::2]:51820"
    )
    name = lab.up_ok(ALICE, config)

    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.probe(ALICE, "tcp", PRIVATE_V6) == "ok"
    assert lab.bed.leaked() == 0
    status = json.loads(lab.bed.cli(ALICE, "status", name, "--json").stdout)["tunnels"][0]
    assert status["endpoint"] == "[fd00:200:2::2]:51820"
