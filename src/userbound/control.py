"""The control socket: versioned JSON requests and replies, one per line.

A request is `{"version": 1, "command": "...", "params": {...}}`.  A reply is
`{"version": 1, "ok": true, "result": {...}}` or
`{"version": 1, "ok": false, "error": {"code": "...", "message": "..."}}`.
The server authorises each request by the peer credentials of the connection
(SO_PEERCRED), which the kernel fills in and the client cannot forge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from userbound.errors import (
    DaemonUnreachable,
    InternalError,
    InvalidRequest,
    UserboundError,
    error_from_code,
)

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/userbound/control.sock"
MAX_REQUEST_BYTES = 1024 * 1024


def socket_path(option: str | None) -> str:
    """Return the control socket path: the option, else $USERBOUND_SOCKET, else the default."""
    return option or os.environ.get("USERBOUND_SOCKET") or DEFAULT_SOCKET


@dataclass(frozen=True)
class Caller:
    """The process on the other end of a control connection."""

    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


Handler = Callable[[str, dict[str, Any], Caller], Awaitable[dict[str, Any]]]


class Params:
    """Typed access to a request's parameters; every error names the field."""

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = params

    def _get(self, name: str, kind: type | tuple[type, ...], label: str, default: Any) -> Any:
        value = self._params.get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidRequest(f"field {name!r} must be {label}, got {json.dumps(value)}")
        return value

    def string(self, name: str, *, required: bool = False) -> str | None:
        if required and name not in self._params:
            raise InvalidRequest(f"field {name!r} is missing")
        value: str | None = self._get(name, str, "a string", None)
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        value: bool = self._get(name, bool, "true or false", default)
        return value

    def user(self, name: str) -> str | int | None:
        """Return a user given as a name or a uid."""
        value: str | int | None = self._get(name, (str, int), "a user name or a uid", None)
        return value

    def users(self, name: str, *, required: bool = False) -> list[str | int] | None:
        if required and name not in self._params:
            raise InvalidRequest(f"field {name!r} is missing")
        value: list[str | int] | None = self._get(name, list, "a list of user names or uids", None)
        if value is not None:
            for item in value:
                if not isinstance(item, str | int) or isinstance(item, bool):
                    raise InvalidRequest(
                        f"field {name!r} must list user names or uids, got {json.dumps(item)}"
                    )
        return value

    def check_known(self, known: set[str]) -> None:
        unknown = sorted(set(self._params) - known)
        if unknown:
            raise InvalidRequest(
                f"unknown field {unknown[0]!r}; this command takes "
                + ", ".join(repr(k) for k in sorted(known))
            )


def _remove_socket_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _error_reply(error: UserboundError) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "ok": False,
        "error": {"code": error.code, "message": error.message},
    }


def _peer_credentials(sock: socket.socket) -> Caller:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Caller(pid=pid, uid=uid & 0xFFFFFFFF, gid=gid & 0xFFFFFFFF)


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Decode one request line into its command and parameters."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"request is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise InvalidRequest("request must be a JSON object")
    version = request.get("version")
    if version != PROTOCOL_VERSION:
        raise InvalidRequest(
            f"field 'version' is {json.dumps(version)}; this daemon speaks version "
            f"{PROTOCOL_VERSION}"
        )
    command = request.get("command")
    if not isinstance(command, str):
        raise InvalidRequest(f"field 'command' must be a string, got {json.dumps(command)}")
    params = request.get("params", {})
    if not isinstance(params, dict):
        raise InvalidRequest(f"field 'params' must be an object, got {json.dumps(params)}")
    return command, params


class ControlServer:
    """Serve control requests on a Unix socket."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)  # noqa: ASYNC240
        _remove_socket_file(self.path)
        self._server = await asyncio.start_unix_server(
            self._serve, path=self.path, limit=MAX_REQUEST_BYTES
        )
        # Every user may connect; each request is authorised by its peer credentials.
        os.chmod(self.path, 0o666)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await self._server.wait_closed()
            self._server = None
        _remove_socket_file(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            caller = _peer_credentials(writer.get_extra_info("socket"))
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    reply = _error_reply(
                        InvalidRequest(f"request is larger than {MAX_REQUEST_BYTES} bytes")
                    )
                    writer.write(json.dumps(reply).encode() + b"\n")
                    break
                if not line:
                    break
                reply = await self._dispatch(line, caller)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _dispatch(self, line: bytes, caller: Caller) -> dict[str, Any]:
        command = "?"
        try:
            command, params = parse_request(line)
            result = await self._handler(command, params, caller)
        except UserboundError as error:
            if isinstance(error, InternalError):
                logger.error("request %s from uid %d failed: %s", command, caller.uid, error)
            return _error_reply(error)
        except Exception:
            logger.exception(
                "request %s from uid %d failed with an internal error", command, caller.uid
            )
            return _error_reply(InternalError(f"internal error while handling {command!r}"))
        return {"version": PROTOCOL_VERSION, "ok": True, "result": result}


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
        sock.sendall(json.dumps(request).encode() + b"\n")
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
