"""WireGuard data planes: the kernel module where present, otherwise wireguard-go.

wireguard-go is configured over its UAPI socket in /var/run/wireguard.  That
folder is shared by all network namespaces, so an interface name must be
unique across every namespace on the machine, not only in the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from userbound.errors import InternalError, InvalidConfig
from userbound.wgconfig import Key, WireGuardConfig

logger = logging.getLogger(__name__)

UAPI_DIR = Path("/var/run/wireguard")
START_TIMEOUT = 5.0
RESOLVE_TIMEOUT = 10.0


@dataclass
class PeerStatus:
    """A peer as the data plane reports it."""

    public_key: str
    endpoint: str | None = None
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    allowed_ips: list[str] = field(default_factory=list)


@dataclass
class DeviceStatus:
    """A device as the data plane reports it; the private key is compared, never kept."""

    private_key_matches: bool
    listen_port: int | None
    fwmark: int
    peers: list[PeerStatus]


class DataPlane(Protocol):
    """The operations the daemon uses on a WireGuard implementation."""

    interface: str
    kind: str

    async def start(self) -> None: ...

    async def configure(
        self, config: WireGuardConfig, fwmark: int, endpoints: dict[str, str]
    ) -> None: ...

    async def read(self, private_key: Key) -> DeviceStatus: ...

    def alive(self) -> bool: ...

    def interface_removed(self) -> None: ...

    async def wait(self) -> None: ...

    async def stop(self) -> None: ...


def interface_in_use(interface: str) -> bool:
    """Return whether any namespace uses this name for a wireguard-go interface."""
    path = UAPI_DIR / f"{interface}.sock"
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def resolve_endpoints(config: WireGuardConfig) -> dict[str, str]:
    """Resolve each peer's endpoint host name to one address, keyed by peer public key."""
    loop = asyncio.get_running_loop()
    resolved = {}
    for peer in config.peers:
        if peer.endpoint is None:
            continue
        try:
            address = ipaddress.ip_address(peer.endpoint.host)
            resolved[peer.public_key.base64()] = _join(str(address), peer.endpoint.port)
            continue
        except ValueError:
            pass
        lookup = loop.getaddrinfo(peer.endpoint.host, peer.endpoint.port, type=socket.SOCK_DGRAM)
        try:
            infos = await asyncio.wait_for(lookup, RESOLVE_TIMEOUT)
        except socket.gaierror as error:
            raise InvalidConfig(
                f"line {peer.line}: Endpoint host {peer.endpoint.host!r} could not be "
                f"resolved ({error.strerror}); check the name or use an address"
            ) from None
        except TimeoutError:
            raise InvalidConfig(
                f"line {peer.line}: resolving Endpoint host {peer.endpoint.host!r} timed out "
                f"after {RESOLVE_TIMEOUT:.0f} s; check the name or use an address"
            ) from None
        resolved[peer.public_key.base64()] = _join(str(infos[0][4][0]), peer.endpoint.port)
    return resolved


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def uapi_set_request(config: WireGuardConfig, fwmark: int, endpoints: dict[str, str]) -> str:
    """Build the UAPI `set` request that replaces the whole device configuration."""
    lines = ["set=1", f"private_key={config.private_key.hex()}", f"fwmark={fwmark}"]
    if config.listen_port is not None:
        lines.append(f"listen_port={config.listen_port}")
    lines.append("replace_peers=true")
    for peer in config.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={peer.preshared_key.hex()}")
        endpoint = endpoints.get(peer.public_key.base64())
        if endpoint is not None:
            lines.append(f"endpoint={endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network}" for network in peer.allowed_ips)
    return "\n".join(lines) + "\n\n"


def parse_uapi_get(reply: str, private_key: Key) -> DeviceStatus:
    """Parse a UAPI `get` reply; the private key is only compared."""
    status = DeviceStatus(private_key_matches=False, listen_port=None, fwmark=0, peers=[])
    peer: PeerStatus | None = None
    seconds = 0
    for line in reply.splitlines():
        key, _, value = line.partition("=")
        if key == "private_key":
            status.private_key_matches = value == private_key.hex()
        elif key == "listen_port":
            status.listen_port = int(value)
        elif key == "fwmark":
            status.fwmark = int(value)
        elif key == "public_key":
            peer = PeerStatus(public_key=Key(bytes.fromhex(value)).base64())
            status.peers.append(peer)
        elif peer is None:
            continue
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "last_handshake_time_sec":
            seconds = int(value)
        elif key == "last_handshake_time_nsec":
            if seconds:
                peer.last_handshake = seconds + int(value) / 1e9
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
    return status


class WireGuardGo:
    """A wireguard-go process serving one interface, configured over UAPI."""

    kind = "wireguard-go"

    def __init__(self, interface: str, pid: int | None = None) -> None:
        self.interface = interface
        self.pid = pid
        self._pidfd: int | None = None
        self._exited = asyncio.Event()
        if pid is not None:
            self._watch(pid)

    @property
    def socket_path(self) -> Path:
        return UAPI_DIR / f"{self.interface}.sock"

    async def start(self) -> None:
        """Start wireguard-go and wait until its UAPI socket accepts connections."""
        program = shutil.which("wireguard-go")
        if program is None:
            raise InternalError(
                "wireguard-go is not installed and this kernel has no WireGuard module; "
                "install the wireguard-go package"
            )

        try:
            self.socket_path.unlink(missing_ok=True)  # left by a process that was killed
        except OSError as error:
            raise InternalError(f"cannot remove stale socket {self.socket_path}: {error}") from None

        # A session of its own: a signal to the daemon's process group (Ctrl-C
        # in a terminal) must not stop the data plane before the daemon has
        # moved its traffic behind the kill switch.  Popen returns once the
        # child is forked, and the child is watched through a pidfd, like one
        # adopted from an earlier daemon.
        try:
            process = subprocess.Popen(  # noqa: ASYNC220
                [program, "-f", self.interface],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"), "LOG_LEVEL": "error"},
            )
        except OSError as error:
            raise InternalError(f"cannot start {program}: {error}") from None
        self.pid = process.pid
        self._watch(process.pid)

        deadline = time.monotonic() + START_TIMEOUT
        while not interface_in_use(self.interface):
            if self._exited.is_set():
                raise InternalError(
                    f"wireguard-go exited before creating interface {self.interface}; "
                    "check that no other interface has this name and that /dev/net/tun exists"
                )
            if time.monotonic() > deadline:
                await self.stop()
                raise InternalError(
                    f"wireguard-go did not create interface {self.interface} "
                    f"within {START_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.01)

    def _watch(self, pid: int) -> None:
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited.set()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self.pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)  # reap it when it is our child
        self._exited.set()

    def alive(self) -> bool:
        return not self._exited.is_set()

    def interface_removed(self) -> None:
        """Do nothing: wireguard-go exits when its interface is deleted, as the pidfd shows."""

    async def wait(self) -> None:
        await self._exited.wait()

    async def _request(self, request: str) -> str:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError as error:
            raise InternalError(
                f"wireguard-go for {self.interface} is unreachable: {error}"
            ) from error
        try:
            writer.write(request.encode())
            await writer.drain()
            reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), START_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            raise InternalError(f"wireguard-go for {self.interface} failed: {error}") from error
        finally:
            writer.close()
        text = reply.decode()
        code = next((line[6:] for line in text.splitlines() if line.startswith("errno=")), "0")
        if code != "0":
            name = errno.errorcode.get(int(code), code)
            raise InternalError(
                f"wireguard-go rejected the configuration of {self.interface}: {name}"
            )
        return text

    async def configure(
        self, config: WireGuardConfig, fwmark: int, endpoints: dict[str, str]
    ) -> None:
        """Set the whole device configuration; endpoints come resolved, keyed by public key."""
        await self._request(uapi_set_request(config, fwmark, endpoints))

    async def read(self, private_key: Key) -> DeviceStatus:
        return parse_uapi_get(await self._request("get=1\n\n"), private_key)

    async def stop(self) -> None:
        """Stop the process; wireguard-go removes its interface and socket when it exits."""
        if self.pid is None or self._exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self._exited.wait(), START_TIMEOUT)
        except TimeoutError:
            logger.warning(
                "wireguard-go pid %d for %s ignored SIGTERM; killing it", self.pid, self.interface
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await self._exited.wait()


class KernelWireGuard:
    """An interface of the kernel's WireGuard module, configured over generic netlink.

    pyroute2's synchronous API runs an event loop of its own, so every call
    goes to a worker thread, away from the daemon's loop.
    """

    # NOTE: this backend has not run in the test suite, because the machines
    # it runs on have no WireGuard module; wireguard-go covers the same calls.

    kind = "kernel"

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._removed = asyncio.Event()

    async def start(self) -> None:
        await asyncio.to_thread(self._create)

    def _create(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.interface, kind="wireguard")
        except NetlinkError as error:
            raise InternalError(
                f"cannot create WireGuard interface {self.interface}: {error}"
            ) from None

    async def configure(
        self, config: WireGuardConfig, fwmark: int, endpoints: dict[str, str]
    ) -> None:
        await asyncio.to_thread(self._configure, config, fwmark, endpoints)

    def _configure(self, config: WireGuardConfig, fwmark: int, endpoints: dict[str, str]) -> None:
        from pyroute2 import WireGuard

        with WireGuard() as wg:
            wg.set(
                self.interface,
                private_key=config.private_key.base64(),
                fwmark=fwmark,
                listen_port=config.listen_port or 0,
            )
            for peer in config.peers:
                settings: dict[str, object] = {
                    "public_key": peer.public_key.base64(),
                    "persistent_keepalive": peer.persistent_keepalive,
                    "replace_allowed_ips": True,
                    "allowed_ips": [str(n) for n in peer.allowed_ips],
                }
                if peer.preshared_key is not None:
                    settings["preshared_key"] = peer.preshared_key.base64()
                endpoint = endpoints.get(peer.public_key.base64())
                if endpoint is not None:
                    host, _, port = endpoint.rpartition(":")
                    settings["endpoint_addr"] = host.strip("[]")
                    settings["endpoint_port"] = int(port)
                wg.set(self.interface, peer=settings)

    async def read(self, private_key: Key) -> DeviceStatus:
        return await asyncio.to_thread(self._read, private_key)

    def _read(self, private_key: Key) -> DeviceStatus:
        from pyroute2 import WireGuard

        with WireGuard() as wg:
            info = wg.info(self.interface)[0]
        status = DeviceStatus(
            private_key_matches=_text(info.get_attr("WGDEVICE_A_PRIVATE_KEY"))
            == private_key.base64(),
            listen_port=info.get_attr("WGDEVICE_A_LISTEN_PORT"),
            fwmark=info.get_attr("WGDEVICE_A_FWMARK") or 0,
            peers=[],
        )
        for peer in info.get_attr("WGDEVICE_A_PEERS") or []:
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
            status.peers.append(
                PeerStatus(
                    public_key=_text(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
                    last_handshake=float(handshake.get("tv_sec") or 0) or None,
                    rx_bytes=peer.get_attr("WGPEER_A_RX_BYTES") or 0,
                    tx_bytes=peer.get_attr("WGPEER_A_TX_BYTES") or 0,
                )
            )
        return status

    def alive(self) -> bool:
        return not self._removed.is_set()

    def interface_removed(self) -> None:
        self._removed.set()

    async def wait(self) -> None:
        await self._removed.wait()

    async def stop(self) -> None:
        await asyncio.to_thread(self._delete)
        self._removed.set()

    def _delete(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr, contextlib.suppress(NetlinkError):
            ipr.link("del", ifname=self.interface)


def _text(value: object) -> str:
    """Return a key attribute as pyroute2 decodes it (str or bytes of base64) as str."""
    if isinstance(value, bytes):
        return value.decode(errors="replace").strip("\0")
    return str(value or "")


def kernel_module_available() -> bool:
    """Return whether the running kernel has the WireGuard module loaded."""
    return Path("/sys/module/wireguard").is_dir()


def check_data_plane(kind: str) -> str:
    """Return the data plane this kind selects on this machine, or raise if it is missing."""
    if kind in ("kernel", "auto") and kernel_module_available():
        return "kernel"
    if kind == "kernel":
        raise InternalError(
            "--data-plane kernel: the WireGuard kernel module is not loaded; "
            "load it with `modprobe wireguard` or use --data-plane auto"
        )
    if shutil.which("wireguard-go") is None:
        raise InternalError(
            "wireguard-go is not installed and this kernel has no WireGuard module; "
            "install the wireguard-go package"
        )
    return "wireguard-go"


def new_data_plane(interface: str, *, kind: str = "auto") -> DataPlane:
    """Create the data plane for an interface: the kernel module if loaded, else wireguard-go."""
    if kind == "kernel" or (kind == "auto" and kernel_module_available()):
        return KernelWireGuard(interface)
    return WireGuardGo(interface)
