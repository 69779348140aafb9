"""A simulated logind on a private system bus, for the lab and the tests.

`PrivateBus` runs a real dbus-daemon with a system-bus configuration in a
folder of its own.  `SimulatedLogind` runs python-dbusmock with the template
in logind_template.py, which owns org.freedesktop.login1 on that bus.
`LogindPuppet` (dbus-fast) changes its sessions and seats silently and sends
only the signals a scenario requests: what logind would emit, or less.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

LOGIN1 = "org.freedesktop.login1"
ROOT = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"
SEAT = "org.freedesktop.login1.Seat"
MOCK = "org.freedesktop.DBus.Mock"
TEMPLATE = Path(__file__).with_name("logind_template.py")
CALL_TIMEOUT = 10.0  # seconds for each call of call_once()

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""


def escape_path(text: str) -> str:
    """Escape a name into one object path element, as logind does (10 -> _310)."""
    out = []
    for index, char in enumerate(text):
        if (char.isascii() and char.isalpha()) or (char.isdigit() and index > 0):
            out.append(char)
        else:
            out.append(f"_{ord(char):02x}")
    return "".join(out) or "_"


def session_path(session_id: str) -> str:
    return f"{ROOT}/session/{escape_path(session_id)}"


def seat_path(seat: str) -> str:
    return f"{ROOT}/seat/{escape_path(seat)}"


def _wait_for(condition: Any, description: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{description} did not happen within {timeout:.0f} s")
        time.sleep(0.01)


class PrivateBus:
    """A dbus-daemon with a system-bus configuration, listening in a folder of its own."""

    def __init__(self, folder: Path, prefix: Sequence[str] = ()) -> None:
        """prefix: a command that runs dbus-daemon, such as `ip netns exec NS`."""
        self.folder = folder
        self.prefix = list(prefix)
        self.socket = folder / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateBus:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Users other than root reach the bus too, as on a real machine.
        os.chmod(self.folder, 0o755)
        config = self.folder / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket))
        self._process = subprocess.Popen(
            [*self.prefix, "dbus-daemon", "--nofork", "--nosyslog", f"--config-file={config}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(self.socket.exists, f"dbus-daemon listening on {self.socket}")
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SimulatedLogind:
    """python-dbusmock's logind, extended, owning org.freedesktop.login1 on a bus."""

    def __init__(self, bus: PrivateBus) -> None:
        """It runs under the bus's command prefix, such as `ip netns exec NS`."""
        self.bus = bus
        self._process: subprocess.Popen[bytes] | None = None
        self.log = bus.folder / "logind.log"

    def start(self, sessions: Sequence[dict[str, Any]] = ()) -> SimulatedLogind:
        """Start it; `sessions` (property maps with "Id") exist before its first reply."""
        environment = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.bus.address)
        parameters = json.dumps({"sessions": list(sessions)})
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    *self.bus.prefix,
                    sys.executable,
                    "-m",
                    "dbusmock",
                    "--system",
                    "--template",
                    str(TEMPLATE),
                    "--parameters",
                    parameters,
                ],
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        _wait_for(self._owned, "the simulated logind taking org.freedesktop.login1")
        return self

    def _owned(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(
                f"the simulated logind exited ({self._process.returncode}): "
                + self.log.read_text()[-2000:]
            )
        return asyncio.run(name_has_owner(self.bus.address, LOGIN1))

    def restart(self) -> None:
        """Stop it and start it again with the sessions it had, as logind finds them again."""
        sessions = asyncio.run(_read_sessions(self.bus.address))
        self.stop()
        self.start(sessions)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop it (SIGKILL to make it vanish as a crash would)."""
        process, self._process = self._process, None
        if process is not None:
            process.send_signal(signum)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> SimulatedLogind:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def call_once(
    address: str,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
) -> list[Any]:
    """Connect to a bus, call one method and disconnect; return the reply's body.

    An error reply raises RuntimeError with its name and text, and no reply
    within CALL_TIMEOUT raises TimeoutError.
    """
    bus = await MessageBus(bus_address=address).connect()
    try:
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        reply = await asyncio.wait_for(bus.call(message), CALL_TIMEOUT)
    finally:
        bus.disconnect()
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{member} on {path}: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def name_has_owner(address: str, name: str) -> bool:
    bus = "org.freedesktop.DBus"
    reply = await call_once(address, bus, "/org/freedesktop/DBus", bus, "NameHasOwner", "s", [name])
    return bool(reply[0])


# The session properties a restarted simulated logind takes over.  Not
# LockedHint: elogind does not save it, so after a restart it is false.
KEPT = (
    "Name",
    "Class",
    "Type",
    "Remote",
    "RemoteHost",
    "Service",
    "VTNr",
    "TTY",
    "State",
    "Leader",
    "Active",
    "Timestamp",
)


async def _read_sessions(address: str) -> list[dict[str, Any]]:
    """Return the sessions on the bus as property maps with "Id", "UID" and "Seat"."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        listed = await bus.call(
            Message(destination=LOGIN1, path=ROOT, interface=MANAGER, member="ListSessions")
        )
        sessions = []
        for _id, uid, _user, seat, path in listed.body[0]:
            reply = await bus.call(
                Message(
                    destination=LOGIN1,
                    path=path,
                    interface="org.freedesktop.DBus.Properties",
                    member="GetAll",
                    signature="s",
                    body=[SESSION],
                )
            )
            values = reply.body[0]
            # The Id property, not ListSessions' first field: dbusmock's gives the path element.
            entry = {"Id": values["Id"].value, "UID": uid, "Seat": seat}
            entry.update({name: values[name].value for name in KEPT if name in values})
            sessions.append(entry)
        return sessions
    finally:
        bus.disconnect()


def _variants(properties: dict[str, Any]) -> dict[str, Variant]:
    signatures = {
        bool: "b",
        int: "u",
        str: "s",
    }
    return {key: Variant(signatures[type(value)], value) for key, value in properties.items()}


class LogindPuppet:
    """Play sessions on the simulated logind: quiet changes, then chosen signals."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, address: str) -> AsyncIterator[LogindPuppet]:
        bus = await MessageBus(bus_address=address).connect()
        try:
            yield cls(bus)
        finally:
            bus.disconnect()

    async def _call(
        self, path: str, interface: str, member: str, signature: str = "", body: Sequence[Any] = ()
    ) -> list[Any]:
        reply = await self._bus.call(
            Message(
                destination=LOGIN1,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        if reply.message_type is MessageType.ERROR:
            raise RuntimeError(f"{member} on {path}: {reply.error_name}: {reply.body}")
        return list(reply.body)

    # Quiet changes

    async def add_session(
        self,
        session_id: str,
        uid: int,
        user: str,
        *,
        seat: str = "seat0",
        session_class: str = "user",
        session_type: str = "x11",
        remote: bool = False,
        remote_host: str = "",
        service: str = "login",
        vt: int = 0,
        tty: str = "",
        state: str = "online",
        leader: int = 1,
    ) -> str:
        properties = {
            "UID": uid,
            "Name": user,
            "Seat": seat,
            "Class": session_class,
            "Type": session_type,
            "Remote": remote,
            "RemoteHost": remote_host,
            "Service": service,
            "VTNr": vt,
            "TTY": tty,
            "State": state,
            "Leader": leader,
        }
        (path,) = await self._call(
            ROOT, MOCK, "AddLoginSession", "sa{sv}", [session_id, _variants(properties)]
        )
        return str(path)

    async def remove_session(self, session_id: str) -> None:
        await self._call(ROOT, MOCK, "RemoveLoginSession", "s", [session_id])

    async def set_session(self, session_id: str, **properties: Any) -> None:
        await self._call(
            ROOT,
            MOCK,
            "SetQuietly",
            "osa{sv}",
            [session_path(session_id), SESSION, _variants(properties)],
        )

    async def drop_property(self, path: str, interface: str, name: str) -> None:
        await self._call(ROOT, MOCK, "DropPropertyQuietly", "oss", [path, interface, name])

    async def set_raw(self, path: str, interface: str, properties: dict[str, Variant]) -> None:
        """Set properties to values of any D-Bus type, without a signal."""
        await self._call(ROOT, MOCK, "SetQuietly", "osa{sv}", [path, interface, properties])

    async def set_active(self, seat: str, session_id: str) -> None:
        await self._call(ROOT, MOCK, "SetActiveQuietly", "ss", [seat, session_id])

    async def add_many_sessions(self, count: int, first_uid: int, prefix: str, seat: str) -> None:
        await self._call(ROOT, MOCK, "AddManySessions", "uuss", [count, first_uid, prefix, seat])

    # Signals, as logind would send them

    async def emit_properties_changed(
        self, path: str, interface: str, changed: Sequence[str], invalidated: Sequence[str] = ()
    ) -> None:
        await self._call(
            ROOT,
            MOCK,
            "EmitPropertiesChanged",
            "osasas",
            [path, interface, list(changed), list(invalidated)],
        )

    async def emit(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        args: Sequence[Variant] = (),
    ) -> None:
        await self._call(
            path, MOCK, "EmitSignal", "sssav", [interface, member, signature, list(args)]
        )

    async def emit_session_new(self, session_id: str) -> None:
        await self.emit(
            ROOT,
            MANAGER,
            "SessionNew",
            "so",
            [Variant("s", session_id), Variant("o", session_path(session_id))],
        )

    async def emit_session_removed(self, session_id: str) -> None:
        await self.emit(
            ROOT,
            MANAGER,
            "SessionRemoved",
            "so",
            [Variant("s", session_id), Variant("o", session_path(session_id))],
        )

    # Whole happenings, with the signals logind sends for them

    async def login(
        self, session_id: str, uid: int, user: str, *, activate: bool = False, **options: Any
    ) -> None:
        """Log a session in: it appears, then SessionNew; with `activate` it takes its seat."""
        await self.add_session(session_id, uid, user, **options)
        await self.emit_session_new(session_id)
        seat = options.get("seat", "seat0")
        if seat:
            await self.emit_properties_changed(seat_path(seat), SEAT, ["Sessions"])
        if activate and seat:
            await self.switch(seat, session_id)

    async def logout(self, session_id: str) -> None:
        """Log a session out: it vanishes and SessionRemoved follows."""
        await self.remove_session(session_id)
        await self.emit_session_removed(session_id)

    async def switch(
        self,
        seat: str,
        session_id: str,
        *,
        previous: str = "",
        signal_seat: bool = True,
        signal_sessions: bool = True,
    ) -> None:
        """Put a session in front of a seat, and emit the signals logind would, unless disabled."""
        await self.set_active(seat, session_id)
        if signal_sessions:
            for changed in (previous, session_id):
                if changed:
                    await self.emit_properties_changed(
                        session_path(changed), SESSION, ["Active"], ["State"]
                    )
        if signal_seat:
            await self.emit_properties_changed(seat_path(seat), SEAT, ["ActiveSession"])

    async def lock(
        self,
        session_id: str,
        *,
        locked: bool = True,
        lock_signal: bool = True,
        hint_signal: bool = True,
    ) -> None:
        """Lock or unlock: the Lock/Unlock request and the LockedHint change, each optional."""
        if lock_signal:
            await self.emit(session_path(session_id), SESSION, "Lock" if locked else "Unlock")
        await self.set_session(session_id, LockedHint=locked)
        if hint_signal:
            await self.emit_properties_changed(session_path(session_id), SESSION, ["LockedHint"])
