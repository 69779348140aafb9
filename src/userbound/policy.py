"""Policy settings and pure decisions: what happens to a tunnel when the screen changes hands.

The policy file (TOML) sets defaults for every tunnel, with `[users.NAME]`
and `[groups.NAME]` tables that override them for one user or group.  A
request to bring a tunnel up may ask for stricter settings than the policy
gives its owner, never looser ones; root may request any.

`decide()` turns a session snapshot into the action a tunnel should get and
the causes behind it; `next_hold()` adds the grace period and
`reconnect_on_return`.  Neither reads anything but its arguments: the daemon
applies what they return.
"""

from __future__ import annotations

import grp
import math
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from userbound.accounts import MAX_UID, is_uid_text, user_name
from userbound.errors import InvalidRequest, NotPermitted
from userbound.sessions.model import Session, Snapshot

DEFAULT_POLICY = Path("/etc/userbound/policy.toml")
MAX_GRACE_PERIOD = 86400.0
MAX_ALLOWED = 64  # users or groups one list may name; larger sets belong in a group


class Action(StrEnum):
    KEEP = "keep"
    SUSPEND = "suspend"
    DISCONNECT = "disconnect"

    @property
    def rank(self) -> int:
        return list(Action).index(self)


class Rule(StrEnum):
    SWITCH_AWAY = "on_switch_away"
    LOCK = "on_lock"
    REMOTE_SESSION = "on_remote_session"
    OWNER_LOGOUT = "on_owner_logout"
    # Not a key: while sessions are unknown, the strictest of the four applies.
    UNKNOWN = "sessions_unknown"


ACTION_RULES = (Rule.SWITCH_AWAY, Rule.LOCK, Rule.REMOTE_SESSION, Rule.OWNER_LOGOUT)
SCOPES = ("owner", "system")


@dataclass(frozen=True)
class Settings:
    """The effective settings of one tunnel."""

    scope: str = "owner"
    allow_users: frozenset[int] = frozenset()
    allow_groups: frozenset[str] = frozenset()
    on_switch_away: Action = Action.KEEP
    on_lock: Action = Action.KEEP
    on_remote_session: Action = Action.KEEP
    on_owner_logout: Action = Action.DISCONNECT
    reconnect_on_return: bool = True
    allow_remote_owner: bool = True
    grace_period: float = 0.0
    kill_switch: bool = True
    # Where each value came from: "default", "policy", "users.NAME",
    # "groups.NAME" or "request".
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def action(self, rule: Rule) -> Action:
        if rule is Rule.UNKNOWN:
            return max((self.action(r) for r in ACTION_RULES), key=lambda a: a.rank)
        value: Action = getattr(self, rule.value)
        return value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in fields(self):
            if item.name == "sources":
                continue
            value = getattr(self, item.name)
            if isinstance(value, frozenset):
                value = sorted(value)
            out[item.name] = {"value": value, "source": self.sources.get(item.name, "default")}
        return out


KEYS = tuple(f.name for f in fields(Settings) if f.name != "sources")
# Settings that belong to the machine's policy, not to one tunnel.
POLICY_ONLY = frozenset({"allow_remote_owner"})
REQUEST_KEYS = frozenset(KEYS) - POLICY_ONLY


# Reading and checking values


def _fail(where: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {message}")


def _shown(value: Any) -> str:
    """Return a value as TOML writes it: true and false for booleans, quoted strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _action(value: Any, where: str, choices: tuple[Action, ...]) -> Action:
    names = [a.value for a in choices]
    if isinstance(value, str) and value in names:
        return Action(value)
    raise _fail(
        where, f"invalid value {_shown(value)}; expected one of " + ", ".join(map(repr, names))
    )


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _fail(where, f"invalid value {_shown(value)}; expected true or false")


def _users(value: Any, where: str) -> frozenset[int]:
    if not isinstance(value, list) or len(value) > MAX_ALLOWED:
        raise _fail(where, f"expected a list of at most {MAX_ALLOWED} user names or uids")
    uids = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise _fail(where, f"invalid entry {item!r}; give a user name or a uid")
        if isinstance(item, int) or is_uid_text(item):
            uid = int(item)
            if not 0 <= uid <= MAX_UID:
                raise _fail(where, f"uid {uid} is outside 0..{MAX_UID}")
        else:
            try:
                uid = pwd.getpwnam(item).pw_uid
            except (KeyError, ValueError):
                raise _fail(where, f"no user named {item[:64]!r}; give an existing user") from None
        uids.add(uid)
    return frozenset(uids)


def _groups(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or len(value) > MAX_ALLOWED:
        raise _fail(where, f"expected a list of at most {MAX_ALLOWED} group names")
    for item in value:
        if not isinstance(item, str):
            raise _fail(where, f"invalid entry {item!r}; give a group name")
        try:
            grp.getgrnam(item)
        except (KeyError, ValueError):
            raise _fail(where, f"no group named {item[:64]!r}; give an existing group") from None
    return frozenset(value)


def check_value(key: str, value: Any, where: str) -> Any:
    """Return a setting's value in its checked form; raise InvalidRequest naming `where`."""
    if key == "scope":
        if value in SCOPES:
            return value
        raise _fail(where, f"invalid value {value!r}; expected 'owner' or 'system'")
    if key == "allow_users":
        return _users(value, where)
    if key == "allow_groups":
        return _groups(value, where)
    if key == "on_owner_logout":
        return _action(value, where, (Action.KEEP, Action.DISCONNECT))
    if key.startswith("on_"):
        return _action(value, where, tuple(Action))
    if key == "grace_period":
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        # The range test comes first: an integer too large for a float
        # would make math.isfinite raise OverflowError.
        if number is None or not 0 <= number <= MAX_GRACE_PERIOD or not math.isfinite(number):
            raise _fail(
                where,
                f"invalid value {_shown(value)}; give a number of seconds from 0 to "
                f"{MAX_GRACE_PERIOD:.0f}, without quotes",
            )
        return float(number)
    return _boolean(value, where)


def check_layer(table: Any, where: str, keys: frozenset[str] = frozenset(KEYS)) -> dict[str, Any]:
    """Check one table of settings; unknown keys and wrong values are errors."""
    if not isinstance(table, dict):
        raise _fail(where, "expected a table of settings")
    checked = {}
    for key, value in table.items():
        if key not in keys:
            hint = ""
            if isinstance(value, dict):
                hint = "; overrides go in [users.NAME] and [groups.NAME] tables"
            raise _fail(
                f"{where}.{key}" if where else key,
                "unknown setting; expected one of "
                + ", ".join(k for k in KEYS if k in keys)
                + hint,
            )
        checked[key] = check_value(key, value, f"{where}.{key}" if where else key)
    return checked


# Strictness: a user may only ask for a value at least as strict as the policy's.


def stricter_or_equal(key: str, requested: Any, permitted: Any) -> bool:
    if key.startswith("on_"):
        return bool(requested.rank >= permitted.rank)
    if key in ("kill_switch",):
        return bool(requested or not permitted)
    if key in ("reconnect_on_return", "allow_remote_owner"):
        return bool(permitted or not requested)
    if key == "grace_period":
        return bool(requested <= permitted)
    if key == "scope":
        return bool(requested == "owner" or permitted == "system")
    if key in ("allow_users", "allow_groups"):
        return bool(requested <= permitted)
    raise AssertionError(key)


def strictest(key: str, values: list[Any]) -> Any:
    """Return the strictest of several values (from several groups)."""
    if key in ("allow_users", "allow_groups"):
        return frozenset.intersection(*values)
    best = values[0]
    for value in values[1:]:
        if stricter_or_equal(key, value, best):
            best = value
    return best


# The policy file


@dataclass(frozen=True)
class Policy:
    """The machine's policy: defaults, and overrides for users and groups."""

    base: Mapping[str, Any] = field(default_factory=dict)
    users: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    path: str | None = None
    # Mistakes that do not stop the policy, such as a table for an unknown user.
    warnings: tuple[str, ...] = ()

    def settings_for(self, owner: int) -> Settings:
        """Return the settings the policy gives a user's tunnels."""
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, value in self.base.items():
            values[key], sources[key] = value, "policy"
        name = user_name(owner)
        groups = sorted(g for g in _groups_of(owner, name) if g in self.groups)
        for key in KEYS:
            set_by_groups = [(g, self.groups[g][key]) for g in groups if key in self.groups[g]]
            if set_by_groups:
                values[key] = strictest(key, [v for _, v in set_by_groups])
                sources[key] = ",".join(f"groups.{g}" for g, _ in set_by_groups)
        found = [k for k in (name, str(owner)) if k is not None and k in self.users]
        for key, value in (self.users[found[0]] if found else {}).items():
            values[key], sources[key] = value, f"users.{found[0]}"
        return Settings(**values, sources=sources)


def _groups_of(uid: int, name: str | None) -> set[str]:
    """Return the names of a user's groups: the primary one and those listing the user."""
    found = set()
    try:
        gid = pwd.getpwuid(uid).pw_gid
        found.add(grp.getgrgid(gid).gr_name)
    except KeyError:
        pass
    if name is not None:
        found |= {g.gr_name for g in grp.getgrall() if name in g.gr_mem}
    return found


def parse_policy(text: str, path: str | None = None) -> Policy:
    """Read a policy from TOML text; raise InvalidRequest naming the first wrong key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InvalidRequest(f"not valid TOML: {error}") from None
    tables: dict[str, dict[str, dict[str, Any]]] = {"users": {}, "groups": {}}
    for kind in ("users", "groups"):
        section = data.pop(kind, {})
        if not isinstance(section, dict):
            raise _fail(kind, f"expected tables such as [{kind}.NAME]")
        for name, table in section.items():
            tables[kind][name] = check_layer(table, f"{kind}.{name}")
    base = check_layer(data, "")
    warnings = [
        f"[users.{name}] matches no account"
        for name in tables["users"]
        if not is_uid_text(name) and not _exists(pwd.getpwnam, name)
    ]
    warnings += [
        f"[groups.{name}] matches no group"
        for name in tables["groups"]
        if not _exists(grp.getgrnam, name)
    ]
    return Policy(base, tables["users"], tables["groups"], path, tuple(warnings))


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except (KeyError, ValueError):
        return False
    return True


def load_policy(path: Path, *, required: bool) -> Policy:
    """Read the policy file; a missing file gives the defaults unless it was named."""
    try:
        # utf-8-sig: a byte order mark, as some editors write, is not part of the TOML.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        if required:
            raise InvalidRequest(f"policy file {path} does not exist") from None
        return Policy(path=None)
    except OSError as error:
        raise InvalidRequest(f"cannot read policy file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"policy file {path} is not UTF-8 text") from None
    try:
        policy = parse_policy(text, str(path))
    except InvalidRequest as error:
        raise InvalidRequest(f"policy file {path}: {error.message}") from None
    mode = path.stat()
    if mode.st_uid != 0 or mode.st_mode & 0o022:
        # The file decides what happens to every tunnel, so only root may write it.
        warning = (
            f"{path} is owned or writable by a user other than root; "
            f"run: chown root: {path}; chmod 644 {path}"
        )
        policy = replace(policy, warnings=(*policy.warnings, warning))
    return policy


def effective(
    policy: Policy, owner: int, request: Mapping[str, Any], *, privileged: bool
) -> Settings:
    """Combine the policy's settings for an owner with the settings a request contains.

    An unprivileged request may only tighten them.  A looser value raises
    NotPermitted, naming the key, the requested value and the policy's value.
    """
    policy_settings = policy.settings_for(owner)
    values = {key: getattr(policy_settings, key) for key in KEYS}
    sources = dict(policy_settings.sources)
    for key, requested in request.items():
        if not privileged and not stricter_or_equal(key, requested, values[key]):
            raise_looser(key, requested, values[key])
        values[key], sources[key] = requested, "request"
    return Settings(**values, sources=sources)


def raise_looser(key: str, requested: Any, permitted: Any) -> None:
    def show(value: Any) -> str:
        if isinstance(value, frozenset):
            return "[" + ", ".join(str(v) for v in sorted(value)) + "]"
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    raise NotPermitted(
        f"{key} = {show(requested)} is looser than the policy's {show(permitted)}; a user may "
        "only request stricter settings (root may request any)"
    )


def admitted_uids(settings: Settings, owner: int) -> frozenset[int]:
    """Return the uids an owner-scoped tunnel admits: the owner and the allowed users."""
    uids = {owner, *settings.allow_users}
    for name in settings.allow_groups:
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        uids |= {p.pw_uid for p in pwd.getpwall() if p.pw_gid == group.gr_gid}
        for member in group.gr_mem:
            try:
                uids.add(pwd.getpwnam(member).pw_uid)
            except KeyError:
                continue
    return frozenset(uids)


# Decisions


@dataclass(frozen=True)
class Cause:
    """One rule whose condition holds, with the action its setting gives."""

    rule: Rule
    action: Action
    reason: str
    session: str = ""  # the session concerned, if one

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.value,
            "action": self.action.value,
            "reason": self.reason,
            "session": self.session or None,
        }


@dataclass(frozen=True)
class Decision:
    """The action a tunnel should get now, and every cause that holds."""

    causes: tuple[Cause, ...] = ()

    @property
    def action(self) -> Action:
        return self.strongest.action if self.strongest else Action.KEEP

    @property
    def strongest(self) -> Cause | None:
        best: Cause | None = None
        for cause in self.causes:
            if best is None or cause.action.rank > best.action.rank:
                best = cause
        return best

    @property
    def reason(self) -> str:
        cause = self.strongest
        return cause.reason if cause else "no rule applies"

    def to_json(self) -> dict[str, Any]:
        cause = self.strongest
        return {
            "action": self.action.value,
            "rule": cause.rule.value if cause else None,
            "reason": self.reason,
            "causes": [c.to_json() for c in self.causes],
        }


def _who(session: Session) -> str:
    if session.uid is None:
        return f"{session.user!r} (no account)"
    return f"{session.user or 'uid'} (uid {session.uid})"


def owner_sessions(snapshot: Snapshot, owner: int) -> list[Session]:
    return [s for s in snapshot.present_sessions() if s.uid == owner]


def decide(
    snapshot: Snapshot,
    owner: int,
    admitted: frozenset[int] | None,
    settings: Settings,
    *,
    owner_seen: bool,
) -> Decision:
    """Return what the policy gives a tunnel in this session state.

    admitted: the uids that enter the tunnel (None: every uid, system scope);
    only other users' remote sessions count.  owner_seen: whether the owner
    has had a session while the tunnel existed, so that a tunnel brought up
    without a session (a service, a job) is not taken for a logout.
    """
    if not snapshot.known:
        return Decision(
            (
                Cause(
                    Rule.UNKNOWN,
                    settings.action(Rule.UNKNOWN),
                    f"sessions unknown: {snapshot.reason}",
                ),
            )
        )
    causes: list[Cause] = []
    mine = owner_sessions(snapshot, owner)
    if owner_seen and not mine:
        causes.append(
            Cause(Rule.OWNER_LOGOUT, settings.on_owner_logout, f"uid {owner} has no session left")
        )
    if snapshot.seats_known and mine:
        seated = [s for s in mine if s.seat]
        if seated and not any(s.active for s in seated):
            seat = seated[0].seat
            front = snapshot.in_front(seat)
            if front is None:
                front_label = "no session"
            elif front.session_class != "user":
                front_label = f"the {front.session_class} (session {front.id})"
            else:
                front_label = f"{_who(front)}'s session {front.id}"
            causes.append(
                Cause(
                    Rule.SWITCH_AWAY,
                    settings.on_switch_away,
                    f"{seat} shows {front_label}, not uid {owner}'s session {seated[0].id}",
                    front.id if front else "",
                )
            )
        if all(s.locked for s in mine):
            causes.append(
                Cause(
                    Rule.LOCK,
                    settings.on_lock,
                    f"every session of uid {owner} is locked",
                    mine[0].id,
                )
            )
    for session in snapshot.present_sessions():
        if not session.remote or session.uid == owner:
            continue
        if admitted is not None and session.uid is not None and session.uid in admitted:
            continue
        where = f" from {session.remote_host}" if session.remote_host else ""
        causes.append(
            Cause(
                Rule.REMOTE_SESSION,
                settings.on_remote_session,
                f"{_who(session)} has remote session {session.id}{where}",
                session.id,
            )
        )
        break
    return Decision(tuple(causes))


@dataclass(frozen=True)
class Hold:
    """The action in force for a tunnel, and a stricter action waiting for its grace period."""

    action: Action = Action.KEEP
    pending: Action | None = None
    pending_since: float | None = None


def next_hold(hold: Hold, decision: Decision, settings: Settings, now: float) -> Hold:
    """Return the hold after a decision.

    A stricter action applies once its cause has lasted the grace period.  A
    looser one applies at once when reconnect_on_return is set, and never by
    itself otherwise.  Hold.pending_since is when the grace period began.
    """
    target = decision.action
    if target.rank > hold.action.rank:
        since = hold.pending_since if hold.pending_since is not None else now
        # The same sum as grace_deadline(), so the action applies at that time.
        if now >= since + settings.grace_period:
            return Hold(target)
        return Hold(hold.action, target, since)
    if target.rank < hold.action.rank and settings.reconnect_on_return:
        return Hold(target)
    return replace(hold, pending=None, pending_since=None)


def grace_deadline(hold: Hold, settings: Settings) -> float | None:
    """Return when a pending action's grace period ends, or None."""
    if hold.pending_since is None:
        return None
    return hold.pending_since + settings.grace_period
