"""The session monitor against a real dbus-daemon and python-dbusmock's logind.

The simulated logind emits nothing by itself: each test sends what logind
would, or leaves out what logind has been seen to drop, and checks the final
state and the exact events the monitor derived.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dbus_fast import Variant

from conftest import ALICE, BOB, missing_bus_tools
from userbound.lab.logind import (
    SEAT,
    SESSION,
    LogindPuppet,
    PrivateBus,
    SimulatedLogind,
    seat_path,
    session_path,
)
from userbound.sessions.logind import LogindMonitor
from userbound.sessions.model import Event, Snapshot

DIRECTORY_USER = 1_500_000_123  # a large uid, as directory services hand out


class Follower:
    """Collect a monitor's events and wait for it to settle."""

    def __init__(self, monitor: LogindMonitor) -> None:
        self.monitor = monitor
        self.events: list[Event] = []
        monitor.subscribe(self.events.append)

    def take(self) -> list[str]:
        """Return the events so far, each as one short string, and forget them."""
        described = [_short(event) for event in self.events]
        self.events.clear()
        return described

    async def settle(self, reads_before: int, timeout: float = 10.0) -> None:
        """Wait until the monitor read again after a step and has nothing pending."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stable_since, last = loop.time(), -1
        while True:
            reads = self.monitor.reads
            if reads != last or self.monitor.pending:
                stable_since, last = loop.time(), reads
            elif reads > reads_before and loop.time() - stable_since > 0.05:
                return
            assert loop.time() < deadline, "the monitor never settled"
            await asyncio.sleep(0.005)

    async def step(self, action: Awaitable[Any]) -> list[str]:
        before = self.monitor.reads
        await action
        await self.settle(before)
        return self.take()


def _short(event: Event) -> str:
    data = event.to_json()
    if "seat" in data:
        source = data["from"]["id"] if data["from"] else "-"
        target = data["to"]["id"] if data["to"] else "-"
        return f"{data['event']} {data['seat']} {source}>{target}"
    if "session" in data:
        return f"{data['event']} {data['session']['id']}"
    return str(data["event"])


Scenario = Callable[[LogindMonitor, Follower, LogindPuppet], Awaitable[None]]


def play(bus: PrivateBus, scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        monitor = LogindMonitor(bus.address, **options)
        follower = Follower(monitor)
        await monitor.start()
        try:
            async with LogindPuppet.connect(bus.address) as puppet:
                await scenario(monitor, follower, puppet)
        finally:
            await monitor.close()

    asyncio.run(main())


def front(snapshot: Snapshot, seat: str = "seat0") -> str | None:
    session = snapshot.in_front(seat)
    return session.user if session else None


def test_fast_user_switch(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        assert follow.take() == []
        assert await follow.step(logind.login("2", ALICE, "alice", vt=5, activate=True)) == [
            "session-started 2",
            "seat-switched seat0 ->2",
        ]
        assert await follow.step(logind.login("3", BOB, "bob", vt=6)) == ["session-started 3"]
        assert front(monitor.snapshot) == "alice"
        assert await follow.step(logind.switch("seat0", "3", previous="2")) == [
            "seat-switched seat0 2>3"
        ]
        assert front(monitor.snapshot) == "bob"
        assert not monitor.snapshot.sessions["2"].active
        assert monitor.snapshot.sessions["3"].active
        assert await follow.step(logind.switch("seat0", "2", previous="3")) == [
            "seat-switched seat0 3>2"
        ]
        assert front(monitor.snapshot) == "alice"
        assert monitor.snapshot.cause == "signal"
        assert monitor.snapshot.signal_time is not None

    play(bus, scenario)


def test_switch_and_back_coalesced_into_nothing(bus: PrivateBus, logind: SimulatedLogind) -> None:
    """logind may send A->B->A as no change at all: the monitor reports none either."""

    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        await follow.step(logind.login("3", BOB, "bob"))
        follow.take()
        await logind.set_active("seat0", "3")
        await logind.set_active("seat0", "2")
        assert (
            await follow.step(
                logind.emit_properties_changed(seat_path("seat0"), SEAT, ["ActiveSession"])
            )
            == []
        )
        assert front(monitor.snapshot) == "alice"

    play(bus, scenario)


def test_greeter_in_front(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        follow.take()
        # The user switcher shows the greeter: it takes the seat, and never counts as a user.
        steps = logind.login(
            "c1", 110, "lightdm", session_class="greeter", service="lightdm-greeter", activate=True
        )
        assert await follow.step(steps) == ["seat-switched seat0 2>c1"]
        assert monitor.snapshot.in_front("seat0") is not None
        assert monitor.snapshot.in_front("seat0").session_class == "greeter"  # type: ignore[union-attr]
        assert [s.id for s in monitor.snapshot.present_sessions()] == ["2"]
        assert await follow.step(logind.logout("c1")) == ["seat-switched seat0 c1>-"]
        # A lock-screen session is no user either.
        steps = logind.login("c2", 110, "lightdm", session_class="lock-screen", activate=True)
        assert await follow.step(steps) == ["seat-switched seat0 ->c2"]

    play(bus, scenario)


def test_lock_follows_locked_hint_not_the_lock_signal(
    bus: PrivateBus, logind: SimulatedLogind
) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        follow.take()
        assert await follow.step(logind.lock("2")) == ["session-locked 2"]
        assert monitor.snapshot.sessions["2"].locked
        # Many screen lockers never send Unlock: LockedHint alone decides.
        assert await follow.step(logind.lock("2", locked=False, lock_signal=False)) == [
            "session-unlocked 2"
        ]
        # A Lock request that no locker acts on changes nothing.
        lock_request = logind.emit(session_path("2"), SESSION, "Lock")
        assert await follow.step(lock_request) == []
        assert not monitor.snapshot.sessions["2"].locked
        # LockedHint changed with only the Lock signal: the read still finds the change.
        assert await follow.step(logind.lock("2", hint_signal=False)) == ["session-locked 2"]

    play(bus, scenario)


def test_seatless_sessions_are_remote(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        follow.take()
        ssh = logind.login(
            "5",
            BOB,
            "bob",
            seat="",
            session_type="tty",
            remote=True,
            remote_host="192.0.2.7",
            service="sshd",
            tty="pts/1",
        )
        assert await follow.step(ssh) == ["remote-session-started 5"]
        # xrdp: no seat, Remote=no, and Active=yes, as it reports.
        rdp = logind.login("6", DIRECTORY_USER, "carol", seat="", service="xrdp-sesman")
        assert await follow.step(rdp) == ["remote-session-started 6"]
        await logind.set_session("6", Active=True)
        rdp_active = logind.emit_properties_changed(session_path("6"), SESSION, ["Active"])
        assert await follow.step(rdp_active) == []
        snapshot = monitor.snapshot
        assert front(snapshot) == "alice"
        for key in ("5", "6"):
            assert snapshot.sessions[key].remote
            assert not snapshot.sessions[key].active
        assert snapshot.sessions["6"].uid == DIRECTORY_USER
        assert snapshot.sessions["5"].remote_host == "192.0.2.7"
        assert await follow.step(logind.logout("5")) == ["remote-session-ended 5"]
        assert await follow.step(logind.logout("6")) == ["remote-session-ended 6"]

    play(bus, scenario)


def test_session_stuck_in_closing_has_ended(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        await follow.step(logind.login("3", BOB, "bob"))
        follow.take()
        # alice logs out; logind keeps her session in "closing" and never signals State.
        await logind.set_session("2", State="closing", Active=False)
        await logind.set_active("seat0", "")
        changed = logind.emit_properties_changed(seat_path("seat0"), SEAT, ["ActiveSession"])
        assert await follow.step(changed) == ["seat-switched seat0 2>-", "session-ended 2"]
        assert monitor.snapshot.sessions["2"].state == "closing"
        # Much later the session goes away, which gives no second event.
        assert await follow.step(logind.logout("2")) == []

        # bob logs out, and logind still names his closing session in front.
        await follow.step(logind.switch("seat0", "3"))
        follow.take()
        await logind.set_session("3", State="closing")
        closing = logind.emit_properties_changed(session_path("3"), SESSION, ["Active"])
        assert await follow.step(closing) == ["seat-switched seat0 3>-", "session-ended 3"]
        assert monitor.snapshot.in_front("seat0") is None
        assert not monitor.snapshot.sessions["3"].active

    play(bus, scenario)


def test_reused_id_is_another_session(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        follow.take()

        async def replace_alice_by_bob() -> None:
            await logind.remove_session("2")
            await logind.login("2", BOB, "bob", activate=True)

        before = monitor.reads
        await replace_alice_by_bob()
        await follow.settle(before)
        ended, started, switched = (event.to_json() for event in follow.events)
        assert follow.take() == [
            "session-ended 2",
            "session-started 2",
            "seat-switched seat0 2>2",
        ]
        assert started["session"]["user"] == "bob"
        assert switched["from"]["user"] == "alice"
        assert switched["to"]["user"] == "bob"
        assert ended["session"]["user"] == "alice"
        assert started["session"]["timestamp"] != ended["session"]["timestamp"]
        assert front(monitor.snapshot) == "bob"

    play(bus, scenario)


def test_seat_switch_without_the_seat_signal(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        await follow.step(logind.login("3", BOB, "bob"))
        follow.take()
        # The seat's ActiveSession change is dropped, and only the sessions signal Active.
        switch = logind.switch("seat0", "3", previous="2", signal_seat=False)
        assert await follow.step(switch) == ["seat-switched seat0 2>3"]
        assert front(monitor.snapshot) == "bob"

    play(bus, scenario)


def test_silent_switch_found_by_resync(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        await follow.step(logind.login("3", BOB, "bob"))
        follow.take()
        silent = logind.switch("seat0", "3", signal_seat=False, signal_sessions=False)
        assert await follow.step(silent) == ["seat-switched seat0 2>3"]
        assert monitor.snapshot.cause == "resync"

    play(bus, scenario, resync_interval=0.3)


def test_logind_disappears_and_comes_back(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, puppet: LogindPuppet) -> None:
        await follow.step(puppet.login("2", ALICE, "alice", vt=5, activate=True))
        await follow.step(puppet.login("3", BOB, "bob", vt=6))
        follow.take()
        alice_started = monitor.snapshot.sessions["2"].timestamp

        before = monitor.reads
        logind.stop(signal.SIGKILL)
        await follow.settle(before)
        assert follow.take() == ["sessions-unknown"]
        assert not monitor.snapshot.known
        assert "no owner" in monitor.snapshot.reason

        # logind restarts with alice's session, "opening" for a while; bob left meanwhile.
        before = monitor.reads
        await asyncio.to_thread(
            logind.start,
            [
                {
                    "Id": "2",
                    "UID": ALICE,
                    "Name": "alice",
                    "VTNr": 5,
                    "State": "opening",
                    "Active": True,
                    "Timestamp": alice_started,
                }
            ],
        )
        await follow.settle(before)
        assert follow.take() == ["sessions-known", "session-ended 3"]
        assert monitor.snapshot.known
        assert monitor.snapshot.sessions["2"].state == "opening"
        assert front(monitor.snapshot) == "alice"

        # Another restart, which numbers sessions from the start again: id 2 is now bob.
        before = monitor.reads
        logind.stop(signal.SIGKILL)
        await follow.settle(before)
        before = monitor.reads
        bob = {"Id": "2", "UID": BOB, "Name": "bob", "VTNr": 6, "Active": True}
        await asyncio.to_thread(logind.start, [bob])
        await follow.settle(before)
        assert follow.take() == [
            "sessions-unknown",
            "sessions-known",
            "session-ended 2",
            "session-started 2",
            "seat-switched seat0 2>2",
        ]
        assert front(monitor.snapshot) == "bob"

    play(bus, scenario)


def test_lock_outlives_logind_restart(bus: PrivateBus, logind: SimulatedLogind) -> None:
    async def scenario(monitor: LogindMonitor, follow: Follower, puppet: LogindPuppet) -> None:
        await follow.step(puppet.login("2", ALICE, "alice", vt=5, activate=True))
        await follow.step(puppet.login("3", BOB, "bob", vt=6))
        await follow.step(puppet.lock("2"))
        follow.take()
        started = {i: s.timestamp for i, s in monitor.snapshot.sessions.items()}

        before = monitor.reads
        logind.stop()
        await follow.settle(before)
        # elogind saves no LockedHint: once restarted, it calls alice's session unlocked.
        before = monitor.reads
        alice = {"Id": "2", "UID": ALICE, "Name": "alice", "VTNr": 5, "Active": True}
        bob = {"Id": "3", "UID": BOB, "Name": "bob", "VTNr": 6}
        restarted = [alice | {"Timestamp": started["2"]}, bob | {"Timestamp": started["3"]}]
        await asyncio.to_thread(logind.start, restarted)
        await follow.settle(before)
        assert follow.take() == ["sessions-unknown", "sessions-known"]
        assert monitor.snapshot.sessions["2"].locked

        # It stays locked until logind signals its lock state again: alice unlocks.
        unlock = puppet.lock("2", locked=False, lock_signal=False)
        assert await follow.step(unlock) == ["session-unlocked 2"]
        assert await follow.step(puppet.lock("2")) == ["session-locked 2"]

    play(bus, scenario)


def test_no_bus_means_unknown_until_it_appears(tmp_path: Path) -> None:
    missing_bus_tools()
    late_bus = PrivateBus(tmp_path / "late")

    async def main() -> None:
        monitor = LogindMonitor(late_bus.address, retry_first=0.05, retry_max=0.2)
        follower = Follower(monitor)
        await monitor.start()
        try:
            assert not monitor.snapshot.known
            assert late_bus.address in monitor.snapshot.reason
            await asyncio.to_thread(late_bus.start)
            # The bus is back, logind not yet: still unknown, for another reason.
            while "no owner" not in monitor.snapshot.reason:
                await asyncio.sleep(0.01)
            simulated = SimulatedLogind(late_bus)
            await asyncio.to_thread(simulated.start)
            try:
                while not monitor.snapshot.known:
                    await asyncio.sleep(0.01)
                assert follower.take() == ["sessions-known"]
            finally:
                await asyncio.to_thread(simulated.stop)
        finally:
            await monitor.close()
            late_bus.stop()

    asyncio.run(main())


def test_burst_of_a_thousand_sessions(bus: PrivateBus, logind: SimulatedLogind) -> None:
    count = 1000

    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        follow.take()
        before = monitor.reads

        async def start_all() -> None:
            for index in range(count):
                # Half on seat0 behind alice, half from the network.
                seat = "seat0" if index % 2 else ""
                await logind.login(f"b{index}", 10_000 + index, f"u{index}", seat=seat)

        assert sorted(await follow.step(start_all())) == sorted(
            [
                f"{'session' if index % 2 else 'remote-session'}-started b{index}"
                for index in range(count)
            ]
        )
        starting_reads = monitor.reads - before
        assert len(monitor.snapshot.sessions) == count + 1

        async def end_all() -> None:
            for index in range(count):
                await logind.logout(f"b{index}")

        assert sorted(await follow.step(end_all())) == sorted(
            [
                f"{'session' if index % 2 else 'remote-session'}-ended b{index}"
                for index in range(count)
            ]
        )
        assert list(monitor.snapshot.sessions) == ["2"]
        assert front(monitor.snapshot) == "alice"
        # 2,000 signals each way, read again far fewer times.
        assert starting_reads < count / 5, starting_reads

    play(bus, scenario)


def test_idle_hint_alone_starts_no_read(bus: PrivateBus, logind: SimulatedLogind) -> None:
    """Any session may flip its IdleHint at will; that alone must not cost a full read."""

    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        before = monitor.reads
        for _ in range(20):
            await logind.set_session("2", IdleHint=True)
            await logind.emit_properties_changed(session_path("2"), SESSION, ["IdleHint"])
        await asyncio.sleep(0.2)
        assert monitor.reads == before
        # The next read for another reason picks the idle state up.
        assert await follow.step(logind.lock("2")) == ["session-locked 2"]
        assert monitor.snapshot.sessions["2"].idle

    play(bus, scenario)


def test_missing_or_mistyped_property_is_unknown(bus: PrivateBus, logind: SimulatedLogind) -> None:
    """A default in place of a missing uid or lock state could name the wrong person."""

    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        follow.take()
        path = session_path("2")
        await logind.drop_property(path, SESSION, "LockedHint")
        changed = logind.emit_properties_changed(path, SESSION, [], ["LockedHint"])
        assert await follow.step(changed) == ["sessions-unknown"]
        assert monitor.snapshot.reason == f"logind sent {path} without the property LockedHint"

        unlocked = Variant("b", value=False)
        await logind.set_raw(path, SESSION, {"LockedHint": unlocked, "Remote": Variant("s", "no")})
        changed = logind.emit_properties_changed(path, SESSION, [], ["Remote"])
        assert await follow.step(changed) == []
        assert monitor.snapshot.reason == (
            f"logind sent the property Remote of {path} as type 's', not 'b'"
        )

        await logind.set_raw(path, SESSION, {"Remote": Variant("b", value=False)})
        changed = logind.emit_properties_changed(path, SESSION, ["Remote"])
        assert await follow.step(changed) == ["sessions-known"]
        assert front(monitor.snapshot) == "alice"

    play(bus, scenario)


def test_invalid_bus_address_is_unknown() -> None:
    async def main() -> Snapshot:
        monitor = LogindMonitor("garbage", retry_first=10)
        await asyncio.wait_for(monitor.start(), 10)
        await monitor.close()
        return monitor.snapshot

    snapshot = asyncio.run(main())
    assert not snapshot.known
    assert snapshot.reason.startswith("cannot connect to the system bus at garbage: ")


def test_unknown_state_is_read_again(bus: PrivateBus, logind: SimulatedLogind) -> None:
    """While unknown, the monitor reads again with backoff, not only on a signal."""

    async def scenario(monitor: LogindMonitor, follow: Follower, logind: LogindPuppet) -> None:
        await follow.step(logind.login("2", ALICE, "alice", activate=True))
        path = session_path("2")
        await logind.drop_property(path, SESSION, "LockedHint")
        await follow.step(logind.emit_properties_changed(path, SESSION, [], ["LockedHint"]))
        assert not monitor.snapshot.known
        follow.take()
        # logind recovers without sending any signal.
        await logind.set_raw(path, SESSION, {"LockedHint": Variant("b", value=True)})
        async with asyncio.timeout(5):
            while not monitor.snapshot.known:
                await asyncio.sleep(0.05)
        assert follow.take() == ["sessions-known", "session-locked 2"]

    play(bus, scenario, retry_first=0.1)
