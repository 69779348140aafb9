"""`userbound lab`: the problem userbound solves, played on a shared machine in namespaces.

The lab builds a testbed (testbed.py), the logins (logins.py: a simulated
logind on a private system bus, or real elogind from a chroot) and the real
daemon, then plays the story of story.py: alice (uid 2001) connects her
tunnel, bob (uid 2002) takes the screen, alice locks it, logind restarts,
she unlocks, bob logs in over ssh, alice logs out.  The machine has no accounts for
them: with a simulated logind they are bare uids, with real elogind they
exist only in its chroot.  Counters at the private server and on the public
side show whose packets got through after each step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from userbound.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LAB_BROKEN,
    EXIT_NOT_PERMITTED,
    EXIT_OK,
    EXIT_USAGE,
    InvalidRequest,
    UserboundError,
)
from userbound.lab.elogind import check_free, unavailable_reason
from userbound.lab.logins import Logins, RealLogins, SimulatedLogins
from userbound.lab.report import Timeline, write_plot
from userbound.lab.story import (
    ALICE,
    BOB,
    PRIVATE_PAGE,
    USERS,
    Check,
    Expectation,
    Fetch,
    Step,
    fetch_check,
    packet_checks,
    story,
)
from userbound.lab.testbed import Testbed, remove_leftovers
from userbound.policy import Policy, Rule, Settings, effective, load_policy
from userbound.protocol import call, stream

PREFIX = "userbound-lab"
# The DSCP value the shared machine writes into each user's packets, so
# that the private server and the public side can tell them apart.
TAGS = {ALICE: 10, BOB: 18}
WINDOW = 1.0  # seconds of packets counted after each step settles
PROBE_INTERVAL = 0.01
SAMPLE_INTERVAL = 0.1
SETTLE_TIMEOUT = 10.0
NO_DECISION_WAIT = 0.2  # seconds to watch for a decision that should not come
NO_ACCOUNTS = (
    "alice and bob have no accounts on this machine (with --real-logind, only inside its "
    f"chroot): name them by uid, as in [users.{ALICE}] or allow_users = [{BOB}]"
)
TOOLS = ("ip", "nft", "wg", "wireguard-go", "setpriv", "curl", "dbus-daemon")


@dataclass
class Options:
    policy: Path | None = None
    json_output: bool = False
    plot: Path | None = None
    without_userbound: bool = False
    keep: bool = False
    real_logind: bool = False


class LabError(Exception):
    """An error that stops the lab from being built or played; its message names the cause."""


def _progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def run_lab(options: Options) -> int:
    """Build the lab, play the story, report, and remove everything; return the exit code."""
    if os.geteuid() != 0:
        print("userbound lab: run as root (it creates network namespaces)", file=sys.stderr)
        return EXIT_NOT_PERMITTED
    try:
        settings, source = _settings(options.policy)
        _check_plot_path(options.plot)
        _check_tools(real_logind=options.real_logind)
    except UserboundError as error:
        print(f"userbound lab: {error.message}", file=sys.stderr)
        if "'alice'" in error.message or "'bob'" in error.message:
            print(f"userbound lab: {NO_ACCOUNTS}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as error:
        print(f"userbound lab: {error}", file=sys.stderr)
        return EXIT_LAB_BROKEN
    # SIGTERM and SIGHUP end the lab as Ctrl-C does, through the cleanup below.
    previous = {
        number: signal.signal(number, signal.default_int_handler)
        for number in (signal.SIGTERM, signal.SIGHUP)
    }
    report: dict[str, Any] | None = None
    try:
        removed = remove_leftovers(PREFIX)
        if removed:
            _progress(f"removed {len(removed)} namespaces of an earlier run, and its processes")
        with _Lab(options, settings, source) as lab:
            report = lab.play()
            _write_report(report, options)
            if options.keep:
                lab.wait_for_interrupt()
    except KeyboardInterrupt:
        _progress("interrupted; the lab is removed")
        if report is None:
            return EXIT_INTERRUPTED
    except (LabError, RuntimeError, OSError, subprocess.SubprocessError) as error:
        print(f"userbound lab: {error}", file=sys.stderr)
        return EXIT_LAB_BROKEN
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return EXIT_OK if report["passed"] else EXIT_FAILED


def _write_report(report: dict[str, Any], options: Options) -> None:
    if options.json_output:
        print(json.dumps(report, indent=2), flush=True)
    if options.plot is not None:
        try:
            write_plot(options.plot, report)
        except OSError as error:
            raise LabError(f"cannot write --plot {options.plot}: {error.strerror}") from None
        _progress(f"timeline drawn in {options.plot}")


def _settings(path: Path | None) -> tuple[Settings, str]:
    """Return alice's settings under the policy, and where they come from."""
    if path is None:
        return effective(Policy(), ALICE, {}, privileged=False), "built-in defaults"
    if not str(path).strip() or str(path) == ".":
        raise InvalidRequest("--policy needs the path of a policy file")
    policy = load_policy(path, required=True)
    for warning in policy.warnings:
        _progress(f"policy: {warning}")
    if any(name in policy.users for name in USERS.values()):
        _progress(NO_ACCOUNTS)
    return effective(policy, ALICE, {}, privileged=False), str(path)


def _check_plot_path(path: Path | None) -> None:
    """Reject a --plot path that cannot take the drawing, before anything is built."""
    if path is None:
        return
    folder = path.parent
    if not folder.is_dir():
        raise InvalidRequest(f"--plot {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise InvalidRequest(f"--plot {path} is a folder; give a file name such as lab.svg")
    if not path.name.endswith(".svg"):
        raise InvalidRequest(f"--plot {path}: the drawing is SVG; give a name ending in .svg")
    existed = path.exists()
    try:
        # Append mode: an existing file keeps its content until the drawing replaces it.
        with path.open("a"):
            pass
    except OSError as error:
        raise InvalidRequest(f"--plot {path}: cannot write it: {error.strerror}") from None
    if not existed:
        path.unlink()


def _check_tools(*, real_logind: bool) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if importlib.util.find_spec("dbusmock") is None and not real_logind:
        missing.append("python-dbusmock")
    if missing:
        raise LabError(f"missing {', '.join(missing)}; scripts/install installs what the lab needs")
    if real_logind:
        reason = unavailable_reason()
        if reason is not None:
            raise LabError(f"--real-logind: {reason}")
        try:
            check_free()
        except RuntimeError as error:
            raise LabError(f"--real-logind: {error}") from None


@dataclass
class _Result:
    """The outcome of one step: times, states, packet counts and checks."""

    step: Step
    started: float
    settled: float
    ended: float
    expected_state: str
    state: str
    because: str
    decision: dict[str, Any] | None
    arrived: dict[str, dict[int, int]]
    # Whether the step brings a stricter state than the one before.
    stricter: bool = False
    # The expected state before the step, and while logind was away during it.
    previous_state: str = "-"
    while_away: str | None = None
    decides: bool = False
    # Every decision the daemon announced from the action to the window's end.
    decisions: list[dict[str, Any]] = field(default_factory=list)
    fetches: list[Check] = field(default_factory=list)
    # The tunnel's state and the packet counts.
    checks: list[Check] = field(default_factory=list)

    @property
    def all_checks(self) -> list[Check]:
        return self.checks + self.fetches


class _Lab:
    """One run: the testbed, the bus, logind, the daemon, and the story's results."""

    def __init__(self, options: Options, settings: Settings, source: str) -> None:
        self.options = options
        self.settings = settings
        self.source = source
        self.expectation = Expectation(settings)
        self.bed = Testbed(PREFIX)
        self.logins: Logins = (
            RealLogins(self.bed, _progress) if options.real_logind else SimulatedLogins(self.bed)
        )
        self._logins_started = False
        self._expected = "-"  # the state the last step should have left
        self.tunnel = self.bed.tunnel_name()
        self.start = time.monotonic()
        self.samples: list[tuple[float, dict[str, dict[int, int]]]] = []
        self.events: list[dict[str, Any]] = []
        self._events_changed = threading.Condition()
        self._stop = threading.Event()
        self.timeline = Timeline(
            sys.stderr if options.json_output else sys.stdout,
            without_userbound=options.without_userbound,
            command="userbound lab --real-logind" if options.real_logind else "userbound lab",
        )

    @property
    def userbound(self) -> bool:
        return not self.options.without_userbound

    # Building and removing

    def __enter__(self) -> _Lab:
        try:
            self._build()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _build(self) -> None:
        _progress("building namespaces: shared machine, public side, VPN server, private server")
        self.bed.build()
        self.bed.count_arrivals(TAGS)
        self.bed.reject_private_network()
        if self.options.real_logind:
            _progress(
                "starting elogind, dbus-daemon and sshd from the chroot on the shared machine"
            )
        else:
            _progress("starting a private system bus and a simulated logind on the shared machine")
        self._logins_started = True
        self.logins.start()
        if self.userbound:
            _progress("starting the userbound daemon on the shared machine")
            extra = ["--sessions", "logind"]
            if self.options.policy is not None:
                extra += ["--policy", str(self.options.policy.resolve())]
            self.bed.start_daemon(*extra, env={"DBUS_SYSTEM_BUS_ADDRESS": self.logins.address})
            threading.Thread(target=self._follow_events, daemon=True).start()
        else:
            _progress("without userbound: alice's VPN will be a system-wide wireguard-go tunnel")
        threading.Thread(target=self._sample, daemon=True).start()

    def _remove(self) -> None:
        self._stop.set()
        # A second Ctrl-C, or a signal sent to the whole process group, must not cut it short.
        ignored = {
            number: signal.signal(number, signal.SIG_IGN)
            for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            _progress("removing the lab")
            try:
                if self._logins_started:
                    self.logins.stop()
            finally:
                self.bed.destroy()
        finally:
            for number, handler in ignored.items():
                signal.signal(number, handler)

    def wait_for_interrupt(self) -> None:
        self._stop.set()
        host, socket = self.bed.host, self.bed.control_socket
        _progress(f"kept running, until Ctrl-C: namespaces {', '.join(self.bed.namespaces)}")
        if self.userbound:
            _progress(
                f"  as alice: ip netns exec {host} setpriv --reuid={ALICE} --regid={ALICE} "
                f"--clear-groups userbound --control-socket {socket} status"
            )
        _progress(f"  files, logs and state: {self.bed.directory}")
        _progress(f"  logind's bus: DBUS_SYSTEM_BUS_ADDRESS={self.logins.address}")
        while True:
            time.sleep(3600)

    # Watching

    def _follow_events(self) -> None:
        with contextlib.suppress(UserboundError, OSError, ValueError):
            replies = stream(str(self.bed.control_socket), "watch-events", {})
            next(replies)
            for event in replies:
                with self._events_changed:
                    self.events.append(event)
                    self._events_changed.notify_all()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                self.samples.append((self.now(), self.bed.arrivals()))

    def now(self) -> float:
        return time.monotonic() - self.start

    # The story

    def play(self) -> dict[str, Any]:
        """Play the story, printing each step as it ends; return the report."""
        self.timeline.header(self.settings, self.source, round(PROBE_INTERVAL * 1000), WINDOW)
        if self.settings.grace_period and self.userbound:
            _progress(
                f"grace_period = {self.settings.grace_period:g} s: each stricter step waits "
                "that long for the daemon's decision"
            )
        bob_job = self.bed.start_probe_loop(BOB, "bob-job", interval=PROBE_INTERVAL)
        self._wait_for_first_probe(bob_job, "bob's job")

        results = []
        steps = story(
            self.tunnel,
            bob_remote_counts=self.expectation.bob_remote_counts,
            userbound=self.userbound,
        )
        rules = frozenset[Rule]()
        for step in steps:
            # The daemon decides only when the rules that hold change, and not for a removed tunnel.
            decides = step.key != "up" and step.rules != rules and not self.expectation.removed
            rules = step.rules
            result = self._play_step(step, decides=decides)
            results.append(result)
            self.timeline.step(
                result.step.title,
                result.step.seat,
                result.started,
                result.state,
                result.arrived,
                result.checks,
                result.fetches,
            )

        total = self.bed.arrivals()
        whole_run = []
        if self.settings.kill_switch and not self.expectation.removed:
            # Also between the windows: while the tunnel reconnects, only the kill switch blocks.
            count = total["public"].get(ALICE, 0)
            whole_run.append(
                Check(
                    "alice's packets on the public side over the whole story",
                    "0",
                    str(count),
                    count == 0,
                    "alice's packets for the private network left outside her tunnel",
                )
            )
        if not self.expectation.bob_admitted:
            count = total["private"].get(BOB, 0)
            whole_run.append(
                Check(
                    "bob's packets at the private server over the whole story",
                    "0",
                    str(count),
                    count == 0,
                    "alice's tunnel carried another user's packets",
                )
            )
        report = self._report(results, whole_run, total)
        self.timeline.summary(report)
        return report

    def _wait_for_first_probe(self, output: Path, who: str) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not self.bed.loop_results(output):
            if time.monotonic() > deadline:
                raise LabError(f"{who} never probed the private server")
            time.sleep(0.01)

    def _play_step(self, step: Step, *, decides: bool) -> _Result:
        """Act a step, wait until the tunnel settles, then count packets for WINDOW seconds."""
        seen = len(self.events)
        started = self.now()
        self._act(step)
        before_rank = self.expectation.action.rank
        expected = self.expectation.advance(step) if step.tunnel_exists else "-"
        stricter = self.expectation.action.rank > before_rank
        previous, self._expected = self._expected, expected
        away = self.expectation.while_away
        if away is not None and away != previous:
            # sessions_unknown changes the tunnel, and the return changes it again.
            decides = True
        decision = None
        if self.userbound and step.tunnel_exists:
            if decides:
                decision = self._wait_for_decision(seen)
            else:
                # No decision should come; give a wrong one the time to show.
                time.sleep(NO_DECISION_WAIT)
            state = self._wait_for_state(expected)
        else:
            # Nothing reacts to sessions: the system-wide tunnel stays up throughout.
            time.sleep(0.05)
            state = "up" if step.tunnel_exists else "-"
        settled = self.now()

        # The curls run during the window, one after another, and may outlast it.
        before = self.bed.arrivals()
        outcomes: list[str] = []
        fetching = threading.Thread(target=lambda: outcomes.extend(self._fetch_all(step.fetches)))
        fetching.start()
        time.sleep(max(0.0, WINDOW - (self.now() - settled)))
        after = self.bed.arrivals()
        fetching.join()
        if self.userbound and step.tunnel_exists:
            # The state must hold through the window, not only at its start.
            final = self._state()
            if final != state:
                state = f"{state}, then {final}"
        arrived = {
            place: {uid: after[place].get(uid, 0) - before[place].get(uid, 0) for uid in USERS}
            for place in after
        }
        result = _Result(
            step,
            started,
            settled,
            self.now(),
            expected,
            state,
            self.expectation.because,
            decision,
            arrived,
            stricter,
            previous,
            away,
            decides,
            [e for e in self.events[seen:] if e.get("event") == "decision"],
        )
        result.checks = self._judge(result)
        result.fetches = [
            fetch_check(self.expectation, fetch, expected, outcome)
            for fetch, outcome in zip(step.fetches, outcomes, strict=True)
        ]
        return result

    def _judge(self, result: _Result) -> list[Check]:
        checks = []
        if not result.step.tunnel_exists:
            count = result.arrived["private"][BOB]
            why = "bob's packets reached the private network before any tunnel existed"
            checks.append(
                Check(
                    "bob's packets at the private server",
                    "0",
                    str(count),
                    count == 0,
                    why,
                    ("private", BOB),
                )
            )
            return checks
        held = result.state == result.expected_state
        why = result.because
        checks.append(Check("tunnel state", result.expected_state, result.state, held, why))
        grace = self.settings.grace_period
        if grace and self.userbound and result.stricter:
            waited = result.settled - result.started
            checks.append(
                Check(
                    "the stricter state waited for the grace period",
                    f">= {grace:g} s",
                    f"{waited:.2f} s",
                    waited >= grace,
                    f"grace_period = {grace:g} should hold the action back that long",
                )
            )
        if self.userbound and result.step.key != "up":
            checks += self._judge_decisions(result)
        checks += packet_checks(self.expectation, result.expected_state, result.arrived)
        return checks

    def _judge_decisions(self, result: _Result) -> list[Check]:
        """Check the states the daemon's decisions gave the tunnel during a step.

        A step that changes no rule must bring no other state. While logind
        is away, sessions_unknown applies unless a grace period covers it.
        """
        observed = "; ".join(
            f"{d.get('rule') or 'no rule'} -> {d.get('state')}" for d in result.decisions
        )
        states = {d.get("state") for d in result.decisions}
        expected, previous, away = result.expected_state, result.previous_state, result.while_away
        if result.step.logind_away:
            what = "decisions while logind was away"
            if away is not None and away != previous:
                action = self.settings.action(Rule.UNKNOWN).value
                held = any(
                    d.get("rule") == Rule.UNKNOWN.value and d.get("state") == away
                    for d in result.decisions
                )
                why = f"sessions_unknown = {action} should apply while logind is away"
                return [Check(what, f"sessions_unknown -> {away}", observed, held, why)]
            grace = self.settings.grace_period
            why = "the daemon changed the tunnel although the rules that hold did not change"
            if grace:
                why = f"grace_period = {grace:g} s should let a logind restart pass"
            held = states <= {previous, expected}
            return [Check(what, f"none that leaves {expected}", observed or "none", held, why)]
        if result.decides:
            return []
        held = states <= {expected}
        why = "the daemon changed the tunnel although the rules that hold did not change"
        return [Check("decisions", f"none that leaves {expected}", observed or "none", held, why)]

    def _act(self, step: Step) -> None:
        if step.key == "up":
            self._bring_up()
        else:
            self.logins.act(step.key)

    def _bring_up(self) -> None:
        client = self.bed.add_client()
        if self.userbound:
            path = self.bed.write_config(self.bed.client_config(client), ALICE, "corp.conf")
            result = self.bed.cli(ALICE, "up", str(path), "--name", self.tunnel)
            if result.returncode != 0:
                raise LabError(f"alice's `userbound up` failed: {result.stderr.strip()}")
        else:
            self.bed.start_plain_tunnel(client, self.tunnel)
        # alice's mail client syncs all along from now on.
        alice_job = self.bed.start_probe_loop(ALICE, "alice-job", interval=PROBE_INTERVAL)
        self._wait_for_first_probe(alice_job, "alice's job")

    def _wait_for_decision(self, seen: int) -> dict[str, Any] | None:
        """Wait for the daemon's decision on a session change; None if none came."""
        timeout = SETTLE_TIMEOUT + self.settings.grace_period
        deadline = time.monotonic() + timeout
        with self._events_changed:
            while True:
                decisions = [e for e in self.events[seen:] if e.get("event") == "decision"]
                if decisions and not decisions[-1].get("pending"):
                    return decisions[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    return decisions[-1] if decisions else None
                self._events_changed.wait(left)

    def _wait_for_state(self, expected: str) -> str:
        """Wait until the tunnel is in the expected state, or the timeout; return its state."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            state = self._state()
            if state == expected or time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def _state(self) -> str:
        tunnels = call(str(self.bed.control_socket), "status", {})["tunnels"]
        for tunnel in tunnels:
            if tunnel["name"] == self.tunnel:
                return str(tunnel["state"])
        return "removed"

    def _fetch_all(self, fetches: tuple[Fetch, ...]) -> list[str]:
        """Run users' curls for the private page; return `page` or `blocked: REASON` for each.

        One after another: two connections opened at once through one
        wireguard-go tunnel sometimes failed to connect here (2 of 80 pairs).
        """
        outcomes = []
        for fetch in fetches:
            argv = ["curl", "-sS", "--max-time", "2"]
            if fetch.on_tunnel:
                # "if!": an interface name, never looked up as a host name once the tunnel is gone.
                argv += ["--interface", f"if!{self.tunnel}"]
            try:
                result = None
                if fetch.over_ssh:
                    result = self.logins.over_ssh(fetch.uid, [*argv, PRIVATE_PAGE])
                if result is None:
                    result = subprocess.run(
                        [*self.bed.prefix_command(self.bed.host, fetch.uid), *argv, PRIVATE_PAGE],
                        capture_output=True,
                        text=True,
                        timeout=10,
                        check=False,
                    )
            except subprocess.TimeoutExpired:
                outcomes.append("blocked: curl did not end within 10 s")
                continue
            if result.returncode == 0 and result.stdout.strip() == "private":
                outcomes.append("page")
                continue
            lines = result.stderr.strip().splitlines()
            reason = f"curl exited {result.returncode}"
            if lines:
                reason = lines[-1].removeprefix("curl: ")
            outcomes.append(f"blocked: {reason}")
        return outcomes

    # The report

    def _report(
        self, results: list[_Result], whole_run: list[Check], total: dict[str, dict[int, int]]
    ) -> dict[str, Any]:
        checks = [c for r in results for c in r.all_checks] + whole_run
        failed = [c for c in checks if not c.held]
        return {
            "mode": "userbound" if self.userbound else "without-userbound",
            "logind": self.logins.kind,
            "policy": {"source": self.source, "settings": self.settings.to_json()},
            "tunnel": self.tunnel,
            "users": {name: uid for uid, name in USERS.items()},
            "window_s": WINDOW,
            "steps": [_step_json(r) for r in results],
            "whole_run": [c.to_json() for c in whole_run],
            "totals": {
                place: {USERS[uid]: count for uid, count in counts.items()}
                for place, counts in total.items()
            },
            "samples": [
                {
                    "time": round(moment, 3),
                    **{
                        place: {USERS[uid]: count for uid, count in counts.items()}
                        for place, counts in arrived.items()
                    },
                }
                for moment, arrived in self.samples
            ],
            "checks": len(checks),
            "failed": [c.to_json() for c in failed],
            "passed": not failed,
            "duration_s": round(self.now(), 2),
        }


def _step_json(result: _Result) -> dict[str, Any]:
    decision = None
    if result.decision is not None:
        decision = {
            key: result.decision.get(key)
            for key in ("rule", "action", "applied", "state", "reason", "latency_ms")
        }
    return {
        "step": result.step.key,
        "title": result.step.title,
        "seat0": result.step.seat,
        "started": round(result.started, 3),
        "settled": round(result.settled, 3),
        "ended": round(result.ended, 3),
        "expected_state": result.expected_state,
        "state": result.state,
        "because": result.because if result.step.tunnel_exists else None,
        "decision": decision,
        "decisions": [
            {key: d.get(key) for key in ("rule", "action", "state", "trigger")}
            for d in result.decisions
        ],
        "packets": {
            place: {USERS[uid]: count for uid, count in counts.items()}
            for place, counts in result.arrived.items()
        },
        "checks": [c.to_json() for c in result.all_checks],
        "held": all(c.held for c in result.all_checks),
    }
