"""A shared machine, a VPN server and a private network, built from network namespaces.

    host ── wan ── vpn ══ WireGuard server (wireguard-go) ── private

- host: the shared computer where userbound runs and users work.
- wan: the public side.  It has no route to the private network and counts
  every packet for it that arrives outside the tunnel: those are leaks.
- vpn: a wireguard-go server that forwards tunnel traffic to the private network.
- private: a server that answers TCP, UDP, DNS and ICMP only from the tunnel.

Every address lives inside these namespaces.  `destroy()` kills the processes
in them and removes them, and `remove_leftovers()` does the same for a run
that was killed before it could clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from userbound.daemon import namespace_lock
from userbound.wgconfig import Key, public_key

PRIVATE_V4 = "10.99.0.2"
PRIVATE_V6 = "fd00:99::2"
PRIVATE_NET_V4 = "10.99.0.0/24"
PRIVATE_NET_V6 = "fd00:99::/64"
SERVER_PORT = 51820
TCP_PORT = 80
PROBE_PORTS = {"tcp": TCP_PORT, "udp": 7, "dns": 53, "icmp": 0}
USERBOUND = Path(sys.executable).parent / "userbound"


def run(*argv: str, check: bool = True, input: str | None = None) -> str:
    """Run a command and return its output; failures raise with the command's stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def generate_key() -> Key:
    """Return a new WireGuard private key, clamped as `wg genkey` does."""
    raw = bytearray(secrets.token_bytes(32))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return Key(bytes(raw))


def kill_namespace(namespace: str) -> None:
    """Kill every process in a namespace, delete it, and remove its daemon's lock file."""
    try:
        inode: int | None = os.stat(f"/run/netns/{namespace}").st_ino
    except OSError:
        inode = None
    pids = run("ip", "netns", "pids", namespace, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = run("ip", "netns", "pids", namespace, check=False).split()
        time.sleep(0.02)
    run("ip", "netns", "delete", namespace, check=False)
    if inode is not None:
        _remove_unheld(namespace_lock(inode))


def _remove_unheld(lock: Path) -> None:
    """Remove a lock file that no process holds; the inode may already name a new namespace."""
    try:
        descriptor = os.open(lock, os.O_WRONLY)
    except FileNotFoundError:
        return
    with os.fdopen(descriptor, "w") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        lock.unlink(missing_ok=True)


@dataclass
class Client:
    """A WireGuard client identity known to the server."""

    key: Key
    address_v4: str
    address_v6: str


class Testbed:
    """The namespaces, keys and servers of one lab or test run."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, prefix: str = "ubt") -> None:
        self.prefix = prefix
        self.id = secrets.token_hex(3)
        # The creating process's pid in the name distinguishes leftovers of a
        # dead run from the namespaces of a run that is still going on.
        self.base = base = f"{prefix}-{os.getpid()}-{self.id}"
        self.host, self.wan, self.vpn, self.private = (
            f"{base}-host",
            f"{base}-wan",
            f"{base}-vpn",
            f"{base}-priv",
        )
        self.server_interface = f"ubs{self.id}"
        self.server_key = generate_key()
        self.clients: list[Client] = []
        self.directory = Path(tempfile.mkdtemp(prefix=f"{base}-"))
        self.directory.chmod(0o755)
        self.processes: list[subprocess.Popen[bytes]] = []
        self._tunnel_names = 0

    @property
    def namespaces(self) -> list[str]:
        return [self.host, self.wan, self.vpn, self.private]

    # Building

    def build(self) -> None:
        """Create the namespaces, links, addresses, servers and counters."""
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _build(self) -> None:
        for namespace in self.namespaces:
            run("ip", "netns", "add", namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
            # Duplicate address detection would hold IPv6 back for a second after a link comes up.
            self._sysctl(namespace, "net.ipv6.conf.default.accept_dad", "0")
            self._sysctl(namespace, "net.ipv6.conf.all.accept_dad", "0")
        self._link(
            self.host,
            "eth0",
            "10.200.1.2/24",
            "fd00:200:1::2/64",
            self.wan,
            "host0",
            "10.200.1.1/24",
            "fd00:200:1::1/64",
        )
        self._link(
            self.wan,
            "vpn0",
            "10.200.2.1/24",
            "fd00:200:2::1/64",
            self.vpn,
            "eth0",
            "10.200.2.2/24",
            "fd00:200:2::2/64",
        )
        self._link(
            self.vpn,
            "priv0",
            "10.99.0.1/24",
            "fd00:99::1/64",
            self.private,
            "eth0",
            f"{PRIVATE_V4}/24",
            f"{PRIVATE_V6}/64",
        )
        for namespace, gateway4, gateway6 in (
            (self.host, "10.200.1.1", "fd00:200:1::1"),
            (self.vpn, "10.200.2.1", "fd00:200:2::1"),
            (self.private, "10.99.0.1", "fd00:99::1"),
        ):
            run("ip", "-n", namespace, "route", "add", "default", "via", gateway4)
            run("ip", "-n", namespace, "-6", "route", "add", "default", "via", gateway6)
        for namespace in (self.wan, self.vpn):
            self._sysctl(namespace, "net.ipv4.ip_forward", "1")
            self._sysctl(namespace, "net.ipv6.conf.all.forwarding", "1")
        # Unprivileged ICMP sockets, so probes can ping as any uid.
        self._sysctl(self.host, "net.ipv4.ping_group_range", "0 2147483647")
        self._count_leaks()
        self._start_server()
        self._start_private_server()

    def _sysctl(self, namespace: str, key: str, value: str) -> None:
        run("ip", "netns", "exec", namespace, "sysctl", "-qw", f"{key}={value}")

    def _link(
        self, a: str, a_name: str, a4: str, a6: str, b: str, b_name: str, b4: str, b6: str
    ) -> None:
        run(
            "ip", "-n", a, "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b
        )
        for namespace, name, v4, v6 in ((a, a_name, a4, a6), (b, b_name, b4, b6)):
            run("ip", "-n", namespace, "addr", "add", v4, "dev", name)
            run("ip", "-n", namespace, "addr", "add", v6, "dev", name, "nodad")
            run("ip", "-n", namespace, "link", "set", name, "up")

    def _count_leaks(self) -> None:
        leaks = [
            f"ip daddr {PRIVATE_NET_V4} counter name leaked",
            f"ip6 daddr {PRIVATE_NET_V6} counter name leaked",
            "ip daddr 10.200.1.1 udp dport 53 counter name leaked",
        ]
        self._add_lab_chain(self.wan, "prerouting", "prerouting", -300, leaks, ["leaked"])
        tunnel = [
            "ip saddr 10.64.0.0/24 counter name through_tunnel",
            "ip6 saddr fd00:64::/64 counter name through_tunnel",
        ]
        self._add_lab_chain(self.private, "input", "input", -300, tunnel, ["through_tunnel"])

    def _add_lab_chain(
        self,
        namespace: str,
        chain: str,
        hook: str,
        priority: int,
        rules: list[str],
        counters: Sequence[str] = (),
    ) -> None:
        """Add a chain of rules, and the named counters they use, to a namespace's lab table."""
        body = "\n        ".join(rules)
        named = "\n".join(f"    counter {name} {{ }}" for name in counters)
        ruleset = f"""
table inet lab {{
    chain {chain} {{
        type filter hook {hook} priority {priority}; policy accept;
        {body}
    }}
{named}
}}
"""
        run("ip", "netns", "exec", namespace, "nft", "-f", "-", input=ruleset)

    def _start_server(self) -> None:
        self.spawn(
            self.vpn,
            "wireguard-go",
            "-f",
            self.server_interface,
            env={"LOG_LEVEL": "error"},
            stderr=subprocess.DEVNULL,
        )
        self._wait_for_socket(self.server_interface, "the lab's wireguard-go server")
        key_file = self.directory / "server.key"
        key_file.write_text(self.server_key.base64() + "\n")
        key_file.chmod(0o600)
        self._wg(
            "set",
            self.server_interface,
            "private-key",
            str(key_file),
            "listen-port",
            str(SERVER_PORT),
        )
        run("ip", "-n", self.vpn, "addr", "add", "10.64.0.1/24", "dev", self.server_interface)
        run(
            "ip",
            "-n",
            self.vpn,
            "addr",
            "add",
            "fd00:64::1/64",
            "dev",
            self.server_interface,
            "nodad",
        )
        run("ip", "-n", self.vpn, "link", "set", self.server_interface, "up")

    def _wait_for_socket(self, interface: str, description: str) -> None:
        deadline = time.monotonic() + 5
        socket_path = Path(f"/var/run/wireguard/{interface}.sock")
        while not socket_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{description} did not start within 5 s")
            time.sleep(0.01)

    def _wg(self, *argv: str) -> str:
        return run("ip", "netns", "exec", self.vpn, "wg", *argv)

    def _start_private_server(self) -> None:
        server = self.spawn(
            self.private,
            sys.executable,
            "-m",
            "userbound.lab.probe",
            "serve",
            f"{PRIVATE_V4},{PRIVATE_V6}",
            str(TCP_PORT),
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("the lab's private server did not start")

    def spawn(
        self,
        namespace: str,
        *argv: str,
        uid: int | None = None,
        env: dict[str, str] | None = None,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a process in a namespace, as another uid if given; destroy() kills it."""
        process = subprocess.Popen(
            [*self.prefix_command(namespace, uid), *argv],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        self.processes.append(process)
        return process

    def prefix_command(self, namespace: str, uid: int | None = None) -> list[str]:
        """Return the command prefix that runs a program in a namespace as a uid."""
        prefix = ["ip", "netns", "exec", namespace]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return prefix

    # Clients

    def add_client(self) -> Client:
        """Register a new client with the server and return its identity."""
        number = len(self.clients) + 2
        client = Client(generate_key(), f"10.64.0.{number}", f"fd00:64::{number}")
        self._wg(
            "set",
            self.server_interface,
            "peer",
            public_key(client.key).base64(),
            "allowed-ips",
            f"{client.address_v4}/32,{client.address_v6}/128",
        )
        self.clients.append(client)
        return client

    def client_config(
        self,
        client: Client,
        allowed_ips: str = f"{PRIVATE_NET_V4}, {PRIVATE_NET_V6}",
        *,
        dns: str | None = PRIVATE_V4,
        endpoint: str = f"10.200.2.2:{SERVER_PORT}",
    ) -> str:
        """Return a wg-quick file for a client, as a VPN provider would hand it out."""
        lines = [
            "[Interface]",
            f"PrivateKey = {client.key.base64()}",
            f"Address = {client.address_v4}/24, {client.address_v6}/64",
        ]
        if dns:
            lines.append(f"DNS = {dns}")
        lines += [
            "",
            "[Peer]",
            f"PublicKey = {public_key(self.server_key).base64()}",
            f"Endpoint = {endpoint}",
            f"AllowedIPs = {allowed_ips}",
            "PersistentKeepalive = 25",
        ]
        return "\n".join(lines) + "\n"

    def start_plain_tunnel(self, client: Client, name: str) -> None:
        """Bring a tunnel up for the whole shared machine, as a VPN client running as root does.

        wireguard-go, the client's key, its addresses and a route for the
        private network in the main table: every user's packets for that
        network enter the tunnel.
        """
        self.spawn(
            self.host,
            "wireguard-go",
            "-f",
            name,
            env={"LOG_LEVEL": "error"},
            stderr=subprocess.DEVNULL,
        )
        self._wait_for_socket(name, "the system-wide wireguard-go tunnel")
        key_file = self.directory / "plain.key"
        key_file.write_text(client.key.base64() + "\n")
        key_file.chmod(0o600)
        run(
            "ip", "netns", "exec", self.host, "wg", "set", name,
            "private-key", str(key_file),
            "peer", public_key(self.server_key).base64(),
            "endpoint", f"10.200.2.2:{SERVER_PORT}",
            "allowed-ips", f"{PRIVATE_NET_V4},{PRIVATE_NET_V6}",
            "persistent-keepalive", "25",
        )  # fmt: skip
        run("ip", "-n", self.host, "addr", "add", f"{client.address_v4}/24", "dev", name)
        run("ip", "-n", self.host, "addr", "add", f"{client.address_v6}/64", "dev", name, "nodad")
        run("ip", "-n", self.host, "link", "set", name, "up")
        run("ip", "-n", self.host, "route", "add", PRIVATE_NET_V4, "dev", name)
        run("ip", "-n", self.host, "-6", "route", "add", PRIVATE_NET_V6, "dev", name)

    def write_config(self, text: str, uid: int, name: str = "corp.conf") -> Path:
        """Write a configuration file owned by uid, as that user would keep it."""
        folder = self.directory / f"home-{uid}"
        folder.mkdir(exist_ok=True)
        os.chown(folder, uid, uid)
        path = folder / name
        path.write_text(text)
        path.chmod(0o600)
        os.chown(path, uid, uid)
        return path

    def tunnel_name(self) -> str:
        """Return a tunnel name unique on this machine, as wireguard-go requires."""
        self._tunnel_names += 1
        return f"ub{self.id}{self._tunnel_names}"

    # userbound itself

    def start_daemon(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start the userbound daemon in the host namespace and wait until it accepts requests."""
        self.control_socket.unlink(missing_ok=True)
        if "--policy" not in extra:
            # The built-in defaults, whatever /etc/userbound/policy.toml contains.
            defaults = self.directory / "default-policy.toml"
            defaults.touch()
            extra = ("--policy", str(defaults), *extra)
        log = open(self.directory / "daemon.log", "ab")
        daemon = self.spawn(
            self.host,
            str(USERBOUND),
            "daemon",
            "--control-socket",
            str(self.control_socket),
            "--state-dir",
            str(self.directory / "state"),
            *extra,
            env=env,
            stdout=log.fileno(),
            stderr=log.fileno(),
        )
        log.close()
        deadline = time.monotonic() + 20
        while not self._daemon_ready():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the userbound daemon did not start:\n{self.daemon_log()}")
            time.sleep(0.02)
        return daemon

    def _daemon_ready(self) -> bool:
        if not self.control_socket.exists():
            return False
        return self.cli(0, "status").returncode == 0

    def daemon_log(self) -> str:
        path = self.directory / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"

    def cli(self, uid: int, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the userbound CLI as a uid in the host namespace."""
        return subprocess.run(
            [*self.prefix_command(self.host, uid), str(USERBOUND), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "USERBOUND_SOCKET": str(self.control_socket)},
            check=False,
        )

    def probe(
        self,
        uid: int,
        kind: str,
        host: str = PRIVATE_V4,
        *,
        port: int | None = None,
        interface: str | None = None,
        timeout: float = 2.0,
    ) -> str:
        """Run one probe as a uid on the shared machine and return `ok` or `error: ...`."""
        argv = [
            sys.executable,
            "-m",
            "userbound.lab.probe",
            kind,
            host,
            str(port or PROBE_PORTS[kind]),
        ]
        argv += ["--timeout", str(timeout)]
        if interface:
            argv += ["--interface", interface]
        result = subprocess.run(
            [*self.prefix_command(self.host, uid), *argv],
            capture_output=True,
            text=True,
            timeout=timeout + 20,
            check=False,
        )
        lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
        return lines[-1] if lines else f"error: probe exited {result.returncode} without output"

    def start_probe_loop(
        self,
        uid: int,
        label: str,
        host: str = PRIVATE_V4,
        *,
        port: int = 7,
        session: bool = False,
        interval: float = 0.01,
        timeout: float = 0.5,
    ) -> Path:
        """Probe from the shared machine as a uid until destroy(); return the file of results."""
        output = self.directory / f"{label}.log"
        output.touch()
        os.chown(output, uid, uid)
        argv = [sys.executable, "-m", "userbound.lab.probe", "loop", host, str(port)]
        argv += ["--output", str(output), "--interval", str(interval), "--timeout", str(timeout)]
        if session:
            argv.append("--session")
        self.spawn(self.host, *argv, uid=uid)
        return output

    @staticmethod
    def loop_results(output: Path) -> list[tuple[float, str]]:
        """Return the (time, result) lines a probe loop has written so far."""
        results = []
        for line in output.read_text().splitlines():
            moment, _, result = line.partition(" ")
            results.append((float(moment), result))
        return results

    # Observing

    def _counter(self, namespace: str, name: str) -> int:
        output = run(
            "ip", "netns", "exec", namespace, "nft", "-j", "list", "counter", "inet", "lab", name
        )
        for item in json.loads(output)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise RuntimeError(f"counter {name} not found in {namespace}")

    def count_by_user(self, uids: list[int]) -> None:
        """Count each uid's packets for the private network as they leave the shared machine.

        `direct_UID` counts those leaving by the public side, `tunnel_UID`
        those leaving by any other interface (a tunnel).  The chain runs
        after userbound's, so it counts only packets userbound let out.
        """
        rules = []
        for uid in uids:
            for path, match in (
                (f"direct_{uid}", '== "eth0"'),
                (f"tunnel_{uid}", '!= { "eth0", "lo" }'),
            ):
                for family, network in (("ip", PRIVATE_NET_V4), ("ip6", PRIVATE_NET_V6)):
                    match_uid = f"meta skuid {uid} {family} daddr {network}"
                    rules.append(f"{match_uid} oifname {match} counter name {path}")
        counters = [f"{kind}_{uid}" for uid in uids for kind in ("direct", "tunnel")]
        self._add_lab_chain(self.host, "output", "output", 100, rules, counters)

    def count_arrivals(self, tags: dict[int, int]) -> None:
        """Count each uid's packets where they arrive: at the private server and on the public side.

        The shared machine writes a DSCP value of each uid (`tags`) into the
        IP header of its packets for the private network, after userbound's
        rules have let them out.  WireGuard carries the inner header unchanged,
        so the private server and the public side can tell whose packet came.
        """
        tag_rules = []
        for uid, dscp in tags.items():
            tag_rules.append(f"meta skuid {uid} ip daddr {PRIVATE_NET_V4} ip dscp set {dscp}")
            tag_rules.append(f"meta skuid {uid} ip6 daddr {PRIVATE_NET_V6} ip6 dscp set {dscp}")
        self._add_lab_chain(self.host, "tag", "output", 100, tag_rules)
        counting = [
            f"{family} daddr {network} {family} dscp {dscp} counter name arrived_{uid}"
            for uid, dscp in tags.items()
            for family, network in (("ip", PRIVATE_NET_V4), ("ip6", PRIVATE_NET_V6))
        ]
        counters = [f"arrived_{uid}" for uid in tags]
        for namespace, hook in ((self.private, "input"), (self.wan, "prerouting")):
            self._add_lab_chain(namespace, "arrivals", hook, -300, counting, counters)

    def reject_private_network(self) -> None:
        """Make the public side reject packets for the private network at once with an ICMP
        error, as a router without a route to it does, instead of dropping most of them.

        The kernel limits its own "unreachable" replies to about one a second
        per sender.  Instead, a route sends these packets toward an interface
        that leads nowhere: one end of a veth pair whose other end is in the
        same namespace.  A reject rule in the forward hook, with the rate limit
        off, then replies to every one.
        """
        # Administratively prohibited: an error even a UDP socket receives.
        self._sysctl(self.wan, "net.ipv4.icmp_ratelimit", "0")
        self._sysctl(self.wan, "net.ipv6.icmp.ratelimit", "0")
        run("ip", "-n", self.wan, "link", "add", "void", "type", "veth", "peer", "name", "void-end")
        for end in ("void", "void-end"):
            run("ip", "-n", self.wan, "link", "set", end, "up")
        run("ip", "-n", self.wan, "route", "add", PRIVATE_NET_V4, "dev", "void")
        run("ip", "-n", self.wan, "-6", "route", "add", PRIVATE_NET_V6, "dev", "void")
        rejects = [
            f"ip daddr {PRIVATE_NET_V4} reject with icmpx type admin-prohibited",
            f"ip6 daddr {PRIVATE_NET_V6} reject with icmpx type admin-prohibited",
        ]
        self._add_lab_chain(self.wan, "unreachable", "forward", 0, rejects)

    def arrivals(self) -> dict[str, dict[int, int]]:
        """Return the packets counted by count_arrivals(): {"private"|"public": {uid: packets}}."""
        found: dict[str, dict[int, int]] = {}
        for place, namespace in (("private", self.private), ("public", self.wan)):
            output = run("ip", "netns", "exec", namespace, "nft", "-j", "list", "counters")
            found[place] = {}
            for item in json.loads(output)["nftables"]:
                counter = item.get("counter")
                if counter and counter["name"].startswith("arrived_"):
                    uid = int(counter["name"].removeprefix("arrived_"))
                    found[place][uid] = int(counter["packets"])
        return found

    def sent(self, uid: int, path: str) -> int:
        """Return how many of a uid's packets left by a path ("direct" or "tunnel")."""
        return self._counter(self.host, f"{path}_{uid}")

    def leaked(self) -> int:
        """Return how many packets for the private network, or DNS queries to the public
        resolver, reached the public side."""
        return self._counter(self.wan, "leaked")

    def through_tunnel(self) -> int:
        """Return how many packets reached the private server through the tunnel."""
        return self._counter(self.private, "through_tunnel")

    # Cleaning up

    def destroy(self) -> None:
        """Stop every process and remove every namespace and file of this run."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            if process.stdout is not None:
                process.stdout.close()
        for namespace in self.namespaces:
            kill_namespace(namespace)
        _remove_files(self.base, self.id)

    def __enter__(self) -> Testbed:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _remove_files(base: str, run_id: str) -> None:
    """Remove the files of a run: its folder, and the UAPI sockets wireguard-go leaves behind."""
    for leftover in Path("/var/run/wireguard").glob(f"ub*{run_id}*.sock"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    for folder in Path(tempfile.gettempdir()).glob(f"{base}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_leftovers(prefix: str) -> list[str]:
    """Remove the runs with this prefix whose creating process is gone; return their namespaces.

    Their processes (a daemon, servers, a bus) run inside their namespaces
    and die with them; then their files go.
    """
    removed = []
    runs = set()
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(f"{prefix}-"):
            continue
        owner, _, rest = name.removeprefix(f"{prefix}-").partition("-")
        if owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue
        kill_namespace(name)
        removed.append(name)
        run_id = rest.partition("-")[0]
        if run_id:
            runs.add((f"{prefix}-{owner}-{run_id}", run_id))
    for base, run_id in runs:
        _remove_files(base, run_id)
    return removed
