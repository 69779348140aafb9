"""The logins of the lab's story, on a simulated logind or on real elogind.

Both act the story's session steps by key (story.py) on the shared
machine, and give the system bus address the daemon reads logind on.
`SimulatedLogins` changes python-dbusmock's logind quietly, then sends the
signals logind would.  `RealLogins` makes it happen: PAM logins on
virtual terminals, chvt, loginctl, ssh and an elogind restart.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from userbound.lab.elogind import RealLogind, Session, ensure_chroot
from userbound.lab.logind import LogindPuppet, PrivateBus, SimulatedLogind
from userbound.lab.story import ALICE, ALICE_SESSION, BOB, BOB_SESSION, BOB_SSH, USERS
from userbound.lab.testbed import Testbed

ALICE_VT = 5
BOB_VT = 6
# The public side's address on the link to the shared machine: where bob's ssh comes from.
SSH_CLIENT = "10.200.1.1"
SSH_SERVER = "10.200.1.2"


class Logins(Protocol):
    """The interface that acts the story's session steps on a logind."""

    kind: str
    address: str

    def start(self) -> None: ...

    def act(self, key: str) -> None: ...

    def over_ssh(self, uid: int, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        """Run a command in a new ssh login of the user; None where logins are simulated."""
        ...

    def stop(self) -> None: ...


class SimulatedLogins:
    """The story on python-dbusmock's logind, on a private bus in the shared machine."""

    kind = "simulated"

    def __init__(self, bed: Testbed) -> None:
        self.bus = PrivateBus(bed.directory / "bus", bed.prefix_command(bed.host))
        self.address = self.bus.address
        self.logind: SimulatedLogind | None = None

    def start(self) -> None:
        self.bus.start()
        self.logind = SimulatedLogind(self.bus).start()

    def stop(self) -> None:
        if self.logind is not None:
            self.logind.stop()
        self.bus.stop()

    def over_ssh(self, uid: int, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        return None

    def act(self, key: str) -> None:
        if key == "login":
            self._play(
                lambda lg: lg.login(ALICE_SESSION, ALICE, "alice", vt=ALICE_VT, activate=True)
            )
        elif key == "switch-to-bob":
            self._play(_switch_to_bob)
        elif key == "switch-to-alice":
            self._play(lambda lg: lg.switch("seat0", ALICE_SESSION, previous=BOB_SESSION))
        elif key in ("lock", "unlock"):
            self._play(lambda lg: lg.lock(ALICE_SESSION, locked=key == "lock"))
        elif key == "ssh":
            self._play(
                lambda lg: lg.login(
                    BOB_SSH,
                    BOB,
                    "bob",
                    seat="",
                    remote=True,
                    remote_host=SSH_CLIENT,
                    service="sshd",
                    session_type="tty",
                )
            )
        elif key == "restart-logind":
            assert self.logind is not None
            self.logind.restart()
        elif key == "logout":
            self._play(lambda lg: lg.logout(ALICE_SESSION))
        else:
            raise ValueError(f"no session step {key!r}")

    def _play(self, play: Callable[[LogindPuppet], Awaitable[Any]]) -> None:
        async def run_play() -> None:
            async with LogindPuppet.connect(self.address) as puppet:
                await play(puppet)

        asyncio.run(run_play())


async def _switch_to_bob(logind: LogindPuppet) -> None:
    await logind.login(BOB_SESSION, BOB, "bob", vt=BOB_VT)
    await logind.switch("seat0", BOB_SESSION, previous=ALICE_SESSION)


class RealLogins:
    """The story with elogind from the chroot, real logins, chvt and ssh, in the shared machine."""

    kind = "elogind"

    def __init__(self, bed: Testbed, progress: Callable[[str], None]) -> None:
        self.progress = progress
        self.elogind = RealLogind(
            bed.host, bed.directory / "elogind", ssh_listen=SSH_SERVER, ssh_from=bed.wan
        )
        self.address = self.elogind.address
        self.alice: Session | None = None
        self.bob: Session | None = None

    def start(self) -> None:
        ensure_chroot(self.elogind.chroot, self.progress)
        self.elogind.start()

    def stop(self) -> None:
        self.elogind.stop()

    def over_ssh(self, uid: int, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        return self.elogind.over_ssh(USERS[uid], shlex.join(argv))

    def act(self, key: str) -> None:
        elogind = self.elogind
        if key == "login":
            self.alice = elogind.login("alice", ALICE_VT)
            elogind.switch(ALICE_VT)
        elif key == "switch-to-bob":
            if self.bob is None:
                self.bob = elogind.login("bob", BOB_VT)
            elogind.switch(BOB_VT)
        elif key == "switch-to-alice":
            elogind.switch(ALICE_VT)
        elif key in ("lock", "unlock"):
            elogind.lock(self._alice(), locked=key == "lock")
        elif key == "ssh":
            elogind.ssh_login("bob")
        elif key == "restart-logind":
            elogind.restart_elogind()
        elif key == "logout":
            elogind.logout(self._alice())
        else:
            raise ValueError(f"no session step {key!r}")

    def _alice(self) -> Session:
        if self.alice is None:
            raise RuntimeError("alice has not logged in")
        return self.alice
