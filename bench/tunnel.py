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

from userbound.control import call
from userbound.lab.testbed import PRIVATE_V4, Testbed, run

ALICE = 2001
RESULTS = Path(__file__).parent / "results" / "tunnel.json"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


def up_to_first_packet(bed: Testbed, rounds: int) -> dict[str, Any]:
    """Time `userbound up` as alice, and the first UDP echo answered through the tunnel."""
    client = bed.add_client()
    path = bed.write_config(bed.client_config(client), ALICE)
    command_ms, first_packet_ms = [], []
    for number in range(rounds):
        loop = bed.start_probe_loop(ALICE, f"first-{number}", interval=0.0005)
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
        "note": "the probe loop sends a UDP echo every 0.5 ms, so first_packet_ms "
        "includes up to about 1 ms of probing resolution and the WireGuard handshake",
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


def plain_tunnel(bed: Testbed, client_key_file: Path, client_address: str, name: str) -> None:
    """Set up a wireguard-go client the way wg-quick would, with no userbound rules."""
    bed.spawn(bed.host, "wireguard-go", "-f", name, stderr=subprocess.DEVNULL)
    socket_path = Path(f"/var/run/wireguard/{name}.sock")
    while not socket_path.exists():
        time.sleep(0.01)
    server = run("ip", "netns", "exec", bed.vpn, "wg", "show", bed.server_interface, "public-key")
    run(
        "ip", "netns", "exec", bed.host, "wg", "set", name, "private-key", str(client_key_file),
        "peer", server.strip(), "endpoint", "10.200.2.2:51820", "allowed-ips", "10.99.0.0/24",
    )  # fmt: skip
    run("ip", "-n", bed.host, "addr", "add", f"{client_address}/24", "dev", name)
    run("ip", "-n", bed.host, "link", "set", name, "up")
    run("ip", "-n", bed.host, "route", "add", "10.99.0.0/24", "dev", name)


def throughput(bed: Testbed, rounds: int, seconds: int) -> dict[str, Any]:
    """Compare iperf3 as the owner through userbound with a plain wireguard-go pair."""
    client = bed.add_client()
    bed.spawn(bed.private, "iperf3", "-s", "-B", PRIVATE_V4)
    time.sleep(0.3)
    key_file = bed.directory / "client.key"
    key_file.write_text(client.key.base64() + "\n")
    key_file.chmod(0o600)
    path = bed.write_config(bed.client_config(client), ALICE)
    with_rules, without = [], []
    for number in range(rounds):
        name = f"ubt{bed.id}{number}"
        assert bed.cli(ALICE, "up", str(path), "--name", name).returncode == 0
        with_rules.append(iperf(bed, ALICE, seconds))
        assert bed.cli(ALICE, "down", name).returncode == 0
        plain = f"ubp{bed.id}{number}"
        plain_tunnel(bed, key_file, client.address_v4, plain)
        without.append(iperf(bed, ALICE, seconds))
        bed.processes[-1].terminate()
        bed.processes[-1].wait()
    ratio = statistics.median(with_rules) / statistics.median(without)
    return {
        "userbound_mbit_s": with_rules,
        "plain_wireguard_go_mbit_s": without,
        "ratio_of_medians": ratio,
        "seconds_per_run": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="tunnels brought up (default: 20)")
    parser.add_argument("--changes", type=int, default=1000, help="allowed-uid changes (default: 1000)")
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
        figures["throughput"] = throughput(bed, arguments.iperf_rounds, arguments.iperf_seconds)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
