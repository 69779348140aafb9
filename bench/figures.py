"""Summaries of timings, and the daemon's decisions as they come, for the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from userbound.lab.testbed import USERBOUND, Testbed


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


def header() -> dict[str, Any]:
    """Return the machine and the time, which every results file starts with."""
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def follow_decisions(bed: Testbed) -> Callable[[], dict[str, Any]]:
    """Follow the daemon's events in the bed; return a function that waits for the next
    committed decision and returns it."""
    follower = bed.spawn(
        bed.host,
        str(USERBOUND),
        "events",
        "--follow",
        "--json",
        env={"USERBOUND_SOCKET": str(bed.control_socket)},
        stdout=subprocess.PIPE,
    )
    output = follower.stdout
    assert output is not None

    def next_decision() -> dict[str, Any]:
        while True:
            event: dict[str, Any] = json.loads(output.readline())
            if event.get("event") == "decision" and event.get("committed_monotonic"):
                return event

    return next_decision


def write(figures: dict[str, Any], output: Path) -> None:
    """Write the figures as JSON to the results file and print its path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {output}")
