"""The policy through the real CLI: the screen changes hands while alice's tunnel is up.

A simulated logind on a private bus plays the sessions.  bob's background
job probes the private server every 10 ms from start to end; counters on the
shared machine tell whose packets left by the tunnel and by the direct path.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import ALICE, BOB, Lab, puppet
from userbound.lab.logind import LogindPuppet, PrivateBus, SimulatedLogind

pytestmark = pytest.mark.root

ALICE_SESSION = "2"
BOB_SESSION = "3"
BOB_SSH = "4"
# What an application gets when userbound blocks its packet.
BLOCKED = (
    "error: Network is unreachable",
    "error: No route to host",
    "error: Connection refused",
    "error: Operation not permitted",
    "error: Permission denied",
)


@dataclass
class Story:
    """alice's tunnel on a shared machine whose sessions a simulated logind plays."""

    lab: Lab
    bus: PrivateBus
    logind: SimulatedLogind
    tunnel: str = ""
    bob_loop: Path | None = None

    def act(self, play: Callable[[LogindPuppet], Any]) -> None:
        puppet(self.bus.address, play)

    def start(self, policy: str) -> None:
        self.lab.use_policy(
            policy, "--sessions", "logind", env={"DBUS_SYSTEM_BUS_ADDRESS": self.bus.address}
        )
        self.lab.bed.count_by_user([ALICE, BOB])
        self.bob_loop = self.lab.bed.start_probe_loop(BOB, "bob")
        self.act(lambda logind: logind.login(ALICE_SESSION, ALICE, "alice", vt=5, activate=True))
        self.tunnel = self.lab.up_ok(ALICE, self.lab.bed.client_config(self.lab.bed.add_client()))

    def state(self) -> str:
        return str(self.lab.status(self.tunnel)["state"])

    def expect(self, state: str) -> None:
        self.lab.wait_for_state(self.tunnel, state)

    def alice_reaches(self) -> bool:
        """Probe as alice; a blocked probe must fail at once, never leave by the direct path."""
        before = self.lab.bed.through_tunnel()
        result = self.lab.bed.probe(ALICE, "udp", timeout=1.0)
        if result == "ok":
            assert self.lab.bed.through_tunnel() > before
            return True
        assert result in BLOCKED, result
        return False

    def events(self) -> list[dict[str, Any]]:
        result = self.lab.bed.cli(ALICE, "events", "--json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def decisions(self) -> list[tuple[str | None, str, str]]:
        """Return (rule, applied action, state) of each decision event so far."""
        return [
            (e["rule"], e["applied"], e["state"]) for e in self.events() if e["event"] == "decision"
        ]

    def check_nothing_leaked(self) -> None:
        # alice's packets never took the direct path, and bob's never the tunnel.
        assert self.lab.bed.sent(ALICE, "direct") == 0
        assert self.lab.bed.sent(BOB, "tunnel") == 0
        assert self.bob_loop is not None
        results = [r for _, r in self.lab.bed.loop_results(self.bob_loop)]
        assert results, "bob's job probed nothing"
        assert "ok" not in results


@pytest.fixture
def story(lab: Lab, bus: PrivateBus, logind: SimulatedLogind) -> Iterator[Story]:
    yield Story(lab, bus, logind)


async def switch_to_bob(logind: LogindPuppet) -> None:
    await logind.login(BOB_SESSION, BOB, "bob", vt=6)
    await logind.switch("seat0", BOB_SESSION, previous=ALICE_SESSION)


async def switch_to_alice(logind: LogindPuppet) -> None:
    await logind.switch("seat0", ALICE_SESSION, previous=BOB_SESSION)


@pytest.mark.parametrize(
    ("action", "state"),
    [("keep", "up"), ("suspend", "suspended"), ("disconnect", "disconnected")],
)
def test_fast_user_switch(story: Story, action: str, state: str) -> None:
    story.start(f'on_switch_away = "{action}"\n')
    assert story.alice_reaches()

    story.act(switch_to_bob)
    if action == "keep":
        # Nothing is to change: wait for the decision, which says so.
        deadline = time.monotonic() + 10
        while ("on_switch_away", "keep", "up") not in story.decisions():
            assert time.monotonic() < deadline, story.events()
            time.sleep(0.05)
    story.expect(state)
    assert story.alice_reaches() == (action == "keep")
    through = story.lab.bed.through_tunnel()

    story.act(switch_to_alice)
    story.expect("up")
    assert story.alice_reaches()
    assert story.lab.bed.through_tunnel() > through

    decisions = story.decisions()
    assert ("on_switch_away", action, state) in decisions
    # A disconnected tunnel reconnects: its data plane starts again.
    assert decisions[-1] == (None, "keep", "connecting" if action == "disconnect" else "up")
    if action == "disconnect":
        assert story.events()[-1]["event"] == "connected"
    switch = next(e for e in story.events() if e["rule"] == "on_switch_away")
    assert switch["session_event"]["event"] == "seat-switched"
    assert switch["causes"][0]["session"] == BOB_SESSION
    if action != "keep":
        assert switch["latency_ms"] is not None and switch["latency_ms"] > 0
    story.check_nothing_leaked()


def test_the_whole_story(story: Story) -> None:
    story.start(
        'on_switch_away = "suspend"\n'
        'on_lock = "suspend"\n'
        'on_remote_session = "suspend"\n'
        'on_owner_logout = "disconnect"\n'
    )
    lab = story.lab
    assert story.alice_reaches()

    # alice locks her screen, then unlocks it.
    story.act(lambda logind: logind.lock(ALICE_SESSION))
    story.expect("suspended")
    assert not story.alice_reaches()
    story.act(lambda logind: logind.lock(ALICE_SESSION, locked=False))
    story.expect("up")
    assert story.alice_reaches()

    # bob logs in over ssh: a session without a seat.
    story.act(
        lambda logind: logind.login(BOB_SSH, BOB, "bob", seat="", remote=True, remote_host="::1")
    )
    story.expect("suspended")
    assert not story.alice_reaches()
    story.act(lambda logind: logind.logout(BOB_SSH))
    story.expect("up")

    # logind restarts: while sessions are unknown the strictest rule applies.
    story.logind.stop()
    story.expect("disconnected")
    assert not story.alice_reaches()
    story.logind.start(
        sessions=[
            {"Id": ALICE_SESSION, "UID": ALICE, "Name": "alice", "Seat": "seat0", "VTNr": 5}
        ]
    )
    story.act(lambda logind: logind.switch("seat0", ALICE_SESSION))
    story.expect("up")
    assert story.alice_reaches()

    # The daemon is killed in the middle of a fast user switch.
    lab.bed.probe(ALICE, "udp", timeout=0.2)
    story.act(switch_to_bob)
    lab.stop_daemon(signal.SIGKILL)
    # The kernel keeps the rules of the last commit: bob stays out.
    assert lab.bed.probe(BOB, "udp", timeout=0.3) != "ok"
    lab.restart_daemon(
        "--policy",
        str(lab.bed.directory / "policy.toml"),
        "--sessions",
        "logind",
        env={"DBUS_SYSTEM_BUS_ADDRESS": story.bus.address},
    )
    story.expect("suspended")
    assert not story.alice_reaches()
    story.act(switch_to_alice)
    story.expect("up")
    assert story.alice_reaches()

    # alice logs out: the tunnel goes, her kill switch stays until she returns.
    story.act(lambda logind: logind.logout(ALICE_SESSION))
    story.expect("disconnected")
    assert not story.alice_reaches()
    story.act(lambda logind: logind.login("5", ALICE, "alice", vt=5, activate=True))
    story.expect("up")
    assert story.alice_reaches()

    rules = [rule for rule, _, _ in story.decisions()]
    for rule in (
        "on_lock",
        "on_remote_session",
        "sessions_unknown",
        "on_switch_away",
        "on_owner_logout",
    ):
        assert rule in rules
    story.check_nothing_leaked()


def test_bob_sees_only_his_own_events(story: Story) -> None:
    story.start('on_switch_away = "suspend"\n')
    story.act(switch_to_bob)
    story.expect("suspended")

    bob = story.lab.bed.cli(BOB, "events", "--json")
    root = story.lab.bed.cli(0, "events", "--json")

    assert bob.returncode == 0 and bob.stdout == ""
    assert any(json.loads(line)["tunnel"] == story.tunnel for line in root.stdout.splitlines())
    log = story.lab.bed.directory / "state" / "audit.log"
    assert log.stat().st_mode & 0o777 == 0o600
    assert any(json.loads(line)["event"] == "decision" for line in log.read_text().splitlines())
