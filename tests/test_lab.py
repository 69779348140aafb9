"""`userbound lab`: the README's first command, end to end."""

from __future__ import annotations

import json
import subprocess

import pytest

from userbound.lab import PREFIX
from userbound.lab.testbed import USERBOUND, run

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
