"""Snapshots and derived events, without any bus; utmp files written by the test."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

from userbound.sessions.model import (
    Event,
    EventKind,
    Seat,
    Session,
    Snapshot,
    Source,
    derive_events,
    describe_event,
    printable,
)
from userbound.sessions.monitor import Follower, Monitor
from userbound.sessions.utmp import BOOT_TIME, RECORD, USER_PROCESS, UtmpMonitor, read_utmp


def snapshot(*sessions: Session, front: str = "") -> Snapshot:
    return Snapshot.build(Source.LOGIND, sessions, [Seat("seat0", front)])


ALICE = Session("2", 2001, "alice", seat="seat0", vt=5)
BOB = Session("3", 2002, "bob", seat="seat0", vt=6)
GREETER = Session("c1", 110, "lightdm", seat="seat0", session_class="greeter")
SSH = Session("5", 2002, "bob", type="tty", remote_host="192.0.2.7")


def kinds(events: list[Event]) -> list[str]:
    return [e.kind.value for e in events]


def test_seatless_sessions_are_remote_and_never_in_front() -> None:
    reported_active = Session("6", 2002, "bob", active=True)
    state = snapshot(ALICE, reported_active, front="6")
    assert state.sessions["6"].remote
    assert not state.sessions["6"].active
    assert state.in_front("seat0") is None


def test_only_user_sessions_count() -> None:
    classes = ["greeter", "lock-screen", "manager", "manager-early", "background"]
    others = [
        Session(f"c{i}", 100 + i, "x", seat="seat0", session_class=c) for i, c in enumerate(classes)
    ]
    state = snapshot(ALICE, *others)
    assert [s.id for s in state.present_sessions()] == ["2"]


def test_first_snapshot_is_the_starting_point() -> None:
    assert derive_events(None, snapshot(ALICE, front="2")) == []


def test_switch_to_the_greeter_and_logout() -> None:
    before = snapshot(ALICE, GREETER, front="2")
    after = snapshot(ALICE, GREETER, front="c1")
    (event,) = derive_events(before, after)
    assert event.kind is EventKind.SEAT_SWITCHED
    assert (event.previous_id, event.current_id) == ("2", "c1")
    assert describe_event(event.to_json()) == (
        "seat-switched seat0: alice (user, session 2) -> lightdm (greeter, session c1)"
    )
    logged_out = snapshot(GREETER, front="c1")
    assert kinds(derive_events(after, logged_out)) == ["session-ended"]


def test_closing_counts_as_ended_once() -> None:
    before = snapshot(ALICE, BOB, front="2")
    closing = snapshot(Session("2", 2001, "alice", seat="seat0", state="closing"), BOB, front="")
    events = derive_events(before, closing)
    assert kinds(events) == ["seat-switched", "session-ended"]
    assert events[1].session is not None and events[1].session.state == "closing"
    assert derive_events(closing, snapshot(BOB)) == []


def test_remote_sessions_have_their_own_events() -> None:
    before = snapshot(ALICE, front="2")
    with_ssh = snapshot(ALICE, SSH, front="2")
    assert kinds(derive_events(before, with_ssh)) == ["remote-session-started"]
    assert kinds(derive_events(with_ssh, before)) == ["remote-session-ended"]


def test_lock_and_unlock() -> None:
    before = snapshot(ALICE, front="2")
    locked = snapshot(Session("2", 2001, "alice", seat="seat0", locked=True), front="2")
    assert kinds(derive_events(before, locked)) == ["session-locked"]
    assert kinds(derive_events(locked, before)) == ["session-unlocked"]


def test_unknown_snapshots_derive_nothing() -> None:
    unknown = Snapshot.unknown(Source.LOGIND, "no bus")
    assert derive_events(snapshot(ALICE), unknown) == []
    assert unknown.to_json()["state"] == "unknown"
    assert unknown.to_json()["reason"] == "no bus"


def _record(
    kind: int, pid: int, line: str, user: str, host: str, when: float | None = None
) -> bytes:
    seconds = int(time.time() if when is None else when)
    return RECORD.pack(
        kind, pid, line.encode(), b"", user.encode(), host.encode(), 0, 0, 0, seconds, 0, b""
    )


def test_utmp_record_size_matches_glibc() -> None:
    assert RECORD.size == 384


def test_read_utmp(tmp_path: Path) -> None:
    path = tmp_path / "utmp"
    alive = os.getpid()
    path.write_bytes(
        _record(USER_PROCESS, alive, "tty1", "root", "")
        + _record(USER_PROCESS, alive, "pts/0", "root", "192.0.2.9")
        + _record(USER_PROCESS, alive, "pts/1", "root", ":0")
        + _record(USER_PROCESS, 0x7FFFFFF0, "pts/2", "root", "")  # its process is gone
        + _record(USER_PROCESS, alive, "pts/3", "no-such-user-here", "")
        + _record(8, alive, "pts/4", "root", "")  # DEAD_PROCESS
        # A login from long before this process started: its pid was reused.
        + _record(USER_PROCESS, alive, "pts/5", "root", "", when=1_000_000)
        # A name that fills the field may be cut short: no uid.
        + _record(USER_PROCESS, alive, "pts/6", "r" * 32, "")
        + b"\0" * 10  # a torn last record
    )
    sessions = read_utmp(str(path))
    assert [(s.tty, s.remote, s.remote_host, s.uid) for s in sessions] == [
        ("tty1", False, "", 0),
        ("pts/0", True, "192.0.2.9", 0),
        ("pts/1", False, "", 0),
        ("pts/3", False, "", None),
        ("pts/6", False, "", None),
    ]
    state = Snapshot.build(Source.UTMP, sessions, [], seats_known=False)
    assert not state.seats_known
    assert state.to_json()["seats"] is None
    assert not state.sessions[f"tty1:{alive}"].remote


def test_utmp_monitor_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "utmp"
    alive = os.getpid()

    async def main() -> None:
        monitor = UtmpMonitor(str(path))
        events: list[Event] = []
        monitor.subscribe(events.append)
        await monitor.start()
        try:
            assert monitor.snapshot.known and not monitor.snapshot.sessions
            path.write_bytes(_record(USER_PROCESS, alive, "pts/0", "root", "192.0.2.9"))
            while not events:
                await asyncio.sleep(0.01)
            assert kinds(events) == ["remote-session-started"]
            events.clear()
            with path.open("r+b") as utmp:
                utmp.write(struct.pack("<h", 8))  # the login ends: DEAD_PROCESS
            while not events:
                await asyncio.sleep(0.01)
            assert kinds(events) == ["remote-session-ended"]
        finally:
            await monitor.close()

    asyncio.run(asyncio.wait_for(main(), 10))


class BrokenSource(Monitor):
    """A source whose read fails with a bug, not with SourceUnavailable."""

    source = Source.UTMP

    async def _open_source(self) -> None:
        pass

    async def _read_source(self) -> Snapshot:
        raise KeyError("Id")

    async def _close_source(self) -> None:
        pass


def test_monitor_bug_makes_sessions_unknown() -> None:
    async def main() -> Snapshot:
        monitor = BrokenSource(retry_first=10)
        await monitor.start()
        await monitor.close()
        return monitor.snapshot

    snapshot = asyncio.run(main())
    assert not snapshot.known
    assert snapshot.reason == "internal error while reading utmp: KeyError('Id')"


def test_control_characters_are_escaped() -> None:
    forged = Session("7", 2002, "bob\x1b[2J", type="tty", remote_host="x\n0 root seat0 active")
    event = Event(EventKind.REMOTE_SESSION_STARTED, snapshot(ALICE, forged, front="2"), forged)
    line = describe_event(event.to_json())
    assert "\n" not in line
    assert "\x1b" not in line
    assert "bob\\x1b[2J" in line
    assert printable("ok") == "ok"


def test_reused_id_is_another_session() -> None:
    before = snapshot(Session("2", 2001, "alice", seat="seat0", timestamp=1), front="2")
    after = snapshot(Session("2", 2002, "bob", seat="seat0", timestamp=2), front="2")
    events = derive_events(before, after)
    assert kinds(events) == ["session-ended", "session-started", "seat-switched"]
    assert events[0].session is not None
    assert events[0].session.user == "alice"
    assert events[1].session is not None
    assert events[1].session.user == "bob"


def test_sessions_known_carries_the_snapshot() -> None:
    state = snapshot(ALICE, front="2")
    data = Event(EventKind.SESSIONS_KNOWN, state).to_json()
    assert data["snapshot"]["seats"][0]["user"] == "alice"
    assert describe_event(data) == "sessions-known: 1 session(s)"


class StaticSource(Monitor):
    """A monitor fed by the test through _publish, with no source behind it."""

    source = Source.LOGIND


async def _take(follower: Follower, count: int) -> list[dict[str, object]]:
    stream = follower.events()
    return [await asyncio.wait_for(anext(stream), 5) for _ in range(count)]


def test_follower_that_falls_behind_gets_the_state() -> None:
    async def main() -> None:
        monitor = StaticSource()
        monitor._publish(snapshot(ALICE, front="2"))
        follower = Follower(monitor, limit=2)
        monitor._publish(snapshot(ALICE, BOB, front="2"))  # session-started 3
        monitor._publish(snapshot(ALICE, BOB, front="3"))  # seat-switched
        locked_bob = Session("3", 2002, "bob", seat="seat0", vt=6, locked=True)
        monitor._publish(snapshot(ALICE, locked_bob, front="3"))  # session-locked
        (resync,) = await _take(follower, 1)
        assert resync["event"] == "snapshot"
        assert resync["missed"] == 3
        follower.close()
        assert monitor._subscribers == []

    asyncio.run(main())


def test_follower_keeps_order_within_its_limit() -> None:
    async def main() -> None:
        monitor = StaticSource()
        monitor._publish(snapshot(ALICE, front="2"))
        follower = Follower(monitor, limit=10)
        monitor._publish(snapshot(ALICE, BOB, front="2"))
        monitor._publish(snapshot(ALICE, BOB, front="3"))
        events = await _take(follower, 2)
        assert [e["event"] for e in events] == ["session-started", "seat-switched"]

    asyncio.run(main())


def test_utmp_login_before_a_clock_step(tmp_path: Path) -> None:
    """The BOOT_TIME record corrects for a wall clock stepped forward after boot."""
    path = tmp_path / "utmp"
    btime = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    hour = 3600
    login = _record(USER_PROCESS, os.getpid(), "tty1", "root", "", when=time.time() - hour)
    path.write_bytes(login)
    assert read_utmp(str(path)) == []  # no record of the boot: the step is unknown
    path.write_bytes(_record(BOOT_TIME, 0, "~", "reboot", "", when=btime - hour) + login)
    assert [s.tty for s in read_utmp(str(path))] == ["tty1"]


def test_follower_sends_sessions_known_with_the_state() -> None:
    async def main() -> None:
        monitor = StaticSource()
        monitor._publish(snapshot(ALICE, front="2"))
        follower = Follower(monitor, limit=10)
        monitor._publish(Snapshot.unknown(Source.LOGIND, "logind restarts"))
        monitor._publish(snapshot(ALICE, BOB, front="2"))
        unknown, known, started = await _take(follower, 3)
        assert unknown["event"] == "sessions-unknown"
        assert known["event"] == "sessions-known"
        assert [s["id"] for s in known["snapshot"]["sessions"]] == ["2", "3"]
        assert started["event"] == "session-started"

    asyncio.run(main())
