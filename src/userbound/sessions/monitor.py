"""The loop every session source shares: read, publish, sleep until something changes.

A source never applies a notice to its view.  A notice (a D-Bus signal, an
inotify event) only makes the monitor read a whole snapshot again, once for a
burst of notices.  A slow periodic read catches changes that came with no
notice.  Between reads the monitor sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

from userbound.sessions.model import Event, EventKind, Snapshot, Source, derive_events

logger = logging.getLogger(__name__)

RESYNC_INTERVAL = 30.0  # seconds between reads when no notice arrives
# A notice after a quiet time is read at once: one loop turn gathers the
# notices already received, and those arriving during a read make one more.
DEBOUNCE = 0.0  # a burst ends after this long without a notice...
MAX_DELAY = 0.1  # ...or this long after its first notice
RETRY_FIRST = 0.5  # seconds before the first attempt to reopen a lost source
RETRY_MAX = 30.0

Subscriber = Callable[[Event], None]


class SourceUnavailable(Exception):
    """Raised when the source cannot be read; the message gives the reason."""


class Monitor:
    """Keep a current `Snapshot` of one source and tell subscribers what changes."""

    source: Source

    def __init__(
        self,
        *,
        resync_interval: float = RESYNC_INTERVAL,
        debounce: float = DEBOUNCE,
        max_delay: float = MAX_DELAY,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.resync_interval = resync_interval
        self._debounce = debounce
        self._max_delay = max_delay
        self._retry_first = retry_first
        self._retry_max = retry_max
        self._snapshot = Snapshot.unknown(self.source, "not read yet")
        self._last_known: Snapshot | None = None
        self._generation = 0
        self._subscribers: list[Subscriber] = []
        self._notice = asyncio.Event()
        self._notice_time: float | None = None
        self._notice_cause = "signal"
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reading = False
        self.reads = 0  # snapshots read so far, for tests and benchmarks

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def pending(self) -> bool:
        """Whether a read is running, or a notice arrived after the last read started."""
        return self._reading or self._notice_time is not None

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call subscriber with every event from now on; return the function that stops it."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(subscriber)

        return unsubscribe

    async def start(self) -> None:
        """Start following the source; return once the first snapshot is read."""
        self._task = asyncio.create_task(self._run(), name=f"{self.source.value} monitor")
        await self._first.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_source()

    def notice(self, cause: str = "signal") -> None:
        """Something may have changed: read a new snapshot soon."""
        if self._notice_time is None:
            self._notice_time = time.monotonic()
            self._notice_cause = cause
        self._notice.set()

    # What each source provides

    def describe_source(self) -> str:
        """Return where this monitor reads, for logs."""
        raise NotImplementedError

    async def _open_source(self) -> None:
        """Connect to the source; raise SourceUnavailable when it cannot be reached."""
        raise NotImplementedError

    async def _read_source(self) -> Snapshot:
        """Read a whole snapshot; raise SourceUnavailable when the source is lost."""
        raise NotImplementedError

    async def _close_source(self) -> None:
        raise NotImplementedError

    # The loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._retry_first
        cause = "start"
        while True:
            try:
                await self._open_source()
                delay = self._retry_first
                retry = self._retry_first
                while True:
                    signal_time = self._notice_time
                    self._notice_time = None
                    self._notice.clear()
                    self._reading = True
                    started = loop.time()
                    try:
                        snapshot = await self._read_source()
                    finally:
                        self._reading = False
                    self.reads += 1
                    logger.debug(
                        "read %d session(s) from %s (%s) in %.1f ms",
                        len(snapshot.sessions),
                        self.source.value,
                        cause,
                        (loop.time() - started) * 1000,
                    )
                    self._publish(replace(snapshot, cause=cause, signal_time=signal_time))
                    # While the state is unknown (logind slow, or sending bad
                    # replies), read again with backoff, not only on the next notice.
                    if snapshot.known:
                        wait, retry = self.resync_interval, self._retry_first
                    else:
                        wait, retry = (
                            min(retry, self.resync_interval),
                            min(retry * 2, self._retry_max),
                        )
                    # A source that signals without pause gets at most half
                    # of this process's time for reads.
                    cause = await self._wait_for_notice(rest=loop.time() - started, longest=wait)
            except SourceUnavailable as error:
                reason = str(error)
            except Exception as error:
                # A bug must not leave an old snapshot standing as if it were current.
                reason = f"internal error while reading {self.source.value}: {error!r}"
                if reason != self._snapshot.reason:
                    logger.exception("reading sessions from %s failed", self.source.value)
            try:
                await self._close_source()
            except Exception:
                logger.exception("closing the %s source failed", self.source.value)
            self._publish(Snapshot.unknown(self.source, reason))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)
            cause = "reconnect"

    async def _wait_for_notice(self, rest: float, longest: float) -> str:
        """Sleep until a burst of notices ends or `longest` seconds pass.

        After a notice, the next read starts no sooner than `rest` seconds
        after the last one ended.
        """
        loop = asyncio.get_running_loop()
        earliest = loop.time() + rest
        try:
            async with asyncio.timeout(longest):
                await self._notice.wait()
        except TimeoutError:
            return "resync"
        deadline = loop.time() + self._max_delay
        while (remaining := deadline - loop.time()) > 0:
            self._notice.clear()
            try:
                async with asyncio.timeout(min(self._debounce, remaining)):
                    await self._notice.wait()
            except TimeoutError:
                break
        if (wait := earliest - loop.time()) > 0:
            await asyncio.sleep(wait)
        return self._notice_cause

    def _publish(self, snapshot: Snapshot) -> None:
        self._generation += 1
        snapshot = replace(snapshot, generation=self._generation)
        before = self._snapshot
        first = not self._first.is_set()
        events: list[Event] = []
        if snapshot.known:
            if not before.known and not first:
                logger.info("sessions known again from %s", self.source.value)
                events.append(Event(EventKind.SESSIONS_KNOWN, snapshot))
            events += derive_events(self._last_known, snapshot)
            self._last_known = snapshot
        else:
            if before.known or first or before.reason != snapshot.reason:
                # Each reason is logged once, however often the same attempt fails.
                logger.warning("sessions unknown: %s", snapshot.reason)
            if before.known and not first:
                events.append(Event(EventKind.SESSIONS_UNKNOWN, snapshot))
        self._snapshot = snapshot
        self._first.set()
        for event in events:
            logger.debug("%s", event.describe())
            for subscriber in list(self._subscribers):
                try:
                    subscriber(event)
                except Exception:
                    logger.exception("a session event subscriber failed")


class Follower:
    """A monitor's events as JSON, queued for one slow consumer (a control stream).

    At most `limit` events wait.  A follower that falls further behind gets,
    in place of the queued events, one `{"event": "snapshot", "missed": N,
    "snapshot": {...}}` with the whole state, and then the events after it.
    """

    def __init__(self, monitor: Monitor, limit: int) -> None:
        self._monitor = monitor
        self._limit = limit
        # JSON, not Event, so that a queued event does not keep its snapshot
        # alive.  sessions-known is the exception because its JSON contains
        # the whole snapshot: followers share the Event until each sends it.
        self._queue: collections.deque[dict[str, Any] | Event] = collections.deque()
        self._ready = asyncio.Event()
        self._missed = 0
        self.close = monitor.subscribe(self._add)

    def _add(self, event: Event) -> None:
        if len(self._queue) >= self._limit:
            self._missed += len(self._queue)
            self._queue.clear()
        self._queue.append(event if event.kind is EventKind.SESSIONS_KNOWN else event.to_json())
        self._ready.set()

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        while True:
            await self._ready.wait()
            if self._missed:
                snapshot = self._monitor.snapshot.to_json()
                # Events the snapshot already contains are dropped with it.
                while self._queue and _generation(self._queue[0]) <= snapshot["generation"]:
                    self._queue.popleft()
                    self._missed += 1
                missed, self._missed = self._missed, 0
                yield {"event": "snapshot", "missed": missed, "snapshot": snapshot}
            while self._queue and not self._missed:
                item = self._queue.popleft()
                yield item.to_json() if isinstance(item, Event) else item
            if not self._queue:
                self._ready.clear()


def _generation(item: dict[str, Any] | Event) -> int:
    if isinstance(item, Event):
        return item.snapshot.generation
    generation: int = item["generation"]
    return generation
