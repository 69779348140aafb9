"""Real elogind, real logins and real virtual-terminal switches, for the lab and the tests.

elogind, dbus-daemon, login and sshd come from a Debian bookworm chroot
that `ensure_chroot` builds with debootstrap and keeps in a cache folder.
The machine itself never gets elogind.  `RealLogind` runs that chroot inside
the shared machine's network namespace: its own proc, sysfs with cgroup2,
the machine's /dev, a tmpfs on /run, the chroot's system bus, elogind, and
an sshd.  alice (2001) and bob (2002) have accounts only in the chroot.
Logins are PAM logins on virtual terminals (`openvt -c 5 -- login -f
alice`), switches are `chvt`, bob's remote login is ssh from another
namespace.  A program outside the chroot reaches the chroot's system bus at
`address`, as the userbound daemon does.

`stop()` kills every process whose root is the chroot, removes the cgroups
elogind made, unmounts what was mounted and brings the virtual terminal
that was in front back.  A run that was killed leaves a state file that the
next run reads to do the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from userbound.lab.logind import call_once, name_has_owner, session_path

CHROOT = Path("/var/cache/userbound/elogind-bookworm")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "elogind",
    "libpam-elogind",
    "dbus",
    "login",
    "kbd",
    "openssh-server",
    "openssh-client",
    "curl",
)
ACCOUNTS = {"alice": 2001, "bob": 2002}
# bob's ssh key, inside the chroot; root uses it to log bob in remotely.
SSH_KEY = "/root/.ssh/lab_bob"
# The marker file a build writes last. A folder without it is built again.
READY = "userbound-testbed"
LOGIN1 = "org.freedesktop.login1"
ROOT = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
VT_ACTIVATE = 0x5606
VT_WAITACTIVE = 0x5607
VT_GETSTATE = 0x5603
TIMEOUT = 10.0
SSH_OPTIONS = (
    "-i",
    SSH_KEY,
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
)
SSHD_CONFIG = """\
# The lab's sshd: keys only, no messages at login.
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
PrintMotd no
PrintLastLog no
"""


class Unavailable(Exception):
    """Real logins cannot run on this machine; the message gives the reason."""


def unavailable_reason(chroot: Path = CHROOT) -> str | None:
    """Return why real logins cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "real logins need root"
    try:
        active_vt()
    except OSError as error:
        return f"no virtual terminals to switch: /dev/tty0: {error.strerror}"
    if not (chroot / READY).exists():
        if shutil.which("debootstrap") is None:
            return (
                f"debootstrap is missing and no elogind chroot is cached in {chroot}; "
                "scripts/install installs debootstrap"
            )
    return None


# Virtual terminals, as chvt and fgconsole reach them


def active_vt() -> int:
    """Return the number of the virtual terminal in front."""
    with _console() as console:
        state = bytearray(6)  # struct vt_stat: v_active, v_signal, v_state
        fcntl.ioctl(console, VT_GETSTATE, state)
        return int.from_bytes(state[0:2], "little")


def activate_vt(number: int) -> None:
    """Bring a virtual terminal to the front and wait until it is, as `chvt` does."""
    with _console() as console:
        fcntl.ioctl(console, VT_ACTIVATE, number)
        fcntl.ioctl(console, VT_WAITACTIVE, number)


@contextlib.contextmanager
def _console() -> Any:
    descriptor = os.open("/dev/tty0", os.O_RDWR | os.O_NOCTTY)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


# Mounts and processes


def mounts_under(folder: Path) -> list[Path]:
    """Return the mount points at or below a folder, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = _unescape(line.split()[4])
            if point == str(folder) or point.startswith(f"{folder}/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field


def unmount_all(folder: Path) -> None:
    """Unmount everything at or below a folder; detach what stays busy."""
    for point in mounts_under(folder):
        result = subprocess.run(["umount", str(point)], capture_output=True, check=False)
        if result.returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)
    left = mounts_under(folder)
    if left:
        raise RuntimeError(f"cannot unmount {', '.join(map(str, left))}")


def rooted_in(folder: Path) -> list[int]:
    """Return the pids of the processes whose root directory is the folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "root") == str(folder):
                pids.append(int(entry.name))
    return pids


def kill_rooted_in(folder: Path) -> None:
    """Kill every process whose root directory is the folder, and wait until they are gone."""
    deadline = time.monotonic() + TIMEOUT
    while pids := rooted_in(folder):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {folder} survive SIGKILL: {pids}")
        time.sleep(0.02)


# Building the chroot


def ensure_chroot(chroot: Path = CHROOT, progress: Callable[[str], None] = lambda _: None) -> Path:
    """Return the chroot, built first when it is missing or was left half-built."""
    if (chroot / READY).exists():
        return chroot
    if shutil.which("debootstrap") is None:
        raise Unavailable("debootstrap is missing; scripts/install installs it")
    chroot.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(chroot, "build"):
        if (chroot / READY).exists():
            return chroot
        progress(f"building the elogind chroot in {chroot} (debootstrap, once, about 30 s)")
        building = chroot.with_name(f"{chroot.name}.building")
        _remove_tree(building)
        _remove_tree(chroot)
        _build(building)
        building.rename(chroot)
    return chroot


def _remove_tree(folder: Path) -> None:
    """Remove a folder that may still hold mounts: unmount them first, never cross into them."""
    if not folder.exists():
        return
    kill_rooted_in(folder)
    unmount_all(folder)
    subprocess.run(["rm", "-rf", "--one-file-system", str(folder)], check=True)


def _build(target: Path) -> None:
    _run("debootstrap", "--variant=minbase", SUITE, str(target), MIRROR)
    try:
        # Packages must not start services in the chroot while they install.
        policy = target / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        _in_chroot(target, "apt-get", "install", "-y", "--no-install-recommends", *PACKAGES)
        _in_chroot(target, "apt-get", "clean")
        for name, uid in ACCOUNTS.items():
            _in_chroot(
                target, "useradd", "--create-home", "--uid", str(uid), "--shell", "/bin/bash", name
            )
        (target / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        _in_chroot(target, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", SSH_KEY)
        ssh = target / "home/bob/.ssh"
        ssh.mkdir(mode=0o700)
        shutil.copy(target / f"{SSH_KEY.lstrip('/')}.pub", ssh / "authorized_keys")
        _in_chroot(target, "chown", "-R", "bob:bob", "/home/bob/.ssh")
        (target / "etc/ssh/sshd_config.d/userbound-lab.conf").write_text(SSHD_CONFIG)
        (target / READY).write_text(json.dumps({"suite": SUITE, "packages": PACKAGES}) + "\n")
    finally:
        # debootstrap and the packages' scripts may leave proc or sysfs mounted.
        unmount_all(target)


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {' '.join(output)}")
    return result.stdout


def _in_chroot(chroot: Path, *argv: str) -> str:
    return _run("chroot", str(chroot), *_clean_env(), *argv)


def _clean_env(**extra: str) -> list[str]:
    """`env -i` with the variables a program in the chroot needs, and nothing from ours."""
    variables = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **extra}
    variables.setdefault("DEBIAN_FRONTEND", "noninteractive")
    return ["env", "-i", *(f"{key}={value}" for key, value in variables.items())]


def check_free(chroot: Path = CHROOT) -> None:
    """Raise RuntimeError naming the holder when a test bed or a build uses the chroot now."""
    if not chroot.parent.is_dir():
        return
    with _exclusive(chroot, "a check"):
        pass


@contextlib.contextmanager
def _exclusive(chroot: Path, purpose: str) -> Any:
    """Hold the chroot's lock: one test bed, or one build, at a time on this machine."""
    lock = chroot.with_name(f"{chroot.name}.lock")
    with open(lock, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise RuntimeError(
                f"the elogind chroot {chroot} is in use by {holder}; "
                "real logins run one test bed at a time, wait until it ends"
            ) from None
        file.truncate(0)
        file.write(f"pid {os.getpid()} ({purpose})\n")
        file.flush()
        try:
            yield
        finally:
            # The lock ends with the file's closing; a pid left in it would name no holder.
            file.truncate(0)


# The test bed


@dataclass
class Session:
    """A logind session as the bus shows it."""

    id: str
    uid: int
    tty: str
    seat: str
    remote: bool
    leader: int
    active: bool
    state: str


class RealLogind:
    """The chroot's dbus-daemon, elogind and sshd inside a network namespace, and real logins."""

    def __init__(
        self,
        namespace: str,
        folder: Path,
        *,
        chroot: Path = CHROOT,
        ssh_listen: str = "",
        ssh_from: str = "",
    ) -> None:
        """namespace: where everything runs. folder: where the logs go.

        ssh_listen: the namespace's address for sshd, which does not run without it.
        ssh_from: the namespace that ssh logins come from (namespace by default).
        """
        self.namespace = namespace
        self.folder = folder
        self.chroot = chroot
        self.ssh_listen = ssh_listen
        self.ssh_from = ssh_from or namespace
        self.socket = chroot / "run/dbus/system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self.state_file = chroot.with_name(f"{chroot.name}.state")
        self._lock: contextlib.ExitStack | None = None
        self._elogind: subprocess.Popen[bytes] | None = None
        # Everything started here; stop() reaps them once they are killed.
        self._processes: list[subprocess.Popen[bytes]] = []
        self._front_vt = 0
        # The cgroups before this bed's elogind ran; None until it is mounted.
        self._cgroups_before: set[str] | None = None

    # Starting and stopping

    def start(self) -> RealLogind:
        """Mount the chroot's file systems, start dbus-daemon, elogind and sshd."""
        reason = unavailable_reason(self.chroot)
        if reason is not None:
            raise Unavailable(reason)
        if not (self.chroot / READY).exists():
            raise Unavailable(f"no elogind chroot in {self.chroot}; ensure_chroot() builds it")
        self.folder.mkdir(parents=True, exist_ok=True)
        stack = contextlib.ExitStack()
        stack.enter_context(_exclusive(self.chroot, "real logins"))
        self._lock = stack
        try:
            self._remove_leftovers()
            self._front_vt = active_vt()
            self._mount()
            self._cgroups_before = set(self._cgroups())
            self.state_file.write_text(
                json.dumps({"front_vt": self._front_vt, "cgroups": sorted(self._cgroups_before)})
            )
            (self.chroot / "run/dbus").mkdir(parents=True, exist_ok=True)
            (self.chroot / "run/sshd").mkdir(mode=0o755, exist_ok=True)
            self._spawn("dbus", "dbus-daemon", "--system", "--nofork", "--nopidfile")
            _wait_for(self.socket.exists, "the chroot's dbus-daemon listening")
            self.start_elogind()
            if self.ssh_listen:
                self._spawn(
                    "sshd", "/usr/sbin/sshd", "-D", "-e", "-o", f"ListenAddress={self.ssh_listen}"
                )
                _wait_for(self._sshd_listening, f"sshd listening on {self.ssh_listen}:22")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every process in the chroot, remove elogind's cgroups, unmount, restore the VT."""
        if self._lock is None:
            return
        try:
            self._elogind = None
            kill_rooted_in(self.chroot)
            for process in self._processes:
                if process.poll() is None:
                    process.kill()
                process.wait()
            self._processes.clear()
            if self._cgroups_before is not None:
                self._remove_cgroups(self._cgroups_before)
            unmount_all(self.chroot)
            if self._front_vt:
                with contextlib.suppress(OSError):
                    activate_vt(self._front_vt)
            self.state_file.unlink(missing_ok=True)
        finally:
            lock, self._lock = self._lock, None
            lock.close()

    def __enter__(self) -> RealLogind:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove_leftovers(self) -> None:
        """Undo what a killed run left: its processes, cgroups, mounts and VT."""
        kill_rooted_in(self.chroot)
        if not self.state_file.exists():
            unmount_all(self.chroot)
            return
        state = json.loads(self.state_file.read_text())
        if not mounts_under(self.chroot / "sys/fs/cgroup"):
            self._mount()
        self._remove_cgroups(set(state.get("cgroups", [])))
        unmount_all(self.chroot)
        with contextlib.suppress(OSError):
            activate_vt(int(state.get("front_vt", 0)) or active_vt())
        self.state_file.unlink()

    def _mount(self) -> None:
        root = self.chroot
        for argv in (
            ("-t", "proc", "proc", root / "proc"),
            ("-t", "sysfs", "sysfs", root / "sys"),
            ("-t", "cgroup2", "cgroup2", root / "sys/fs/cgroup"),
            ("--bind", "/dev", root / "dev"),
            ("--bind", "/dev/pts", root / "dev/pts"),
            ("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", root / "run"),
        ):
            _run("mount", *map(str, argv))

    def _cgroups(self) -> list[str]:
        return [entry.name for entry in (self.chroot / "sys/fs/cgroup").iterdir() if entry.is_dir()]

    def _remove_cgroups(self, before: set[str]) -> None:
        """Remove the cgroups elogind made for sessions: named by session id, now empty."""
        folder = self.chroot / "sys/fs/cgroup"
        if not mounts_under(folder):
            return
        created = {name for name in set(self._cgroups()) - before if _session_cgroup(name)}
        for name in created:
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    _remove_cgroup(folder / name)
                    break
                except OSError as error:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cannot remove cgroup {name}: {error}") from None
                    time.sleep(0.05)

    def _spawn(self, log: str, *argv: str, namespace: str = "") -> subprocess.Popen[bytes]:
        """Start a program of the chroot in a namespace, with a clean environment."""
        with open(self.folder / f"{log}.log", "ab") as output:
            process = subprocess.Popen(
                self._command(argv, namespace, SYSTEMD_LOG_TARGET="console"),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        self._processes.append(process)
        return process

    def _command(self, argv: tuple[str, ...], namespace: str, **env: str) -> list[str]:
        """Return the command that runs a program of the chroot in a namespace (ours by default)."""
        where = namespace or self.namespace
        return ["ip", "netns", "exec", where, "chroot", str(self.chroot), *_clean_env(**env), *argv]

    def _in_namespace(self, *argv: str, namespace: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._command(argv, namespace),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def _sshd_listening(self) -> bool:
        result = subprocess.run(
            ["ip", "netns", "exec", self.namespace, "ss", "-Htln", "sport", "=", ":22"],
            capture_output=True,
            text=True,
            check=False,
        )
        return bool(result.stdout.strip())

    # elogind

    def start_elogind(self) -> None:
        """Start elogind and wait until it owns its bus name.

        The wait asks the bus with NameHasOwner: loginctl could make it activate another elogind.
        """
        if self._elogind is not None and self._elogind.poll() is None:
            raise RuntimeError("elogind is already running; call stop_elogind() first")
        self._elogind = self._spawn("elogind", "/lib/elogind/elogind")
        _wait_for(self._owned, "elogind taking org.freedesktop.login1")

    def stop_elogind(self) -> None:
        """Stop elogind as its init script does (SIGTERM), and wait until its name is gone."""
        process, self._elogind = self._elogind, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        # ip netns exec replaces itself with chroot, env and elogind: the pid is elogind's.
        process.wait(TIMEOUT)
        _wait_for(lambda: not self._owned(), "org.freedesktop.login1 released")

    def restart_elogind(self) -> None:
        self.stop_elogind()
        self.start_elogind()

    def _owned(self) -> bool:
        if self._elogind is not None and self._elogind.poll() is not None:
            raise RuntimeError(f"elogind exited; its log ends: {self.log('elogind')[-2000:]}")
        return asyncio.run(name_has_owner(self.address, LOGIN1))

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # Sessions

    def call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        """Call a method on the chroot's system bus as root; return the reply's body."""
        return asyncio.run(
            call_once(self.address, destination, path, interface, member, signature, body or ())
        )

    def sessions(self) -> list[Session]:
        """Return elogind's sessions, read property by property."""
        found = []
        for session_id, _uid, _user, _seat, path in self.call(
            LOGIN1, ROOT, MANAGER, "ListSessions"
        )[0]:
            try:
                (values,) = self.call(
                    LOGIN1, path, "org.freedesktop.DBus.Properties", "GetAll", "s", [SESSION]
                )
            except RuntimeError:
                continue  # gone meanwhile
            found.append(
                Session(
                    id=session_id,
                    uid=int(values["User"].value[0]),
                    tty=values["TTY"].value,
                    seat=values["Seat"].value[0],
                    remote=values["Remote"].value,
                    leader=int(values["Leader"].value),
                    active=values["Active"].value,
                    state=values["State"].value,
                )
            )
        return found

    def wait_for_session(self, match: Callable[[Session], bool], description: str) -> Session:
        """Wait until a session matches, for up to 10 s; return it."""
        found: list[Session] = []

        def seen() -> bool:
            found[:] = [s for s in self.sessions() if match(s)]
            return bool(found)

        _wait_for(seen, description)
        return found[0]

    def login(self, user: str, vt: int) -> Session:
        """Log a user in on a virtual terminal with PAM, as a getty would; return the session."""
        uid = _account(user)
        result = self._in_namespace("openvt", "-c", str(vt), "--", "login", "-f", user)
        if result.returncode != 0:
            raise RuntimeError(f"openvt -c {vt} login -f {user}: {result.stderr.strip()}")
        return self.wait_for_session(
            lambda s: s.uid == uid and s.tty == f"tty{vt}", f"{user}'s session on tty{vt}"
        )

    def switch(self, vt: int) -> None:
        """Switch virtual terminals with the chroot's chvt."""
        result = self._in_namespace("chvt", str(vt))
        if result.returncode != 0:
            raise RuntimeError(f"chvt {vt}: {result.stderr.strip()}")

    def lock(self, session: Session, *, locked: bool = True) -> None:
        """Lock or unlock as the session's owner: loginctl, then the lock hint, as a locker does."""
        verb = "lock-session" if locked else "unlock-session"
        hint = "true" if locked else "false"
        for argv in (
            ("loginctl", verb, session.id),
            (
                "dbus-send",
                "--system",
                "--print-reply",
                f"--dest={LOGIN1}",
                session_path(session.id),
                f"{SESSION}.SetLockedHint",
                f"boolean:{hint}",
            ),
        ):
            result = self._in_namespace(
                "setpriv",
                f"--reuid={session.uid}",
                f"--regid={session.uid}",
                "--init-groups",
                *argv,
            )
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")

    def ssh_login(self, user: str) -> Session:
        """Log a user in over ssh from ssh_from and keep the session open; return it."""
        if not self.ssh_listen:
            raise RuntimeError("this test bed runs no sshd (ssh_listen is empty)")
        uid = _account(user)
        before = {s.id for s in self.sessions()}
        self._spawn(
            f"ssh-{user}",
            "ssh",
            *SSH_OPTIONS,
            f"{user}@{self.ssh_listen}",
            "exec sleep infinity",
            namespace=self.ssh_from,
        )
        return self.wait_for_session(
            lambda s: s.uid == uid and s.remote and s.id not in before,
            f"{user}'s ssh session",
        )

    def over_ssh(
        self, user: str, command: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a new ssh login of a user; the session ends with the command."""
        return subprocess.run(
            self._command(
                ("ssh", *SSH_OPTIONS, f"{user}@{self.ssh_listen}", command), self.ssh_from
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def logout(self, session: Session) -> None:
        """Hang up the session's terminal, as closing it does: login ends, the session closes."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(session.leader, signal.SIGHUP)
        _wait_for(
            lambda: all(s.id != session.id for s in self.sessions()),
            f"session {session.id} closing",
        )


def _account(user: str) -> int:
    """Return the uid of an account in the chroot; raise ValueError naming the accounts."""
    if user not in ACCOUNTS:
        raise ValueError(f"no account {user!r} in the chroot; use one of {', '.join(ACCOUNTS)}")
    return ACCOUNTS[user]


def _session_cgroup(name: str) -> bool:
    """Return whether a cgroup's name is one elogind gives a session: its id, such as 3 or c2."""
    return name.removeprefix("c").isdigit()


def _remove_cgroup(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir():
            _remove_cgroup(child)
    folder.rmdir()


def _wait_for(condition: Callable[[], bool], description: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{description} did not happen within {timeout:.0f} s")
        time.sleep(0.01)
