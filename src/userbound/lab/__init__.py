"""`userbound lab`: a shared machine in network namespaces, and who reaches what.

The lab builds a testbed (see testbed.py), starts the real daemon on its
shared machine, brings up a tunnel owned by alice (uid 2001) and probes the
private network as alice and as bob (uid 2002), who has no tunnel.  Both
uids have no account: nothing on the machine changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from userbound.lab.testbed import PRIVATE_V4, PRIVATE_V6, Testbed, remove_leftovers

ALICE = 2001
BOB = 2002
PREFIX = "userbound-lab"


@dataclass
class Check:
    """One probe of the story, with what the owner-only rules should produce."""

    step: str
    user: str
    probe: str
    expected: str
    result: str = ""

    @property
    def held(self) -> bool:
        return (self.result == "ok") == (self.expected == "ok")


def _progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def run_lab(*, json_output: bool, keep: bool) -> int:
    """Build the lab, play the story, print what happened, and remove everything."""
    if os.geteuid() != 0:
        print("userbound lab: run as root (it creates network namespaces)", file=sys.stderr)
        return 3
    removed = remove_leftovers(PREFIX)
    if removed:
        _progress(f"removed {len(removed)} namespaces left by an earlier run")
    bed = Testbed(PREFIX)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _progress("building namespaces: shared machine, public side, VPN server, private server")
        bed.build()
        _progress("starting the userbound daemon on the shared machine")
        # A long restart delay keeps the crashed tunnel down while the lab probes it.
        bed.start_daemon("--restart-delay", "30")
        checks = _play(bed)
        passed = _report(checks, json_output=json_output)
        if keep:
            _progress(f"lab kept: namespaces {', '.join(bed.namespaces)}; Ctrl-C removes it")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        _progress("interrupted; removing the lab")
        return 1
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        print(f"userbound lab: {error}", file=sys.stderr)
        return 1
    finally:
        bed.destroy()
        signal.signal(signal.SIGTERM, previous)
    return 0 if passed else 1


def _report(checks: list[Check], *, json_output: bool) -> bool:
    """Print the checks and return whether every expectation held."""
    leaked = checks[-1]
    probes = checks[:-1]
    passed = all(c.held for c in probes) and leaked.result == "0"
    if json_output:
        report = {
            "checks": [asdict(c) | {"held": c.held} for c in probes],
            "leaked_packets": int(leaked.result),
            "passed": passed,
        }
        print(json.dumps(report, indent=2), flush=True)
    else:
        _print_table(probes, int(leaked.result))
    return passed


def _play(bed: Testbed) -> list[Check]:
    client = bed.add_client()
    path = bed.write_config(bed.client_config(client), ALICE, "corp.conf")
    name = bed.tunnel_name()
    _progress(f"alice runs: userbound up {path.name} --name {name}")
    result = bed.cli(ALICE, "up", str(path), "--name", name)
    if result.returncode != 0:
        raise RuntimeError(f"userbound up failed: {result.stderr.strip()}")

    checks = [
        Check("tunnel up", "alice", "TCP to the private server", "ok"),
        Check("tunnel up", "alice", "UDP to the private server", "ok"),
        Check("tunnel up", "alice", "ping the private server over IPv6", "ok"),
        Check("tunnel up", "alice", "DNS query to the system resolver", "ok"),
        Check("tunnel up", "bob", "TCP to the private server", "blocked"),
        Check("tunnel up", "bob", f"TCP bound to {name} (curl --interface)", "blocked"),
        Check("tunnel up", "bob", f"ping bound to {name}", "blocked"),
    ]
    probes = [
        (ALICE, "tcp", PRIVATE_V4, None),
        (ALICE, "udp", PRIVATE_V4, None),
        (ALICE, "icmp", PRIVATE_V6, None),
        (ALICE, "dns", "10.200.1.1", None),
        (BOB, "tcp", PRIVATE_V4, None),
        (BOB, "tcp", PRIVATE_V4, name),
        (BOB, "icmp", PRIVATE_V4, name),
    ]

    # The public side counts every packet for the private network; bob's
    # packets go there by design, so only the counts around alice's probes add up.
    alice_leaks = 0
    for check, (uid, kind, host, interface) in zip(checks, probes, strict=True):
        before = bed.leaked()
        check.result = bed.probe(uid, kind, host, interface=interface, timeout=1)
        if uid == ALICE:
            alice_leaks += bed.leaked() - before

    _progress("the data plane dies: the kill switch must hold")
    subprocess.run(["pkill", "-KILL", "-f", f"wireguard-go -f {name}$"], check=False)
    time.sleep(0.2)
    crashed = [
        Check("data plane killed", "alice", "TCP to the private server", "blocked"),
        Check("data plane killed", "alice", "UDP to the private server", "blocked"),
    ]
    before = bed.leaked()
    crashed[0].result = bed.probe(ALICE, "tcp", timeout=1)
    crashed[1].result = bed.probe(ALICE, "udp", timeout=1)
    alice_leaks += bed.leaked() - before
    leaked = Check("whole story", "alice", "packets leaked outside the tunnel", "0")
    leaked.result = str(alice_leaks)
    return [*checks, *crashed, leaked]


def _print_table(checks: list[Check], leaked: int) -> None:
    print(f"{'step':<18} {'user':<6} {'probe':<42} {'expected':<8} result")
    for check in checks:
        mark = "✓" if check.held else "✗"
        result = "reached" if check.result == "ok" else check.result.removeprefix("error: ")
        expected = "reach" if check.expected == "ok" else "blocked"
        print(f"{check.step:<18} {check.user:<6} {check.probe:<42} {expected:<8} {mark} {result}")
    mark = "✓" if leaked == 0 else "✗"
    print(f"{mark} alice's packets that left outside the tunnel: {leaked}")
