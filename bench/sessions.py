"""Benchmarks of session awareness, on a private bus with the simulated logind (root).

    /opt/userbound/venv/bin/python bench/sessions.py [--switches N] [--idle SECONDS]
                                                     [--sessions N] [--output FILE]

Measures:
- latency from a PropertiesChanged emission to the derived seat-switched
  event, over N fast user switches, seen by `userbound sessions --direct
  --follow --json` in its own process (the event's time is when the monitor
  built the snapshot it came from);
- CPU time and wakeups (context switches) of the idle daemon, summed over its
  threads, from /proc, with a tunnel up and three sessions;
- the daemon's resident memory with N sessions, and the time of one whole read.
Figures go to bench/results/sessions.json (or --output) and to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from figures import header, summary, write

from userbound.lab.logind import (
    SEAT,
    SESSION,
    LogindPuppet,
    PrivateBus,
    SimulatedLogind,
    seat_path,
    session_path,
)
from userbound.lab.testbed import USERBOUND, Testbed
from userbound.sessions.logind import LogindMonitor

ALICE = 2001
BOB = 2002
RESULTS = Path(__file__).parent / "results" / "sessions.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


async def two_users(logind: LogindPuppet) -> None:
    await logind.login("2", ALICE, "alice", vt=5, activate=True)
    await logind.login("3", BOB, "bob", vt=6)
    await logind.login("4", BOB, "bob", seat="", remote=True, remote_host="192.0.2.7")


def switch_latency(bus: PrivateBus, switches: int) -> dict[str, Any]:
    """Switch seat0 between alice and bob; time each emission to the event's snapshot."""
    follower = subprocess.Popen(
        [str(USERBOUND), "sessions", "--direct", "--follow", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
    )
    assert follower.stdout is not None
    latencies: list[float] = []

    def next_event(kind: str) -> dict[str, Any]:
        while True:
            event: dict[str, Any] = json.loads(follower.stdout.readline())  # type: ignore[union-attr]
            if event["event"] == kind:
                return event

    async def play() -> None:
        async with LogindPuppet.connect(bus.address) as logind:
            front, behind = "2", "3"
            for _ in range(switches):
                await logind.set_active("seat0", behind)
                # What logind sends on a switch: both sessions, then the seat.
                emitted = time.time()
                for changed in (front, behind):
                    await logind.emit_properties_changed(
                        session_path(changed), SESSION, ["Active"], ["State"]
                    )
                await logind.emit_properties_changed(seat_path("seat0"), SEAT, ["ActiveSession"])
                event = await asyncio.to_thread(next_event, "seat-switched")
                latencies.append((event["time"] - emitted) * 1000)
                front, behind = behind, front

    try:
        next_event("snapshot")
        asyncio.run(play())
    finally:
        follower.terminate()
        follower.wait(10)
        follower.stdout.close()
    return {"ms": summary(latencies)}


def thread_counters(pid: int) -> tuple[float, int, int]:
    """Return CPU seconds and voluntary and involuntary context switches of all threads."""
    cpu, voluntary, involuntary = 0.0, 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return cpu, voluntary, involuntary


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def daemon_pid(daemon: subprocess.Popen[bytes]) -> int:
    # `ip netns exec` and setpriv replace themselves with the program: same pid.
    command = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"userbound") for part in command), command
    return daemon.pid


def idle_daemon(bus: PrivateBus, bed: Testbed, seconds: float) -> dict[str, Any]:
    daemon = bed.start_daemon("--sessions", "logind", env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
    pid = daemon_pid(daemon)
    client = bed.add_client()
    path = bed.write_config(bed.client_config(client), ALICE)
    result = bed.cli(ALICE, "up", str(path), "--name", bed.tunnel_name())
    assert result.returncode == 0, result.stderr
    time.sleep(2)  # the tunnel's start has settled
    cpu_before, voluntary_before, involuntary_before = thread_counters(pid)
    time.sleep(seconds)
    cpu_after, voluntary_after, involuntary_after = thread_counters(pid)
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    daemon.terminate()
    daemon.wait(30)
    return {
        "seconds": seconds,
        "cpu_ms": round((cpu_after - cpu_before) * 1000, 1),
        "voluntary_context_switches": voluntary_after - voluntary_before,
        "involuntary_context_switches": involuntary_after - involuntary_before,
        "threads": threads,
        "resync_interval_s": 30,
    }


def many_sessions(bus: PrivateBus, bed: Testbed, count: int) -> dict[str, Any]:
    daemon = bed.start_daemon("--sessions", "logind", env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
    pid = daemon_pid(daemon)
    time.sleep(1)
    before = resident_kib(pid)

    async def add() -> float:
        async with LogindPuppet.connect(bus.address) as logind:
            await logind.add_many_sessions(count, 100_000, "m", "")
            await logind.emit_session_new("m0")
        monitor = LogindMonitor(bus.address)
        started = time.monotonic()
        await monitor.start()
        elapsed = time.monotonic() - started
        assert len(monitor.snapshot.sessions) >= count
        await monitor.close()
        return elapsed

    read_seconds = asyncio.run(add())
    deadline = time.monotonic() + 120
    while True:
        listed = bed.cli(0, "sessions", "--json")
        if listed.returncode == 0 and len(json.loads(listed.stdout)["sessions"]) >= count:
            break
        assert time.monotonic() < deadline, "the daemon never listed every session"
        time.sleep(0.5)
    after = resident_kib(pid)
    daemon.terminate()
    daemon.wait(30)
    return {
        "sessions": count,
        "daemon_rss_kib_before": before,
        "daemon_rss_kib_after": after,
        "one_whole_read_s": round(read_seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--switches", type=int, default=1000, help="fast user switches to time")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds to watch the idle daemon")
    parser.add_argument(
        "--sessions", type=int, default=10_000, help="sessions for the memory figure"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON file for the figures")
    arguments = parser.parse_args()

    if os.geteuid() != 0:
        print("bench/sessions.py: run as root (it builds network namespaces)", file=sys.stderr)
        return 3

    figures = header()
    with tempfile.TemporaryDirectory() as folder:
        with PrivateBus(Path(folder) / "bus") as bus, SimulatedLogind(bus):
            asyncio.run(play_on(bus, two_users))
            figures["switch_to_event"] = switch_latency(bus, arguments.switches)
            print(json.dumps(figures["switch_to_event"]), flush=True)
            with Testbed("ubb") as bed:
                figures["idle_daemon"] = idle_daemon(bus, bed, arguments.idle)
                print(json.dumps(figures["idle_daemon"]), flush=True)
                figures["many_sessions"] = many_sessions(bus, bed, arguments.sessions)
                print(json.dumps(figures["many_sessions"]), flush=True)

    write(figures, arguments.output)
    return 0


async def play_on(bus: PrivateBus, scenario: Any) -> None:
    async with LogindPuppet.connect(bus.address) as logind:
        await scenario(logind)


if __name__ == "__main__":
    sys.exit(main())
