"""Session awareness: sessions and seats as one snapshot, and the events between two.

Everything here is pure: a monitor reads a `Snapshot` from its source, and
`derive_events` compares it with the one before.  A snapshot is either known
or unknown; an unknown one carries the reason, so that policy can fail closed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

# Only this class means that a person uses the machine.
USER_CLASS = "user"
SOURCES = ("auto", "logind", "utmp")


class Source(StrEnum):
    LOGIND = "logind"
    UTMP = "utmp"


class EventKind(StrEnum):
    SESSION_STARTED = "session-started"
    SESSION_ENDED = "session-ended"
    SEAT_SWITCHED = "seat-switched"
    SESSION_LOCKED = "session-locked"
    SESSION_UNLOCKED = "session-unlocked"
    REMOTE_SESSION_STARTED = "remote-session-started"
    REMOTE_SESSION_ENDED = "remote-session-ended"
    SESSIONS_UNKNOWN = "sessions-unknown"
    SESSIONS_KNOWN = "sessions-known"


@dataclass(frozen=True, slots=True)
class Session:
    """One login session, as its source describes it.

    In a snapshot, `remote` is true for a session that reports Remote=yes
    and, where seats are known, for every session without a seat (ssh, xrdp),
    whatever it reports as Active.  `active` is true only for the session in
    front of its seat.  `uid` is None when utmp names a user without an
    account, or a name too long to be whole.
    """

    id: str
    uid: int | None
    user: str
    seat: str = ""
    vt: int | None = None
    session_class: str = USER_CLASS
    type: str = ""
    remote: bool = False
    remote_host: str = ""
    service: str = ""
    state: str = "online"
    active: bool = False
    locked: bool = False
    idle: bool = False
    leader: int = 0
    tty: str = ""
    # When the session started (logind's Timestamp, µs since the epoch): a
    # restarted logind may hand out an id again, to another person.
    timestamp: int = 0

    @property
    def present(self) -> bool:
        """Whether this session means that a person uses the machine."""
        return self.session_class == USER_CLASS and self.state != "closing"

    @property
    def identity(self) -> tuple[str, int | None, int]:
        """The key that distinguishes two sessions, also across a reused id."""
        return (self.id, self.uid, self.timestamp)

    def to_json(self, *, seats_known: bool = True) -> dict[str, Any]:
        """Return the JSON form; without seats (utmp), active and locked are null."""
        return {
            "id": self.id,
            "uid": self.uid,
            "user": self.user,
            "seat": self.seat or None,
            "vt": self.vt,
            "class": self.session_class,
            "type": self.type,
            "remote": self.remote,
            "remote_host": self.remote_host or None,
            "service": self.service,
            "state": self.state,
            "active": self.active if seats_known else None,
            "locked": self.locked if seats_known else None,
            "idle": self.idle,
            "leader": self.leader,
            "tty": self.tty or None,
            "timestamp": self.timestamp or None,
        }


@dataclass(frozen=True, slots=True)
class Seat:
    id: str
    active_session: str = ""  # "" when no session is in front


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The sessions and seats at one moment, or the reason they are unknown."""

    source: Source
    known: bool
    sessions: Mapping[str, Session] = field(default_factory=dict)
    seats: Mapping[str, Seat] = field(default_factory=dict)
    seats_known: bool = True
    reason: str = ""
    time: float = field(default_factory=time.time)
    generation: int = 0
    # What made the monitor read this snapshot ("start", "signal", "owner",
    # "resync", "reconnect"), and for "signal" and "owner" the
    # time.monotonic() at which the first such notice arrived.
    cause: str = "start"
    signal_time: float | None = None

    @classmethod
    def build(
        cls,
        source: Source,
        sessions: Iterable[Session],
        seats: Iterable[Seat],
        *,
        seats_known: bool = True,
    ) -> Snapshot:
        """Make a known snapshot.

        Only a session on that seat can be in front of it.  A session in
        `closing` is not in front: its user has left, whatever logind reports.
        """
        by_id = {s.id: s for s in sessions}
        checked = {}
        for seat in seats:
            front = by_id.get(seat.active_session)
            if front is not None and (front.seat != seat.id or front.state == "closing"):
                seat = replace(seat, active_session="")
            checked[seat.id] = seat
        fronts = {seat.active_session for seat in checked.values()}
        normalised = {
            key: replace(
                s,
                remote=s.remote or (seats_known and not s.seat),
                active=bool(s.seat) and (s.id in fronts if seats_known else s.active),
            )
            for key, s in by_id.items()
        }
        return cls(source, known=True, sessions=normalised, seats=checked, seats_known=seats_known)

    @classmethod
    def unknown(cls, source: Source, reason: str) -> Snapshot:
        return cls(source, known=False, reason=reason, seats_known=False)

    def in_front(self, seat: str) -> Session | None:
        """Return the session in front of a seat, if any."""
        entry = self.seats.get(seat)
        if entry is None:
            return None
        return self.sessions.get(entry.active_session)

    def present_sessions(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.present]

    def to_json(self) -> dict[str, Any]:
        seats = []
        for seat in sorted(self.seats.values(), key=lambda s: s.id):
            front = self.in_front(seat.id)
            seats.append(
                {
                    "id": seat.id,
                    "active_session": seat.active_session or None,
                    "uid": front.uid if front else None,
                    "user": front.user if front else None,
                    "class": front.session_class if front else None,
                }
            )
        return {
            "source": self.source.value,
            "state": "known" if self.known else "unknown",
            "reason": self.reason or None,
            "seats_known": self.seats_known,
            "time": self.time,
            "generation": self.generation,
            "cause": self.cause,
            "seats": seats if self.seats_known else None,
            "sessions": [
                s.to_json(seats_known=self.seats_known)
                for s in sorted(self.sessions.values(), key=_session_order)
            ],
        }


def _session_order(session: Session) -> tuple[int, str]:
    return (int(session.id), "") if session.id.isdigit() else (1 << 62, session.id)


@dataclass(frozen=True, slots=True)
class Event:
    """A change between two snapshots, carrying the snapshot it came from."""

    kind: EventKind
    snapshot: Snapshot
    session: Session | None = None  # the session that started, ended, locked or unlocked
    seat: str = ""  # for seat-switched
    previous: Session | None = None  # for seat-switched: who was in front
    current: Session | None = None  # for seat-switched: who is in front now
    previous_id: str = ""
    current_id: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "event": self.kind.value,
            "time": self.snapshot.time,
            "generation": self.snapshot.generation,
            "cause": self.snapshot.cause,
        }
        if self.session is not None:
            data["session"] = self.session.to_json(seats_known=self.snapshot.seats_known)
        if self.kind is EventKind.SEAT_SWITCHED:
            data["seat"] = self.seat
            data["from"] = _front_json(self.previous_id, self.previous)
            data["to"] = _front_json(self.current_id, self.current)
        if self.kind is EventKind.SESSIONS_UNKNOWN:
            data["reason"] = self.snapshot.reason
        if self.kind is EventKind.SESSIONS_KNOWN:
            # A follower that joined while sessions were unknown learns them here.
            data["snapshot"] = self.snapshot.to_json()
        return data

    def describe(self) -> str:
        return describe_event(self.to_json())


def _front_json(session_id: str, session: Session | None) -> dict[str, Any] | None:
    if not session_id:
        return None
    if session is None:
        return {"id": session_id, "uid": None, "user": None, "class": None}
    return {
        "id": session_id,
        "uid": session.uid,
        "user": session.user,
        "class": session.session_class,
    }


def _front_text(front: dict[str, Any] | None) -> str:
    if front is None:
        return "no session"
    if front["user"] is None:
        return f"session {front['id']}"
    return f"{front['user']} ({front['class']}, session {front['id']})"


def printable(text: str) -> str:
    """Escape control characters, so that a name from logind cannot forge terminal output."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_event(event: dict[str, Any]) -> str:
    """Return one line for people, from an event's JSON form (as the daemon sends it)."""
    return printable(_describe(event))


def _describe(event: dict[str, Any]) -> str:
    kind = event["event"]
    if kind == EventKind.SEAT_SWITCHED:
        return f"{kind} {event['seat']}: {_front_text(event['from'])} -> {_front_text(event['to'])}"
    if kind == EventKind.SESSIONS_UNKNOWN:
        return f"{kind}: {event['reason']}"
    if kind == EventKind.SESSIONS_KNOWN:
        return f"{kind}: {len(event['snapshot']['sessions'])} session(s)"
    session = event.get("session")
    if session is None:
        return str(kind)
    where = session["seat"] or "no seat"
    if session["remote_host"]:
        where += f", from {session['remote_host']}"
    return (
        f"{kind} {session['user']} (uid {session['uid']}, session {session['id']}, "
        f"{session['class']}, {where})"
    )


def _identity(snapshot: Snapshot, session_id: str) -> tuple[str, int | None, int] | None:
    session = snapshot.sessions.get(session_id)
    return None if session is None else session.identity


def derive_events(previous: Snapshot | None, current: Snapshot) -> list[Event]:
    """Return what changed from one known snapshot to the next.

    Without a previous snapshot there is nothing to compare: the current one
    is the starting point.  Sessions of classes other than `user`, and
    sessions in `closing`, never count as present.
    """
    if previous is None or not previous.known or not current.known:
        return []
    started: list[Event] = []
    ended: list[Event] = []
    locks: list[Event] = []
    before = {s.identity: s for s in previous.present_sessions()}
    after = {s.identity: s for s in current.present_sessions()}
    for key, session in after.items():
        old = before.get(key)
        if old is None:
            kind = EventKind.REMOTE_SESSION_STARTED if session.remote else EventKind.SESSION_STARTED
            started.append(Event(kind, current, session))
        elif old.locked != session.locked:
            kind = EventKind.SESSION_LOCKED if session.locked else EventKind.SESSION_UNLOCKED
            locks.append(Event(kind, current, session))
    for key, old in before.items():
        if key not in after:
            # The session as it is now (closing), or as it was when it vanished.
            later = current.sessions.get(old.id)
            session = later if later is not None and later.identity == key else old
            kind = EventKind.REMOTE_SESSION_ENDED if old.remote else EventKind.SESSION_ENDED
            ended.append(Event(kind, current, session))
    switches: list[Event] = []
    if previous.seats_known and current.seats_known:
        for seat in sorted(set(previous.seats) | set(current.seats)):
            was = previous.seats[seat].active_session if seat in previous.seats else ""
            now = current.seats[seat].active_session if seat in current.seats else ""
            if was == now and _identity(previous, was) == _identity(current, now):
                continue
            switches.append(
                Event(
                    EventKind.SEAT_SWITCHED,
                    current,
                    seat=seat,
                    previous=previous.sessions.get(was),
                    current=current.sessions.get(now),
                    previous_id=was,
                    current_id=now,
                )
            )
    # A session whose id another session took ends first, so that a consumer
    # that keys sessions by id gets the end before the start.
    reused = {e.session.id for e in started if e.session is not None}
    ended_first = [e for e in ended if e.session is not None and e.session.id in reused]
    ended_last = [e for e in ended if e not in ended_first]
    return ended_first + started + switches + locks + ended_last
