"""Session awareness: sessions and seats from logind, or from utmp without logind.

`open_monitor` picks the source; the monitor keeps a `Snapshot` and calls its
subscribers with each `Event`.  Importing this package loads neither asyncio
nor D-Bus, so the CLI starts fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from userbound.sessions.model import SOURCES, Event, EventKind, Seat, Session, Snapshot, Source

if TYPE_CHECKING:
    from userbound.sessions.monitor import Monitor

# logind and elogind write a file per seat here; packages may create the folder empty.
LOGIND_RUNTIME = "/run/systemd/seats"

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "Event",
    "EventKind",
    "Seat",
    "Session",
    "Snapshot",
    "Source",
    "choose_source",
    "open_monitor",
]


async def choose_source(source: str, bus_address: str | None = None) -> Source:
    """Resolve "auto": logind where the machine has one, even if it is down now; else utmp."""
    if source != "auto":
        return Source(source)
    from userbound.sessions.logind import logind_present

    if _logind_ran() or await logind_present(bus_address):
        return Source.LOGIND
    return Source.UTMP


def _logind_ran() -> bool:
    """Return whether a logind has written seat files since boot (an empty folder is not enough)."""
    try:
        return any(Path(LOGIND_RUNTIME).iterdir())
    except OSError:
        return False


async def open_monitor(
    source: str = "auto",
    *,
    bus_address: str | None = None,
    utmp_path: str | None = None,
    **options: Any,
) -> Monitor:
    """Return a started monitor of the chosen source."""
    monitor: Monitor
    if await choose_source(source, bus_address) is Source.LOGIND:
        from userbound.sessions.logind import LogindMonitor

        monitor = LogindMonitor(bus_address, **options)
    else:
        from userbound.sessions.utmp import UTMP_PATH, UtmpMonitor

        monitor = UtmpMonitor(utmp_path or UTMP_PATH, **options)
    logger.info("following sessions from %s", monitor.describe_source())
    await monitor.start()
    return monitor
