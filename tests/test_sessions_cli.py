"""`userbound sessions`, directly on a private bus and through the daemon."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ALICE, BOB, puppet
from userbound.lab.logind import LogindPuppet, PrivateBus, SimulatedLogind
from userbound.lab.testbed import USERBOUND, Testbed
from userbound.protocol import DEFAULT_SOCKET


async def alice_in_front_and_bob_over_ssh(logind: LogindPuppet) -> None:
    await logind.login("2", ALICE, "alice", vt=5, activate=True)
    await logind.login(
        "4", BOB, "bob", seat="", remote=True, remote_host="192.0.2.7", service="sshd"
    )
    await logind.lock("2")


def sessions_cli(bus_address: str, *argv: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address}
    environment.pop("USERBOUND_SOCKET", None)
    return subprocess.run(
        [str(USERBOUND), "sessions", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
        check=False,
    )


def test_direct_reading_when_no_daemon_runs(bus: PrivateBus, logind: SimulatedLogind) -> None:
    if subprocess.run([str(USERBOUND), "status"], capture_output=True, check=False).returncode == 0:
        pytest.skip(f"a daemon answers on {DEFAULT_SOCKET}")
    puppet(bus.address, alice_in_front_and_bob_over_ssh)
    result = sessions_cli(bus.address, "--json")
    assert result.returncode == 0, result.stderr
    assert f"no daemon at {DEFAULT_SOCKET}; reading sessions directly" in result.stderr
    state = json.loads(result.stdout)
    assert state["state"] == "known"
    assert state["source"] == "logind"
    assert state["seats"] == [
        {"id": "seat0", "active_session": "2", "uid": ALICE, "user": "alice", "class": "user"}
    ]
    by_id = {s["id"]: s for s in state["sessions"]}
    assert by_id["2"]["locked"] and by_id["2"]["active"]
    assert by_id["4"]["remote"] and by_id["4"]["remote_host"] == "192.0.2.7"

    text = sessions_cli(bus.address, "--direct").stdout
    lines = text.splitlines()
    assert lines[0] == "source: logind"
    assert lines[1].split() == ["SEAT", "IN", "FRONT"]
    assert lines[2].split() == ["seat0", "alice", "(user,", "session", "2)"]
    assert lines[5].split() == [
        "2", "alice", str(ALICE), "seat0", "5", "user", "x11", "-", "active", "locked",
    ]  # fmt: skip
    assert lines[6].split() == [
        "4", "bob", str(BOB), "-", "-", "user", "x11", "192.0.2.7", "online", "unlocked",
    ]  # fmt: skip


def test_named_socket_never_falls_back(bus: PrivateBus, logind: SimulatedLogind) -> None:
    result = sessions_cli(bus.address, "--control-socket", "/nonexistent/control.sock")
    assert result.returncode == 4
    assert result.stdout == ""
    assert "cannot reach the userbound daemon at /nonexistent/control.sock" in result.stderr
    if subprocess.run([str(USERBOUND), "status"], capture_output=True, check=False).returncode:
        # Naming the default path is naming it too.
        named_default = sessions_cli(bus.address, "--control-socket", DEFAULT_SOCKET)
        assert named_default.returncode == 4


def test_direct_reading_says_why_sessions_are_unknown(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path}/no-bus-here"
    result = sessions_cli(address, "--source", "logind")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "source: logind",
        f"sessions unknown: cannot connect to the system bus at {address}: "
        "No such file or directory",
    ]
    utmp = sessions_cli(address, "--source", "utmp")
    assert utmp.returncode == 0, utmp.stderr
    assert "seats: unknown (no logind" in utmp.stdout
    utmp_json = json.loads(sessions_cli(address, "--source", "utmp", "--json").stdout)
    assert utmp_json["seats"] is None
    for session in utmp_json["sessions"]:
        assert session["locked"] is None
        assert session["active"] is None


def test_closed_pipe_ends_quietly(bus: PrivateBus, logind: SimulatedLogind) -> None:
    puppet(bus.address, alice_in_front_and_bob_over_ssh)
    result = subprocess.run(
        f"{USERBOUND} sessions --direct --json | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
        check=False,
    )
    assert result.stdout == "{"
    assert result.stderr == ""


@pytest.mark.parametrize("value", ["0", "-5", "0.5", "abc", "nan", "inf", "90000"])
def test_resync_interval_out_of_range(value: str) -> None:
    result = subprocess.run(
        [str(USERBOUND), "daemon", "--resync-interval", value],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"argument --resync-interval: invalid value {value!r}" in result.stderr
    assert "give seconds from 1 to 86400" in result.stderr


def test_direct_follow_streams_events(bus: PrivateBus, logind: SimulatedLogind) -> None:
    follower = subprocess.Popen(
        [str(USERBOUND), "sessions", "--direct", "--follow", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
    )
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert first["event"] == "snapshot"
        assert first["snapshot"]["sessions"] == []
        puppet(bus.address, lambda logind: logind.login("2", ALICE, "alice", activate=True))
        started = json.loads(follower.stdout.readline())
        switched = json.loads(follower.stdout.readline())
        assert started["event"] == "session-started"
        assert started["session"]["uid"] == ALICE
        assert switched["event"] == "seat-switched"
        assert switched["from"] is None
        assert switched["to"]["user"] == "alice"
    finally:
        follower.terminate()
        follower.wait(10)
        if follower.stdout is not None:
            follower.stdout.close()


@pytest.fixture
def daemon_on_bus(bus: PrivateBus) -> Iterator[Testbed]:
    testbed = Testbed("ubt")
    testbed.build()
    try:
        testbed.start_daemon("--sessions", "logind", env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
        yield testbed
    finally:
        testbed.destroy()


@pytest.mark.root
def test_sessions_through_the_daemon(
    bus: PrivateBus,
    logind: SimulatedLogind,
    daemon_on_bus: Testbed,
) -> None:
    bed = daemon_on_bus
    puppet(bus.address, alice_in_front_and_bob_over_ssh)
    # Any user may look, as with loginctl.
    result = bed.cli(ALICE, "sessions", "--json")
    assert result.returncode == 0, result.stderr + bed.daemon_log()
    assert "reading sessions directly" not in result.stderr
    state = json.loads(result.stdout)
    assert [s["id"] for s in state["sessions"]] == ["2", "4"]

    follower = bed.spawn(
        bed.host,
        str(USERBOUND),
        "sessions",
        "--follow",
        "--json",
        uid=BOB,
        env={"USERBOUND_SOCKET": str(bed.control_socket)},
        stdout=subprocess.PIPE,
    )
    assert follower.stdout is not None
    first = json.loads(follower.stdout.readline())
    assert first["event"] == "snapshot"

    async def switch_to_bob(logind: LogindPuppet) -> None:
        await logind.login("3", BOB, "bob", vt=6)
        await logind.switch("seat0", "3", previous="2")

    puppet(bus.address, switch_to_bob)
    kinds = [json.loads(follower.stdout.readline())["event"] for _ in range(2)]
    assert kinds == ["session-started", "seat-switched"]

    logind.stop()
    unknown = json.loads(follower.stdout.readline())
    assert unknown["event"] == "sessions-unknown"
    assert "no owner" in unknown["reason"] or "left the system bus" in unknown["reason"]
    follower.terminate()
    follower.wait(10)
    follower.stdout.close()

    result = bed.cli(0, "sessions")
    assert result.returncode == 1, result.stderr
    assert "sessions unknown: org.freedesktop.login1 has no owner" in result.stdout
    # The follower's connection is closed, and the daemon still serves every user.
    assert bed.cli(BOB, "sessions").returncode == 1
    # --source reads directly, whatever the daemon reports.
    assert bed.cli(ALICE, "sessions", "--source", "utmp").stdout.startswith("source: utmp\n")
