"""Benchmarks of the policy, on a private bus with the simulated logind (root).

    /opt/userbound/venv/bin/python bench/policy.py [--switches N] [--output FILE]

With `on_switch_away = "suspend"`, seat0 switches between alice, who owns a
tunnel, and bob, N times; each switch suspends or resumes the tunnel.
Measures:
- the daemon's own figure for each decision: from the first D-Bus signal the
  daemon received to the committed kernel change (the audit event's
  latency_ms);
- from the emission of the first signal to the committed kernel change,
  both on CLOCK_MONOTONIC;
- while alice sends a UDP datagram to the private server every millisecond,
  how many of those sent after each suspend was committed reached the server.
Figures go to bench/results/policy.json (or --output) and to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from figures import follow_decisions, header, summary, write

from userbound.lab.logind import (
    SEAT,
    SESSION,
    LogindPuppet,
    PrivateBus,
    SimulatedLogind,
    seat_path,
    session_path,
)
from userbound.lab.testbed import PRIVATE_V4, Testbed

ALICE = 2001
BOB = 2002
RESULTS = Path(__file__).parent / "results" / "policy.json"
PORT = 9999

# Sends CLOCK_MONOTONIC as a double to the private server every millisecond.
SENDER = f"""
import socket, struct, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
while True:
    try:
        sock.sendto(struct.pack("d", time.monotonic()), ("{PRIVATE_V4}", {PORT}))
    except OSError:
        pass
    time.sleep(0.001)
"""
# Records the send time of every datagram that arrives, until SIGTERM.
RECEIVER = f"""
import signal, socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{PRIVATE_V4}", {PORT}))
print("ready", flush=True)
times = []
def stop(*_):
    sys.stdout.write("\\n".join(repr(t) for t in times) + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    times.append(struct.unpack("d", sock.recv(64))[0])
"""


def run_switches(bus: PrivateBus, bed: Testbed, switches: int) -> dict[str, Any]:
    policy = bed.directory / "policy.toml"
    policy.write_text('on_switch_away = "suspend"\n')
    environment = {"DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    bed.start_daemon("--sessions", "logind", "--policy", str(policy), env=environment)
    path = bed.write_config(bed.client_config(bed.add_client()), ALICE)
    result = bed.cli(ALICE, "up", str(path), "--name", bed.tunnel_name())
    assert result.returncode == 0, result.stderr

    receiver = bed.spawn(bed.private, sys.executable, "-c", RECEIVER, stdout=subprocess.PIPE)
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == b"ready"
    bed.spawn(bed.host, sys.executable, "-c", SENDER, uid=ALICE)
    next_decision = follow_decisions(bed)

    records: list[tuple[float, dict[str, Any]]] = []

    async def play() -> None:
        async with LogindPuppet.connect(bus.address) as logind:
            front, behind = "2", "3"
            for _ in range(switches):
                await logind.set_active("seat0", behind)
                emitted = time.monotonic()
                for changed in (front, behind):
                    await logind.emit_properties_changed(
                        session_path(changed), SESSION, ["Active"], ["State"]
                    )
                await logind.emit_properties_changed(seat_path("seat0"), SEAT, ["ActiveSession"])
                event = await asyncio.to_thread(next_decision)
                records.append((emitted, event))
                front, behind = behind, front
                # Let alice's sender get packets through before the next suspend.
                await asyncio.sleep(0.02)

    asyncio.run(play())
    time.sleep(0.2)
    receiver.send_signal(signal.SIGTERM)
    received = sorted(float(line) for line in receiver.stdout.read().split())

    # For each suspend: datagrams sent after its commit and before the
    # switch back began (a resume opens the tunnel before its commit ends).
    passed_after_commit = 0
    suspends = 0
    sent_while_suspended = 0.0
    for (_, event), (back, _) in zip(records, [*records[1:], (float("inf"), {})], strict=True):
        if event["state"] != "suspended":
            continue
        suspends += 1
        start = event["committed_monotonic"]
        passed_after_commit += sum(1 for t in received if start < t < back)
        if back != float("inf"):
            sent_while_suspended += (back - start) * 1000  # one datagram per ms
    return {
        "switches": switches,
        "signal_received_to_commit_ms": summary([e["latency_ms"] for _, e in records]),
        "emission_to_commit_ms": summary(
            [(e["committed_monotonic"] - emitted) * 1000 for emitted, e in records]
        ),
        "suspends": suspends,
        "owner_datagrams_sent_while_suspended_approx": round(sent_while_suspended),
        "owner_datagrams_passed_after_suspend_commit": passed_after_commit,
        "owner_datagrams_received_in_all": len(received),
    }


async def two_users(bus: PrivateBus) -> None:
    async with LogindPuppet.connect(bus.address) as logind:
        await logind.login("2", ALICE, "alice", vt=5, activate=True)
        await logind.login("3", BOB, "bob", vt=6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--switches", type=int, default=1000, help="fast user switches")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON file for the figures")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/policy.py: run as root (it builds network namespaces)", file=sys.stderr)
        return 3

    figures = header()
    with Testbed("ubb") as bed:
        with PrivateBus(bed.directory / "bus") as bus, SimulatedLogind(bus):
            asyncio.run(two_users(bus))
            figures["switch_to_commit"] = run_switches(bus, bed, arguments.switches)
    print(json.dumps(figures["switch_to_commit"], indent=2), flush=True)
    write(figures, arguments.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
