"""The control socket's wire format, and the client the CLI uses.

A request is `{"version": 1, "command": "...", "params": {...}}`.  A reply is
`{"version": 1, "ok": true, "result": {...}}` or
`{"version": 1, "ok": false, "error": {"code": "...", "message": "..."}}`.
Each is one line of JSON.  This module stays free of asyncio and netlink, so
the CLI starts fast.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from userbound.errors import DaemonUnreachable, error_from_code

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/userbound/control.sock"
MAX_REQUEST_BYTES = 1024 * 1024


def socket_path(option: str | None) -> str:
    """Return the control socket path: the option, else $USERBOUND_SOCKET, else the default."""
    return option or os.environ.get("USERBOUND_SOCKET") or DEFAULT_SOCKET


def call(path: str, command: str, params: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the daemon and return its result, raising the error it reports."""
    request = {"version": PROTOCOL_VERSION, "command": command, "params": params}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as error:
            raise DaemonUnreachable(
                f"cannot reach the userbound daemon at {path}: {error.strerror}; "
                "start it with `userbound daemon` or set --control-socket"
            ) from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
        except BrokenPipeError:
            pass  # the daemon stopped reading an oversized request; its reply follows
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise DaemonUnreachable(
                    f"the daemon at {path} did not reply within {timeout:.0f} s"
                ) from None
            if not chunk:
                raise DaemonUnreachable(
                    f"the daemon at {path} closed the connection without a reply"
                )
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        details = reply.get("error", {})
        raise error_from_code(str(details.get("code")), str(details.get("message")))
    result: dict[str, Any] = reply.get("result", {})
    return result
