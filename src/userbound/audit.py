"""The audit trail: one event for every decision the daemon takes about a tunnel.

Events are JSON objects.  The daemon keeps the latest in memory for
`userbound events`, hands each to the followers of `userbound events
--follow`, and appends it as one line to a log file in its state folder that
only root can read.  The file is rotated by size: audit.log becomes
audit.log.1, and so on, keeping a fixed number of old files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROTATE_BYTES = 1 << 20
KEEP_FILES = 5
RECENT = 1000  # events kept in memory for root, and for each tunnel owner

Record = dict[str, Any]


class AuditLog:
    """Append events to a root-only file, keep the latest in memory, and stream them."""

    def __init__(
        self, path: Path, *, rotate_bytes: int = ROTATE_BYTES, keep_files: int = KEEP_FILES
    ) -> None:
        self.path = path
        self._rotate_bytes = rotate_bytes
        self._keep_files = keep_files
        self.recent: collections.deque[Record] = collections.deque(maxlen=RECENT)
        # Each owner's own, so that one user's many events cannot push out another's.
        self._by_owner: dict[int, collections.deque[Record]] = {}
        self._subscribers: list[Callable[[Record], None]] = []
        self._failed = False

    def load(self) -> None:
        """Keep in memory the latest events an earlier daemon wrote, so a restart loses none.

        The rotated files are read too, oldest first, so that each owner
        finds their own latest events however many others wrote since.
        """
        lines: list[str] = []
        for number in range(self._keep_files, -1, -1):
            path = self.path.with_name(f"{self.path.name}.{number}") if number else self.path
            try:
                lines += path.read_text(errors="replace").splitlines()
            except OSError:
                continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._keep(record)

    def add(self, record: Record) -> None:
        self._keep(record)
        for subscriber in list(self._subscribers):
            subscriber(record)
        self._write(record)

    def _keep(self, record: Record) -> None:
        self.recent.append(record)
        owner = record.get("owner_uid")
        if isinstance(owner, int):
            if owner not in self._by_owner:
                self._by_owner[owner] = collections.deque(maxlen=RECENT)
            self._by_owner[owner].append(record)

    def recent_of(self, owner: int) -> list[Record]:
        """Return the latest events of one owner's tunnels, oldest first."""
        return list(self._by_owner.get(owner, ()))

    def _write(self, record: Record) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "a") as stream:
                stream.write(line)
                size = stream.tell()
            if size >= self._rotate_bytes:
                self._rotate()
            self._failed = False
        except OSError as error:
            # The audit file must never stop a decision; a failure is logged once.
            if not self._failed:
                logger.error("cannot write the audit log %s: %s", self.path, error)
            self._failed = True

    def _rotate(self) -> None:
        for number in range(self._keep_files - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            with contextlib.suppress(FileNotFoundError):
                older.rename(self.path.with_name(f"{self.path.name}.{number + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        with contextlib.suppress(FileNotFoundError):
            self.path.with_name(f"{self.path.name}.{self._keep_files + 1}").unlink()

    def subscribe(self, subscriber: Callable[[Record], None]) -> Callable[[], None]:
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(subscriber)

        return unsubscribe


class AuditFollower:
    """The events one client may see, queued; one that falls behind learns how many it missed."""

    def __init__(self, log: AuditLog, visible: Callable[[Record], bool], limit: int) -> None:
        self._visible = visible
        self._limit = limit
        self._queue: collections.deque[Record] = collections.deque()
        self._ready = asyncio.Event()
        self._missed = 0
        self.close = log.subscribe(self._add)

    def _add(self, record: Record) -> None:
        if not self._visible(record):
            return
        if len(self._queue) >= self._limit:
            self._missed += len(self._queue)
            self._queue.clear()
        self._queue.append(record)
        self._ready.set()

    async def events(self) -> AsyncGenerator[Record, None]:
        while True:
            await self._ready.wait()
            if self._missed:
                missed, self._missed = self._missed, 0
                yield {"event": "missed", "missed": missed}
            while self._queue:
                yield self._queue.popleft()
            self._ready.clear()
