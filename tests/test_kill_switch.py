"""The kill switch: while a tunnel is not up, the owner's packets fail at once and never leave."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from conftest import ALICE, BOB, Lab, data_plane_pids
from userbound.lab.testbed import PRIVATE_V6, TCP_PORT

pytestmark = pytest.mark.root

# Errors an application gets when the kill switch rejects its packet, as
# opposed to "timed out", which would mean the packet went somewhere.
IMMEDIATE_ERRORS = (
    "error: Network is unreachable",
    "error: No route to host",
    "error: Connection refused",
    "error: Operation not permitted",
    "error: Permission denied",
)


def kill_data_plane(lab: Lab, name: str) -> None:
    pids = data_plane_pids(name)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)


def set_link(lab: Lab, name: str, state: str) -> None:
    subprocess.run(["ip", "-n", lab.bed.host, "link", "set", name, state], check=True)


def assert_owner_blocked(lab: Lab) -> None:
    for kind in ("tcp", "udp", "icmp"):
        assert lab.bed.probe(ALICE, kind) in IMMEDIATE_ERRORS, kind
        assert lab.bed.probe(ALICE, kind, PRIVATE_V6) in IMMEDIATE_ERRORS, kind
    assert lab.bed.leaked() == 0


def test_data_plane_killed(lab: Lab) -> None:
    # Six probes, each a new process, must run before the data plane restarts.
    lab.stop_daemon()
    lab.restart_daemon("--restart-delay", "5")
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    loop = lab.bed.start_probe_loop(ALICE, "alice")

    kill_data_plane(lab, name)
    lab.wait_for_state(name, "connecting")
    assert_owner_blocked(lab)

    # The daemon restarts the data plane and the routes come back with it.
    lab.wait_for_state(name, "up")
    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.leaked() == 0
    results = [r for _, r in lab.bed.loop_results(loop)]
    assert "ok" in results
    assert any(r in IMMEDIATE_ERRORS for r in results)


def test_interface_set_down(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))

    set_link(lab, name, "down")
    lab.wait_for_state(name, "down")
    assert_owner_blocked(lab)
    assert lab.bed.probe(BOB, "icmp", "10.200.1.1") == "ok"

    set_link(lab, name, "up")
    lab.wait_for_state(name, "up")
    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.probe(ALICE, "tcp", PRIVATE_V6) == "ok"
    assert lab.bed.leaked() == 0


def test_existing_connection_stops(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    session = lab.bed.start_probe_loop(ALICE, "session", port=TCP_PORT, session=True)
    wait_until(lambda: "ok" in [r for _, r in lab.bed.loop_results(session)])

    kill_data_plane(lab, name)
    killed = time.time()
    wait_until(lambda: lab.bed.loop_results(session)[-1][1] != "ok")
    wait_until(lambda: any(t > killed for t, _ in lab.bed.loop_results(session)))

    after = [r for t, r in lab.bed.loop_results(session) if t > killed]
    assert "ok" not in after
    # The daemon aborts the connection, so the application learns at once.
    assert "error: Software caused connection abort" in [
        r for _, r in lab.bed.loop_results(session)
    ]
    assert lab.bed.leaked() == 0


def test_connecting_tunnel_blocks_owner(lab: Lab) -> None:
    lab.stop_daemon()
    lab.daemon = lab.bed.start_daemon("--restart-delay", "60")
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))

    kill_data_plane(lab, name)
    lab.wait_for_state(name, "connecting")

    assert_owner_blocked(lab)
    assert lab.status(name)["state"] == "connecting"


def test_without_kill_switch_traffic_leaves(lab: Lab) -> None:
    # The policy decides whether a user may go without the kill switch.
    lab.use_policy("kill_switch = false\n")
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()), "--no-kill-switch")

    set_link(lab, name, "down")
    lab.wait_for_state(name, "down")
    lab.bed.probe(ALICE, "udp", timeout=0.3)

    # The control case: the leak counter counts what the kill switch stops.
    assert lab.bed.leaked() > 0


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_failed_restarts_keep_kill_switch(lab: Lab) -> None:
    lab.stop_daemon()
    lab.daemon = lab.bed.start_daemon("--restart-delay", "0.5")
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))

    kill_data_plane(lab, name)
    # An interface of the same name, taken as soon as the old one is gone,
    # makes every restart fail.
    blocker = ["ip", "-n", lab.bed.host, "link", "add", name, "type", "veth", "peer", "name", "blk"]
    wait_until(lambda: subprocess.run(blocker, capture_output=True, check=False).returncode == 0)
    lab.wait_for_state(name, "failed")
    assert_owner_blocked(lab)
    assert "failed to start" in lab.bed.daemon_log()

    subprocess.run(["ip", "-n", lab.bed.host, "link", "del", name], check=True)
    lab.wait_for_state(name, "up", timeout=30)
    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.leaked() == 0
