"""The lab's story, and what the policy in force should make of each step.

alice (uid 2001) owns the tunnel; bob (uid 2002) shares the machine.  Each
step changes the sessions, and names the policy rules that hold after it.
`Expectation` follows the policy's settings through the steps, as the daemon
should: a stricter action applies, a looser one only with
`reconnect_on_return`.  Nothing here touches the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from userbound.lab.testbed import PRIVATE_V4
from userbound.policy import Action, Rule, Settings, admitted_uids

ALICE = 2001
BOB = 2002
USERS = {ALICE: "alice", BOB: "bob"}
PRIVATE_PAGE = f"http://{PRIVATE_V4}/"
# Logind session ids of the story.
ALICE_SESSION = "2"
BOB_SESSION = "3"
BOB_SSH = "4"

# The tunnel's state under each action the policy applies.
STATE_OF = {
    Action.KEEP: "up",
    Action.SUSPEND: "suspended",
    Action.DISCONNECT: "disconnected",
}


@dataclass(frozen=True)
class Fetch:
    """A user's curl for the private page during a step."""

    uid: int
    label: str
    # Bind to the owner's tunnel interface, as `curl --interface` does.
    on_tunnel: bool = False
    # Run in a new ssh login of the user where the logins are real.
    over_ssh: bool = False


@dataclass(frozen=True)
class Step:
    """One happening of the story."""

    key: str
    title: str
    seat: str  # who is in front of seat0 afterwards
    rules: frozenset[Rule] = frozenset()  # the rules that hold afterwards
    fetches: tuple[Fetch, ...] = ()
    tunnel_exists: bool = True
    # logind leaves the bus during the step, and sessions are unknown meanwhile.
    logind_away: bool = False


def story(tunnel: str, *, bob_remote_counts: bool, userbound: bool = True) -> list[Step]:
    """Return the steps for alice's tunnel.

    bob_remote_counts: whether bob's ssh session brings on_remote_session.
    Without userbound, alice's VPN client brings the tunnel up for the whole machine.
    """
    remote = frozenset({Rule.REMOTE_SESSION}) if bob_remote_counts else frozenset()
    return [
        Step("login", "alice logs in on seat0", "alice", tunnel_exists=False),
        Step(
            "up",
            "alice: userbound up corp.conf" if userbound else "alice connects her VPN",
            "alice",
            fetches=(Fetch(ALICE, f"alice: curl {PRIVATE_PAGE}"),),
        ),
        Step(
            "switch-to-bob",
            "fast user switch to bob",
            "bob",
            frozenset({Rule.SWITCH_AWAY}),
            fetches=(
                Fetch(BOB, f"bob: curl {PRIVATE_PAGE}"),
                Fetch(BOB, f"bob: curl --interface {tunnel} {PRIVATE_PAGE}", on_tunnel=True),
            ),
        ),
        Step(
            "switch-to-alice",
            "switch back to alice",
            "alice",
            fetches=(Fetch(ALICE, f"alice: curl {PRIVATE_PAGE}"),),
        ),
        Step("lock", "alice locks her screen", "alice (locked)", frozenset({Rule.LOCK})),
        # elogind does not save the lock hint; the daemon must keep the session locked.
        Step(
            "restart-logind",
            "logind restarts",
            "alice (locked)",
            frozenset({Rule.LOCK}),
            logind_away=True,
        ),
        Step("unlock", "alice unlocks", "alice"),
        Step(
            "ssh",
            "bob logs in over ssh",
            "alice",
            remote,
            fetches=(Fetch(BOB, f"bob, over ssh: curl {PRIVATE_PAGE}", over_ssh=True),),
        ),
        Step("logout", "alice logs out", "nobody", frozenset({Rule.OWNER_LOGOUT}) | remote),
    ]


@dataclass
class Check:
    """One expectation of a step, and whether it held."""

    what: str
    expected: str
    observed: str
    held: bool
    # What a failure means; empty when the check held.
    why: str = ""
    # The timeline column it fills: (place, uid) for a packet count.
    cell: tuple[str, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.held:
            self.why = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "expected": self.expected,
            "observed": self.observed,
            "held": self.held,
            "why": self.why,
        }


@dataclass
class Expectation:
    """The state the policy should give alice's tunnel after each step."""

    settings: Settings
    action: Action = Action.KEEP
    removed: bool = False
    because: str = "no rule applies"
    # The state while logind was away in the last step, where sessions_unknown applied.
    while_away: str | None = None
    bob_admitted: bool = field(init=False)
    # Whether bob's remote session counts for on_remote_session: unless the
    # allow lists let him into an owner-scoped tunnel.
    bob_remote_counts: bool = field(init=False)

    def __post_init__(self) -> None:
        system = self.settings.scope == "system"
        allowed = BOB in admitted_uids(self.settings, ALICE)
        self.bob_admitted = system or allowed
        self.bob_remote_counts = system or not allowed

    def advance(self, step: Step) -> str:
        """Apply a step's rules and return the state the tunnel should then be in.

        While logind is away, sessions_unknown applies first, unless a grace
        period lets the restart pass.
        """
        self.while_away = None
        if self.removed:
            return "removed"
        if step.logind_away and not self.settings.grace_period:
            self.while_away = self._apply(frozenset({Rule.UNKNOWN}))
            if self.removed:
                return "removed"
        return self._apply(step.rules)

    def _apply(self, rules: frozenset[Rule]) -> str:
        target = max(
            (self.settings.action(rule) for rule in rules),
            key=lambda action: action.rank,
            default=Action.KEEP,
        )
        if target.rank > self.action.rank or (
            target.rank < self.action.rank and self.settings.reconnect_on_return
        ):
            self.action = target
        causes = sorted(r for r in rules if self.settings.action(r) is self.action)
        if causes:
            self.because = " and ".join(f"{r.value} = {self.action.value}" for r in causes)
        elif self.action is Action.KEEP:
            self.because = "no rule applies"
        else:
            self.because = f"reconnect_on_return = false keeps it {STATE_OF[self.action]}"
        if self.action is Action.DISCONNECT and not self.settings.reconnect_on_return:
            # Nothing would bring it back, so the daemon removes it.
            self.removed = True
            return "removed"
        return STATE_OF[self.action]

    def reaches(self, uid: int, state: str) -> bool:
        """Return whether a uid's packets should reach the private network in this state."""
        return state == "up" and (uid == ALICE or self.bob_admitted)

    def alice_may_leave_directly(self, state: str) -> bool:
        """Return whether alice's packets may take the public side: once the tunnel is gone.

        A suspended or disconnected tunnel blocks them even without the kill
        switch, because the policy took the tunnel away, not a failure.
        """
        return state == "removed"


def packet_checks(
    expectation: Expectation, state: str, arrived: dict[str, dict[int, int]]
) -> list[Check]:
    """Judge the packets counted in a step's window against what its state allows."""
    checks = []
    for uid, name in USERS.items():
        count = arrived["private"].get(uid, 0)
        if expectation.reaches(uid, state):
            held = count > 0
            why = "" if held else f"{name}'s packets did not get through the tunnel"
            checks.append(
                Check(
                    f"{name}'s packets at the private server",
                    "> 0",
                    str(count),
                    held,
                    why,
                    ("private", uid),
                )
            )
            continue
        if uid == ALICE:
            why = f"alice's packets got through while her tunnel should be {state}"
        else:
            why = "alice's tunnel carried another user's packets, which only alice may use"
        checks.append(
            Check(
                f"{name}'s packets at the private server",
                "0",
                str(count),
                count == 0,
                why,
                ("private", uid),
            )
        )
    leaked = arrived["public"].get(ALICE, 0)
    if not expectation.alice_may_leave_directly(state):
        checks.append(
            Check(
                "alice's packets on the public side",
                "0",
                str(leaked),
                leaked == 0,
                "alice's packets for the private network left outside her tunnel",
                ("public", ALICE),
            )
        )
    return checks


def fetch_check(expectation: Expectation, fetch: Fetch, state: str, result: str) -> Check:
    """Judge one curl: the private page or a failure, as the state allows."""
    reaches = expectation.reaches(fetch.uid, state)
    expected = "page" if reaches else "blocked"
    observed = "page" if result == "page" else "blocked"
    name = USERS[fetch.uid]
    if reaches:
        why = f"the private page did not load: {result}"
    elif state == "up":
        why = f"{name} got the private page through alice's tunnel, which admits only alice"
    else:
        why = f"{name} got the private page while the policy expects the tunnel {state}"
    return Check(fetch.label, expected, result, observed == expected, why)
