"""Sessions from utmp, for machines without logind, watched with inotify.

utmp lists logins with their terminal and remote host, nothing more: seats,
switching and locks are unknown in this mode, and snapshots show it
(`seats_known` is false).  An entry whose process is gone, or whose pid now
belongs to a later process, is stale and is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import pwd
import struct
from pathlib import Path
from typing import Any

from userbound.sessions.model import Session, Snapshot, Source
from userbound.sessions.monitor import Monitor, SourceUnavailable

UTMP_PATH = "/run/utmp"
BOOT_TIME = 2
USER_PROCESS = 7
# glibc's struct utmp on 64-bit Linux: 384 bytes, with 32-bit ut_tv fields.
RECORD = struct.Struct("<hxxi32s4s32s256shhi2i16s20x")

CLOCK_SLACK = 2.0  # seconds between a login's process start and its utmp record, at most
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


def read_utmp(path: str) -> list[Session]:
    """Return the live logins in a utmp file; raise OSError when it cannot be read."""
    data = Path(path).read_bytes()
    records = [
        RECORD.unpack_from(data, offset)
        for offset in range(0, len(data) - RECORD.size + 1, RECORD.size)
    ]

    # /proc/stat's btime moves with every step of the wall clock, while utmp
    # keeps the times written before the step.  The BOOT_TIME record, written
    # at boot, shows how far the clock has stepped forward since.
    # NOTE: without that record, a login from before a forward step of more
    # than CLOCK_SLACK looks stale and is left out.
    boot_time = _boot_time()
    recorded_boots = [seconds for kind, *_, seconds, _, _ in records if kind == BOOT_TIME]
    if recorded_boots:
        boot_time = min(boot_time, recorded_boots[-1])

    sessions = []
    for kind, pid, line, _, user, host, _, _, _, seconds, _, _ in records:
        if kind != USER_PROCESS or pid <= 0 or not _alive_since(pid, seconds, boot_time):
            continue

        name = _text(user)
        uid: int | None = None
        # A name that fills the field may be cut short, and then it would
        # name another account: such a login keeps no uid.
        if b"\0" in user:
            with contextlib.suppress(KeyError):
                uid = pwd.getpwnam(name).pw_uid

        tty = _text(line)
        remote_host = _text(host)
        local_display = remote_host.startswith(":")
        sessions.append(
            Session(
                id=f"{tty}:{pid}",
                uid=uid,
                user=name,
                seat="",
                type="x11" if local_display else "tty",
                remote=bool(remote_host) and not local_display,
                remote_host="" if local_display else remote_host,
                state="online",
                leader=pid,
                tty=tty,
            )
        )
    return sessions


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime line in /proc/stat")


def _alive_since(pid: int, login_time: int, boot_time: float) -> bool:
    """Return whether the login's process still runs: pid exists and started by the login time.

    A process that started later has only reused the pid of a login that ended
    without a DEAD_PROCESS record.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
    started = boot_time + ticks / os.sysconf("SC_CLK_TCK")
    return started <= login_time + CLOCK_SLACK


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(errors="replace")


class UtmpMonitor(Monitor):
    """Follow a utmp file: inotify on its folder gives the notices."""

    source = Source.UTMP

    def __init__(self, path: str = UTMP_PATH, **options: Any) -> None:
        super().__init__(**options)
        # A symlinked utmp is watched where the file itself lives.
        self.path = os.path.realpath(path)
        self._folder = os.path.dirname(self.path)
        self._inotify: int | None = None

    def describe_source(self) -> str:
        return f"utmp at {self.path}"

    async def _open_source(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        descriptor = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if descriptor < 0:
            raise SourceUnavailable(f"cannot start inotify: {os.strerror(ctypes.get_errno())}")
        folder = self._folder.encode()
        mask = (
            IN_MODIFY
            | IN_ATTRIB
            | IN_CLOSE_WRITE
            | IN_MOVED_FROM
            | IN_MOVED_TO
            | IN_CREATE
            | IN_DELETE
        )
        if libc.inotify_add_watch(descriptor, folder, mask) < 0:
            reason = os.strerror(ctypes.get_errno())
            os.close(descriptor)
            raise SourceUnavailable(f"cannot watch {folder.decode()}: {reason}")
        self._inotify = descriptor
        asyncio.get_running_loop().add_reader(descriptor, self._readable)

    def _readable(self) -> None:
        assert self._inotify is not None
        name = os.path.basename(self.path).encode()
        try:
            data = os.read(self._inotify, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + 16 <= len(data):
            _, _, _, length = struct.unpack_from("iIII", data, offset)
            entry = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
            offset += 16 + length
            if entry == name:
                self.notice("signal")
                return

    async def _close_source(self) -> None:
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify)
            os.close(self._inotify)
            self._inotify = None

    async def _read_source(self) -> Snapshot:
        try:
            sessions = await asyncio.to_thread(read_utmp, self.path)
        except FileNotFoundError:
            sessions = []  # no login has been recorded since boot
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EIO):
                return Snapshot.unknown(self.source, f"cannot read {self.path}: {error.strerror}")
            raise SourceUnavailable(f"cannot read {self.path}: {error.strerror}") from None
        return Snapshot.build(self.source, sessions, [], seats_known=False)
