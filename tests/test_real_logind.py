"""Against real elogind: PAM logins on virtual terminals, chvt, loginctl, ssh, restarts.

elogind runs from a Debian chroot, built with debootstrap on first use and
then cached, inside the test's own namespaces. userbound reads it over the
chroot's system bus, as it reads logind on a real machine.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_lab
from userbound.errors import EXIT_LAB_BROKEN
from userbound.lab.elogind import (
    CHROOT,
    RealLogind,
    Unavailable,
    active_vt,
    ensure_chroot,
    mounts_under,
    rooted_in,
    unavailable_reason,
)
from userbound.lab.testbed import USERBOUND, Testbed

pytestmark = pytest.mark.root

ALICE = 2001
BOB = 2002
SSH_SERVER = "10.200.1.2"
SSH_CLIENT = "10.200.1.1"
STRICT = """\
on_switch_away = "suspend"
on_lock = "disconnect"
on_remote_session = "suspend"
"""


@pytest.fixture(scope="module")
def chroot() -> Path:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") and "debootstrap" in reason:
            pytest.fail(f"real logins: {reason}; CI installs debootstrap with scripts/install")
        pytest.skip(f"real logins: {reason}")
    return ensure_chroot(progress=lambda line: print(line, file=sys.stderr))


@pytest.fixture
def logind(bed: Testbed, chroot: Path) -> Iterator[RealLogind]:
    with RealLogind(
        bed.host, bed.directory / "elogind", chroot=chroot, ssh_listen=SSH_SERVER, ssh_from=bed.wan
    ) as real:
        yield real


def cgroups() -> set[str]:
    """The cgroups at the top of the cgroup2 hierarchy, wherever this machine mounts it."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return {p.name for p in Path(fields[4]).iterdir() if p.is_dir()}
    return set()


def assert_removed(chroot: Path, front_vt: int, before: set[str]) -> None:
    assert rooted_in(chroot) == []
    assert mounts_under(chroot) == []
    assert cgroups() == before
    assert active_vt() == front_vt
    assert not chroot.with_name(f"{chroot.name}.state").exists()


def sessions(address: str, namespace: str) -> dict[str, Any]:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, str(USERBOUND), "sessions", "--direct", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address},
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    snapshot: dict[str, Any] = json.loads(result.stdout)
    return snapshot


def subset(values: dict[str, Any], expected: Iterable[str]) -> dict[str, Any]:
    return {key: values.get(key) for key in expected}


def by_id(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in snapshot["sessions"]}


expected_alice = {
    "uid": ALICE,
    "user": "alice",
    "seat": "seat0",
    "vt": 5,
    "tty": "tty5",
    "class": "user",
    "type": "tty",
    "remote": False,
    "service": "login",
    "active": True,
    "locked": True,
}
expected_ssh = {
    "uid": BOB,
    "seat": None,
    "remote": True,
    "remote_host": SSH_CLIENT,
    "service": "sshd",
    "class": "user",
}


def test_sessions_read_from_real_logins(bed: Testbed, logind: RealLogind) -> None:
    alice = logind.login("alice", 5)
    logind.switch(5)
    bob = logind.login("bob", 6)
    ssh = logind.ssh_login("bob")
    logind.lock(alice)

    snapshot = sessions(logind.address, bed.host)

    assert snapshot["state"] == "known"
    seen = by_id(snapshot)
    assert subset(seen[alice.id], expected_alice) == expected_alice
    assert (seen[bob.id]["vt"], seen[bob.id]["active"]) == (6, False)
    assert subset(seen[ssh.id], expected_ssh) == expected_ssh
    assert snapshot["seats"][0]["active_session"] == alice.id

    # A restarted elogind finds the same sessions, with their ids, seats and remote hosts,
    logind.restart_elogind()
    again = by_id(sessions(logind.address, bed.host))
    fields = ("uid", "seat", "vt", "active", "remote_host", "state")
    assert {k: subset(v, fields) for k, v in again.items()} == {
        k: subset(v, fields) for k, v in seen.items()
    }
    # but not the lock hint: elogind 246 does not save it.
    assert again[alice.id]["locked"] is False


class Follow:
    """`userbound sessions --direct --follow --json` in the shared machine, read line by line."""

    def __init__(self, address: str, namespace: str) -> None:
        argv = ["ip", "netns", "exec", namespace, str(USERBOUND), "sessions", "--direct"]
        self.process = subprocess.Popen(
            [*argv, "--follow", "--json"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.events: list[dict[str, Any]] = []
        first = self.until(lambda event: event["event"] == "snapshot")
        self.snapshot: dict[str, Any] = first["snapshot"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def until(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Read events until one matches, for up to 10 s; return it."""
        deadline = time.monotonic() + 10
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(f"no such event within 10 s; seen: {self.events}") from None
            event: dict[str, Any] = json.loads(line)
            self.events.append(event)
            if match(event):
                return event

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def follow(bed: Testbed, logind: RealLogind) -> Iterator[Callable[[], Follow]]:
    started: list[Follow] = []

    def start() -> Follow:
        started.append(Follow(logind.address, bed.host))
        return started[-1]

    yield start
    for follower in started:
        follower.close()


def test_real_switches_reach_a_follower(logind: RealLogind, follow: Callable[[], Follow]) -> None:
    alice = logind.login("alice", 5)
    bob = logind.login("bob", 6)
    logind.switch(5)
    follower = follow()
    assert follower.snapshot["state"] == "known"

    # The second chvt 5 changes nothing, and elogind emits nothing.
    for vt in (6, 5, 5, 6):
        logind.switch(vt)
        time.sleep(0.1)
    logind.logout(alice)
    follower.until(lambda event: event["event"] == "session-ended")

    events = follower.events
    switches = [(e["from"]["id"], e["to"]["id"]) for e in events if e["event"] == "seat-switched"]
    assert switches == [(alice.id, bob.id), (bob.id, alice.id), (alice.id, bob.id)]
    assert events[-1]["session"]["id"] == alice.id


def test_lock_outlives_elogind_restart(logind: RealLogind, follow: Callable[[], Follow]) -> None:
    """elogind does not save LockedHint across a restart; userbound keeps the session locked."""
    alice = logind.login("alice", 5)
    logind.switch(5)
    logind.lock(alice)
    follower = follow()
    assert [s["locked"] for s in follower.snapshot["sessions"]] == [True]

    logind.restart_elogind()
    follower.until(lambda event: event["event"] == "sessions-known")
    assert [e["event"] for e in follower.events[1:]] == ["sessions-unknown", "sessions-known"]

    logind.lock(alice, locked=False)
    unlocked = follower.until(lambda event: event["event"] == "session-unlocked")
    assert unlocked["session"]["id"] == alice.id


def test_lab_story_with_real_logins(tmp_path: Path) -> None:
    """`userbound lab --real-logind` under the built-in policy, and what it leaves behind."""
    before, front_vt = cgroups(), active_vt()
    plot = tmp_path / "lab.svg"

    result = run_lab("--real-logind", "--json", "--plot", str(plot), timeout=300)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["logind"] == "elogind"
    assert report["passed"] is True, report["failed"]
    steps = {s["step"]: s for s in report["steps"]}
    assert [s["state"] for s in report["steps"]][1:] == ["up"] * 7 + ["disconnected"]
    assert report["totals"]["private"]["bob"] == 0
    assert steps["switch-to-bob"]["decision"]["rule"] == "on_switch_away"
    assert steps["ssh"]["decision"]["rule"] == "on_remote_session"
    assert "10.200.1.1" in steps["ssh"]["decision"]["reason"]
    # While elogind restarts, sessions_unknown disconnects; alice's locked session is back.
    assert steps["restart-logind"]["decisions"][0]["rule"] == "sessions_unknown"
    assert steps["logout"]["decision"]["rule"] == "on_owner_logout"
    over_ssh = [c for c in steps["ssh"]["checks"] if "over ssh" in c["what"]]
    assert over_ssh[0]["observed"].startswith("blocked: (7)")
    assert "with userbound and real elogind" in plot.read_text()
    assert_removed(CHROOT, front_vt, before)
    assert CHROOT.with_name(f"{CHROOT.name}.lock").read_text() == ""


def test_lab_strict_policy_with_real_logins(tmp_path: Path) -> None:
    """Each real session change suspends, disconnects or resumes alice's tunnel."""
    policy = tmp_path / "strict.toml"
    policy.write_text(STRICT)

    result = run_lab("--real-logind", "--json", "--policy", str(policy), timeout=300)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True, report["failed"]
    assert [s["state"] for s in report["steps"]][1:] == [
        "up",
        "suspended",
        "up",
        "disconnected",
        "disconnected",
        "up",
        "suspended",
        "disconnected",
    ]
    decisions = [(s["step"], (s["decision"] or {}).get("rule")) for s in report["steps"]]
    assert decisions[2:] == [
        ("switch-to-bob", "on_switch_away"),
        ("switch-to-alice", None),
        ("lock", "on_lock"),
        ("restart-logind", None),
        ("unlock", None),
        ("ssh", "on_remote_session"),
        ("logout", "on_owner_logout"),
    ]
    # elogind restarts while alice is locked: the tunnel stays disconnected throughout.
    restart = next(s for s in report["steps"] if s["step"] == "restart-logind")
    assert {d["state"] for d in restart["decisions"]} <= {"disconnected"}
    applied = [s["decision"] for s in report["steps"] if s["decision"]]
    assert all(d["latency_ms"] is not None for d in applied if d["action"] != "keep")
    # While suspended or disconnected, nothing of alice's left by the public side.
    assert report["totals"]["public"]["alice"] == 0


def test_everything_is_removed_after_a_kill(bed: Testbed, chroot: Path) -> None:
    """A test bed killed with its logins open leaves what the next one removes."""
    before, front_vt = cgroups(), active_vt()
    script = f"""
import sys, time
from pathlib import Path
from userbound.lab.elogind import RealLogind
bed = RealLogind({bed.host!r}, Path({str(bed.directory / "killed")!r}),
                 ssh_listen={SSH_SERVER!r}, ssh_from={bed.wan!r}).start()
bed.login("alice", 5); bed.switch(5); bed.login("bob", 6); bed.ssh_login("bob")
print("ready", flush=True)
time.sleep(600)
"""
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "ready"
            # A second test bed must wait: the chroot is in use.
            with pytest.raises(RuntimeError, match="in use by pid"):
                RealLogind(bed.host, bed.directory / "second", chroot=chroot).start()
        finally:
            holder.send_signal(signal.SIGKILL)
    assert rooted_in(chroot) != []
    assert mounts_under(chroot) != []
    assert cgroups() != before

    with RealLogind(bed.host, bed.directory / "next", chroot=chroot) as next_bed:
        assert [s.id for s in next_bed.sessions()] == []

    assert_removed(chroot, front_vt, before)


def test_lab_rejected_while_the_chroot_is_used(logind: RealLogind) -> None:
    result = run_lab("--real-logind", timeout=300)

    assert result.returncode == EXIT_LAB_BROKEN
    assert f"in use by pid {os.getpid()}" in result.stderr
    # Rejected before anything was built.
    assert "building" not in result.stderr


def test_removed_when_a_step_fails(bed: Testbed, chroot: Path) -> None:
    before, front_vt = cgroups(), active_vt()

    with pytest.raises(RuntimeError, match="openvt"):
        with RealLogind(bed.host, bed.directory / "failing", chroot=chroot) as real:
            real.login("alice", 5)
            real.switch(5)
            real.login("bob", 5)  # VT5 is alice's, so openvt fails

    assert_removed(chroot, front_vt, before)


def test_login_of_unknown_account_rejected(logind: RealLogind) -> None:
    with pytest.raises(ValueError, match="no account 'carol' in the chroot; use one of alice, bob"):
        logind.login("carol", 7)

    assert logind.sessions() == []


def test_unavailable_names_the_missing_part(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="no elogind chroot"):
        RealLogind("nowhere", tmp_path, chroot=tmp_path / "missing").start()
