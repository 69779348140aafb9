"""Streams on the control socket: every way a stream ends releases what it holds."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from userbound.control import Caller, ControlServer, Stream


async def _serve_streams(path: Path, clients: int, *, read_first: bool) -> tuple[int, int]:
    """Open and drop `clients` streams; return how many were opened and closed."""
    opened = closed = 0

    async def events() -> AsyncGenerator[dict[str, Any], None]:
        while True:
            await asyncio.sleep(3600)
            yield {}

    async def handler(command: str, params: dict[str, Any], caller: Caller) -> Stream:
        nonlocal opened

        def close() -> None:
            nonlocal closed
            closed += 1

        opened += 1
        return Stream({"watching": True}, events(), close)

    server = ControlServer(str(path), handler)
    await server.start()
    try:
        for _ in range(clients):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(json.dumps({"version": 1, "command": "watch"}).encode() + b"\n")
            await writer.drain()
            if read_first:
                assert json.loads(await reader.readline())["result"] == {"watching": True}
            writer.close()
            await writer.wait_closed()
        for _ in range(200):
            if closed == clients:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.close()
    return opened, closed


def test_stream_closed_when_client_leaves_at_once(tmp_path: Path) -> None:
    opened, closed = asyncio.run(_serve_streams(tmp_path / "control.sock", 50, read_first=False))
    assert opened == 50
    assert closed == 50


def test_stream_closed_when_client_leaves_later(tmp_path: Path) -> None:
    opened, closed = asyncio.run(_serve_streams(tmp_path / "control.sock", 20, read_first=True))
    assert opened == 20
    assert closed == 20


def test_stream_closed_when_client_stops_reading(tmp_path: Path, monkeypatch: Any) -> None:
    """A client that never reads is dropped once its socket buffers fill and time passes."""
    monkeypatch.setattr("userbound.control.STREAM_WRITE_TIMEOUT", 0.2)
    path = tmp_path / "control.sock"
    closed = asyncio.Event()

    async def events() -> AsyncGenerator[dict[str, Any], None]:
        while True:
            yield {"padding": "x" * 65536}

    async def handler(command: str, params: dict[str, Any], caller: Caller) -> Stream:
        return Stream({}, events(), closed.set)

    async def main() -> None:
        server = ControlServer(str(path), handler)
        await server.start()
        client = socket.socket(socket.AF_UNIX)
        try:
            client.connect(str(path))
            client.sendall(json.dumps({"version": 1, "command": "watch"}).encode() + b"\n")
            await asyncio.wait_for(closed.wait(), 10)
        finally:
            client.close()
            await server.close()

    asyncio.run(main())
