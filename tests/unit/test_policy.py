"""The policy file, merging and strictness, and the pure decisions built on a session snapshot.

The tests rely on uid 0 being "root" with the primary group "root".  The uids
2001 to 2003 need no passwd entry.  Extra group memberships come from a
patched grp.getgrall.
"""

from __future__ import annotations

import grp
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from userbound.errors import InvalidRequest, NotPermitted
from userbound.policy import (
    ACTION_RULES,
    KEYS,
    REQUEST_KEYS,
    Action,
    Cause,
    Decision,
    Hold,
    Policy,
    Rule,
    Settings,
    admitted_uids,
    check_layer,
    decide,
    effective,
    grace_deadline,
    load_policy,
    next_hold,
    parse_policy,
)
from userbound.sessions.model import Seat, Session, Snapshot, Source

KEEP, SUSPEND, DISCONNECT = Action.KEEP, Action.SUSPEND, Action.DISCONNECT
SWITCH, LOCK, REMOTE, LOGOUT = (
    Rule.SWITCH_AWAY,
    Rule.LOCK,
    Rule.REMOTE_SESSION,
    Rule.OWNER_LOGOUT,
)

OWNER = 2001
OTHER = 2002
THIRD = 2003


def line_id(line: str) -> str:
    """Return a short test id for a line of TOML."""
    text = line.replace(" ", "").replace('"', "").replace("\n", ";")
    return text if len(text) <= 40 else text[:37] + "..."


def by_line(rows: list[tuple[Any, ...]]) -> list[Any]:
    """Return table rows as pytest params, each named after its first column (a TOML line)."""
    return [pytest.param(*row, id=line_id(row[0])) for row in rows]


def by_request(rows: list[tuple[Any, ...]]) -> list[Any]:
    """Return request rows (policy, key, requested value, ...) as pytest params."""
    return [
        pytest.param(*row, id=f"{line_id(row[0]) or 'defaults'}|{row[1]}={line_id(str(row[2]))}")
        for row in rows
    ]


def sources(settings: Settings) -> dict[str, str]:
    return {key: entry["source"] for key, entry in settings.to_json().items()}


# Parsing the policy file


def test_empty_policy_gives_defaults() -> None:
    policy = parse_policy("")

    assert policy == Policy()
    assert policy.settings_for(OWNER) == Settings()
    assert policy.settings_for(0) == Settings()
    assert set(sources(policy.settings_for(0)).values()) == {"default"}


ACTION_LINES = [
    (f'{key} = "{action}"', key, action)
    for key in ("on_switch_away", "on_lock", "on_remote_session")
    for action in Action
] + [(f'on_owner_logout = "{action}"', "on_owner_logout", action) for action in (KEEP, DISCONNECT)]

VALID_LINES = [
    ('scope = "system"', "scope", "system"),
    ('scope = "owner"', "scope", "owner"),
    ('allow_users = ["root", 2001, "2002"]', "allow_users", frozenset({0, OWNER, OTHER})),
    ("allow_users = []", "allow_users", frozenset()),
    ("allow_users = [4294967294]", "allow_users", frozenset({4294967294})),
    ('allow_groups = ["root"]', "allow_groups", frozenset({"root"})),
    ("allow_groups = []", "allow_groups", frozenset()),
    *ACTION_LINES,
    ("reconnect_on_return = false", "reconnect_on_return", False),
    ("reconnect_on_return = true", "reconnect_on_return", True),
    ("allow_remote_owner = false", "allow_remote_owner", False),
    ("kill_switch = false", "kill_switch", False),
    ("kill_switch = true", "kill_switch", True),
    ("grace_period = 0", "grace_period", 0.0),
    ("grace_period = 5", "grace_period", 5.0),
    ("grace_period = 2.5", "grace_period", 2.5),
    ("grace_period = 86400", "grace_period", 86400.0),
]


@pytest.mark.parametrize(("line", "key", "value"), by_line(VALID_LINES))
def test_valid_setting_at_top_level(line: str, key: str, value: Any) -> None:
    policy = parse_policy(line)
    settings = policy.settings_for(OWNER)

    assert policy.base == {key: value}
    assert type(policy.base[key]) is type(value)
    assert getattr(settings, key) == value
    assert settings.sources == {key: "policy"}


@pytest.mark.parametrize("section", ["users.alice", "users.2001", "groups.staff"])
@pytest.mark.parametrize(("line", "key", "value"), by_line(VALID_LINES))
def test_valid_setting_in_table(section: str, line: str, key: str, value: Any) -> None:
    policy = parse_policy(f"[{section}]\n{line}\n")
    kind, name = section.split(".")

    assert policy.base == {}
    assert getattr(policy, kind) == {name: {key: value}}


INVALID_LINES = [
    ('on_lock = "pause"', "on_lock"),
    ('on_lock = "Keep"', "on_lock"),
    ("on_switch_away = 1", "on_switch_away"),
    ("on_remote_session = true", "on_remote_session"),
    ('on_owner_logout = "suspend"', "on_owner_logout"),
    ('on_owner_logout = "pause"', "on_owner_logout"),
    ("grace_period = -1", "grace_period"),
    ("grace_period = true", "grace_period"),
    ('grace_period = "5"', "grace_period"),
    ("grace_period = inf", "grace_period"),
    ("grace_period = nan", "grace_period"),
    ("grace_period = 86400.5", "grace_period"),
    ('kill_switch = "yes"', "kill_switch"),
    ("kill_switch = 1", "kill_switch"),
    ('reconnect_on_return = "true"', "reconnect_on_return"),
    ("allow_remote_owner = 0", "allow_remote_owner"),
    ('scope = "all"', "scope"),
    ('scope = "Owner"', "scope"),
    ('scope = ["owner"]', "scope"),
    ('allow_users = ["no-such-user-ub"]', "allow_users"),
    ('allow_users = "root"', "allow_users"),
    ("allow_users = [-1]", "allow_users"),
    ("allow_users = [4294967295]", "allow_users"),
    ("allow_users = [true]", "allow_users"),
    ("allow_users = [1.5]", "allow_users"),
    ("allow_users = [" + ", ".join(["2001"] * 1025) + "]", "allow_users"),
    ('allow_groups = ["no-such-group-ub"]', "allow_groups"),
    ('allow_groups = "root"', "allow_groups"),
    ("allow_groups = [0]", "allow_groups"),
]


@pytest.mark.parametrize(("line", "key"), by_line(INVALID_LINES))
@pytest.mark.parametrize("section", ["", "users.alice", "groups.root"])
def test_invalid_value_names_key(section: str, line: str, key: str) -> None:
    text = f"[{section}]\n{line}\n" if section else line
    where = f"{section}.{key}" if section else key

    with pytest.raises(InvalidRequest) as info:
        parse_policy(text)

    assert info.value.message.startswith(f"{where}: ")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param("bogus = 1", "bogus", id="top-level-key"),
        pytest.param("[other]\non_lock = 'keep'", "other", id="top-level-table"),
        pytest.param("[users.alice]\nbogus = 1", "users.alice.bogus", id="users-key"),
        pytest.param("[groups.root]\nbogus = true", "groups.root.bogus", id="groups-key"),
        pytest.param(
            "[users.alice.nested]\non_lock = 'keep'", "users.alice.nested", id="users-subtable"
        ),
        pytest.param("[users.alice]\nusers = {}", "users.alice.users", id="users-in-users"),
    ],
)
def test_unknown_key_is_named(text: str, where: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_policy(text)

    assert info.value.message.startswith(f"{where}: unknown setting; expected one of ")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param("users = 1", "users", id="users-number"),
        pytest.param('groups = ["root"]', "groups", id="groups-list"),
        pytest.param("[users]\nalice = 5", "users.alice", id="users-entry-number"),
        pytest.param("groups.root = 'keep'", "groups.root", id="groups-entry-string"),
    ],
)
def test_users_and_groups_must_be_tables(text: str, where: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_policy(text)

    assert info.value.message.startswith(f"{where}: expected ")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("on_lock =", id="no-value"),
        pytest.param("on_lock = keep", id="bare-word"),
        pytest.param('on_lock = "keep"\non_lock = "keep"', id="duplicate-key"),
        pytest.param("[users.alice", id="open-table"),
    ],
)
def test_invalid_toml(text: str) -> None:
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        parse_policy(text)
    with pytest.raises(InvalidRequest, match=r"^not valid TOML: "):
        parse_policy(text, "/etc/x.toml")


def test_invalid_toml_message_without_path() -> None:
    with pytest.raises(InvalidRequest, match=r"^not valid TOML: "):
        parse_policy("on_lock =")


HUGE_INTEGER = "1" + "0" * 400


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda: parse_policy(f"grace_period = {HUGE_INTEGER}"), id="toml"),
        pytest.param(
            lambda: check_layer(
                json.loads(f'{{"grace_period": {HUGE_INTEGER}}}'), "settings", REQUEST_KEYS
            ),
            id="json-request",
        ),
    ],
)
def test_huge_grace_period_is_invalid(read: Any) -> None:
    with pytest.raises(InvalidRequest, match="grace_period: invalid value"):
        read()


@pytest.mark.parametrize(
    ("table", "where"),
    [
        pytest.param(
            {"allow_remote_owner": False}, "settings.allow_remote_owner", id="policy-only"
        ),
        pytest.param({"bogus": 1}, "settings.bogus", id="unknown"),
        pytest.param({"on_lock": "pause"}, "settings.on_lock", id="wrong-value"),
    ],
)
def test_request_layer_rejects(table: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_layer(table, "settings", REQUEST_KEYS)

    assert info.value.message.startswith(f"{where}: ")


def test_request_layer_rejects_non_table() -> None:
    with pytest.raises(InvalidRequest, match=r"^settings: expected a table of settings$"):
        check_layer(["on_lock"], "settings", REQUEST_KEYS)


def test_load_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('on_lock = "suspend"\n[users.root]\nkill_switch = false\n')

    policy = load_policy(path, required=True)

    assert policy.base == {"on_lock": SUSPEND}
    assert policy.users == {"root": {"kill_switch": False}}
    assert policy.path == str(path)


def test_load_policy_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"

    assert load_policy(path, required=False) == Policy(path=None)
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_policy(path, required=True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b'on_lock = "pause"\n', "on_lock: invalid value 'pause'", id="wrong-value"),
        pytest.param(b"on_lock =\n", ": not valid TOML", id="invalid-toml"),
        pytest.param(b'on_lock = "\xff"\n', "is not UTF-8 text", id="not-utf8"),
    ],
)
def test_load_policy_errors_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(content)

    with pytest.raises(InvalidRequest) as info:
        load_policy(path, required=False)

    assert str(path) in info.value.message
    assert message in info.value.message


# Merging the top level, groups and users


@pytest.fixture
def root_in_two_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make root a member of the groups "ub-a" and "ub-b", besides its primary group."""
    real = grp.getgrall
    extra = [
        grp.struct_group(("ub-a", "x", 4241, ["root"])),
        grp.struct_group(("ub-b", "x", 4242, ["daemon", "root"])),
    ]
    monkeypatch.setattr(grp, "getgrall", lambda: [*real(), *extra])


@pytest.mark.parametrize(
    ("text", "owner", "key", "value", "source"),
    [
        pytest.param('on_lock = "suspend"', 0, "on_lock", SUSPEND, "policy", id="top-level"),
        pytest.param('on_lock = "suspend"', 0, "grace_period", 0.0, "default", id="default"),
        pytest.param(
            'on_lock = "suspend"\n[groups.root]\non_lock = "disconnect"',
            0,
            "on_lock",
            DISCONNECT,
            "groups.root",
            id="group-over-top",
        ),
        pytest.param(
            'on_lock = "suspend"\n[groups.root]\non_lock = "keep"',
            0,
            "on_lock",
            KEEP,
            "groups.root",
            id="looser-group-over-top",
        ),
        pytest.param(
            '[groups.root]\non_lock = "disconnect"\n[users.root]\non_lock = "keep"',
            0,
            "on_lock",
            KEEP,
            "users.root",
            id="user-over-group",
        ),
        pytest.param(
            'on_lock = "suspend"\n[users.root]\non_lock = "keep"',
            0,
            "on_lock",
            KEEP,
            "users.root",
            id="user-over-top",
        ),
        pytest.param(
            '[groups.root]\nkill_switch = false\n[users.root]\non_lock = "keep"',
            0,
            "kill_switch",
            False,
            "groups.root",
            id="group-key-user-lacks",
        ),
        pytest.param(
            '[users.2002]\nscope = "system"',
            OTHER,
            "scope",
            "system",
            "users.2002",
            id="user-by-uid-no-passwd",
        ),
        pytest.param("[users.0]\ngrace_period = 3", 0, "grace_period", 3.0, None, id="user-by-uid"),
        pytest.param(
            '[users.daemon]\non_lock = "disconnect"',
            0,
            "on_lock",
            KEEP,
            "default",
            id="other-user-table",
        ),
        pytest.param(
            '[groups.no-such-group-ub]\non_lock = "disconnect"',
            0,
            "on_lock",
            KEEP,
            "default",
            id="other-group-table",
        ),
        pytest.param(
            '[groups.root]\non_lock = "disconnect"',
            OTHER,
            "on_lock",
            KEEP,
            "default",
            id="no-passwd-no-groups",
        ),
    ],
)
def test_merge_order(text: str, owner: int, key: str, value: Any, source: str | None) -> None:
    settings = parse_policy(text).settings_for(owner)

    assert getattr(settings, key) == value
    if source is not None:
        assert sources(settings)[key] == source


MERGE_CASES = [
    # (key, value in ub-a, value in ub-b, merged value, groups named in its source)
    ("on_lock", '"suspend"', '"disconnect"', DISCONNECT, {"ub-b"}),
    ("on_switch_away", '"disconnect"', '"keep"', DISCONNECT, {"ub-a"}),
    ("on_remote_session", '"suspend"', '"keep"', SUSPEND, {"ub-a"}),
    ("on_owner_logout", '"keep"', '"disconnect"', DISCONNECT, {"ub-b"}),
    ("kill_switch", "false", "true", True, {"ub-b"}),
    ("kill_switch", "true", "false", True, {"ub-a"}),
    ("reconnect_on_return", "true", "false", False, {"ub-b"}),
    ("reconnect_on_return", "false", "true", False, {"ub-a"}),
    ("allow_remote_owner", "false", "true", False, {"ub-a"}),
    ("grace_period", "10", "3", 3.0, {"ub-b"}),
    ("grace_period", "3", "10", 3.0, {"ub-a"}),
    ("scope", '"system"', '"owner"', "owner", {"ub-b"}),
    ("scope", '"owner"', '"system"', "owner", {"ub-a"}),
    ("allow_users", "[0, 2001]", "[2001, 2002]", frozenset({OWNER}), {"ub-a", "ub-b"}),
    ("allow_groups", '["root"]', "[]", frozenset(), {"ub-a", "ub-b"}),
]


@pytest.mark.usefixtures("root_in_two_groups")
@pytest.mark.parametrize(
    ("key", "first", "second", "value", "source_groups"),
    MERGE_CASES,
    ids=[f"{key}={first}|{second}" for key, first, second, _, _ in MERGE_CASES],
)
def test_strictest_group_wins(
    key: str, first: str, second: str, value: Any, source_groups: set[str]
) -> None:
    text = f"{key} = {first}\n[groups.ub-a]\n{key} = {first}\n[groups.ub-b]\n{key} = {second}\n"

    settings = parse_policy(text).settings_for(0)
    source = sources(settings)[key]

    assert getattr(settings, key) == value
    assert {f"groups.{g}" for g in source_groups} <= set(source.split(","))


@pytest.mark.usefixtures("root_in_two_groups")
def test_groups_merge_per_key() -> None:
    text = (
        'on_lock = "suspend"\n'
        "[groups.ub-a]\ngrace_period = 4\n"
        '[groups.ub-b]\non_lock = "disconnect"\n'
        "[groups.root]\nkill_switch = false\n"
        "[users.root]\ngrace_period = 1\n"
    )

    settings = parse_policy(text).settings_for(0)

    assert settings.on_lock is DISCONNECT
    assert settings.kill_switch is False
    assert settings.grace_period == 1.0
    assert sources(settings)["on_lock"] == "groups.ub-b"
    assert sources(settings)["kill_switch"] == "groups.root"
    assert sources(settings)["grace_period"] == "users.root"
    assert sources(settings)["scope"] == "default"


# A request against the policy


EFFECTIVE_ALLOWED = [
    # (policy, key, requested value, value that results)
    ('on_switch_away = "suspend"', "on_switch_away", "suspend", SUSPEND),
    ('on_switch_away = "suspend"', "on_switch_away", "disconnect", DISCONNECT),
    ("", "on_lock", "suspend", SUSPEND),
    ('on_remote_session = "suspend"', "on_remote_session", "disconnect", DISCONNECT),
    ('on_owner_logout = "keep"', "on_owner_logout", "disconnect", DISCONNECT),
    ("", "on_owner_logout", "disconnect", DISCONNECT),
    ("kill_switch = false", "kill_switch", True, True),
    ("kill_switch = false", "kill_switch", False, False),
    ("", "reconnect_on_return", False, False),
    ("reconnect_on_return = false", "reconnect_on_return", False, False),
    ("grace_period = 5", "grace_period", 2.5, 2.5),
    ("grace_period = 5", "grace_period", 5, 5.0),
    ("grace_period = 5", "grace_period", 0, 0.0),
    ('scope = "system"', "scope", "owner", "owner"),
    ('scope = "system"', "scope", "system", "system"),
    ("", "scope", "owner", "owner"),
    ('allow_users = [2002, "root"]', "allow_users", [0], frozenset({0})),
    ('allow_users = [2002, "root"]', "allow_users", [], frozenset()),
    ('allow_users = [2002, "root"]', "allow_users", ["2002", 0], frozenset({0, OTHER})),
    ('allow_groups = ["root"]', "allow_groups", [], frozenset()),
    ('allow_groups = ["root"]', "allow_groups", ["root"], frozenset({"root"})),
]

EFFECTIVE_LOOSER = [
    # (policy, key, requested value)
    ('on_switch_away = "suspend"', "on_switch_away", "keep"),
    ('on_lock = "disconnect"', "on_lock", "suspend"),
    ('on_remote_session = "suspend"', "on_remote_session", "keep"),
    ("", "on_owner_logout", "keep"),
    ("", "kill_switch", False),
    ("reconnect_on_return = false", "reconnect_on_return", True),
    ("grace_period = 5", "grace_period", 5.5),
    ("", "grace_period", 1),
    ("", "scope", "system"),
    ("allow_users = [2002]", "allow_users", [2002, 2003]),
    ("", "allow_users", ["root"]),
    ("", "allow_groups", ["root"]),
]


@pytest.mark.parametrize(("text", "key", "requested", "value"), by_request(EFFECTIVE_ALLOWED))
def test_stricter_request_accepted(text: str, key: str, requested: Any, value: Any) -> None:
    request = check_layer({key: requested}, "settings", REQUEST_KEYS)

    settings = effective(parse_policy(text), OWNER, request, privileged=False)

    assert getattr(settings, key) == value
    assert sources(settings)[key] == "request"


@pytest.mark.parametrize(("text", "key", "requested"), by_request(EFFECTIVE_LOOSER))
def test_looser_request_rejected(text: str, key: str, requested: Any) -> None:
    request = check_layer({key: requested}, "settings", REQUEST_KEYS)

    with pytest.raises(NotPermitted) as info:
        effective(parse_policy(text), OWNER, request, privileged=False)

    assert info.value.message.startswith(f"{key} = ")
    assert "looser than the policy's" in info.value.message


@pytest.mark.parametrize(("text", "key", "requested"), by_request(EFFECTIVE_LOOSER))
def test_privileged_request_accepted(text: str, key: str, requested: Any) -> None:
    request = check_layer({key: requested}, "settings", REQUEST_KEYS)

    settings = effective(parse_policy(text), OWNER, request, privileged=True)

    assert getattr(settings, key) == request[key]
    assert sources(settings)[key] == "request"


def test_request_checked_against_merged_value() -> None:
    policy = parse_policy(
        'on_lock = "keep"\n[groups.root]\non_lock = "disconnect"\n'
        '[users.root]\non_switch_away = "suspend"\n'
    )

    with pytest.raises(NotPermitted, match=r"^on_lock = suspend is looser than the policy's"):
        effective(policy, 0, {"on_lock": SUSPEND}, privileged=False)
    with pytest.raises(NotPermitted, match=r"^on_switch_away = keep is looser"):
        effective(policy, 0, {"on_switch_away": KEEP}, privileged=False)


def test_empty_request_keeps_policy_sources() -> None:
    policy = parse_policy('on_lock = "suspend"\n[users.root]\nkill_switch = false\n')

    settings = effective(policy, 0, {}, privileged=False)

    assert settings == policy.settings_for(0)
    assert sources(settings)["on_lock"] == "policy"
    assert sources(settings)["kill_switch"] == "users.root"
    assert sources(settings)["scope"] == "default"
    assert set(sources(settings)) == set(KEYS)


@pytest.mark.parametrize(
    ("settings", "inside", "outside"),
    [
        pytest.param(Settings(), {OWNER}, {OTHER, 0}, id="owner-only"),
        pytest.param(
            Settings(allow_users=frozenset({OTHER, THIRD})),
            {OWNER, OTHER, THIRD},
            {0},
            id="users",
        ),
        pytest.param(
            Settings(allow_groups=frozenset({"root"})), {OWNER, 0}, {OTHER}, id="group-root"
        ),
        pytest.param(
            Settings(allow_groups=frozenset({"no-such-group-ub"})),
            {OWNER},
            {OTHER, 0},
            id="missing-group",
        ),
    ],
)
def test_admitted_uids(settings: Settings, inside: set[int], outside: set[int]) -> None:
    admitted = admitted_uids(settings, OWNER)

    assert inside <= admitted
    assert not outside & admitted


# Decisions


MINE = Session("2", OWNER, "alice", seat="seat0", vt=2)
MINE_LOCKED = replace(MINE, locked=True)
MINE_SEAT1 = Session("7", OWNER, "alice", seat="seat1", vt=1)
MY_SSH = Session("4", OWNER, "alice", type="tty", remote_host="192.0.2.8")
THEIRS = Session("3", OTHER, "bob", seat="seat0", vt=3)
THEIRS_SEAT1 = Session("8", OTHER, "bob", seat="seat1", vt=2)
THEIR_SSH = Session("5", OTHER, "bob", type="tty", remote_host="192.0.2.7")
THIRD_SSH = Session("9", THIRD, "carol", type="tty", remote_host="192.0.2.9")
GREETER = Session("c1", 110, "lightdm", seat="seat0", session_class="greeter")
NO_ACCOUNT_SSH = Session("pts/3:77", None, "ghost", type="tty", remote=True, remote_host="h")


def snapshot(*sessions: Session, **fronts: str) -> Snapshot:
    """Return a logind snapshot. `fronts` maps a seat to the session in front ("" for none)."""
    seats = [Seat(seat, front) for seat, front in (fronts or {"seat0": ""}).items()]
    return Snapshot.build(Source.LOGIND, sessions, seats)


def utmp(*sessions: Session) -> Snapshot:
    return Snapshot.build(Source.UTMP, sessions, [], seats_known=False)


# For each rule, a state in which only that rule applies.
ONLY = {
    SWITCH: snapshot(MINE, THEIRS, seat0="3"),
    LOCK: snapshot(MINE_LOCKED, seat0="2"),
    REMOTE: snapshot(MINE, THEIR_SSH, seat0="2"),
    LOGOUT: snapshot(GREETER, seat0="c1"),
}
RULE_VALUES = [
    (rule, action)
    for rule in ACTION_RULES
    for action in ((KEEP, DISCONNECT) if rule is LOGOUT else tuple(Action))
]


@pytest.mark.parametrize(
    ("rule", "action"), RULE_VALUES, ids=[f"{r.value}={a.value}" for r, a in RULE_VALUES]
)
def test_decide_each_rule_value(rule: Rule, action: Action) -> None:
    settings = Settings(**{rule.value: action})

    decision = decide(ONLY[rule], OWNER, frozenset({OWNER}), settings, owner_seen=True)

    assert [c.rule for c in decision.causes] == [rule]
    assert decision.action is action
    assert decision.strongest is not None
    assert decision.strongest.rule is rule
    assert decision.reason == decision.causes[0].reason


CASES = [
    # (state, owner, admitted, owner_seen, rules that apply)
    pytest.param(snapshot(MINE, seat0="2"), OWNER, {OWNER}, True, [], id="in-front"),
    pytest.param(snapshot(MINE, GREETER, seat0="c1"), OWNER, {OWNER}, True, [SWITCH], id="greeter"),
    pytest.param(snapshot(MINE, seat0=""), OWNER, {OWNER}, True, [SWITCH], id="nobody-in-front"),
    pytest.param(
        snapshot(MINE, THEIRS_SEAT1, seat0="8"),
        OWNER,
        {OWNER},
        True,
        [SWITCH],
        id="front-elsewhere",
    ),
    pytest.param(
        snapshot(replace(MINE, state="closing"), seat0="2"),
        OWNER,
        {OWNER},
        True,
        [LOGOUT],
        id="closing-seen",
    ),
    pytest.param(
        snapshot(replace(MINE, state="closing"), seat0="2"),
        OWNER,
        {OWNER},
        False,
        [],
        id="closing-unseen",
    ),
    pytest.param(snapshot(seat0=""), OWNER, {OWNER}, False, [], id="unseen-no-session"),
    pytest.param(snapshot(seat0=""), OWNER, {OWNER}, True, [LOGOUT], id="seen-no-session"),
    pytest.param(
        snapshot(MINE, Session("6", OTHER, "bob", active=True), seat0="2"),
        OWNER,
        {OWNER},
        True,
        [REMOTE],
        id="seatless-active",
    ),
    pytest.param(
        snapshot(MINE, MINE_SEAT1, THEIRS_SEAT1, seat0="2", seat1="8"),
        OWNER,
        {OWNER},
        True,
        [],
        id="two-seats-front-one",
    ),
    pytest.param(
        snapshot(MINE, MINE_SEAT1, THEIRS, THEIRS_SEAT1, seat0="3", seat1="8"),
        OWNER,
        {OWNER},
        True,
        [SWITCH],
        id="two-seats-front-none",
    ),
    pytest.param(
        snapshot(MINE_LOCKED, replace(MY_SSH, locked=False), seat0="2"),
        OWNER,
        {OWNER},
        True,
        [],
        id="one-of-two-locked",
    ),
    pytest.param(
        snapshot(MINE_LOCKED, replace(MINE_SEAT1, locked=True), seat0="2", seat1="7"),
        OWNER,
        {OWNER},
        True,
        [LOCK],
        id="all-locked",
    ),
    pytest.param(
        snapshot(MINE_LOCKED, replace(MINE_SEAT1, state="closing"), seat0="2", seat1=""),
        OWNER,
        {OWNER},
        True,
        [LOCK],
        id="locked-and-closing",
    ),
    pytest.param(
        snapshot(MINE_LOCKED, THEIRS, seat0="3"),
        OWNER,
        {OWNER},
        True,
        [SWITCH, LOCK],
        id="away-and-locked",
    ),
    pytest.param(snapshot(MINE, MY_SSH, seat0="2"), OWNER, {OWNER}, True, [], id="own-ssh"),
    pytest.param(snapshot(MY_SSH, seat0=""), OWNER, {OWNER}, True, [], id="only-own-ssh"),
    pytest.param(snapshot(MINE, MY_SSH, seat0="2"), OWNER, None, True, [], id="own-ssh-system"),
    pytest.param(
        snapshot(MINE, THEIR_SSH, seat0="2"),
        OWNER,
        {OWNER, OTHER},
        True,
        [],
        id="admitted-ssh",
    ),
    pytest.param(
        snapshot(MINE, THEIR_SSH, seat0="2"),
        OWNER,
        None,
        True,
        [REMOTE],
        id="system-scope-ssh",
    ),
    pytest.param(
        snapshot(MINE, THEIR_SSH, THIRD_SSH, seat0="2"),
        OWNER,
        {OWNER, OTHER},
        True,
        [REMOTE],
        id="one-of-two-admitted",
    ),
    pytest.param(
        snapshot(MINE, THEIR_SSH, THIRD_SSH, seat0="2"),
        OWNER,
        {OWNER},
        True,
        [REMOTE],
        id="two-ssh-one-cause",
    ),
    pytest.param(
        snapshot(MINE, replace(THEIR_SSH, state="closing"), seat0="2"),
        OWNER,
        {OWNER},
        True,
        [],
        id="closing-ssh",
    ),
    pytest.param(
        snapshot(MINE, replace(THEIR_SSH, session_class="background"), seat0="2"),
        OWNER,
        {OWNER},
        True,
        [],
        id="background-class",
    ),
    pytest.param(
        snapshot(MINE, replace(THEIRS, remote=True), seat0="2"),
        OWNER,
        {OWNER},
        True,
        [REMOTE],
        id="seated-remote",
    ),
    pytest.param(
        snapshot(MINE, NO_ACCOUNT_SSH, seat0="2"),
        OWNER,
        {OWNER, OTHER},
        True,
        [REMOTE],
        id="no-uid-ssh",
    ),
    pytest.param(
        snapshot(MINE, NO_ACCOUNT_SSH, seat0="2"),
        OWNER,
        None,
        True,
        [REMOTE],
        id="no-uid-ssh-system",
    ),
    pytest.param(
        snapshot(MINE, Session("x", None, "ghost", seat="seat0"), seat0="x"),
        OWNER,
        {OWNER},
        True,
        [SWITCH],
        id="no-uid-in-front",
    ),
    pytest.param(
        snapshot(replace(THEIRS, locked=True), THIRD_SSH, seat0="3"),
        OTHER,
        {OTHER},
        True,
        [LOCK, REMOTE],
        id="owner-2002",
    ),
    pytest.param(
        snapshot(MINE, replace(THEIRS, uid=None), seat0="3"),
        OWNER,
        {OWNER},
        True,
        [SWITCH],
        id="owner-2001-no-uid-front",
    ),
    pytest.param(
        utmp(Session("tty1:10", OWNER, "alice", tty="tty1", locked=True), THEIRS),
        OWNER,
        {OWNER},
        True,
        [],
        id="utmp-no-switch-lock",
    ),
    pytest.param(
        utmp(replace(MINE, locked=True), THEIRS),
        OWNER,
        {OWNER},
        True,
        [],
        id="utmp-seated",
    ),
    pytest.param(
        utmp(Session("tty1:10", OWNER, "alice", tty="tty1"), replace(THEIR_SSH, remote=True)),
        OWNER,
        {OWNER},
        True,
        [REMOTE],
        id="utmp-ssh",
    ),
    pytest.param(
        utmp(Session("tty1:10", OWNER, "alice", tty="tty1"), replace(THEIR_SSH, remote_host="")),
        OWNER,
        {OWNER},
        True,
        [],
        id="utmp-local-seatless",
    ),
    pytest.param(utmp(THEIRS), OWNER, {OWNER}, True, [LOGOUT], id="utmp-logout"),
    pytest.param(utmp(THEIRS), OWNER, {OWNER}, False, [], id="utmp-unseen"),
]

ALL_STRICT = Settings(
    on_switch_away=SUSPEND, on_lock=SUSPEND, on_remote_session=DISCONNECT, on_owner_logout=KEEP
)


@pytest.mark.parametrize(("state", "owner", "admitted", "owner_seen", "rules"), CASES)
def test_decide_cases(
    state: Snapshot,
    owner: int,
    admitted: set[int] | None,
    *,
    owner_seen: bool,
    rules: list[Rule],
) -> None:
    allowed = None if admitted is None else frozenset(admitted)

    decision = decide(state, owner, allowed, ALL_STRICT, owner_seen=owner_seen)

    assert [c.rule for c in decision.causes] == rules
    expected = max((ALL_STRICT.action(r) for r in rules), key=lambda a: a.rank, default=KEEP)
    assert decision.action is expected


@pytest.mark.parametrize(
    ("state", "rule", "session", "words"),
    [
        pytest.param(
            snapshot(MINE, GREETER, seat0="c1"),
            SWITCH,
            "c1",
            "seat0 shows the greeter (session c1), not uid 2001's session 2",
            id="greeter",
        ),
        pytest.param(
            snapshot(MINE, seat0=""),
            SWITCH,
            "",
            "seat0 shows no session",
            id="nobody-in-front",
        ),
        pytest.param(
            snapshot(MINE, THEIRS, seat0="3"),
            SWITCH,
            "3",
            "seat0 shows bob (uid 2002)'s session 3",
            id="other-user",
        ),
        pytest.param(
            snapshot(MINE_LOCKED, seat0="2"),
            LOCK,
            "2",
            "every session of uid 2001 is locked",
            id="lock",
        ),
        pytest.param(
            snapshot(MINE, THEIR_SSH, seat0="2"),
            REMOTE,
            "5",
            "bob (uid 2002) has remote session 5 from 192.0.2.7",
            id="ssh",
        ),
        pytest.param(
            snapshot(MINE, NO_ACCOUNT_SSH, seat0="2"),
            REMOTE,
            "pts/3:77",
            "'ghost' (no account) has remote session pts/3:77 from h",
            id="no-account",
        ),
        pytest.param(
            snapshot(GREETER, seat0="c1"),
            LOGOUT,
            "",
            "uid 2001 has no session left",
            id="logout",
        ),
    ],
)
def test_cause_names_session(state: Snapshot, rule: Rule, session: str, words: str) -> None:
    decision = decide(state, OWNER, frozenset({OWNER}), Settings(), owner_seen=True)
    (cause,) = [c for c in decision.causes if c.rule is rule]

    assert cause.session == session
    assert words in cause.reason


@pytest.mark.parametrize(
    ("settings", "action"),
    [
        pytest.param(Settings(), DISCONNECT, id="defaults"),
        pytest.param(Settings(on_owner_logout=KEEP), KEEP, id="all-keep"),
        pytest.param(Settings(on_owner_logout=KEEP, on_lock=SUSPEND), SUSPEND, id="lock-suspend"),
        pytest.param(
            Settings(on_owner_logout=KEEP, on_switch_away=SUSPEND, on_remote_session=DISCONNECT),
            DISCONNECT,
            id="remote-disconnect",
        ),
        pytest.param(
            Settings(on_switch_away=SUSPEND, on_owner_logout=DISCONNECT),
            DISCONNECT,
            id="logout-disconnect",
        ),
    ],
)
@pytest.mark.parametrize("owner_seen", [True, False], ids=["seen", "unseen"])
def test_unknown_sessions_take_strictest(
    settings: Settings, action: Action, *, owner_seen: bool
) -> None:
    state = Snapshot.unknown(Source.LOGIND, "logind does not answer")

    decision = decide(state, OWNER, frozenset({OWNER}), settings, owner_seen=owner_seen)

    assert [c.rule for c in decision.causes] == [Rule.UNKNOWN]
    assert decision.action is action
    assert decision.reason == "sessions unknown: logind does not answer"


@pytest.mark.parametrize(
    ("causes", "action", "rule"),
    [
        pytest.param((), KEEP, None, id="none"),
        pytest.param(((LOCK, KEEP),), KEEP, LOCK, id="keep-cause"),
        pytest.param(((SWITCH, SUSPEND), (LOCK, SUSPEND)), SUSPEND, SWITCH, id="tie-first"),
        pytest.param(((SWITCH, SUSPEND), (REMOTE, DISCONNECT)), DISCONNECT, REMOTE, id="strongest"),
    ],
)
def test_decision_strongest(
    causes: tuple[tuple[Rule, Action], ...], action: Action, rule: Rule | None
) -> None:
    decision = Decision(tuple(Cause(r, a, f"{r.value} applies") for r, a in causes))

    assert decision.action is action
    assert (decision.strongest.rule if decision.strongest else None) is rule
    assert decision.reason == (f"{rule.value} applies" if rule else "no rule applies")


# Grace period and reconnect_on_return


def decision_for(action: Action) -> Decision:
    return Decision((Cause(LOCK, action, "test"),)) if action is not KEEP else Decision()


@pytest.mark.parametrize(
    ("hold", "action", "grace", "reconnect", "now", "result"),
    [
        pytest.param(Hold(), KEEP, 0, True, 100.0, Hold(), id="keep"),
        pytest.param(Hold(), SUSPEND, 0, True, 100.0, Hold(SUSPEND), id="stricter-no-grace"),
        pytest.param(
            Hold(), DISCONNECT, 0, False, 100.0, Hold(DISCONNECT), id="stricter-no-reconnect"
        ),
        pytest.param(Hold(), SUSPEND, 5, True, 100.0, Hold(KEEP, SUSPEND, 100.0), id="pending"),
        pytest.param(
            Hold(KEEP, SUSPEND, 100.0),
            SUSPEND,
            5,
            True,
            104.9,
            Hold(KEEP, SUSPEND, 100.0),
            id="still-pending",
        ),
        pytest.param(
            Hold(KEEP, SUSPEND, 100.0), SUSPEND, 5, True, 105.0, Hold(SUSPEND), id="deadline"
        ),
        pytest.param(
            Hold(KEEP, SUSPEND, 100.0), SUSPEND, 5, True, 900.0, Hold(SUSPEND), id="long-after"
        ),
        pytest.param(
            Hold(SUSPEND), DISCONNECT, 5, True, 100.0, Hold(SUSPEND, DISCONNECT, 100.0), id="step"
        ),
        pytest.param(Hold(KEEP, SUSPEND, 100.0), KEEP, 5, True, 103.0, Hold(), id="cleared"),
        pytest.param(
            Hold(SUSPEND, DISCONNECT, 100.0),
            SUSPEND,
            5,
            True,
            103.0,
            Hold(SUSPEND),
            id="cleared-to-current",
        ),
        pytest.param(Hold(SUSPEND), KEEP, 0, True, 100.0, Hold(), id="looser-reconnect"),
        pytest.param(Hold(SUSPEND), KEEP, 5, True, 100.0, Hold(), id="looser-ignores-grace"),
        pytest.param(
            Hold(DISCONNECT), SUSPEND, 0, True, 100.0, Hold(SUSPEND), id="looser-one-step"
        ),
        pytest.param(Hold(SUSPEND), KEEP, 0, False, 100.0, Hold(SUSPEND), id="looser-no-reconnect"),
        pytest.param(
            Hold(DISCONNECT), SUSPEND, 0, False, 100.0, Hold(DISCONNECT), id="one-step-no-reconnect"
        ),
        pytest.param(
            Hold(SUSPEND, DISCONNECT, 100.0),
            KEEP,
            5,
            False,
            103.0,
            Hold(SUSPEND),
            id="looser-no-reconnect-clears",
        ),
        pytest.param(Hold(SUSPEND), SUSPEND, 5, False, 100.0, Hold(SUSPEND), id="same"),
    ],
)
def test_next_hold(
    hold: Hold, action: Action, grace: float, *, reconnect: bool, now: float, result: Hold
) -> None:
    settings = Settings(grace_period=grace, reconnect_on_return=reconnect)

    assert next_hold(hold, decision_for(action), settings, now) == result


@pytest.mark.parametrize(
    ("hold", "grace", "deadline"),
    [
        pytest.param(Hold(), 5, None, id="nothing-pending"),
        pytest.param(Hold(SUSPEND), 5, None, id="applied"),
        pytest.param(Hold(KEEP, SUSPEND, 100.0), 5, 105.0, id="pending"),
        pytest.param(Hold(KEEP, DISCONNECT, 100.0), 0.5, 100.5, id="half-second"),
    ],
)
def test_grace_deadline(hold: Hold, grace: float, deadline: float | None) -> None:
    assert grace_deadline(hold, Settings(grace_period=grace)) == deadline


def test_grace_period_restarts_after_cause_clears() -> None:
    settings = Settings(grace_period=5)
    hold = Hold()
    steps = [
        (100.0, SUSPEND, Hold(KEEP, SUSPEND, 100.0)),
        (103.0, KEEP, Hold()),
        (104.0, SUSPEND, Hold(KEEP, SUSPEND, 104.0)),
        (108.0, SUSPEND, Hold(KEEP, SUSPEND, 104.0)),
        (109.0, SUSPEND, Hold(SUSPEND)),
    ]

    for now, action, expected in steps:
        hold = next_hold(hold, decision_for(action), settings, now)
        assert hold == expected, f"at {now}"

    assert grace_deadline(hold, settings) is None


def test_no_reconnect_keeps_action() -> None:
    settings = Settings(reconnect_on_return=False)
    hold = next_hold(Hold(), decision_for(DISCONNECT), settings, 100.0)

    for now in (101.0, 200.0, 10_000.0):
        hold = next_hold(hold, decision_for(KEEP), settings, now)
        assert hold == Hold(DISCONNECT)


def test_action_applies_at_grace_deadline() -> None:
    settings = Settings(grace_period=5)
    hold = next_hold(Hold(), decision_for(SUSPEND), settings, 3.2)
    deadline = grace_deadline(hold, settings)
    assert deadline is not None

    assert next_hold(hold, decision_for(SUSPEND), settings, deadline) == Hold(SUSPEND)


def test_policy_warns_of_unknown_tables() -> None:
    policy = parse_policy(
        '[users.ub-nobody]\non_lock = "suspend"\n[groups.ub-none]\nkill_switch = true\n'
    )

    assert policy.warnings == (
        "[users.ub-nobody] matches no account",
        "[groups.ub-none] matches no group",
    )


def test_misnamed_override_table_hints() -> None:
    with pytest.raises(InvalidRequest, match=r"\[users\.NAME\] and \[groups\.NAME\]"):
        parse_policy('[user.alice]\non_lock = "suspend"\n')


def test_policy_file_writable_by_others_warns(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('on_lock = "suspend"\n')
    path.chmod(0o666)

    policy = load_policy(path, required=True)

    assert any("chmod 644" in warning for warning in policy.warnings)
