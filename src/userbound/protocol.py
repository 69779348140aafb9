"""The control socket's wire format, and the client the CLI uses.

A request is `{"version": 1, "command": "...", "params": {...}}`.  A reply is
`{"version": 1, "ok": true, "result": {...}}` or
`{"version": 1, "ok": false, "error": {"code": "...", "message": "..."}}`.
Each is one line of JSON.  A request that follows something (`watch-sessions`)
gets its reply, then `{"version": 1, "event": {...}}` lines until either side
closes, or a last `{"version": 1, "error": {...}}` line.  Its client keeps the
sending side open: anything it sends, or a half-close, ends the stream.  This module stays
free of asyncio and netlink, so the CLI starts fast.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from userbound.errors import DaemonNotRunning, DaemonUnreachable, error_from_code

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/userbound/control.sock"
MAX_REQUEST_BYTES = 1024 * 1024


def socket_path(option: str | None) -> str:
    """Return the control socket path: the option, else $USERBOUND_SOCKET, else the default."""
    return option or os.environ.get("USERBOUND_SOCKET") or DEFAULT_SOCKET


def call(path: str, command: str, params: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the daemon and return its result, raising the error it reports."""
    with _connect(path, timeout) as sock:
        _send(sock, command, params)
        return _result(_read_line(sock, path, timeout))


def stream(
    path: str, command: str, params: dict[str, Any], timeout: float = 60.0
) -> Iterator[dict[str, Any]]:
    """Send a request whose reply goes on: yield its result, then each event the daemon sends."""
    with _connect(path, timeout) as sock:
        _send(sock, command, params)
        with sock.makefile("rb") as lines:
            try:
                first = lines.readline()
            except TimeoutError:
                raise DaemonUnreachable(
                    f"the daemon at {path} did not reply within {timeout:.0f} s"
                ) from None
            if not first:
                raise DaemonUnreachable(
                    f"the daemon at {path} closed the connection without a reply"
                )
            yield _result(first)
            sock.settimeout(None)
            for line in lines:
                message = json.loads(line)
                if "error" in message:
                    details = message["error"]
                    raise error_from_code(str(details.get("code")), str(details.get("message")))
                yield message["event"]
        raise DaemonUnreachable(f"the daemon at {path} closed the connection")


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        if isinstance(error, PermissionError):
            hint = "check the permissions of the socket and its folders"
        else:
            hint = "start it with `userbound daemon` or set --control-socket"
        message = f"cannot reach the userbound daemon at {path}: {error.strerror}; {hint}"
        if isinstance(error, FileNotFoundError | ConnectionRefusedError):
            raise DaemonNotRunning(message) from None
        raise DaemonUnreachable(message) from None
    return sock


def _send(sock: socket.socket, command: str, params: dict[str, Any]) -> None:
    request = {"version": PROTOCOL_VERSION, "command": command, "params": params}
    try:
        sock.sendall(json.dumps(request).encode() + b"\n")
    except BrokenPipeError:
        pass  # the daemon stopped reading an oversized request; its reply follows


def _read_line(sock: socket.socket, path: str, timeout: float) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise DaemonUnreachable(
                f"the daemon at {path} did not reply within {timeout:.0f} s"
            ) from None
        if not chunk:
            raise DaemonUnreachable(f"the daemon at {path} closed the connection without a reply")
        data += chunk
    return data


def _result(data: bytes) -> dict[str, Any]:
    reply = json.loads(data)
    if not reply.get("ok"):
        details = reply.get("error", {})
        raise error_from_code(str(details.get("code")), str(details.get("message")))
    result: dict[str, Any] = reply.get("result", {})
    return result
