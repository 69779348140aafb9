"""`userbound lab`: the README's first command, end to end."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from userbound.lab import PREFIX
from userbound.lab.testbed import USERBOUND, remove_leftovers, run

pytestmark = pytest.mark.root


def test_lab_report_passes() -> None:
    result = subprocess.run(
        [str(USERBOUND), "lab", "--json"], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["leaked_packets"] == 0
    assert all(check["held"] for check in report["checks"])
    assert {c["user"] for c in report["checks"]} == {"alice", "bob"}
    assert PREFIX not in run("ip", "netns", "list")


def test_leftovers_of_dead_runs_removed() -> None:
    dead = "ubtleft-4194304-aa"  # above the kernel's pid_max limit, so never a live pid
    alive = f"ubtleft-{os.getpid()}-bb"
    for name in (dead, alive):
        run("ip", "netns", "add", name)
    try:
        removed = remove_leftovers("ubtleft")
        names = run("ip", "netns", "list")

        assert removed == [dead]
        assert dead not in names
        assert alive in names
    finally:
        for name in (dead, alive):
            run("ip", "netns", "delete", name, check=False)
