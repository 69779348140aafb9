"""From a real VT switch to the committed kernel change, with real elogind (root, VTs).

    /opt/userbound/venv/bin/python bench/real_logind.py [--switches N] [--output FILE]

alice logs in on VT5 and bob on VT6 with PAM (`login -f` under openvt),
in elogind's chroot inside the test bed's shared machine. alice's tunnel
runs under `on_switch_away = "suspend"`.  The benchmark switches between
VT5 and VT6 N times with the VT_ACTIVATE ioctl that chvt uses, and waits
for the daemon's decision after each switch.  Measures, on CLOCK_MONOTONIC:
- from the switch to the committed kernel change (the decision event's
  committed_monotonic): elogind noticing the VT, its D-Bus signals, the
  daemon's reading and decision, and the nftables and routing change;
- the daemon's own part, from the first signal it received to the commit
  (the audit event's latency_ms).
Figures go to bench/results/real_logind.json (or --output) and to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from figures import follow_decisions, header, summary, write

from userbound.lab.elogind import (
    RealLogind,
    activate_vt,
    ensure_chroot,
    unavailable_reason,
)
from userbound.lab.testbed import Testbed

ALICE = 2001
RESULTS = Path(__file__).parent / "results" / "real_logind.json"


def run_switches(bed: Testbed, logind: RealLogind, switches: int) -> dict[str, Any]:
    policy = bed.directory / "policy.toml"
    policy.write_text('on_switch_away = "suspend"\n')
    logind.login("alice", 5)
    logind.login("bob", 6)
    activate_vt(5)
    environment = {"DBUS_SYSTEM_BUS_ADDRESS": logind.address}
    bed.start_daemon("--sessions", "logind", "--policy", str(policy), env=environment)
    path = bed.write_config(bed.client_config(bed.add_client()), ALICE)
    result = bed.cli(ALICE, "up", str(path), "--name", bed.tunnel_name())
    assert result.returncode == 0, result.stderr
    next_decision = follow_decisions(bed)

    records = []
    target = 6
    for _ in range(switches):
        switched = time.monotonic()
        activate_vt(target)
        event = next_decision()
        expected = "suspended" if target == 6 else "up"
        if event["state"] != expected:
            raise RuntimeError(f"after chvt {target} the tunnel is {event['state']}: {event}")
        records.append((switched, event))
        target = 11 - target
        # Let elogind and the daemon settle before the next switch.
        time.sleep(0.02)
    return {
        "switches": switches,
        "vt_switch_to_commit_ms": summary(
            [(e["committed_monotonic"] - switched) * 1000 for switched, e in records]
        ),
        "signal_received_to_commit_ms": summary([e["latency_ms"] for _, e in records]),
        "suspends": sum(1 for _, e in records if e["state"] == "suspended"),
        "resumes": sum(1 for _, e in records if e["state"] == "up"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--switches", type=int, default=200, help="VT switches")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON file for the figures")
    arguments = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench/real_logind.py: {reason}", file=sys.stderr)
        return 3
    ensure_chroot(progress=lambda line: print(line, file=sys.stderr))

    figures = header()
    with Testbed("ubb") as bed, RealLogind(bed.host, bed.directory / "elogind") as logind:
        figures["elogind"] = run_switches(bed, logind, arguments.switches)
    print(json.dumps(figures["elogind"], indent=2), flush=True)
    write(figures, arguments.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
