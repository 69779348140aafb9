"""Crash safety: the rules live in the kernel, survive SIGKILL, and SIGTERM removes them all."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ALICE, BOB, Lab, data_plane_pids, kernel_state
from userbound.lab.testbed import USERBOUND, Testbed

pytestmark = pytest.mark.root


def test_sigkill_keeps_enforcement(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    bob = lab.bed.start_probe_loop(BOB, "bob")

    lab.stop_daemon(signal.SIGKILL)

    # No daemon: the kernel still keeps bob out and the tunnel still serves alice.
    assert lab.bed.probe(BOB, "tcp", interface=name, timeout=0.5).startswith("error")
    assert lab.bed.probe(ALICE, "tcp") == "ok"

    lab.restart_daemon()
    assert lab.status(name)["state"] == "up"
    assert len(data_plane_pids(name)) == 1
    assert lab.bed.probe(ALICE, "tcp") == "ok"
    assert lab.bed.probe(BOB, "tcp", interface=name, timeout=0.5).startswith("error")
    assert "ok" not in [r for _, r in lab.bed.loop_results(bob)]
    assert "adopted tunnel" in lab.bed.daemon_log()


def test_restart_replaces_dead_data_plane(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    lab.stop_daemon(signal.SIGKILL)
    for pid in data_plane_pids(name):
        os.kill(pid, signal.SIGKILL)

    # Data plane gone, daemon gone: the kernel alone keeps the kill switch in force.
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
    assert data_plane_pids(first) == []
    assert data_plane_pids(second) == []
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


def test_ready_sent_when_socket_accepts(bed: Testbed) -> None:
    notify_path = bed.directory / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        daemon = bed.spawn(
            bed.host,
            str(USERBOUND),
            "daemon",
            "--control-socket",
            str(bed.control_socket),
            "--state-dir",
            str(bed.directory / "state"),
            env={"NOTIFY_SOCKET": str(notify_path)},
            stderr=subprocess.DEVNULL,
        )
        message = notify.recv(256)
        status = bed.cli(ALICE, "status")

        assert message == b"READY=1"
        assert status.returncode == 0, status.stderr
        Lab(bed, daemon).stop_daemon()
        assert notify.recv(256) == b"STOPPING=1"


def test_systemd_unit_verifies() -> None:
    unit = Path(__file__).parent.parent / "contrib" / "systemd" / "userbound.service"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "Type=notify" in unit.read_text()


def run_daemon(bed: Testbed, namespace: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bed.prefix_command(namespace), str(USERBOUND), "daemon", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_second_daemon_refused(lab: Lab) -> None:
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    before = kernel_state(lab.bed.host)
    other = lab.bed.directory / "other"

    same_namespace = run_daemon(
        lab.bed, lab.bed.host, "--control-socket", f"{other}.sock", "--state-dir", str(other)
    )
    same_folder = run_daemon(
        lab.bed,
        lab.bed.wan,
        "--control-socket",
        f"{other}.sock",
        "--state-dir",
        str(lab.bed.directory / "state"),
    )

    assert same_namespace.returncode == 1
    assert "another userbound daemon runs in this network namespace" in same_namespace.stderr
    assert same_folder.returncode == 1
    assert "uses the state folder" in same_folder.stderr
    assert kernel_state(lab.bed.host) == before
    assert lab.status(name)["state"] == "up"
    assert lab.bed.probe(BOB, "tcp", interface=name, timeout=0.5).startswith("error")


def test_missing_kernel_module_refused(bed: Testbed) -> None:
    if Path("/sys/module/wireguard").is_dir():
        pytest.skip("this kernel has the WireGuard module loaded")
    before = kernel_state(bed.host)

    result = run_daemon(
        bed,
        bed.host,
        "--data-plane",
        "kernel",
        "--control-socket",
        str(bed.control_socket),
        "--state-dir",
        str(bed.directory / "state"),
    )

    assert result.returncode == 1
    assert "kernel module is not loaded" in result.stderr
    assert kernel_state(bed.host) == before
