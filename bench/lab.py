"""Benchmark of `userbound lab`: how long a run takes and how fast its steps settle (root).

    /opt/userbound/venv/bin/python bench/lab.py [--runs N] [--output FILE]

Runs `userbound lab --json` N times with userbound, with a policy that
suspends on a switch, lock and remote session, and without userbound.
Measures the whole run as the user waits for it (from start to exit), the
run's own duration, the time from each step's action to the tunnel's settled
state, and the daemon's latency for each decision that changed the kernel.
Figures go to bench/results/lab.json (or --output) and to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from figures import header, summary

from userbound.lab.testbed import USERBOUND

SUSPEND = 'on_switch_away = "suspend"\non_lock = "suspend"\non_remote_session = "suspend"\n'


def run_lab(*argv: str) -> tuple[float, dict[str, Any], int]:
    start = time.monotonic()
    result = subprocess.run(
        [str(USERBOUND), "lab", "--json", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.monotonic() - start
    if not result.stdout:
        raise RuntimeError(f"userbound lab {' '.join(argv)} failed: {result.stderr[-2000:]}")
    return elapsed, json.loads(result.stdout), result.returncode


def measure(runs: int, *argv: str) -> dict[str, Any]:
    wall, durations, settle, latency, codes = [], [], [], [], []
    for _ in range(runs):
        elapsed, report, code = run_lab(*argv)
        wall.append(elapsed)
        durations.append(report["duration_s"])
        codes.append(code)
        for step in report["steps"][1:]:
            settle.append((step["settled"] - step["started"]) * 1000)
            decision = step["decision"]
            if decision and decision.get("latency_ms") is not None:
                latency.append(decision["latency_ms"])
    figures: dict[str, Any] = {
        "exit_codes": codes,
        "wall_s": summary(wall),
        "duration_s": summary(durations),
        "settle_ms": summary(settle),
    }
    if latency:
        figures["decision_latency_ms"] = summary(latency)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "lab.json"), type=Path
    )
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        policy = Path(folder) / "suspend.toml"
        policy.write_text(SUSPEND)
        results = {
            **header(),
            "runs": arguments.runs,
            "default_policy": measure(arguments.runs),
            "suspend_policy": measure(arguments.runs, "--policy", str(policy)),
            "without_userbound": measure(arguments.runs, "--without-userbound"),
        }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=2) + "\n")
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
