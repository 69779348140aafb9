"""Crash safety: the rules live in the kernel, survive SIGKILL, and SIGTERM removes them all."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import ALICE, BOB, Lab, kernel_state
from userbound.lab.testbed import USERBOUND, Testbed

pytestmark = pytest.mark.root


def wireguard_go_pids(name: str) -> list[str]:
    result = subprocess.run(
        ["pgrep", "-f", f"wireguard-go -f {name}$"], capture_output=True, text=True, check=False
    )
    return result.stdout.split()


def test_sigkill_keeps_enforcement(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    bob = lab.bed.start_probe_loop(BOB, "bob")

    lab.stop_daemon(signal.SIGKILL)

    # No daemon: the kernel still keeps bob out and the tunnel still serves alice.
    assert lab.bed.probe(BOB, "tcp", interface=name, timeout=0.5).startswith("error")
    assert lab.bed.probe(ALICE, "tcp") == "ok"

    lab.restart_daemon()
    assert lab.status(name)["state"] == "up"
    assert len(wireguard_go_pids(name)) == 1
    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.probe(BOB, "tcp", interface=name, timeout=0.5).startswith("error")
    assert "ok" not in [r for _, r in lab.bed.loop_results(bob)]
    assert "adopted tunnel" in lab.bed.daemon_log()


def test_restart_replaces_dead_data_plane(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    lab.stop_daemon(signal.SIGKILL)
    for pid in wireguard_go_pids(name):
        subprocess.run(["kill", "-9", pid], check=True)

    # Data plane gone, daemon gone: the kill switch holds in the kernel alone.
    assert lab.bed.probe(ALICE, "tcp") != "ok"
    assert lab.bed.leaked() == 0

    lab.restart_daemon()
    lab.wait_for_state(name, "up")
    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.leaked() == 0


def test_sigterm_leaves_no_trace(bed: Testbed) -> None:
    before = kernel_state(bed.host)
    daemon = bed.start_daemon()
    lab = Lab(bed, daemon)
    first = lab.up_ok(ALICE, bed.client_config(bed.add_client()))
    second = lab.up_ok(BOB, bed.client_config(bed.add_client(), "0.0.0.0/0"))
    assert kernel_state(bed.host) != before

    lab.stop_daemon(signal.SIGTERM)

    assert daemon.returncode == 0
    assert kernel_state(bed.host) == before
    assert wireguard_go_pids(first) == []
    assert wireguard_go_pids(second) == []
    assert not (bed.directory / "state" / "tunnels.json").exists()


def test_restart_removes_unclaimed_leftovers(lab: Lab) -> None:
    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    lab.stop_daemon(signal.SIGKILL)
    (lab.bed.directory / "state" / "tunnels.json").unlink()

    lab.restart_daemon()

    state = kernel_state(lab.bed.host)
    assert "userbound" not in state
    assert "proto 85" not in state


def test_shared_state_and_socket_folder(bed: Testbed) -> None:
    folder = bed.directory / "run"
    daemon = bed.spawn(
        bed.host,
        str(USERBOUND),
        "daemon",
        "--control-socket",
        str(folder / "control.sock"),
        "--state-dir",
        str(folder),
        stderr=subprocess.DEVNULL,
    )
    lab = Lab(bed, daemon)
    config = bed.write_config(bed.client_config(bed.add_client()), ALICE)
    name = bed.tunnel_name()
    socket_option = ["--control-socket", str(folder / "control.sock")]

    deadline = time.monotonic() + 20
    while bed.cli(0, "status", *socket_option).returncode != 0:
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)
    result = bed.cli(ALICE, "up", str(config), "--name", name, *socket_option)

    assert result.returncode == 0, result.stderr
    assert (folder / "tunnels.json").stat().st_mode & 0o777 == 0o600
    lab.stop_daemon()
