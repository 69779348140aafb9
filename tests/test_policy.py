"""The policy through the real CLI: the screen changes hands while alice's tunnel is up.

A simulated logind on a private bus plays the sessions.  bob's background
job probes the private server every 10 ms from start to end.  Counters on the
shared machine show whose packets left by the tunnel and by the direct path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import ALICE, BOB, Lab, kernel_state, puppet
from userbound.errors import EXIT_NOT_FOUND, EXIT_NOT_PERMITTED, EXIT_USAGE
from userbound.lab.logind import LogindPuppet, PrivateBus, SimulatedLogind
from userbound.lab.testbed import PRIVATE_V4, USERBOUND

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
        # bob's job runs from the start: wait for its first probe.
        deadline = time.monotonic() + 15
        while not self.lab.bed.loop_results(self.bob_loop):
            assert time.monotonic() < deadline, "bob's job never probed"
            time.sleep(0.02)
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
        # The tunnel stays up: wait for the decision to keep it.
        deadline = time.monotonic() + 10
        while ("on_switch_away", "keep", "up") not in story.decisions():
            assert time.monotonic() < deadline, story.events()
            time.sleep(0.05)
    story.expect(state)
    assert story.alice_reaches() == (action == "keep")
    if action != "keep":
        # DNS too: a query redirected to the tunnel's resolver must not pass.
        before = story.lab.bed.through_tunnel()
        for server in (PRIVATE_V4, "10.200.1.1"):
            assert story.lab.bed.probe(ALICE, "dns", server, timeout=1.0) in BLOCKED
        assert story.lab.bed.through_tunnel() == before
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


def test_policy_whole_story(story: Story) -> None:
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
        sessions=[{"Id": ALICE_SESSION, "UID": ALICE, "Name": "alice", "Seat": "seat0", "VTNr": 5}]
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

    assert bob.returncode == 0
    assert bob.stdout == ""
    assert any(json.loads(line)["tunnel"] == story.tunnel for line in root.stdout.splitlines())
    log = story.lab.bed.directory / "state" / "audit.log"
    assert log.stat().st_mode & 0o777 == 0o600
    assert any(json.loads(line)["event"] == "decision" for line in log.read_text().splitlines())


def test_grace_period_absorbs_a_quick_switch(story: Story) -> None:
    story.start('on_switch_away = "suspend"\ngrace_period = 2\n')

    story.act(switch_to_bob)
    time.sleep(0.3)
    assert story.state() == "up"
    pending = story.lab.status(story.tunnel)["policy"]
    assert pending["pending"] == "suspend"
    story.act(switch_to_alice)
    time.sleep(2.5)
    assert story.state() == "up"

    # A switch that lasts longer than the grace period suspends.
    story.act(lambda logind: logind.switch("seat0", BOB_SESSION, previous=ALICE_SESSION))
    story.expect("suspended")
    story.check_nothing_leaked()


def test_user_cannot_loosen_the_policy(story: Story) -> None:
    story.start('on_switch_away = "suspend"\n')
    path = story.lab.bed.write_config(story.lab.bed.client_config(story.lab.bed.add_client()), BOB)
    before = kernel_state(story.lab.bed.host)

    for option in (
        "--on-switch-away=keep",
        "--no-kill-switch",
        "--grace-period=5",
        "--scope=system",
    ):
        result = story.lab.bed.cli(BOB, "up", str(path), "--name", "ubloose", option)
        assert result.returncode == EXIT_NOT_PERMITTED, (option, result.stderr)
        assert "looser than the policy" in result.stderr

    assert kernel_state(story.lab.bed.host) == before
    stricter = story.lab.bed.cli(ALICE, "status", story.tunnel, "--json")
    settings = json.loads(stricter.stdout)["tunnels"][0]["settings"]
    assert settings["on_switch_away"] == {"value": "suspend", "source": "policy"}
    assert settings["on_lock"] == {"value": "keep", "source": "default"}


def test_remote_owner_refused_when_the_policy_says_so(story: Story) -> None:
    story.start("allow_remote_owner = false\n")
    story.act(
        lambda logind: logind.login(BOB_SSH, BOB, "bob", seat="", remote=True, remote_host="::1")
    )
    path = story.lab.bed.write_config(story.lab.bed.client_config(story.lab.bed.add_client()), BOB)

    result = story.lab.bed.cli(BOB, "up", str(path), "--name", "ubremote")

    assert result.returncode == EXIT_NOT_PERMITTED
    assert "no local session" in result.stderr


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ('on_lock = "pause"\n', "on_lock: invalid value 'pause'"),
        ("grace = 5\n", "grace: unknown setting"),
        ('[users.alice]\non_owner_logout = "suspend"\n', "users.alice.on_owner_logout"),
        ("kill_switch = \n", "not valid TOML"),
    ],
)
def test_invalid_policy_refused(lab: Lab, policy: str, words: str) -> None:
    path = lab.bed.directory / "bad-policy.toml"
    path.write_text(policy)
    lab.stop_daemon()

    result = subprocess.run(
        [
            *lab.bed.prefix_command(lab.bed.host),
            str(USERBOUND),
            "daemon",
            "--policy",
            str(path),
            "--control-socket",
            str(lab.bed.control_socket),
            "--state-dir",
            str(lab.bed.directory / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == EXIT_USAGE, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "userbound"
        not in subprocess.run(
            ["ip", "netns", "exec", lab.bed.host, "nft", "list", "tables"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def test_reload_invalid_file_keeps_policy(story: Story) -> None:
    path = story.lab.bed.directory / "policy.toml"
    story.start('on_switch_away = "keep"\n')

    path.write_text('on_switch_away = "pause"\n')
    story.lab.daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "keeping the previous policy" not in story.lab.bed.daemon_log():
        assert time.monotonic() < deadline, story.lab.bed.daemon_log()
        time.sleep(0.05)
    story.act(switch_to_bob)
    time.sleep(0.5)
    assert story.state() == "up"

    path.write_text('on_switch_away = "suspend"\n')
    story.lab.daemon.send_signal(signal.SIGHUP)
    story.expect("suspended")
    events = story.events()
    assert any(e["event"] == "decision" and e["trigger"] == "policy reloaded" for e in events)


def test_no_reconnect_waits_for_resume(story: Story) -> None:
    story.start('on_switch_away = "suspend"\non_lock = "disconnect"\nreconnect_on_return = false\n')
    story.act(switch_to_bob)
    story.expect("suspended")

    early = story.lab.bed.cli(ALICE, "resume", story.tunnel)
    assert early.returncode == EXIT_NOT_PERMITTED
    assert "seat0 shows" in early.stderr
    story.act(switch_to_alice)
    time.sleep(0.5)
    assert story.state() == "suspended"
    resumed = story.lab.bed.cli(ALICE, "resume", story.tunnel)
    assert resumed.returncode == 0, resumed.stderr
    assert story.state() == "up"
    assert story.alice_reaches()

    # Without reconnect_on_return, a disconnect removes the tunnel.
    story.act(lambda logind: logind.lock(ALICE_SESSION))
    deadline = time.monotonic() + 10
    while story.lab.bed.cli(0, "status", story.tunnel).returncode != EXIT_NOT_FOUND:
        assert time.monotonic() < deadline, story.lab.bed.daemon_log()
        time.sleep(0.05)
    assert story.events()[-1]["state"] == "removed"
    story.check_nothing_leaked()


def test_system_scope_lets_everyone_in(lab: Lab) -> None:
    lab.bed.count_by_user([BOB])
    path = lab.bed.write_config(lab.bed.client_config(lab.bed.add_client()), 0)
    name = lab.bed.tunnel_name()

    shared = lab.bed.cli(0, "up", str(path), "--name", name, "--scope", "system")

    assert shared.returncode == 0, shared.stderr
    # The control case: a tunnel for every uid carries bob's packets too.
    assert lab.bed.probe(BOB, "udp") == "ok"
    assert lab.bed.sent(BOB, "tunnel") > 0
    assert lab.status(name)["allowed_uids"] == "all"


def test_reload_narrows_a_request(lab: Lab) -> None:
    path = lab.use_policy("allow_users = [2002, 2003]\n")
    name = lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()), "--allow", str(BOB))
    assert lab.status(name)["allowed_uids"] == [ALICE, BOB]

    # The new policy no longer lets bob in, and the request never named 2003.
    path.write_text("allow_users = [2003]\n")
    lab.daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while lab.status(name)["allowed_uids"] != [ALICE]:
        assert time.monotonic() < deadline, lab.status(name)
        time.sleep(0.05)
    events = lab.bed.cli(ALICE, "events", "--json").stdout.splitlines()
    narrowed = [e for e in map(json.loads, events) if e["event"] == "settings-narrowed"]
    assert narrowed[-1]["tunnel"] == name
    assert narrowed[-1]["keys"] == ["allow_users"]


def test_reload_starts_a_grace_period(story: Story) -> None:
    path = story.lab.bed.directory / "policy.toml"
    story.start("")
    story.act(switch_to_bob)
    time.sleep(0.3)

    path.write_text('on_switch_away = "suspend"\ngrace_period = 1\n')
    story.lab.daemon.send_signal(signal.SIGHUP)

    # No session event follows: the end of the grace period alone applies it.
    story.expect("suspended")
    last = [e for e in story.events() if e["event"] == "decision"][-1]
    assert last["trigger"] == "grace period"


def test_remote_owner_without_local_session_refused(story: Story) -> None:
    story.start("allow_remote_owner = false\n")
    path = story.lab.bed.write_config(story.lab.bed.client_config(story.lab.bed.add_client()), BOB)

    # bob has no session at all, as a job started by cron.
    result = story.lab.bed.cli(BOB, "up", str(path), "--name", "ubnosess")

    assert result.returncode == EXIT_NOT_PERMITTED
    assert "no local session" in result.stderr


def test_restart_keeps_tunnel_with_stale_request(lab: Lab) -> None:
    lab.use_policy("allow_users = [2002, 2003]\n")
    name = lab.up_ok(
        ALICE,
        lab.bed.client_config(lab.bed.add_client()),
        "--on-lock",
        "suspend",
        "--allow",
        "2002",
    )
    lab.stop_daemon(signal.SIGKILL)
    # The request names a user who has left since, besides bob.
    state = lab.bed.directory / "state" / "tunnels.json"
    stored = json.loads(state.read_text())
    stored["tunnels"][0]["request"]["allow_users"] = ["ub-deleted-user", BOB]
    state.write_text(json.dumps(stored))

    lab.restart_daemon("--policy", str(lab.bed.directory / "policy.toml"))

    tunnel = lab.status(name)
    assert tunnel["state"] == "up"
    assert tunnel["settings"]["on_lock"] == {"value": "suspend", "source": "request"}
    # Only bob: the deleted user admits no one, and the policy's 2003 stays out.
    assert tunnel["allowed_uids"] == [ALICE, BOB]
    assert "ub-deleted-user" in lab.bed.daemon_log()


def test_state_file_failure_still_suspends(story: Story) -> None:
    story.start('on_lock = "suspend"\n')
    blocker = story.lab.bed.directory / "state" / "tunnels.tmp"
    blocker.mkdir()

    story.act(lambda logind: logind.lock(ALICE_SESSION))

    story.expect("suspended")
    assert not story.alice_reaches()
    assert "cannot write the state file" in story.lab.bed.daemon_log()
    blocker.rmdir()
