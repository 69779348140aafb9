"""The lab's expectations under each policy, and its drawing, without touching the machine."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ElementTree
from typing import Any

import pytest

from userbound.lab.report import Timeline, draw
from userbound.lab.story import (
    ALICE,
    BOB,
    Expectation,
    Fetch,
    fetch_check,
    packet_checks,
    story,
)
from userbound.policy import Action, Settings

KEYED = [
    "login",
    "up",
    "switch-to-bob",
    "switch-to-alice",
    "lock",
    "restart-logind",
    "unlock",
    "ssh",
    "logout",
]


# The index of bob's ssh login among the steps with a tunnel.
SSH = KEYED.index("ssh") - 1


def states(settings: Settings) -> list[str]:
    expectation = Expectation(settings)
    steps = story("ub1", bob_remote_counts=expectation.bob_remote_counts)
    assert [s.key for s in steps] == KEYED
    return [expectation.advance(s) for s in steps if s.tunnel_exists]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (Settings(), ["up"] * 7 + ["disconnected"]),
        (
            Settings(on_switch_away=Action.SUSPEND, on_remote_session=Action.SUSPEND),
            ["up", "suspended", "up", "up", "up", "up", "suspended", "disconnected"],
        ),
        (
            Settings(on_lock=Action.DISCONNECT),
            ["up", "up", "up", "disconnected", "disconnected", "up", "up", "disconnected"],
        ),
        # Without reconnect_on_return, a suspended tunnel waits for `userbound resume`,
        (
            Settings(on_switch_away=Action.SUSPEND, reconnect_on_return=False),
            # A logind restart brings sessions_unknown = disconnect, which nothing undoes.
            ["up", "suspended", "suspended", "suspended"] + ["removed"] * 4,
        ),
        # and a disconnected one is gone for good.
        (
            Settings(on_lock=Action.DISCONNECT, reconnect_on_return=False),
            ["up", "up", "up"] + ["removed"] * 5,
        ),
        (Settings(on_owner_logout=Action.KEEP), ["up"] * 8),
    ],
)
def test_expected_states(settings: Settings, expected: list[str]) -> None:
    assert states(settings) == expected


@pytest.mark.parametrize(
    ("settings", "while_away"),
    [
        # The strictest of the four rules applies while sessions are unknown,
        (Settings(), "disconnected"),
        (Settings(on_owner_logout=Action.SUSPEND), "suspended"),
        (Settings(on_owner_logout=Action.KEEP), "up"),
        # unless a grace period lets the restart pass.
        (Settings(grace_period=2), None),
    ],
)
def test_state_while_logind_is_away(settings: Settings, while_away: str | None) -> None:
    expectation = Expectation(settings)
    for step in story("ub1", bob_remote_counts=True):
        state = expectation.advance(step)
        if step.logind_away:
            assert expectation.while_away == while_away
            assert state == "up"
        else:
            assert expectation.while_away is None


def test_allowed_bob_has_no_remote_rule() -> None:
    settings = Settings(on_remote_session=Action.SUSPEND, allow_users=frozenset({BOB}))
    expectation = Expectation(settings)

    assert expectation.bob_admitted
    assert not expectation.bob_remote_counts
    assert states(settings)[SSH] == "up"
    assert not Expectation(Settings()).bob_admitted


def test_system_scope_counts_every_remote_session() -> None:
    settings = Settings(scope="system", on_remote_session=Action.SUSPEND)
    expectation = Expectation(settings)

    assert expectation.bob_admitted
    assert expectation.bob_remote_counts
    assert states(settings)[SSH] == "suspended"


def test_because_names_the_rule() -> None:
    expectation = Expectation(Settings(on_switch_away=Action.SUSPEND, reconnect_on_return=False))
    steps = {s.key: s for s in story("ub1", bob_remote_counts=True)}

    expectation.advance(steps["switch-to-bob"])
    assert expectation.because == "on_switch_away = suspend"
    expectation.advance(steps["switch-to-alice"])
    assert expectation.because == "reconnect_on_return = false keeps it suspended"


def counts(alice: int, bob: int, alice_public: int = 0) -> dict[str, dict[int, int]]:
    return {"private": {ALICE: alice, BOB: bob}, "public": {ALICE: alice_public, BOB: 50}}


def failed(checks: list[Any]) -> list[str]:
    return [c.what for c in checks if not c.held]


def test_packet_checks() -> None:
    expectation = Expectation(Settings())

    assert failed(packet_checks(expectation, "up", counts(90, 0))) == []
    assert failed(packet_checks(expectation, "up", counts(0, 3, 2))) == [
        "alice's packets at the private server",
        "bob's packets at the private server",
        "alice's packets on the public side",
    ]
    # Held by the policy: nothing through the tunnel, nothing around it.
    assert failed(packet_checks(expectation, "disconnected", counts(0, 0))) == []
    assert failed(packet_checks(expectation, "suspended", counts(5, 0))) == [
        "alice's packets at the private server"
    ]
    # Even without the kill switch: the policy took the tunnel away, no failure did.
    loose = Expectation(Settings(kill_switch=False))
    assert failed(packet_checks(loose, "disconnected", counts(0, 0, 40))) == [
        "alice's packets on the public side"
    ]
    # Once the tunnel is gone, alice's packets take the ordinary route.
    assert failed(packet_checks(expectation, "removed", counts(0, 0, 40))) == []


def test_why_only_for_failures() -> None:
    checks = packet_checks(Expectation(Settings()), "up", counts(90, 2))

    assert [c.why for c in checks] == [
        "",
        "alice's tunnel carried another user's packets, which only alice may use",
        "",
    ]


def test_fetch_checks() -> None:
    expectation = Expectation(Settings())
    bob = Fetch(BOB, "bob: curl", on_tunnel=True)

    assert fetch_check(expectation, bob, "up", "blocked: (28) timed out").held
    check = fetch_check(expectation, bob, "up", "page")
    assert not check.held
    assert check.why == "bob got the private page through alice's tunnel, which admits only alice"
    check = fetch_check(expectation, bob, "suspended", "page")
    assert check.why == "bob got the private page while the policy expects the tunnel suspended"
    assert not fetch_check(expectation, Fetch(ALICE, "alice"), "up", "blocked: refused").held
    assert fetch_check(expectation, Fetch(ALICE, "alice"), "suspended", "blocked: refused").held


def report(*, passed: bool) -> dict[str, Any]:
    steps = []
    for index, (key, seat, state) in enumerate(
        [("login", "alice", "-"), ("up", "alice", "up"), ("switch-to-bob", "bob", "suspended")]
    ):
        steps.append(
            {
                "step": key,
                "title": f"{key} <&>",
                "seat0": seat,
                "state": state,
                "started": float(index),
                "settled": index + 0.1,
                "ended": index + 1.0,
                "held": passed,
            }
        )
    samples = [
        {"time": t / 10, "private": {"alice": t * 10, "bob": 0}, "public": {"alice": 0, "bob": t}}
        for t in range(30)
    ]
    return {
        "mode": "userbound",
        "steps": steps,
        "samples": samples,
        "duration_s": 3.0,
        "checks": 10,
        "failed": [] if passed else [{"what": "x", "expected": "0", "observed": "1", "why": "y"}],
        "totals": {"private": {"alice": 300, "bob": 0}},
    }


def test_drawing_is_valid_svg() -> None:
    svg = draw(report(passed=True))

    root = ElementTree.fromstring(svg)
    assert root.tag.endswith("svg")
    # Titles are escaped; each user has a line in each chart.
    assert "&lt;&amp;&gt;" in svg
    assert svg.count("<polyline") == 4


def test_summary() -> None:
    out = io.StringIO()
    Timeline(out, without_userbound=False).summary(report(passed=True))
    assert "✓ All 10 expectations held" in out.getvalue()

    out = io.StringIO()
    Timeline(out, without_userbound=False).summary(report(passed=False))
    assert "✗ 1 of 10 expectations failed" in out.getvalue()
    assert "x: expected 0, got 1: y" in out.getvalue()
