"""A python-dbusmock template: logind, plus quiet changes for the lab and the tests.

It loads dbusmock's logind template and adds methods on the mock interface
that change sessions and seats without emitting anything.  What logind would
signal is then sent separately (`EmitPropertiesChanged`, dbusmock's
`EmitSignal`), or deliberately left out.  dbusmock runs this file with
dbus-python; it is not part of the userbound package's own code.
"""

import time

import dbus
from dbusmock import MOCK_IFACE, mockobject
from dbusmock.templates import logind

from userbound.lab.logind import escape_path

BUS_NAME = logind.BUS_NAME
MAIN_OBJ = logind.MAIN_OBJ
MAIN_IFACE = logind.MAIN_IFACE
SYSTEM_BUS = True
SESSION_IFACE = "org.freedesktop.login1.Session"
SEAT_IFACE = "org.freedesktop.login1.Seat"
USER_IFACE = "org.freedesktop.login1.User"
ROOT = "/org/freedesktop/login1"
NO_OBJECT = dbus.ObjectPath("/")

# The module-level methods of the logind template (ListSessions, AddSession, ...).
for _name in dir(logind):
    _value = getattr(logind, _name)
    if callable(_value) and hasattr(_value, "_dbus_interface"):
        globals()[_name] = _value


def load(mock, parameters):
    logind.load(mock, parameters)
    # The sessions a restarted logind finds again (parameter "sessions": a list
    # of property maps with "Id"), in place before its first reply.
    for entry in parameters.get("sessions", []):
        properties = dict(entry)
        session_id = properties.pop("Id")
        AddLoginSession(mock, session_id, properties)
        if properties.get("Active") and properties.get("Seat", "seat0"):
            SetActiveQuietly(mock, properties.get("Seat", "seat0"), session_id)


def _session_path(session_id):
    return dbus.ObjectPath(f"{ROOT}/session/{escape_path(session_id)}")


def _add_to_list(path, interface, entry):
    obj = mockobject.objects[path]
    entries = [e for e in obj.props[interface]["Sessions"] if e[0] != entry[0]]
    entries.append(entry)
    obj.props[interface]["Sessions"] = dbus.Array(entries, signature="(so)")


def _remove_from_list(path, interface, session_id):
    obj = mockobject.objects.get(path)
    if obj is None:
        return
    entries = [e for e in obj.props[interface]["Sessions"] if e[0] != session_id]
    obj.props[interface]["Sessions"] = dbus.Array(entries, signature="(so)")


def _add_seat(self, seat):
    path = dbus.ObjectPath(f"{ROOT}/seat/{escape_path(seat)}")
    if path not in mockobject.objects:
        self.AddSeat(seat)
    return path


def _add_user(self, uid, name):
    path = dbus.ObjectPath(f"{ROOT}/user/{escape_path(str(uid))}")
    if path not in mockobject.objects:
        self.AddObject(
            path,
            USER_IFACE,
            {
                "UID": dbus.UInt32(uid),
                "GID": dbus.UInt32(uid),
                "Name": name,
                "State": "online",
                "Sessions": dbus.Array([], signature="(so)"),
                "Display": ("", NO_OBJECT),
                "Linger": False,
                "IdleHint": False,
            },
            [],
        )
    return path


@dbus.service.method(MOCK_IFACE, in_signature="sa{sv}", out_signature="o")
def AddLoginSession(self, session_id, properties):
    """Add a session without any signal; Seat "" makes a session without a seat."""
    path = _session_path(session_id)
    if path in mockobject.objects:
        raise dbus.exceptions.DBusException(
            f"session {session_id} already exists", name=MOCK_IFACE + ".SessionExists"
        )

    uid = int(properties.get("UID", 0))
    name = str(properties.get("Name", f"user{uid}"))
    seat = str(properties.get("Seat", "seat0"))
    seat_path = _add_seat(self, seat) if seat else NO_OBJECT
    user_path = _add_user(self, uid, name)

    values = {
        "Id": session_id,
        "Name": name,
        "User": (dbus.UInt32(uid), user_path),
        "Seat": (seat, seat_path),
        "VTNr": dbus.UInt32(properties.get("VTNr", 0)),
        "TTY": str(properties.get("TTY", "")),
        "Display": str(properties.get("Display", "")),
        "Remote": bool(properties.get("Remote", False)),
        "RemoteHost": str(properties.get("RemoteHost", "")),
        "RemoteUser": "",
        "Service": str(properties.get("Service", "login")),
        "Desktop": "",
        "Scope": f"session-{session_id}.scope",
        "Leader": dbus.UInt32(properties.get("Leader", 1)),
        "Audit": dbus.UInt32(0),
        "Type": str(properties.get("Type", "tty")),
        "Class": str(properties.get("Class", "user")),
        "Active": bool(properties.get("Active", False)),
        "State": str(properties.get("State", "online")),
        "IdleHint": bool(properties.get("IdleHint", False)),
        "IdleSinceHint": dbus.UInt64(0),
        "IdleSinceHintMonotonic": dbus.UInt64(0),
        "LockedHint": bool(properties.get("LockedHint", False)),
        "Timestamp": dbus.UInt64(properties.get("Timestamp", int(time.time() * 1e6))),
        "TimestampMonotonic": dbus.UInt64(int(time.monotonic() * 1e6)),
    }
    self.AddObject(
        path,
        SESSION_IFACE,
        values,
        [
            ("Activate", "", "", ""),
            ("Lock", "", "", 'self.EmitSignal("", "Lock", "", [])'),
            ("Unlock", "", "", 'self.EmitSignal("", "Unlock", "", [])'),
            ("SetLockedHint", "b", "", 'self.UpdateProperties("", {"LockedHint": args[0]})'),
            ("Terminate", "", "", ""),
        ],
    )

    if seat:
        _add_to_list(seat_path, SEAT_IFACE, (session_id, path))
    _add_to_list(user_path, USER_IFACE, (session_id, path))
    return path


@dbus.service.method(MOCK_IFACE, in_signature="s", out_signature="")
def RemoveLoginSession(self, session_id):
    """Remove a session without any signal, and take it off its seat."""
    path = _session_path(session_id)
    obj = mockobject.objects[path]
    seat, seat_path = obj.props[SESSION_IFACE]["Seat"]
    _, user_path = obj.props[SESSION_IFACE]["User"]
    if seat:
        _remove_from_list(seat_path, SEAT_IFACE, session_id)
        seat_props = mockobject.objects[seat_path].props[SEAT_IFACE]
        if seat_props["ActiveSession"][0] == session_id:
            seat_props["ActiveSession"] = ("", NO_OBJECT)
    _remove_from_list(user_path, USER_IFACE, session_id)
    self.RemoveObject(path)


@dbus.service.method(MOCK_IFACE, in_signature="osa{sv}", out_signature="")
def SetQuietly(self, path, interface, properties):
    """Change properties without a PropertiesChanged signal."""
    props = mockobject.objects[path].props[interface]
    for name, value in properties.items():
        props[name] = value


@dbus.service.method(MOCK_IFACE, in_signature="oss", out_signature="")
def DropPropertyQuietly(self, path, interface, name):
    """Remove a property, as an older or broken logind would lack it."""
    del mockobject.objects[path].props[interface][name]


@dbus.service.method(MOCK_IFACE, in_signature="ss", out_signature="")
def SetActiveQuietly(self, seat, session_id):
    """Put a session in front of a seat, and set Active on the seat's sessions, silently."""
    seat_path = dbus.ObjectPath(f"{ROOT}/seat/{escape_path(seat)}")
    seat_props = mockobject.objects[seat_path].props[SEAT_IFACE]
    target = _session_path(session_id) if session_id else NO_OBJECT
    seat_props["ActiveSession"] = (session_id, target)
    for entry_id, entry_path in seat_props["Sessions"]:
        props = mockobject.objects[entry_path].props[SESSION_IFACE]
        props["Active"] = entry_id == session_id
        if props["State"] in ("active", "online"):
            props["State"] = "active" if entry_id == session_id else "online"


@dbus.service.method(MOCK_IFACE, in_signature="osasas", out_signature="")
def EmitPropertiesChanged(self, path, interface, changed, invalidated):
    """Emit PropertiesChanged from an object with the current values of `changed`."""
    obj = mockobject.objects[path]
    values = dbus.Dictionary({name: obj.props[interface][name] for name in changed}, signature="sv")
    obj.EmitSignal(
        "org.freedesktop.DBus.Properties",
        "PropertiesChanged",
        "sa{sv}as",
        [interface, values, dbus.Array(invalidated, signature="s")],
    )


@dbus.service.method(MOCK_IFACE, in_signature="uuss", out_signature="")
def AddManySessions(self, count, first_uid, prefix, seat):
    """Add count sessions quietly, one user each, for memory and load figures."""
    for index in range(count):
        uid = first_uid + index
        AddLoginSession(
            self,
            f"{prefix}{index}",
            {"UID": dbus.UInt32(uid), "Name": f"u{uid}", "Seat": seat, "Type": "tty"},
        )
