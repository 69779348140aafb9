"""Fixtures: fresh network namespaces with a VPN server, and the real daemon in them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from userbound.lab.logind import LogindPuppet, PrivateBus, SimulatedLogind
from userbound.lab.testbed import USERBOUND, Testbed, remove_leftovers, run

ALICE = 2001
BOB = 2002
CAROL = 2003
PREFIX = "ubt"


def run_lab(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `userbound lab` with options, as a user does, and capture its output."""
    return subprocess.run(
        [str(USERBOUND), "lab", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for program in ("ip", "nft", "wireguard-go", "wg", "setpriv"):
        if shutil.which(program) is None:
            return f"needs {program}"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


@pytest.fixture(autouse=True)
def _prerequisites(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is None:
        return
    missing = _missing_prerequisites()
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"this test {missing}, and CI must run every test")
    pytest.skip(f"this test {missing}")


def missing_bus_tools() -> None:
    """Skip a test that needs a private bus when its tools are missing; fail in CI."""
    missing = None
    if shutil.which("dbus-daemon") is None:
        missing = "needs dbus-daemon"
    else:
        try:
            import dbusmock  # noqa: F401
        except ImportError:
            missing = "needs python-dbusmock"
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"this test {missing}, and CI must run every test")
    pytest.skip(f"this test {missing}")


def puppet(address: str, play: Callable[[LogindPuppet], Awaitable[Any]]) -> None:
    """Play a scenario on the simulated logind at this bus address."""

    async def main() -> None:
        async with LogindPuppet.connect(address) as logind:
            await play(logind)

    asyncio.run(main())


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A real dbus-daemon with a system-bus configuration, private to the test."""
    missing_bus_tools()
    with PrivateBus(tmp_path / "bus") as private_bus:
        yield private_bus


@pytest.fixture
def logind(bus: PrivateBus) -> Iterator[SimulatedLogind]:
    """python-dbusmock's logind on the private bus, with nothing signalled by itself."""
    with SimulatedLogind(bus) as simulated:
        yield simulated


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers_from_killed_runs() -> None:
    if _missing_prerequisites() is None:
        remove_leftovers(PREFIX)


@dataclass
class Lab:
    """A testbed with the daemon running on its shared machine."""

    bed: Testbed
    daemon: subprocess.Popen[bytes]

    def up(
        self, uid: int, config: str, *argv: str, name: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        path = self.bed.write_config(config, uid, f"{name or 'corp'}.conf")
        return self.bed.cli(uid, "up", str(path), "--name", name or self.bed.tunnel_name(), *argv)

    def up_ok(self, uid: int, config: str, *argv: str) -> str:
        name = self.bed.tunnel_name()
        result = self.up(uid, config, *argv, name=name)
        assert result.returncode == 0, result.stderr + self.bed.daemon_log()
        assert result.stdout.strip() == name
        return name

    def status(self, name: str) -> dict[str, Any]:
        result = self.bed.cli(0, "status", name, "--json")
        assert result.returncode == 0, result.stderr
        tunnel: dict[str, Any] = json.loads(result.stdout)["tunnels"][0]
        return tunnel

    def wait_for_state(self, name: str, state: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.status(name)["state"] != state:
            assert time.monotonic() < deadline, (
                f"{name} never became {state}:\n{self.bed.daemon_log()}"
            )
            time.sleep(0.05)

    def restart_daemon(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.daemon = self.bed.start_daemon(*extra, env=env)

    def use_policy(self, text: str, *extra: str, env: dict[str, str] | None = None) -> Path:
        """Restart the daemon with this policy file; return the file."""
        path = self.bed.directory / "policy.toml"
        path.write_text(text)
        if self.daemon.poll() is None:
            self.stop_daemon()
        self.restart_daemon("--policy", str(path), *extra, env=env)
        return path

    def stop_daemon(self, signum: int = signal.SIGTERM) -> None:
        self.daemon.send_signal(signum)
        self.daemon.wait(timeout=30)


def data_plane_pids(name: str) -> list[int]:
    """Return the pids of the wireguard-go processes serving this interface."""
    result = subprocess.run(
        ["pgrep", "-f", f"wireguard-go -f {name}$"], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in result.stdout.split()]


def kernel_state(namespace: str) -> str:
    """Return the namespace's rules, routes, links and nftables ruleset as text."""
    parts = []
    for argv in (
        ["nft", "list", "ruleset"],
        ["ip", "rule"],
        ["ip", "-6", "rule"],
        ["ip", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
        ["ip", "-o", "link"],
        ["ip", "-o", "addr"],
    ):
        parts.append(f"$ {' '.join(argv)}\n" + run("ip", "netns", "exec", namespace, *argv))
    # Counters change with traffic the kernel sends by itself (IPv6 router
    # solicitations dropped at a tunnel); everything else must match exactly.
    return re.sub(r"packets \d+ bytes \d+", "packets N bytes N", "\n".join(parts))


@pytest.fixture
def bed() -> Iterator[Testbed]:
    testbed = Testbed(PREFIX)
    testbed.build()
    try:
        yield testbed
    finally:
        testbed.destroy()
        left = [n for n in testbed.namespaces if n in run("ip", "netns", "list")]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def lab(bed: Testbed) -> Iterator[Lab]:
    daemon = bed.start_daemon()
    environment = Lab(bed, daemon)
    try:
        yield environment
    finally:
        if environment.daemon.poll() is None:
            environment.stop_daemon()
