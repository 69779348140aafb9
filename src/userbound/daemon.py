"""The root daemon: owns the tunnels, applies kernel enforcement, serves the control API.

Every change to the tunnels ends in `sync()`, which stores the tunnels, changes
the nftables table in one transaction and then brings the routing rules and
routes in line.  The firewall goes first, so a uid that loses access is
blocked before its routes change.  The policy loop turns every change of the
session state into a decision for each tunnel and applies it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from userbound import __version__, wgconfig
from userbound.accounts import resolve_user, user_name
from userbound.audit import AuditFollower, AuditLog, Record
from userbound.control import Caller, ControlServer, Params, Stream
from userbound.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    NotFound,
    NotPermitted,
    UserboundError,
)
from userbound.firewall import Firewall
from userbound.names import check_name
from userbound.policy import (
    DEFAULT_POLICY,
    REQUEST_KEYS,
    Action,
    Decision,
    Hold,
    Settings,
    admitted_uids,
    check_layer,
    decide,
    effective,
    grace_deadline,
    load_policy,
    next_hold,
    owner_sessions,
    stricter_or_equal,
    strictest,
)
from userbound.routing import (
    TABLE_FIRST,
    TABLE_LAST,
    LinkEvents,
    Routing,
    close_connections,
    dns_mark,
)
from userbound.sessions import open_monitor
from userbound.sessions.model import Event, Snapshot
from userbound.sessions.monitor import RESYNC_INTERVAL, Follower, Monitor
from userbound.tunnels import State, StateFile, Tunnel
from userbound.wireguard import (
    DataPlane,
    WireGuardGo,
    check_data_plane,
    interface_in_use,
    new_data_plane,
    resolve_endpoints,
)

logger = logging.getLogger(__name__)

NAMESPACE_LOCK_DIR = Path("/run/userbound")
RESTART_DELAY_FIRST = 1.0
RESTART_DELAY_MAX = 30.0
FAILURES_BEFORE_FAILED = 3
MAX_TUNNELS_PER_USER = 8
MAX_QUEUED_EVENTS = 10_000  # per follower of session events; then it gets the state instead
MAX_UNDECIDED_EVENTS = 1000  # session events kept for the audit until the next decision
PRIVATE_NETWORKS = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]


def notify_systemd(message: str) -> None:
    """Send a state change to systemd when it started us with Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as error:
            logger.warning("could not notify systemd at %s: %s", address, error)


class Daemon:
    """The tunnels of this network namespace and everything that enforces them."""

    def __init__(
        self,
        control_socket: str,
        state_dir: str,
        data_plane_kind: str = "auto",
        restart_delay: float = RESTART_DELAY_FIRST,
        sessions_source: str = "auto",
        resync_interval: float = RESYNC_INTERVAL,
        policy_path: str | None = None,
    ) -> None:
        self.control_socket = control_socket
        # A named policy file must exist; the default one may be absent.
        self._policy_path = Path(policy_path) if policy_path else DEFAULT_POLICY
        self._policy_required = policy_path is not None
        self.policy = load_policy(self._policy_path, required=self._policy_required)
        self._log_policy()
        self._sessions_source = sessions_source
        self._resync_interval = resync_interval
        self.sessions: Monitor | None = None
        self._restart_delay = restart_delay
        self.tunnels: dict[str, Tunnel] = {}
        self._lock = asyncio.Lock()
        self._data_plane_kind = check_data_plane(data_plane_kind)
        self._firewall = Firewall()
        self._routing = Routing()
        self._state_dir = Path(state_dir)
        self._state_file = StateFile(self._state_dir)
        self._server = ControlServer(control_socket, self.handle)
        self._stopping = asyncio.Event()
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._link_check: asyncio.Task[None] | None = None
        self.audit = AuditLog(self._state_dir / "audit.log")
        self._policy_due = asyncio.Event()
        self._undecided: list[Event] = []
        self._reloaded = False  # SIGHUP read a new policy that the loop has yet to apply
        self._policy_task: asyncio.Task[None] | None = None

    # Lifecycle

    async def run(self) -> None:
        """Adopt what an earlier daemon left, serve until SIGTERM or SIGINT, then clean up."""
        with self._single_instance():
            await self._run()

    @contextlib.contextmanager
    def _single_instance(self) -> Iterator[None]:
        """Hold this network namespace and this state folder for one daemon only.

        A second daemon would replace the first one's rules with its own (none),
        opening the first one's tunnels to every user.  Each is marked by an
        flock, which the kernel releases when the process dies.  The namespace
        lock lives in a root-owned folder, named after the namespace's inode,
        so that no other user can take it first.
        """
        locks = [
            (
                namespace_lock(os.stat("/proc/self/ns/net").st_ino),
                "another userbound daemon runs in this network namespace; "
                "stop it first (only one daemon may manage a namespace)",
            ),
            (
                self._state_dir / "daemon.lock",
                f"another userbound daemon uses the state folder {self._state_dir}; "
                "stop it or choose another with --state-dir",
            ),
        ]
        with contextlib.ExitStack() as held:
            for path, message in locks:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                # Mode 0600: flock needs only an open file, so a lock file other
                # users can read is one they can hold to keep the daemon out.
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.fchmod(descriptor, 0o600)
                lock = held.enter_context(os.fdopen(descriptor, "w"))
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise Conflict(message) from None
            yield

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_policy)
        links = LinkEvents(self._on_link_event)
        loop.add_reader(links.fileno(), links.readable)
        try:
            await self._routing.open()
            self.audit.load()
            # Sessions first: restored tunnels get the policy's decision
            # before their rules are first written.
            self.sessions = await open_monitor(
                self._sessions_source, resync_interval=self._resync_interval
            )
            await self.restore()
            self.sessions.subscribe(self._on_session_event)
            self._policy_task = loop.create_task(self._policy_loop(), name="policy")
            await self._server.start()
            logger.info(
                "userbound %s ready on %s with %d tunnel(s)",
                __version__,
                self.control_socket,
                len(self.tunnels),
            )
            notify_systemd("READY=1")
            await self._stopping.wait()
            notify_systemd("STOPPING=1")
            logger.info("stopping: removing every tunnel, rule and route")
        finally:
            loop.remove_reader(links.fileno())
            loop.remove_signal_handler(signal.SIGHUP)
            links.close()
            await self._server.close()
            if self._policy_task is not None:
                self._policy_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._policy_task
            if self.sessions is not None:
                await self.sessions.close()
            await self.shutdown()

    async def restore(self) -> None:
        """Adopt the tunnels a previous daemon left, or replace their data planes.

        Each tunnel gets the policy's decision for the current sessions before
        its rules are written, and that decision is audited.
        """
        restored: list[tuple[Tunnel, Action]] = []
        async with self._lock:
            for record in self._state_file.load():
                try:
                    tunnel = self._tunnel_from_record(record)
                except (UserboundError, KeyError, TypeError, ValueError) as error:
                    logger.error("dropping stored tunnel %r: %s", record.get("name"), error)
                    continue
                stored = tunnel.hold.action
                self._decide(tunnel, self._snapshot(), time.monotonic())
                restored.append((tunnel, stored))
                if tunnel.hold.action is Action.DISCONNECT:
                    if tunnel.data_plane is not None:
                        await tunnel.data_plane.stop()
                        tunnel.data_plane = None
                    tunnel.state = State.DISCONNECTED
                    if not tunnel.settings.reconnect_on_return:
                        tunnel.removed = True
                        continue
                elif tunnel.data_plane is not None and await self._adopt(tunnel):
                    tunnel.state = tunnel.running_state()
                    logger.info("adopted tunnel %s of uid %d", tunnel.name, tunnel.owner)
                self.tunnels[tunnel.name] = tunnel
            # One transaction: adopted tunnels stay open or suspended, the
            # rest wait behind the kill switch, and leftovers no tunnel
            # claims are removed.
            await self.sync()
        for tunnel, stored in restored:
            if tunnel.state is not State.DISCONNECTED and not tunnel.removed:
                self._supervise(tunnel, start_now=tunnel.data_plane is None)
            # The state the previous daemon last stored: its last commit may be newer.
            previous = {Action.KEEP: State.UP, Action.SUSPEND: State.SUSPENDED}.get(
                stored, State.DISCONNECTED
            )
            self._audit(tunnel, "decision", previous_state=previous, trigger="restart")

    def _tunnel_from_record(self, record: dict[str, Any]) -> Tunnel:
        config = wgconfig.parse(record["config"])
        tunnel = Tunnel(
            name=check_name(record["name"]),
            owner=int(record["owner"]),
            config_text=record["config"],
            config=config,
            table=int(record["table"]),
            fwmark=int(record["fwmark"]),
            allowed_uids=set(),
            created=float(record.get("created") or 0),
            request=dict(record["request"]),
            privileged=bool(record["privileged"]),
            extra_uids={int(u) for u in record["extra_uids"]},
            removed_uids={int(u) for u in record["removed_uids"]},
            hold=_stored_hold(record),
            owner_seen=bool(record["owner_seen"]),
        )
        settings, changed = self._settings_for(tunnel)
        if changed:
            logger.warning(
                "tunnel %s: settings now differ from its request in %s",
                tunnel.name,
                ", ".join(changed),
            )
        self._apply_settings(tunnel, settings)
        pid = record.get("pid")
        if isinstance(pid, int) and _is_wireguard_go(pid, tunnel.interface):
            tunnel.data_plane = WireGuardGo(tunnel.interface, pid=pid)
        return tunnel

    async def _adopt(self, tunnel: Tunnel) -> bool:
        assert tunnel.data_plane is not None
        try:
            await self._verify(tunnel, tunnel.data_plane)
            await self._routing.configure_link(
                tunnel.interface, tunnel.config.addresses, tunnel.config.mtu, set_up=True
            )
        except UserboundError as error:
            logger.warning(
                "cannot adopt tunnel %s, replacing its data plane: %s", tunnel.name, error
            )
            await tunnel.data_plane.stop()
            tunnel.data_plane = None
            return False
        return True

    async def shutdown(self) -> None:
        """Stop every data plane and remove every table, rule, route and interface."""
        async with self._lock:
            for tunnel in self.tunnels.values():
                tunnel.removed = True
            for task in self._supervisors.values():
                task.cancel()
            if self._link_check is not None:
                self._link_check.cancel()
            for tunnel in self.tunnels.values():
                if tunnel.data_plane is not None:
                    await tunnel.data_plane.stop()
            self.tunnels.clear()
            self._firewall.remove()
            await self._routing.apply([])
            self._routing.close()
            self._state_file.remove()

    # Kernel state

    async def sync(self, *, refresh: bool = True) -> float:
        """Make the kernel's rules and routes match the tunnels, and store the tunnels.

        refresh=False reuses the interface states and routes read by the last
        call; it suits changes that add or remove no interface.  Returns the
        time.monotonic() at which the kernel held the new rules and routes.
        """
        tunnels = list(self.tunnels.values())
        if refresh:
            for tunnel in tunnels:
                tunnel.link_index, tunnel.link_up = await self._routing.link_state(tunnel.interface)
        # Stored first: a daemon killed after the kernel change restarts from it.
        self._state_file.save(tunnels)
        self._firewall.apply([t.firewall_rules() for t in tunnels])
        await self._routing.apply([t.routes() for t in tunnels], refresh=refresh)
        committed = time.monotonic()
        for tunnel in tunnels:
            engaged = tunnel.state is not State.UP
            if engaged and tunnel.enforced_state is State.UP and tunnel.blocking:
                await close_connections(tunnel.config.addresses)
            tunnel.enforced_state = tunnel.state
        return committed

    def _on_link_event(self) -> None:
        if self._link_check is None or self._link_check.done():
            self._link_check = asyncio.get_running_loop().create_task(self._check_links())

    async def _check_links(self) -> None:
        """Follow interfaces set down or up by someone else, and restore routes when up."""
        async with self._lock:
            changed = False
            for tunnel in self.tunnels.values():
                index, link_up = await self._routing.link_state(tunnel.interface)
                if index is None and tunnel.data_plane is not None:
                    tunnel.data_plane.interface_removed()
                alive = tunnel.data_plane is not None and tunnel.data_plane.alive()
                running = tunnel.state in (State.UP, State.SUSPENDED)
                if running and not link_up:
                    logger.warning("interface %s went down; kill switch engaged", tunnel.interface)
                    tunnel.state = State.DOWN
                    changed = True
                elif tunnel.state is State.DOWN and link_up and alive:
                    logger.info("interface %s is up again; restoring its routes", tunnel.interface)
                    await self._routing.configure_link(
                        tunnel.interface, tunnel.config.addresses, tunnel.config.mtu, set_up=False
                    )
                    tunnel.state = tunnel.running_state()
                    changed = True
                elif tunnel.state is State.UP:
                    # Routes vanish when a link flaps faster than we see it.
                    changed = True
            if changed:
                await self.sync()

    # Data planes

    async def _start_data_plane(self, tunnel: Tunnel, endpoints: dict[str, str]) -> None:
        data_plane = new_data_plane(tunnel.interface, kind=self._data_plane_kind)
        tunnel.data_plane = data_plane
        try:
            await data_plane.start()
            await data_plane.configure(tunnel.config, tunnel.fwmark, endpoints)
            await self._verify(tunnel, data_plane)
            await self._routing.configure_link(
                tunnel.interface, tunnel.config.addresses, tunnel.config.mtu, set_up=True
            )
        except BaseException:
            await data_plane.stop()
            raise

    async def _verify(self, tunnel: Tunnel, data_plane: DataPlane) -> None:
        """Read the device configuration back and compare it with the tunnel's."""
        status = await data_plane.read(tunnel.config.private_key)
        expected = {p.public_key.base64() for p in tunnel.config.peers}
        found = {p.public_key for p in status.peers}
        if not status.private_key_matches or status.fwmark != tunnel.fwmark or found != expected:
            raise InternalError(
                f"the data plane of {tunnel.name} reads back a different configuration "
                "than the one set"
            )

    def _supervise(self, tunnel: Tunnel, *, start_now: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._supervisor(tunnel, start_now=start_now))
        self._supervisors[tunnel.name] = task

    async def _supervisor(self, tunnel: Tunnel, *, start_now: bool) -> None:
        """Restart the data plane whenever it exits."""
        while not tunnel.removed:
            if not start_now:
                await self._wait_for_exit(tunnel)
            await self._restart(tunnel, wait_first=not start_now)
            start_now = False

    async def _wait_for_exit(self, tunnel: Tunnel) -> None:
        if tunnel.data_plane is not None:
            await tunnel.data_plane.wait()
        async with self._lock:
            if tunnel.removed:
                return
            logger.warning("data plane of tunnel %s exited; kill switch engaged", tunnel.name)
            previous = tunnel.state
            tunnel.state = State.CONNECTING
            await self.sync()
        self._audit(tunnel, "data-plane-exited", previous_state=previous)

    async def _restart(self, tunnel: Tunnel, *, wait_first: bool) -> None:
        """Start the data plane again, waiting longer after each failure, until it runs."""
        delay = self._restart_delay
        while not tunnel.removed:
            if wait_first:
                await asyncio.sleep(delay)
            wait_first = True
            # Names are resolved outside the lock: a slow resolver must not
            # hold up the other tunnels.
            failure: UserboundError | None = None
            endpoints: dict[str, str] = {}
            try:
                endpoints = await resolve_endpoints(tunnel.config)
            except UserboundError as error:
                failure = error
            async with self._lock:
                if tunnel.removed:
                    return
                try:
                    if failure is not None:
                        raise failure
                    await self._start_data_plane(tunnel, endpoints)
                except Exception as error:
                    # Any failure, such as running out of file descriptors,
                    # must lead to another try, never to a supervisor that died.
                    tunnel.failures += 1
                    if tunnel.failures >= FAILURES_BEFORE_FAILED:
                        tunnel.state = State.FAILED
                    delay = max(min(delay * 2, RESTART_DELAY_MAX), self._restart_delay)
                    logger.error(
                        "data plane of %s failed to start (%d in a row), next try in %.0f s: %s",
                        tunnel.name,
                        tunnel.failures,
                        delay,
                        error,
                    )
                    try:
                        await self.sync()
                    except Exception:
                        logger.exception("applying the rules for tunnel %s failed", tunnel.name)
                    continue
                tunnel.failures = 0
                previous = tunnel.state
                tunnel.state = tunnel.running_state()
                await self.sync()
                logger.info(
                    "data plane of tunnel %s runs; the tunnel is %s",
                    tunnel.name,
                    tunnel.state.value,
                )
                self._audit(tunnel, "connected", previous_state=previous)
                return

    # Control API

    async def handle(
        self, command: str, params: dict[str, Any], caller: Caller
    ) -> dict[str, Any] | Stream:
        """Run one control request for a caller."""
        handlers: dict[str, Callable[[Params, Caller], Awaitable[dict[str, Any] | Stream]]] = {
            "up": self._up,
            "down": self._down,
            "status": self._status,
            "allow": self._allow,
            "resume": self._resume,
            "events": self._events,
            "watch-events": self._watch_events,
            "version": self._version,
            "sessions": self._sessions,
            "watch-sessions": self._watch_sessions,
        }
        handler = handlers.get(command)
        if handler is None:
            raise InvalidRequest(
                f"unknown command {command!r}; expected one of " + ", ".join(sorted(handlers))
            )
        return await handler(Params(params), caller)

    async def _version(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known(set())
        return {"version": __version__}

    def _owned(self, name: str, caller: Caller, action: str) -> Tunnel:
        tunnel = self.tunnels.get(name)
        if tunnel is None:
            raise NotFound(f"no tunnel named {name!r}; `userbound status` lists them")
        if not caller.is_root and tunnel.owner != caller.uid:
            raise NotPermitted(
                f"tunnel {name!r} belongs to uid {tunnel.owner}; "
                f"only that user or root may {action}"
            )
        return tunnel

    async def _up(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known({"config", "name", "owner", "settings"})
        text = params.string("config", required=True) or ""
        name = check_name(params.string("name", required=True) or "")
        requested_owner = params.user("owner")
        owner = caller.uid if requested_owner is None else resolve_user(requested_owner)
        if owner != caller.uid and not caller.is_root:
            raise NotPermitted("only root may bring up a tunnel for another user (field 'owner')")
        raw = params.table("settings")
        request = check_layer(raw, "settings", REQUEST_KEYS)
        settings = effective(self.policy, owner, request, privileged=caller.is_root)
        if not settings.allow_remote_owner and not caller.is_root:
            self._check_local_owner(owner)
        config = wgconfig.parse(text)
        if not caller.is_root:
            _check_unprivileged(config)
        # Resolved before taking the lock: a slow resolver must not hold up other tunnels.
        endpoints = await resolve_endpoints(config)

        async with self._lock:
            # Again under the lock: a policy reloaded while the endpoints were
            # resolved applies to this tunnel too.
            settings = effective(self.policy, owner, request, privileged=caller.is_root)
            if not settings.allow_remote_owner and not caller.is_root:
                self._check_local_owner(owner)
            tunnel = Tunnel(
                name=name,
                owner=owner,
                config_text=text,
                config=config,
                table=self._free_table(),
                fwmark=0,
                allowed_uids=set(),
                request=raw,
                privileged=caller.is_root,
            )
            self._apply_settings(tunnel, settings)
            tunnel.fwmark = config.fwmark or tunnel.table
            if not caller.is_root:
                self._check_quota(owner)
            await self._check_conflicts(tunnel)
            await self._check_addresses(tunnel, unprivileged=not caller.is_root)
            # A cause that is present already applies at once: it began before the tunnel.
            self._decide(tunnel, self._snapshot(), time.monotonic(), grace=False)
            if tunnel.hold.action is Action.DISCONNECT and not settings.reconnect_on_return:
                raise NotPermitted(
                    f"the policy disconnects this tunnel now ({tunnel.decision.reason}); "
                    "try again when that has changed"
                )
            self.tunnels[name] = tunnel
            try:
                await self.sync()
                if tunnel.hold.action is not Action.DISCONNECT:
                    await self._start_data_plane(tunnel, endpoints)
            except BaseException:
                tunnel.removed = True
                del self.tunnels[name]
                await self.sync()
                raise
            if tunnel.hold.action is Action.DISCONNECT:
                tunnel.state = State.DISCONNECTED
            else:
                tunnel.state = tunnel.running_state()
                self._supervise(tunnel, start_now=False)
            await self.sync()
        logger.info(
            "tunnel %s %s for uid %d (allowed uids %s, kill switch %s), requested by uid %d",
            name,
            tunnel.state.value,
            owner,
            "all" if tunnel.everyone else sorted(tunnel.allowed_uids),
            "on" if tunnel.kill_switch else "off",
            caller.uid,
        )
        self._audit(tunnel, "up", by=caller.uid, previous_state=None)
        if tunnel.hold.pending is not None:
            # The policy loop learns of the new grace period and wakes at its end.
            self._policy_due.set()
        return {
            "name": name,
            "interface": tunnel.interface,
            "owner_uid": owner,
            "state": tunnel.state.value,
            "reason": tunnel.decision.reason if tunnel.held else None,
        }

    def _check_local_owner(self, owner: int) -> None:
        """Refuse a user who is not at the machine when the policy requires it."""
        snapshot = self._snapshot()
        if not snapshot.known:
            raise NotPermitted(
                f"the policy lets only users with a local session bring up a tunnel "
                f"(allow_remote_owner = false), and sessions are unknown: {snapshot.reason}"
            )
        if not any(not s.remote for s in owner_sessions(snapshot, owner)):
            raise NotPermitted(
                f"uid {owner} has no local session (only remote ones, or none), and the policy "
                "lets only users with a local session bring up a tunnel "
                "(allow_remote_owner = false)"
            )

    def _check_quota(self, owner: int) -> None:
        count = sum(1 for t in self.tunnels.values() if t.owner == owner)
        if count >= MAX_TUNNELS_PER_USER:
            raise NotPermitted(
                f"uid {owner} already has {count} tunnels, the most a user may have; "
                "bring one down first (root has no limit)"
            )

    def _free_table(self) -> int:
        used = {t.table for t in self.tunnels.values()}
        for table in range(TABLE_FIRST, TABLE_LAST + 1):
            if table not in used:
                return table
        raise Conflict(f"all {TABLE_LAST - TABLE_FIRST + 1} routing tables of userbound are in use")

    async def _check_conflicts(self, new: Tunnel) -> None:
        if new.name in self.tunnels:
            raise Conflict(f"a tunnel named {new.name!r} exists; choose another name with --name")
        index, _ = await self._routing.link_state(new.interface)
        if index is not None or interface_in_use(new.interface):
            raise Conflict(
                f"an interface named {new.interface!r} exists (here or in another network "
                "namespace); choose another name with --name"
            )
        self._check_overlaps(new)
        marks = {t.fwmark for t in self.tunnels.values()} | {
            dns_mark(t.table) for t in self.tunnels.values()
        }
        if new.fwmark in marks or dns_mark(new.table) in marks:
            raise Conflict(
                f"FwMark {new.fwmark:#x} is already used by another tunnel; remove FwMark "
                "from the file and userbound chooses one"
            )

    async def _check_addresses(self, new: Tunnel, *, unprivileged: bool) -> None:
        """Reject tunnel addresses that would capture traffic meant for someone else.

        An interface address is local for the whole machine: every user's
        packets to it stay on the machine.  It must not be an address already
        in use or another tunnel's address, network or endpoint.  A user's
        tunnel must also use a private range outside the machine's own networks.
        """
        local = await self._routing.local_addresses()
        for address in new.config.addresses:
            ip = address.ip
            if ip in local:
                raise Conflict(f"Address {ip} is already assigned on this machine")
            for other in self.tunnels.values():
                endpoints = {p.endpoint.host for p in other.config.peers if p.endpoint}
                # A full tunnel claims every address; the firewall keeps its
                # owner's packets away from other tunnels' addresses instead.
                claimed = [n for n in other.networks() if n.prefixlen > 0]
                if str(ip) in endpoints or any(ip in n for n in claimed):
                    raise Conflict(
                        f"Address {ip} belongs to the networks or endpoint of tunnel "
                        f"{other.name!r}; a tunnel address must not capture its traffic"
                    )
            if not unprivileged:
                continue
            if not any(ip in network for network in PRIVATE_NETWORKS):
                raise NotPermitted(
                    f"Address {ip} is not in a private range (10/8, 172.16/12, 192.168/16, "
                    "100.64/10, fc00::/7); only root may give a tunnel another address"
                )
            for network in await self._routing.main_networks():
                if ip in network:
                    raise NotPermitted(
                        f"Address {ip} lies in {network}, a network this machine reaches "
                        "directly; only root may give a tunnel such an address"
                    )

    def _check_overlaps(self, tunnel: Tunnel) -> None:
        """Reject AllowedIPs that overlap those of another tunnel a shared uid enters.

        Each uid has one routing table per destination: two tunnels claiming
        the same destination for the same uid would each trip the other's kill switch.
        """
        for other in self.tunnels.values():
            if other is tunnel:
                continue
            if tunnel.everyone or other.everyone:
                shared = other.allowed_uids if tunnel.everyone else tunnel.allowed_uids
                shared = shared or {other.owner}
            else:
                shared = tunnel.allowed_uids & other.allowed_uids
            if not shared:
                continue
            for mine in tunnel.networks():
                for theirs in other.networks():
                    if mine.version == theirs.version and mine.overlaps(theirs):
                        raise Conflict(
                            f"AllowedIPs {mine} of tunnel {tunnel.name!r} overlaps {theirs} of "
                            f"tunnel {other.name!r}, which uid {min(shared)} also enters"
                        )

    async def _down(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known({"name"})
        name = params.string("name", required=True) or ""
        async with self._lock:
            tunnel = self._owned(name, caller, "bring it down")
            previous = tunnel.state
            tunnel.removed = True
            await self._stop_data_plane(tunnel)
            del self.tunnels[name]
            await self.sync()
        logger.info("tunnel %s of uid %d down, requested by uid %d", name, tunnel.owner, caller.uid)
        self._audit(tunnel, "down", by=caller.uid, previous_state=previous)
        return {"name": name}

    async def _stop_data_plane(self, tunnel: Tunnel) -> None:
        task = self._supervisors.pop(tunnel.name, None)
        if task is not None:
            task.cancel()
        if tunnel.data_plane is not None:
            await tunnel.data_plane.stop()
            tunnel.data_plane = None

    async def _allow(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known({"name", "add", "remove"})
        name = params.string("name", required=True) or ""
        add = {resolve_user(u) for u in params.users("add") or []}
        remove = {resolve_user(u) for u in params.users("remove") or []}
        async with self._lock:
            tunnel = self._owned(name, caller, "change who enters it")
            if not caller.is_root:
                raise NotPermitted(f"only root may change which users enter tunnel {name!r}")
            if tunnel.owner in remove:
                raise InvalidRequest(
                    f"field 'remove': uid {tunnel.owner} owns tunnel {name!r} and always enters it"
                )
            if tunnel.everyone:
                raise InvalidRequest(
                    f"tunnel {name!r} has scope 'system': every user enters it already"
                )
            previous = (set(tunnel.extra_uids), set(tunnel.removed_uids))
            tunnel.extra_uids = (tunnel.extra_uids | add) - remove
            tunnel.removed_uids = (tunnel.removed_uids | remove) - add
            self._apply_settings(tunnel, tunnel.settings)
            try:
                self._check_overlaps(tunnel)
                await self.sync(refresh=False)
            except BaseException:
                tunnel.extra_uids, tunnel.removed_uids = previous
                self._apply_settings(tunnel, tunnel.settings)
                await self.sync()
                raise
        logger.info("tunnel %s now admits uids %s", name, sorted(tunnel.allowed_uids))
        return {"name": name, "allowed_uids": sorted(tunnel.allowed_uids)}

    async def _status(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known({"name"})
        name = params.string("name")
        tunnels = [self.tunnels[name]] if name in self.tunnels else []
        if name is not None and not tunnels:
            raise NotFound(f"no tunnel named {name!r}; `userbound status` lists them")
        described = []
        for tunnel in tunnels or list(self.tunnels.values()):
            if caller.is_root or tunnel.owner == caller.uid:
                device = None
                if tunnel.data_plane is not None and tunnel.data_plane.alive():
                    try:
                        device = await tunnel.data_plane.read(tunnel.config.private_key)
                    except UserboundError as error:
                        logger.warning("cannot read the data plane of %s: %s", tunnel.name, error)
                described.append(tunnel.details(device))
            else:
                described.append(tunnel.summary())
        return {
            "caller": {"uid": caller.uid, "name": user_name(caller.uid)},
            "tunnels": described,
        }

    # Sessions: logind's view, readable by every user, as with loginctl.

    def _monitor(self) -> Monitor:
        assert self.sessions is not None, "the control server starts after the monitor"
        return self.sessions

    async def _sessions(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known(set())
        return self._monitor().snapshot.to_json()

    async def _watch_sessions(self, params: Params, caller: Caller) -> Stream:
        params.check_known(set())
        monitor = self._monitor()
        follower = Follower(monitor, MAX_QUEUED_EVENTS)
        return Stream(monitor.snapshot.to_json(), follower.events(), follower.close)

    # Policy: what the session state does to each tunnel

    def _snapshot(self) -> Snapshot:
        assert self.sessions is not None, "the session monitor starts first"
        return self.sessions.snapshot

    def _log_policy(self) -> None:
        if self.policy.path is None:
            logger.info("no policy file at %s: the built-in defaults apply", self._policy_path)
        else:
            logger.info("policy from %s", self.policy.path)
        for warning in self.policy.warnings:
            logger.warning("policy: %s", warning)

    def _settings_for(self, tunnel: Tunnel) -> tuple[Settings, list[str]]:
        """Return a tunnel's settings under the current policy, and the keys it had to change.

        Where a user's request has become looser than the policy, the
        stricter of the two values applies: for allowed users, only those
        both name.
        """
        request: dict[str, Any] = {}
        changed: list[str] = []
        for key, value in tunnel.request.items():
            if key in ("allow_users", "allow_groups") and isinstance(value, list):
                # Entry by entry: a user or group deleted since admits no one,
                # and the policy's list must not take the request's place.
                value = [v for v in value if self._still_valid(tunnel, key, v)]
                changed += [key] if len(value) < len(tunnel.request[key]) else []
            try:
                request.update(check_layer({key: value}, "settings", REQUEST_KEYS))
            except InvalidRequest as error:
                logger.warning("tunnel %s: dropping %s", tunnel.name, error.message)
                changed.append(key)
        if tunnel.privileged:
            return effective(self.policy, tunnel.owner, request, privileged=True), changed
        policy_settings = self.policy.settings_for(tunnel.owner)
        looser = [
            k
            for k, v in request.items()
            if not stricter_or_equal(k, v, getattr(policy_settings, k))
        ]
        for key in looser:
            request[key] = strictest(key, [request[key], getattr(policy_settings, key)])
        settings = effective(self.policy, tunnel.owner, request, privileged=False)
        # A value the policy gave back shows the policy as its source.
        sources = dict(settings.sources)
        for key in looser:
            if getattr(settings, key) == getattr(policy_settings, key):
                sources[key] = policy_settings.sources.get(key, "default")
        return replace(settings, sources=sources), list(dict.fromkeys(changed + looser))

    @staticmethod
    def _still_valid(tunnel: Tunnel, key: str, entry: Any) -> bool:
        try:
            check_layer({key: [entry]}, "settings", REQUEST_KEYS)
        except InvalidRequest as error:
            logger.warning("tunnel %s: dropping from %s", tunnel.name, error.message)
            return False
        return True

    @staticmethod
    def _apply_settings(tunnel: Tunnel, settings: Settings) -> None:
        tunnel.settings = settings
        tunnel.kill_switch = settings.kill_switch
        # NOTE: scope "system" also sends the daemon's own DNS lookups into the
        # tunnel, so a disconnected one with a host-name Endpoint cannot resolve it.
        tunnel.everyone = settings.scope == "system"
        admitted = admitted_uids(settings, tunnel.owner) | tunnel.extra_uids
        tunnel.allowed_uids = set(admitted - tunnel.removed_uids) | {tunnel.owner}

    @staticmethod
    def _decide(tunnel: Tunnel, snapshot: Snapshot, now: float, *, grace: bool = True) -> None:
        if owner_sessions(snapshot, tunnel.owner):
            tunnel.owner_seen = True
        admitted = None if tunnel.everyone else frozenset(tunnel.allowed_uids)
        tunnel.decision = decide(
            snapshot, tunnel.owner, admitted, tunnel.settings, owner_seen=tunnel.owner_seen
        )
        settings = tunnel.settings if grace else replace(tunnel.settings, grace_period=0.0)
        tunnel.hold = next_hold(tunnel.hold, tunnel.decision, settings, now)

    def _on_session_event(self, event: Event) -> None:
        self._undecided.append(event)
        del self._undecided[:-MAX_UNDECIDED_EVENTS]
        self._policy_due.set()

    async def _policy_loop(self) -> None:
        """Decide again after every batch of session events and when a grace period ends."""
        while True:
            deadlines = [
                deadline
                for t in self.tunnels.values()
                if (deadline := grace_deadline(t.hold, t.settings)) is not None
            ]
            delay = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            trigger = None
            try:
                async with asyncio.timeout(delay):
                    await self._policy_due.wait()
            except TimeoutError:
                trigger = "grace period"
            self._policy_due.clear()
            events, self._undecided = self._undecided, []
            try:
                if self._reloaded:
                    self._reloaded = False
                    await self._apply_new_policy()
                    trigger = "policy reloaded"
                await self.apply_policy(events, trigger)
            except Exception:
                logger.exception("applying the policy failed")

    async def apply_policy(self, events: list[Event], trigger: str | None = None) -> None:
        """Decide for every tunnel, commit the changes in one transaction, then audit them."""
        snapshot = self._snapshot()
        decided: list[tuple[Tunnel, State, Hold, Decision]] = []
        committed = None
        async with self._lock:
            now = time.monotonic()
            stopped: list[Tunnel] = []
            for tunnel in list(self.tunnels.values()):
                before = (tunnel.state, tunnel.hold, tunnel.decision)
                self._decide(tunnel, snapshot, now)
                if tunnel.hold.action is not before[1].action:
                    if self._follow_hold(tunnel, before[1].action):
                        stopped.append(tunnel)
                if (tunnel.hold, _causes(tunnel.decision)) != (before[1], _causes(before[2])):
                    decided.append((tunnel, *before))
            if any(t.state is not state for t, state, _, _ in decided):
                committed = await self.sync(refresh=False)
                logger.debug("policy committed in %.2f ms", (committed - now) * 1000)
            elif decided:
                # A grace period that began changes no rule, but a restart must keep it.
                self._state_file.save(list(self.tunnels.values()))
            for tunnel in stopped:
                # After the commit: the tunnel is closed before its data plane stops.
                await self._stop_data_plane(tunnel)
            if stopped:
                await self.sync()
        for tunnel, state, _, _ in decided:
            latency = None
            if committed is not None and snapshot.signal_time is not None and trigger is None:
                latency = round((committed - snapshot.signal_time) * 1000, 3)
            self._audit(
                tunnel,
                "decision",
                previous_state=state,
                trigger=trigger or snapshot.cause,
                session_event=_session_event(events, tunnel.decision),
                latency_ms=latency if tunnel.state is not state else None,
                # CLOCK_MONOTONIC seconds, to match with other measurements on this machine.
                committed_monotonic=committed if tunnel.state is not state else None,
            )

    def _follow_hold(self, tunnel: Tunnel, previous: Action) -> bool:
        """Set the tunnel's state for a new hold; return whether its data plane must stop."""
        if tunnel.hold.action is Action.DISCONNECT:
            tunnel.state = State.DISCONNECTED
            if not tunnel.settings.reconnect_on_return:
                # Nothing brings it back: it goes, as with `userbound down`.
                tunnel.removed = True
                del self.tunnels[tunnel.name]
            return True
        if previous is Action.DISCONNECT:
            tunnel.state = State.CONNECTING
            self._supervise(tunnel, start_now=True)
        elif tunnel.state in (State.UP, State.SUSPENDED):
            tunnel.state = tunnel.running_state()
        return False

    def reload_policy(self) -> None:
        """Read the policy file again (SIGHUP); a file with an error leaves the old policy."""
        try:
            policy = load_policy(self._policy_path, required=self._policy_required)
        except InvalidRequest as error:
            logger.error("keeping the previous policy: %s", error.message)
            self.audit.add(_record("policy-rejected", reason=error.message))
            return
        self.policy = policy
        self._log_policy()
        self.audit.add(_record("policy-reloaded", path=str(self._policy_path)))
        self._reloaded = True
        self._policy_due.set()

    async def _apply_new_policy(self) -> None:
        """Compute every tunnel's settings under the new policy and write the rules."""
        async with self._lock:
            narrowed: list[tuple[Tunnel, list[str]]] = []
            for tunnel in self.tunnels.values():
                try:
                    settings, changed = self._settings_for(tunnel)
                except UserboundError as error:
                    logger.error("tunnel %s keeps its settings: %s", tunnel.name, error.message)
                    continue
                self._apply_settings(tunnel, settings)
                if changed:
                    narrowed.append((tunnel, changed))
            await self.sync(refresh=False)
        for tunnel, changed in narrowed:
            # The owner sees this event: their request no longer applies as it was.
            logger.warning(
                "tunnel %s: under the new policy, settings differ from its request in %s",
                tunnel.name,
                ", ".join(changed),
            )
            self._audit(tunnel, "settings-narrowed", previous_state=tunnel.state, keys=changed)

    async def _resume(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known({"name"})
        name = params.string("name", required=True) or ""
        async with self._lock:
            tunnel = self._owned(name, caller, "resume it")
            if tunnel.state is not State.SUSPENDED:
                raise InvalidRequest(f"tunnel {name!r} is {tunnel.state.value}, not suspended")
            if tunnel.decision.action is not Action.KEEP:
                then = (
                    "it resumes by itself when that changes"
                    if tunnel.settings.reconnect_on_return
                    else "run this again when that has changed"
                )
                raise NotPermitted(
                    f"the policy still gives tunnel {name!r} "
                    f"{tunnel.decision.action.value} ({tunnel.decision.reason}); {then}"
                )
            previous = tunnel.state
            tunnel.hold = Hold()
            tunnel.state = tunnel.running_state()
            await self.sync(refresh=False)
        self._audit(tunnel, "resume", by=caller.uid, previous_state=previous)
        return {"name": name, "state": tunnel.state.value}

    # Audit

    def _audit(
        self, tunnel: Tunnel, event: str, *, previous_state: State | None, **extra: Any
    ) -> None:
        decision = tunnel.decision
        cause = decision.strongest
        self.audit.add(
            _record(
                event,
                tunnel=tunnel.name,
                owner_uid=tunnel.owner,
                owner_name=user_name(tunnel.owner),
                rule=cause.rule.value if cause else None,
                action=decision.action.value,
                applied=tunnel.hold.action.value,
                pending=tunnel.hold.pending.value if tunnel.hold.pending else None,
                previous_state=previous_state.value if previous_state else None,
                state="removed" if tunnel.removed else tunnel.state.value,
                reason=decision.reason,
                causes=[c.to_json() for c in decision.causes],
                **extra,
            )
        )

    def _visible(self, caller: Caller) -> Callable[[Record], bool]:
        """Return the filter of audit events a caller may see: root all, a user their own."""
        return lambda record: caller.is_root or record.get("owner_uid") == caller.uid

    def _recent_events(self, caller: Caller) -> list[Record]:
        return list(self.audit.recent) if caller.is_root else self.audit.recent_of(caller.uid)

    async def _events(self, params: Params, caller: Caller) -> dict[str, Any]:
        params.check_known(set())
        return {"events": self._recent_events(caller)}

    async def _watch_events(self, params: Params, caller: Caller) -> Stream:
        params.check_known(set())
        visible = self._visible(caller)
        recent = self._recent_events(caller)
        follower = AuditFollower(self.audit, visible, MAX_QUEUED_EVENTS)
        return Stream({"events": recent}, follower.events(), follower.close)


def namespace_lock(inode: int) -> Path:
    """Return the lock file of the daemon of the network namespace with this inode."""
    return NAMESPACE_LOCK_DIR / f"netns-{inode}.lock"


def _stored_hold(record: dict[str, Any]) -> Hold:
    """Return the hold a state record keeps, with its grace period still running."""
    pending = record.get("pending")
    since = record.get("pending_since")
    if pending is None or not isinstance(since, (int, float)):
        return Hold(Action(record["hold"]))
    # CLOCK_MONOTONIC restarts with the machine; a state folder that outlived
    # a reboot starts the grace period again.
    return Hold(Action(record["hold"]), Action(pending), min(float(since), time.monotonic()))


def _record(event: str, **fields: Any) -> Record:
    return {"time": time.time(), "event": event, **fields}


def _causes(decision: Decision) -> list[tuple[str, str, str]]:
    return [(c.rule.value, c.action.value, c.session) for c in decision.causes]


def _session_event(events: list[Event], decision: Decision) -> dict[str, Any] | None:
    """Return the session event behind a decision: the latest one about its session."""
    if not events:
        return None
    cause = decision.strongest
    chosen = events[-1]
    if cause is not None and cause.session:
        for event in reversed(events):
            ids = {event.current_id, event.previous_id}
            if event.session is not None:
                ids.add(event.session.id)
            if cause.session in ids:
                chosen = event
                break
    data = chosen.to_json()
    data.pop("snapshot", None)
    return {**data, "description": chosen.describe()}


def _check_unprivileged(config: wgconfig.WireGuardConfig) -> None:
    """Reject settings of a user's file that would reach beyond the user's own traffic."""
    if config.fwmark is not None:
        raise NotPermitted(
            "FwMark selects routing rules for every user's packets; only root may set it. "
            "Remove it from the file: userbound chooses the data plane's mark"
        )
    if config.listen_port is not None and 0 < config.listen_port < 1024:
        raise NotPermitted(
            f"ListenPort {config.listen_port} is a privileged port; only root may use ports "
            "below 1024. Remove ListenPort or choose 1024 or above"
        )


def _is_wireguard_go(pid: int, interface: str) -> bool:
    """Return whether pid is a wireguard-go process serving this interface."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(arguments)
        and arguments[0].endswith(b"wireguard-go")
        and interface.encode() in arguments
    )
