"""The daemon's side of the control socket (the wire format is in protocol.py).

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
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from userbound.errors import InternalError, InvalidRequest, NotPermitted, UserboundError
from userbound.protocol import MAX_REQUEST_BYTES, PROTOCOL_VERSION

logger = logging.getLogger(__name__)

REJECT_READ_TIMEOUT = 1.0  # seconds a rejected client has to send its request
IDLE_TIMEOUT = 30.0  # seconds to send a whole request line
STREAM_WRITE_TIMEOUT = 10.0  # seconds a stream's client may leave a line unread
MAX_CONNECTIONS_PER_UID = 16  # root is not limited


@dataclass(frozen=True)
class Caller:
    """The process on the other end of a control connection."""

    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass
class Stream:
    """A reply that goes on: the result, then events until either side closes.

    The server calls `close` when the stream ends, however it ends, also when
    the client left before the first event.
    """

    result: dict[str, Any]
    events: AsyncGenerator[dict[str, Any], None]
    close: Callable[[], None]


Handler = Callable[[str, dict[str, Any], Caller], Awaitable[dict[str, Any] | Stream]]


def _shown(value: Any) -> str:
    """Return a value as JSON for an error message, shortened."""
    try:
        text = json.dumps(value)
    except RecursionError:
        return "a value nested too deeply"
    return text if len(text) <= 200 else text[:200] + "..."


class Params:
    """Typed access to a request's parameters; every error names the field."""

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = params

    def _get(self, name: str, kind: type | tuple[type, ...], label: str, default: Any) -> Any:
        value = self._params.get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidRequest(f"field {name!r} must be {label}, got {_shown(value)}")
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

    def table(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] = self._get(name, dict, "an object", {})
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
    except ValueError as error:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is an
        # integer longer than Python converts (4300 digits by default).
        raise InvalidRequest(f"request is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest("request is nested too deeply") from None
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
        self._per_uid: dict[int, int] = {}

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
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
        caller = _peer_credentials(writer.get_extra_info("socket"))
        self._connections.add(task)
        self._per_uid[caller.uid] = self._per_uid.get(caller.uid, 0) + 1
        try:
            if not caller.is_root and self._per_uid[caller.uid] > MAX_CONNECTIONS_PER_UID:
                logger.warning("uid %d has too many control connections open", caller.uid)
                limit = NotPermitted(
                    f"too many open control connections from uid {caller.uid} (at most "
                    f"{MAX_CONNECTIONS_PER_UID}); close some and try again"
                )
                # The reply follows the request, so the client is not cut off
                # while it still sends (it would see a broken pipe, not the reason).
                with contextlib.suppress(TimeoutError, OSError, ValueError):
                    await asyncio.wait_for(reader.readline(), REJECT_READ_TIMEOUT)
                writer.write(json.dumps(_error_reply(limit)).encode() + b"\n")
                return
            while True:
                try:
                    # A client that stops sending half-way must not hold the connection forever.
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except TimeoutError:
                    break
                except ValueError:
                    too_large = _error_reply(
                        InvalidRequest(f"request is larger than {MAX_REQUEST_BYTES} bytes")
                    )
                    writer.write(json.dumps(too_large).encode() + b"\n")
                    break
                if not line:
                    break
                reply = await self._dispatch(line, caller)
                if isinstance(reply, Stream):
                    try:
                        await self._stream(reply, reader, writer, caller)
                    finally:
                        reply.close()
                    break
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            self._per_uid[caller.uid] -= 1
            writer.close()

    async def _stream(
        self,
        stream: Stream,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        caller: Caller,
    ) -> None:
        """Send a stream's result and events until the client closes its end."""

        async def send_line(message: dict[str, Any]) -> None:
            writer.write(json.dumps(message).encode() + b"\n")
            async with asyncio.timeout(STREAM_WRITE_TIMEOUT):
                await writer.drain()

        async def send() -> None:
            try:
                await send_line({"version": PROTOCOL_VERSION, "ok": True, "result": stream.result})
                async for event in stream.events:
                    await send_line({"version": PROTOCOL_VERSION, "event": event})
            except TimeoutError:
                logger.warning(
                    "closing a stream to uid %d (pid %d): it left output unread for %.0f s",
                    caller.uid,
                    caller.pid,
                    STREAM_WRITE_TIMEOUT,
                )
            except UserboundError as error:
                message = {"code": error.code, "message": error.message}
                writer.write(
                    json.dumps({"version": PROTOCOL_VERSION, "error": message}).encode() + b"\n"
                )

        sender = asyncio.create_task(send())
        # Anything the client sends now, or its end of the connection, ends the stream.
        closed = asyncio.create_task(reader.read(1))
        try:
            await asyncio.wait({sender, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, closed):
                task.cancel()
            await asyncio.gather(sender, closed, return_exceptions=True)
            await stream.events.aclose()

    async def _dispatch(self, line: bytes, caller: Caller) -> dict[str, Any] | Stream:
        command = "?"
        try:
            command, params = parse_request(line)
            result = await self._handler(command, params, caller)
            if isinstance(result, Stream):
                return result
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
