"""Sessions from systemd-logind or elogind on the system D-Bus (dbus-fast).

This is the only module that speaks D-Bus to logind.  It reads the snapshot
with ListSessions, ListSeats and one GetAll per object, and treats every
signal from login1, and every change of the name's owner, only as a notice to
read again.  Calls never D-Bus-activate logind (NO_AUTOSTART): a daemon must
not start a second login manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import replace
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from userbound.sessions.model import Seat, Session, Snapshot, Source
from userbound.sessions.monitor import Monitor, SourceUnavailable

logger = logging.getLogger(__name__)

SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"
LOGIN1 = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"
SEAT = "org.freedesktop.login1.Seat"
PROPERTIES = "org.freedesktop.DBus.Properties"
BUS = "org.freedesktop.DBus"
CALL_TIMEOUT = 5.0  # seconds for each call
READ_TIMEOUT = 30.0  # seconds for a whole snapshot
# Calls in flight at once.  dbus-fast drops the connection when the socket's
# send buffer fills (its writer treats EAGAIN as fatal), so a snapshot of
# thousands of sessions must not queue all its calls at once.
MAX_PENDING_CALLS = 64
# Errors that mean logind is not on the bus (any more).
GONE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
}
# Errors that mean one object vanished between the listing and its read.
VANISHED = {
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.login1.NoSuchSession",
    "org.freedesktop.login1.NoSuchSeat",
}
MATCH_RULES = [
    *(
        f"type='signal',sender='{LOGIN1}',interface='{interface}',path_namespace='{LOGIN1_PATH}'"
        for interface in (PROPERTIES, MANAGER, SESSION)
    ),
    f"type='signal',sender='{BUS}',path='/org/freedesktop/DBus',interface='{BUS}',"
    f"member='NameOwnerChanged',arg0='{LOGIN1}'",
]


class CallFailed(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name


def system_bus_address() -> str:
    """Return the system bus address: $DBUS_SYSTEM_BUS_ADDRESS, else the standard socket."""
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT


async def logind_present(address: str | None = None) -> bool:
    """Return whether the bus has, or can start, a logind.

    A bus that exists but does not respond in time counts as having one, so
    that a slow start reports unknown sessions rather than settling on utmp.
    """
    try:
        bus = await asyncio.wait_for(
            MessageBus(bus_address=address or system_bus_address()).connect(), CALL_TIMEOUT
        )
    except TimeoutError:
        return True
    except Exception:
        return False
    try:
        for member in ("ListNames", "ListActivatableNames"):
            reply = await asyncio.wait_for(
                bus.call(
                    Message(
                        destination=BUS, path="/org/freedesktop/DBus", interface=BUS, member=member
                    )
                ),
                CALL_TIMEOUT,
            )
            if reply.message_type is MessageType.METHOD_RETURN and LOGIN1 in reply.body[0]:
                return True
        return False
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        bus.disconnect()


class LogindMonitor(Monitor):
    """Follow logind's sessions and seats on the system bus."""

    source = Source.LOGIND

    def __init__(self, bus_address: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._address = bus_address
        self._bus: MessageBus | None = None
        self._owner = ""
        self._lost = False
        self._watch: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_PENDING_CALLS)
        # Sessions that were locked when logind left the bus.  elogind does
        # not save LockedHint, so once restarted it reports them unlocked.
        # They stay locked here until logind signals their lock state again.
        self._held_locks: set[tuple[str, int | None, int]] = set()
        # Session ids by object path, from the last read, to match signals.
        self._ids: dict[str, str] = {}

    @property
    def address(self) -> str:
        return self._address or system_bus_address()

    def describe_source(self) -> str:
        return f"logind on the system bus at {self.address}"

    async def _open_source(self) -> None:
        address = self.address
        try:
            bus = MessageBus(bus_address=address)
            async with asyncio.timeout(CALL_TIMEOUT):
                await bus.connect()
        except TimeoutError:
            raise SourceUnavailable(
                f"the system bus at {address} did not respond within {CALL_TIMEOUT:.0f} s"
            ) from None
        except Exception as error:
            raise SourceUnavailable(
                f"cannot connect to the system bus at {address}: {_reason(error)}"
            ) from None
        self._bus = bus
        self._lost = False
        # A new limit per connection, because calls of a read abandoned on an
        # old connection may still hold slots of the old limit.
        self._slots = asyncio.Semaphore(MAX_PENDING_CALLS)
        bus.add_message_handler(self._on_message)
        try:
            for rule in MATCH_RULES:
                await self._call(BUS, "/org/freedesktop/DBus", BUS, "AddMatch", "s", [rule])
            try:
                reply = await self._call(
                    BUS, "/org/freedesktop/DBus", BUS, "GetNameOwner", "s", [LOGIN1]
                )
                self._owner = reply[0]
            except CallFailed as error:
                if error.name not in GONE:
                    raise
                self._owner = ""
        except (CallFailed, TimeoutError, OSError) as error:
            raise SourceUnavailable(
                f"the system bus at {address} rejected the request for logind's owner: "
                + _reason(error)
            ) from None
        self._watch = asyncio.create_task(self._watch_disconnect(bus), name="system bus watch")

    async def _watch_disconnect(self, bus: MessageBus) -> None:
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        if bus is self._bus:
            self._lost = True
            self.notice("reconnect")

    async def _close_source(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.disconnect()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _on_message(self, message: Message) -> None:
        if message.message_type is not MessageType.SIGNAL:
            return
        if message.member == "NameOwnerChanged" and message.sender == BUS:
            if message.body and message.body[0] == LOGIN1:
                self._owner = message.body[2]
                if not self._owner and self.snapshot.known:
                    self._held_locks |= {
                        s.identity for s in self.snapshot.sessions.values() if s.locked
                    }
                logger.info("logind %s the system bus", "joined" if self._owner else "left")
                self.notice("owner")
            return
        path = message.path or ""
        interface = message.interface or ""
        if not (self._owner and message.sender == self._owner and path.startswith(LOGIN1_PATH)):
            return
        if interface == PROPERTIES and _only_idle_changed(message.body):
            return
        if self._held_locks and _lock_signal(message):
            session_id = self._ids.get(path)
            self._held_locks = {key for key in self._held_locks if key[0] != session_id}
        if interface == PROPERTIES or interface.startswith(LOGIN1 + "."):
            self.notice("signal")

    async def _read_source(self) -> Snapshot:
        if self._lost:
            raise SourceUnavailable(f"lost the connection to the system bus at {self.address}")
        if not self._owner:
            return Snapshot.unknown(
                self.source, f"{LOGIN1} has no owner on the system bus at {self.address}"
            )
        try:
            async with asyncio.timeout(READ_TIMEOUT) as deadline:
                return await self._read_logind()
        except TimeoutError:
            if deadline.expired():
                reason = f"a read of logind's sessions did not finish within {READ_TIMEOUT:.0f} s"
            else:
                reason = f"logind did not respond within {CALL_TIMEOUT:.0f} s"
            return Snapshot.unknown(self.source, reason)
        except (InvalidReply, ValueError, TypeError) as error:
            return Snapshot.unknown(self.source, str(error))
        except CallFailed as error:
            if self._lost:
                raise SourceUnavailable(
                    f"lost the connection to the system bus at {self.address}"
                ) from None
            if error.name in GONE:
                return Snapshot.unknown(self.source, f"logind left the system bus ({error})")
            return Snapshot.unknown(self.source, f"logind rejected a read: {error}")

    async def _read_logind(self) -> Snapshot:
        (listed_sessions,) = await self._call(LOGIN1, LOGIN1_PATH, MANAGER, "ListSessions")
        (listed_seats,) = await self._call(LOGIN1, LOGIN1_PATH, MANAGER, "ListSeats")
        sessions, seats = await asyncio.gather(
            asyncio.gather(*(self._session(path) for *_, path in listed_sessions)),
            asyncio.gather(*(self._seat(path) for _, path in listed_seats)),
        )
        self._ids = {
            path: session.id
            for (*_, path), session in zip(listed_sessions, sessions, strict=True)
            if session is not None
        }
        found = [s for s in sessions if s is not None]
        if self._held_locks:
            found = self._hold_locks(found)
        return Snapshot.build(self.source, found, (s for s in seats if s is not None))

    def _hold_locks(self, sessions: list[Session]) -> list[Session]:
        """Keep sessions locked that were locked before logind restarted."""
        # Held no longer: sessions that ended, and those logind calls locked again.
        self._held_locks &= {s.identity for s in sessions if not s.locked}
        return [replace(s, locked=True) if s.identity in self._held_locks else s for s in sessions]

    # Each object becomes a model object as soon as it is read, so a read of
    # thousands of sessions never keeps all their property maps at once.

    async def _session(self, path: str) -> Session | None:
        properties = await self._properties(path, SESSION)
        return None if properties is None else _session(path, properties)

    async def _seat(self, path: str) -> Seat | None:
        properties = await self._properties(path, SEAT)
        return None if properties is None else _seat(path, properties)

    async def _properties(self, path: str, interface: str) -> dict[str, Variant] | None:
        try:
            async with self._slots:
                (properties,) = await self._call(
                    LOGIN1, path, PROPERTIES, "GetAll", "s", [interface]
                )
        except CallFailed as error:
            if error.name in VANISHED:
                return None  # it ended after the listing; the next read will not list it
            raise
        if not isinstance(properties, dict):
            raise InvalidReply(f"logind sent the properties of {path} as {type(properties)}")
        return properties

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        bus = self._bus
        if bus is None or self._lost:
            raise CallFailed("org.freedesktop.DBus.Error.Disconnected", "not connected")
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            flags=MessageFlag.NO_AUTOSTART,
        )
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                reply = await bus.call(message)
        except TimeoutError:
            raise
        except Exception as error:
            raise CallFailed("org.freedesktop.DBus.Error.Disconnected", _reason(error)) from None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise CallFailed(str(reply.error_name), str(text))
        return list(reply.body)


def _only_idle_changed(body: list[Any]) -> bool:
    """Return whether a PropertiesChanged signal changes nothing but idle hints."""
    try:
        _, changed, invalidated = body
        return set(changed) | set(invalidated) <= IDLE_PROPERTIES
    except (TypeError, ValueError):
        return False


def _lock_signal(message: Message) -> bool:
    """Return whether a signal concerns a session's lock state."""
    if message.interface == SESSION:
        return message.member in ("Lock", "Unlock")
    body = message.body
    return (
        message.interface == PROPERTIES
        and len(body) >= 3
        and body[0] == SESSION
        and ("LockedHint" in body[1] or "LockedHint" in body[2])
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


# The properties a snapshot needs, with their D-Bus types.  A reply without
# one of them, or with another type, makes the snapshot unknown: an invented
# default (uid 0, unlocked, remote) could open a tunnel to the wrong person.
# LockedHint needs systemd 230 or later, or elogind.
SESSION_PROPERTIES = {
    "Id": "s",
    "User": "(uo)",
    "Name": "s",
    "Seat": "(so)",
    "VTNr": "u",
    "TTY": "s",
    "Class": "s",
    "Type": "s",
    "Remote": "b",
    "RemoteHost": "s",
    "Service": "s",
    "State": "s",
    "Active": "b",
    "LockedHint": "b",
    "IdleHint": "b",
    "Leader": "u",
    "Timestamp": "t",
}
SEAT_PROPERTIES = {"Id": "s", "ActiveSession": "(so)"}
# Changes that alone never start a read: any session may set its IdleHint as
# often as it likes, and the next read picks the new value up.
IDLE_PROPERTIES = {"IdleHint", "IdleSinceHint", "IdleSinceHintMonotonic"}


class InvalidReply(Exception):
    """logind sent an object without a needed property, or with the wrong type."""


def _checked(path: str, properties: dict[str, Variant], expected: dict[str, str]) -> dict[str, Any]:
    values = {}
    for name, signature in expected.items():
        variant = properties.get(name)
        if variant is None:
            raise InvalidReply(f"logind sent {path} without the property {name}")
        if variant.signature != signature:
            raise InvalidReply(
                f"logind sent the property {name} of {path} as type {variant.signature!r}, "
                f"not {signature!r}"
            )
        values[name] = variant.value
    return values


def _session(path: str, properties: dict[str, Variant]) -> Session:
    p = _checked(path, properties, SESSION_PROPERTIES)
    return Session(
        id=p["Id"],
        uid=p["User"][0],
        user=p["Name"],
        seat=p["Seat"][0],
        vt=p["VTNr"] or None,
        session_class=p["Class"],
        type=p["Type"],
        remote=p["Remote"],
        remote_host=p["RemoteHost"],
        service=p["Service"],
        state=p["State"],
        active=p["Active"],
        locked=p["LockedHint"],
        idle=p["IdleHint"],
        leader=p["Leader"],
        tty=p["TTY"],
        timestamp=p["Timestamp"],
    )


def _seat(path: str, properties: dict[str, Variant]) -> Seat:
    p = _checked(path, properties, SEAT_PROPERTIES)
    return Seat(id=p["Id"], active_session=p["ActiveSession"][0])
