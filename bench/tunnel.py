"""Benchmarks of the owner-bound tunnel, run as root in the lab's namespaces.

    /opt/userbound/venv/bin/python bench/tunnel.py [--rounds N] [--output FILE]

Measures:
- time from `userbound up` to the first packet answered through the tunnel;
- the cost of changing a tunnel's allowed uids, seen by a control client;
- iperf3 throughput as the owner through the tunnel, against the same
  wireguard-go pair with no userbound rules, alternating in one run.
Figures go to bench/results/tunnel.json (or --output) and to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from figures import summary

from userbound.lab.testbed import PRIVATE_V4, Testbed, run
from userbound.protocol import call

ALICE = 2001
RESULTS = Path(__file__).parent / "results" / "tunnel.json"


def up_to_first_packet(bed: Testbed, rounds: int) -> dict[str, Any]:
    """Time `userbound up` as alice, and the first UDP echo answered through the tunnel."""
    client = bed.add_client()
    path = bed.write_config(bed.client_config(client), ALICE)
    command_ms, first_packet_ms = [], []
    for number in range(rounds):
        loop = bed.start_probe_loop(ALICE, f"first-{number}", interval=0.0005, timeout=0.01)
        time.sleep(0.3)  # the loop's interpreter has started and is probing
        name = f"ubf{bed.id}{number}"
        start = time.time()
        result = bed.cli(ALICE, "up", str(path), "--name", name)
        returned = time.time()
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 10
        first = None
        while first is None and time.monotonic() < deadline:
            first = next((t for t, r in bed.loop_results(loop) if t > start and r == "ok"), None)
            time.sleep(0.01)
        assert first is not None, "no packet came through the tunnel within 10 s"
        bed.processes[-1].kill()
        command_ms.append((returned - start) * 1000)
        first_packet_ms.append((first - start) * 1000)
        assert bed.cli(ALICE, "down", name).returncode == 0
    return {
        "up_command_ms": summary(command_ms),
        "first_packet_ms": summary(first_packet_ms),
        "note": "a probe loop sends a UDP echo every 0.5 ms and waits 10 ms for each "
        "answer, so first_packet_ms is late by up to about 11 ms; it includes the "
        "WireGuard handshake. up_command_ms includes starting the CLI as alice.",
    }


def allowed_uid_changes(bed: Testbed, changes: int) -> dict[str, Any]:
    """Time `allow` requests that add and remove one uid, alternately."""
    client = bed.add_client()
    path = bed.write_config(bed.client_config(client), ALICE)
    name = f"uba{bed.id}"
    assert bed.cli(ALICE, "up", str(path), "--name", name).returncode == 0
    socket_path = str(bed.control_socket)
    durations = []
    for number in range(changes):
        key = "add" if number % 2 == 0 else "remove"
        start = time.perf_counter()
        call(socket_path, "allow", {"name": name, key: [3000 + number // 2]})
        durations.append((time.perf_counter() - start) * 1000)
    assert bed.cli(0, "down", name).returncode == 0
    return {"round_trip_ms": summary(durations), "changes": changes}


def iperf(bed: Testbed, uid: int, seconds: int) -> float:
    """Return the receiver's throughput in Mbit/s of one iperf3 TCP run from the shared machine."""
    argv = ["iperf3", "-c", PRIVATE_V4, "-t", str(seconds), "-J"]
    result = subprocess.run(
        [*bed.prefix_command(bed.host, uid), *argv], capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def kill_daemon(bed: Testbed) -> None:
    """SIGKILL the daemon, which leaves its tunnels, rules and routes in place."""
    for process in bed.processes:
        if "daemon" in process.args and process.poll() is None:
            process.kill()
            process.wait()


def strip_userbound(bed: Testbed, name: str) -> None:
    """Leave the tunnel as plain wireguard-go: no userbound table or rules, a main-table route."""
    host = ["ip", "netns", "exec", bed.host]
    run(*host, "nft", "delete", "table", "inet", "userbound")
    for family in ("-4", "-6"):
        for line in run(*host, "ip", family, "rule").splitlines():
            if "proto 85" in line:
                run(*host, "ip", family, "rule", "del", "priority", line.split(":")[0])
    run(*host, "ip", "route", "add", "10.99.0.0/24", "dev", name)


FIREWALL_NAME = "bench-host-firewall"
HOST_FIREWALL = """
table inet bench-host-firewall {
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
    }
}
"""


def throughput(
    bed: Testbed, rounds: int, seconds: int, *, dns: bool, stateful_host: bool = False
) -> dict[str, Any]:
    """Compare iperf3 as the owner through one wireguard-go pair with and without userbound.

    Each round measures the tunnel under userbound, then kills the daemon,
    removes its table and rules and routes the private network through the
    same interface in the main table, as wg-quick would, and measures again.
    A restarted daemon adopts the tunnel for the next round.  With dns, the
    configuration has a DNS server, so userbound also redirects the owner's
    queries, which brings in connection tracking.  With stateful_host, the
    shared machine has a stateful firewall of its own, as most machines do,
    so both sides of the comparison pay for connection tracking.
    """
    if stateful_host:
        run("ip", "netns", "exec", bed.host, "nft", "-f", "-", input=HOST_FIREWALL)
    client = bed.add_client()
    config = bed.client_config(client, dns=PRIVATE_V4 if dns else None)
    path = bed.write_config(config, ALICE)
    name = f"ubt{bed.id}{len(bed.clients)}"
    assert bed.cli(ALICE, "up", str(path), "--name", name).returncode == 0
    with_rules, without = [], []
    for _ in range(rounds):
        with_rules.append(iperf(bed, ALICE, seconds))
        kill_daemon(bed)
        strip_userbound(bed, name)
        without.append(iperf(bed, ALICE, seconds))
        run("ip", "-n", bed.host, "route", "del", "10.99.0.0/24", "dev", name)
        bed.start_daemon()
    assert bed.cli(ALICE, "down", name).returncode == 0
    if stateful_host:
        run("ip", "netns", "exec", bed.host, "nft", "delete", "table", "inet", FIREWALL_NAME)
    return {
        "userbound_mbit_s": with_rules,
        "plain_wireguard_go_mbit_s": without,
        "ratio_of_medians": statistics.median(with_rules) / statistics.median(without),
        "seconds_per_run": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="tunnels brought up (default: 20)")
    parser.add_argument(
        "--changes", type=int, default=1000, help="allowed-uid changes (default: 1000)"
    )
    parser.add_argument("--iperf-rounds", type=int, default=5, help="iperf3 pairs (default: 5)")
    parser.add_argument("--iperf-seconds", type=int, default=5, help="length of one iperf3 run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    arguments = parser.parse_args()

    if os.geteuid() != 0:
        print("bench/tunnel.py: run as root", file=sys.stderr)
        return 3

    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
        "wireguard_go": run("wireguard-go", "--version").splitlines()[0],
    }
    with Testbed("ubbench") as bed:
        bed.start_daemon()
        print("bench: up to first packet", file=sys.stderr)
        figures["up_to_first_packet"] = up_to_first_packet(bed, arguments.rounds)
        print("bench: allowed uid changes", file=sys.stderr)
        figures["allowed_uid_changes"] = allowed_uid_changes(bed, arguments.changes)

        print("bench: iperf3 throughput", file=sys.stderr)
        bed.spawn(bed.private, "iperf3", "-s", "-B", PRIVATE_V4)
        time.sleep(0.3)
        for key, dns, stateful in (
            ("throughput", False, False),
            ("throughput_with_dns", True, False),
            ("throughput_with_dns_stateful_host", True, True),
        ):
            rounds, seconds = arguments.iperf_rounds, arguments.iperf_seconds
            figures[key] = throughput(bed, rounds, seconds, dns=dns, stateful_host=stateful)

    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
