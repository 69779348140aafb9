"""`userbound lab`: the README's first command, end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import pytest

from conftest import run_lab
from userbound.errors import EXIT_FAILED, EXIT_NOT_PERMITTED, EXIT_USAGE
from userbound.lab import PREFIX
from userbound.lab.testbed import USERBOUND, remove_leftovers, run

pytestmark = pytest.mark.root

STEPS = [
    "login",
    "up",
    "switch-to-bob",
    "switch-to-alice",
    "lock",
    "restart-logind",
    "unlock",
    "ssh",
    "logout",
]


def leftovers() -> list[str]:
    """Return what lab runs that ended left behind: namespaces, folders, processes.

    Their names carry the lab's pid; a lab someone runs meanwhile is not a leftover.
    """
    ended = re.compile(rf"{PREFIX}-(\d+)-")

    def of_ended_run(text: str) -> bool:
        match = ended.search(text)
        return match is not None and not Path(f"/proc/{match.group(1)}").exists()

    found = [n for n in run("ip", "netns", "list").split() if of_ended_run(n)]
    found += [
        str(p) for p in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*") if of_ended_run(p.name)
    ]
    processes = subprocess.run(["pgrep", "-af", f"{PREFIX}-"], capture_output=True, text=True)
    found += [line for line in processes.stdout.splitlines() if of_ended_run(line)]
    return found


def by_step(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["step"]: step for step in report["steps"]}


def test_lab_with_userbound(tmp_path: Path) -> None:
    plot = tmp_path / "lab.svg"

    result = run_lab("--json", "--plot", str(plot))

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "userbound"
    assert report["passed"] is True, report["failed"]
    steps = by_step(report)
    assert list(steps) == STEPS
    assert [s["state"] for s in report["steps"]] == [
        "-",
        "up",
        "up",
        "up",
        "up",
        "up",
        "up",
        "up",
        "disconnected",
    ]
    assert [s["seat0"] for s in report["steps"]][2:5] == ["bob", "alice", "alice (locked)"]
    # Counted at the private server: alice's job got through while her tunnel was up, bob's never.
    assert report["totals"]["private"]["bob"] == 0
    assert all(s["packets"]["private"]["alice"] > 0 for s in report["steps"][1:8])
    assert steps["logout"]["packets"]["private"]["alice"] == 0
    assert all(s["packets"]["public"]["alice"] == 0 for s in report["steps"])
    # bob's job ran all along, on the public side.
    assert all(s["packets"]["public"]["bob"] > 0 for s in report["steps"])
    fetches = {c["what"]: c for c in steps["switch-to-bob"]["checks"] if "curl" in c["what"]}
    assert len(fetches) == 2
    assert all(c["observed"].startswith("blocked") and c["held"] for c in fetches.values())
    assert steps["logout"]["decision"]["rule"] == "on_owner_logout"
    # While logind restarts, sessions_unknown disconnects the tunnel; then alice is back.
    away = steps["restart-logind"]["decisions"]
    assert away[0]["rule"] == "sessions_unknown"
    assert away[0]["state"] == "disconnected"
    assert steps["restart-logind"]["state"] == "up"
    assert report["logind"] == "simulated"
    assert report["duration_s"] < 30
    # The drawing is SVG, with a row for each step.
    svg = ElementTree.parse(plot).getroot()
    assert svg.tag.endswith("svg")
    assert "fast user switch to bob" in plot.read_text()
    assert leftovers() == []


def test_lab_without_userbound_shows_the_problem() -> None:
    result = run_lab("--json", "--without-userbound")

    assert result.returncode == EXIT_FAILED, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "without-userbound"
    assert report["passed"] is False
    steps = by_step(report)
    # bob reaches alice's private network: his job, his browser, his ssh session.
    assert report["totals"]["private"]["bob"] > 0
    assert steps["switch-to-bob"]["packets"]["private"]["bob"] > 0
    fetches = [c for c in steps["switch-to-bob"]["checks"] if "curl" in c["what"]]
    assert [c["observed"] for c in fetches] == ["page", "page"]
    failed = {c["what"] for c in report["failed"]}
    assert "bob's packets at the private server" in failed
    assert "bob, over ssh: curl http://10.99.0.2/" in failed
    # The tunnel outlives alice's session.
    assert steps["logout"]["state"] == "up"
    assert "tunnel state" in failed
    assert steps["logout"]["packets"]["private"]["alice"] > 0
    assert "Without userbound" in result.stderr
    assert leftovers() == []


def test_lab_under_another_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('on_switch_away = "disconnect"\non_lock = "suspend"\nkill_switch = false\n')

    result = run_lab("--json", "--policy", str(policy))

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True, report["failed"]
    assert report["policy"]["settings"]["on_switch_away"]["value"] == "disconnect"
    states = [s["state"] for s in report["steps"]]
    assert states[2:7] == ["disconnected", "up", "suspended", "suspended", "up"]
    steps = by_step(report)
    # Without its interface, bob's curl --interface fails at once.
    bound = [c for c in steps["switch-to-bob"]["checks"] if "--interface" in c["what"]]
    assert bound[0]["held"]
    # A tunnel the policy takes away blocks alice even without the kill switch.
    assert steps["switch-to-bob"]["packets"]["private"]["alice"] == 0
    assert steps["switch-to-bob"]["packets"]["public"]["alice"] == 0
    assert steps["lock"]["packets"]["public"]["alice"] == 0
    assert steps["unlock"]["packets"]["private"]["alice"] > 0


def test_killed_lab_cleaned_up_by_the_next_run() -> None:
    process = subprocess.Popen(
        [str(USERBOUND), "lab", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if "fast user switch to bob" in line:
                break
        else:
            pytest.fail("the lab ended before the switch: " + "".join(seen))
        process.kill()
        process.wait()
    finally:
        process.kill()
        process.stderr.close()
    left = [n for n in run("ip", "netns", "list").split() if f"-{process.pid}-" in n]
    assert len(left) == 4

    result = run_lab("--json")

    assert result.returncode == 0, result.stderr
    assert re.search(r"removed \d+ namespaces of an earlier run", result.stderr)
    assert json.loads(result.stdout)["passed"] is True
    assert leftovers() == []


def test_interrupted_lab_removes_itself() -> None:
    process = subprocess.Popen(
        [str(USERBOUND), "lab"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "userbound up" in line:
            break
    process.send_signal(signal.SIGINT)
    # A second signal while it cleans up must not cut the cleanup short.
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)

    assert process.returncode == 130, errors
    assert "interrupted" in errors
    assert leftovers() == []


def test_kept_lab_reports_the_story() -> None:
    process = subprocess.Popen(
        [str(USERBOUND), "lab", "--json", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "kept running" in line:
            break
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)

    # The exit code is the story's, not the interrupt's.
    assert process.returncode == 0
    assert json.loads(output)["passed"] is True
    assert leftovers() == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "/nonexistent/policy.toml"], "policy file /nonexistent/policy.toml"),
        (["--plot", "/nonexistent/lab.svg"], "the folder /nonexistent does not exist"),
        (["--plot", "/tmp"], "is a folder"),
        (["--plot", "/tmp/lab.png"], "give a name ending in .svg"),
    ],
)
def test_bad_options_change_nothing(argv: list[str], message: str) -> None:
    namespaces = run("ip", "netns", "list")

    result = run_lab(*argv)

    assert result.returncode == EXIT_USAGE
    assert message in result.stderr
    assert run("ip", "netns", "list") == namespaces


def test_bad_policy_value_named(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('on_lock = "pause"\n')

    result = run_lab("--policy", str(policy))

    assert result.returncode == EXIT_USAGE
    assert "on_lock" in result.stderr
    assert "'pause'" in result.stderr


def test_lab_needs_root() -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=2001", "--regid=2001", "--clear-groups", str(USERBOUND), "lab"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == EXIT_NOT_PERMITTED
    assert "run as root" in result.stderr


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
