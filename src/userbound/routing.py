"""Policy routing by socket owner, and the tunnel interface's addresses.

Each tunnel has a routing table of its own that contains its AllowedIPs.  Rules
select that table for the allowed uids, only for locally generated packets
(`iif lo`), so forwarded traffic is never captured.  A rule of higher priority
sends packets carrying the data plane's fwmark to the main table, so the
encrypted packets to the endpoint never loop into the tunnel, even when root
is an allowed uid.

With the kill switch on, the table also holds an `unreachable` route of the
lowest preference for each network.  The kernel removes the routes through an
interface when it goes down or away, and the unreachable routes then match,
so an allowed uid's packet fails at once instead of leaving by the main table.

Everything userbound adds carries the routing protocol number RTPROT_USERBOUND,
which is how a restarted daemon finds what an earlier one left.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from userbound.accounts import MAX_UID
from userbound.errors import InternalError
from userbound.wgconfig import IPAddress, IPInterface, IPNetwork

logger = logging.getLogger(__name__)

RTPROT_USERBOUND = 85
PRIORITY_FWMARK = 10000
PRIORITY_UID = 10001
TABLE_FIRST = 52000
TABLE_LAST = 52999
UNREACHABLE_METRIC = 0xFFFFFFFF
IFA_F_NOPREFIXROUTE = 0x200
RTMGRP_LINK = 1
IFF_UP = 1
MAIN_TABLE = 254


def dns_mark(table: int) -> int:
    """Return the fwmark that steers a tunnel's redirected DNS queries into its table."""
    return 0x00750000 | table


def _enable_route_localnet(interface: str) -> None:
    """Let packets with a loopback source leave through the interface until masqueraded.

    A DNS query sent to 127.0.0.53 and redirected into the tunnel keeps its
    loopback source until the postrouting hook; without this the kernel drops it.
    A write to procfs, which does not block.
    """
    Path(f"/proc/sys/net/ipv4/conf/{interface}/route_localnet").write_text("1\n")


class RouteKey(NamedTuple):
    """One route userbound installs: through the interface, or unreachable when index is 0."""

    table: int
    network: str
    interface_index: int


class RuleKey(NamedTuple):
    """One routing rule userbound installs; it selects by fwmark, by uid range or by source."""

    family: int
    priority: int
    table: int
    fwmark: int = 0
    uid_start: int = 0
    uid_end: int = 0
    source: str = ""


@dataclass(frozen=True)
class TunnelRoutes:
    """The routing layer's view of one tunnel."""

    interface: str
    table: int
    fwmark: int
    dns_mark: int
    allowed_uids: frozenset[int]
    addresses: tuple[IPInterface, ...]
    networks: tuple[IPNetwork, ...]
    blocked: tuple[IPNetwork, ...]
    kill_switch: bool
    # The interface to route the networks through, or None while the tunnel is not up.
    link_index: int | None
    # Every uid enters (scope "system"); allowed_uids is then unused.
    everyone: bool = False


def uid_ranges(uids: Iterable[int]) -> list[tuple[int, int]]:
    """Collapse uids into the fewest inclusive ranges."""
    ranges: list[tuple[int, int]] = []
    for uid in sorted(set(uids)):
        if ranges and ranges[-1][1] == uid - 1:
            ranges[-1] = (ranges[-1][0], uid)
        else:
            ranges.append((uid, uid))
    return ranges


def _family(version: int) -> socket.AddressFamily:
    return socket.AF_INET if version == 4 else socket.AF_INET6


class Routing:
    """Rules and routes of the current network namespace, over one netlink socket."""

    # NOTE: a daemon that brings a tunnel up and down in a loop grows by about
    # 17 KB a cycle, most of it outside Python objects.  This class alone grew
    # about 6 KB a cycle in a test, and the cause is not found.

    def __init__(self) -> None:
        self._ipr = AsyncIPRoute()
        # What the last apply() left in the kernel, for calls that skip the dump.
        self._rules: set[RuleKey] | None = None
        self._routes: set[RouteKey] | None = None

    async def open(self) -> None:
        await self._ipr.setup_endpoint()

    def close(self) -> None:
        self._ipr.close()

    async def link_index(self, interface: str) -> int | None:
        """Return the interface's index, or None if it does not exist."""
        found = await self._ipr.link_lookup(ifname=interface)
        return int(found[0]) if found else None

    async def link_state(self, interface: str) -> tuple[int | None, bool]:
        """Return the interface's index (None if it does not exist) and whether it is up."""
        try:
            links = await self._ipr.link("get", ifname=interface)
        except NetlinkError:
            return None, False
        if not links:
            return None, False
        return int(links[0]["index"]), bool(links[0]["flags"] & IFF_UP)

    async def local_addresses(self) -> set[IPAddress]:
        """Return every address assigned to an interface of this namespace."""
        found: set[IPAddress] = set()
        async for address in await self._ipr.addr("dump"):
            value = address.get_attr("IFA_LOCAL") or address.get_attr("IFA_ADDRESS")
            if value:
                found.add(ipaddress.ip_address(value.split("%")[0]))
        return found

    async def main_networks(self) -> list[IPNetwork]:
        """Return the destinations of the main table's routes, except default routes."""
        networks: list[IPNetwork] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            async for route in await self._ipr.get_routes(family=family, table=MAIN_TABLE):
                if route["dst_len"] == 0 or route.get_attr("RTA_TABLE") != MAIN_TABLE:
                    continue
                network = ipaddress.ip_network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}")
                if not network.is_link_local:
                    networks.append(network)
        return networks

    async def configure_link(
        self, interface: str, addresses: Sequence[IPInterface], mtu: int | None, *, set_up: bool
    ) -> None:
        """Give the interface its addresses and MTU, and set it up if asked to.

        Addresses get no prefix route: the prefix would otherwise land in the
        main table and pull every user's packets towards the tunnel.
        """
        index = await self.link_index(interface)
        if index is None:
            raise InternalError(f"interface {interface} disappeared while it was configured")
        _enable_route_localnet(interface)
        current = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            async for a in await self._ipr.addr("dump", index=index)
        }
        for address in addresses:
            if (str(address.ip), address.network.prefixlen) in current:
                continue
            await self._ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                family=_family(address.version),
                IFA_FLAGS=IFA_F_NOPREFIXROUTE,
            )
        if mtu is not None:
            await self._ipr.link("set", index=index, mtu=mtu)
        if set_up:
            await self._ipr.link("set", index=index, state="up")

    async def apply(self, tunnels: Sequence[TunnelRoutes], *, refresh: bool = True) -> None:
        """Make userbound's rules and routes exactly those these tunnels need.

        Removes anything userbound installed earlier that no tunnel needs,
        so the same call adopts, updates and cleans up.  With refresh=False
        it trusts what the previous call left instead of reading the kernel's
        tables, which only suits changes that no link event can have overtaken.
        """
        desired_rules = {rule for t in tunnels for rule in _rules(t)}
        if refresh or self._rules is None:
            self._rules = await self._present_rules()
        # Deletions go first, so a uid that loses access never selects two tables.
        self._change_rules(self._rules - desired_rules, sorted(desired_rules - self._rules))
        self._rules = desired_rules

        desired_routes = {route for t in tunnels for route in _routes(t)}
        if refresh or self._routes is None:
            self._routes = await self._present_routes()
        for route in self._routes - desired_routes:
            await self._route("del", route)
        for route in desired_routes - self._routes:
            await self._route("add", route)
        self._routes = desired_routes

    async def _present_rules(self) -> set[RuleKey]:
        present = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            async for rule in await self._ipr.get_rules(family=family):
                if rule.get_attr("FRA_PROTOCOL") != RTPROT_USERBOUND:
                    continue
                uids = rule.get_attr("FRA_UID_RANGE")
                start, end = (int(x) for x in uids.split(":")) if uids else (0, 0)
                source = rule.get_attr("FRA_SRC")
                present.add(
                    RuleKey(
                        family=family,
                        priority=rule.get_attr("FRA_PRIORITY"),
                        table=rule.get_attr("FRA_TABLE"),
                        fwmark=rule.get_attr("FRA_FWMARK") or 0,
                        uid_start=start,
                        uid_end=end,
                        source=f"{source}/{rule['src_len']}" if source else "",
                    )
                )
        return present

    def _change_rules(self, deletions: Iterable[RuleKey], additions: Iterable[RuleKey]) -> None:
        """Delete, then add, routing rules in one netlink batch.

        With pyroute2 0.9.7, one rule took about 0.25 ms to encode and send on
        a 2-CPU test machine, and a change of allowed uids sends two or more.
        This batch takes microseconds.
        """
        requests = [(RTM_DELRULE, rule) for rule in deletions]
        requests += [(RTM_NEWRULE, rule) for rule in additions]
        if not requests:
            return
        messages = b"".join(
            _rule_message(kind, rule, sequence) for sequence, (kind, rule) in enumerate(requests, 1)
        )
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(5)
            sock.sendall(messages)
            pending = dict(enumerate(requests, 1))
            while pending:
                for sequence, code in _acks(sock.recv(65536)):
                    kind, rule = pending.pop(sequence)
                    ignorable = errno.ENOENT if kind == RTM_DELRULE else errno.EEXIST
                    if code not in (0, ignorable):
                        command = "delete" if kind == RTM_DELRULE else "add"
                        raise InternalError(
                            f"failed to {command} routing rule {rule}: {os.strerror(code)}"
                        )

    async def _present_routes(self) -> set[RouteKey]:
        present = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            async for route in await self._ipr.get_routes(family=family, table=None):
                table = route.get_attr("RTA_TABLE")
                if not TABLE_FIRST <= table <= TABLE_LAST or route["proto"] != RTPROT_USERBOUND:
                    continue
                dst = route.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                network = ipaddress.ip_network(f"{dst}/{route['dst_len']}")
                index = route.get_attr("RTA_OIF") if route["type"] == 1 else 0
                present.add(RouteKey(table, str(network), index or 0))
        return present

    async def _route(self, command: str, key: RouteKey) -> None:
        table, network, index = key
        arguments: dict[str, Any] = {
            "dst": network,
            "table": table,
            "proto": RTPROT_USERBOUND,
            "family": _family(ipaddress.ip_network(network).version),
        }
        if index:
            arguments["oif"] = index
        else:
            arguments.update(type="unreachable", priority=UNREACHABLE_METRIC)
        try:
            await self._ipr.route(command, **arguments)
        except NetlinkError as error:
            ignorable = errno.ESRCH if command == "del" else errno.EEXIST
            if error.code not in (ignorable, errno.ENOENT, errno.ENODEV):
                raise InternalError(
                    f"failed to {command} route {network} in table {table}: {error}"
                ) from error


def _routes(tunnel: TunnelRoutes) -> set[RouteKey]:
    routes: set[RouteKey] = set()
    for network in tunnel.networks:
        if tunnel.link_index is not None:
            routes.add(RouteKey(tunnel.table, str(network), tunnel.link_index))
        if tunnel.kill_switch:
            routes.add(RouteKey(tunnel.table, str(network), 0))
    if tunnel.kill_switch:
        routes.update(RouteKey(tunnel.table, str(network), 0) for network in tunnel.blocked)
    return routes


def _rules(tunnel: TunnelRoutes) -> set[RuleKey]:
    rules: set[RuleKey] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        rules.add(RuleKey(family, PRIORITY_FWMARK, MAIN_TABLE, fwmark=tunnel.fwmark))
        rules.add(RuleKey(family, PRIORITY_UID, tunnel.table, fwmark=tunnel.dns_mark))
        ranges = [(0, MAX_UID)] if tunnel.everyone else uid_ranges(tunnel.allowed_uids)
        for start, end in ranges:
            rules.add(RuleKey(family, PRIORITY_UID, tunnel.table, uid_start=start, uid_end=end))
    # Packets from the tunnel's own addresses belong in the tunnel even when
    # they have no socket owner, such as the last ACKs of a closed TCP connection.
    for address in tunnel.addresses:
        host = f"{address.ip}/{address.max_prefixlen}"
        rules.add(RuleKey(_family(address.version), PRIORITY_UID, tunnel.table, source=host))
    return rules


async def close_connections(addresses: Sequence[IPInterface]) -> None:
    """Abort the TCP connections that use these local addresses.

    Once a tunnel stops carrying traffic, its connections have no route: TCP
    would retry for minutes before the application noticed.  Aborting them
    (SOCK_DESTROY, through `ss -K`) gives the application an error at once.
    """
    if not addresses:
        return
    terms: list[str] = []
    for address in addresses:
        host = str(address.ip) if address.version == 4 else f"[{address.ip}]"
        terms += ["or", "src", host] if terms else ["src", host]
    process = await asyncio.create_subprocess_exec(
        "ss",
        "-K",
        "-t",
        "-H",
        "(",
        *terms,
        ")",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, error = await process.communicate()
    if process.returncode != 0:
        logger.warning(
            "could not abort connections from %s: %s",
            ", ".join(str(a.ip) for a in addresses),
            error.decode(errors="replace").strip(),
        )


RTM_NEWRULE = 32
RTM_DELRULE = 33
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
FR_ACT_TO_TBL = 1
FRA_SRC = 2
FRA_IIFNAME = 3
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
FRA_FWMASK = 16
FRA_UID_RANGE = 20
FRA_PROTOCOL = 21


def _attribute(kind: int, data: bytes) -> bytes:
    padding = b"\0" * (-len(data) % 4)
    return struct.pack("=HH", 4 + len(data), kind) + data + padding


def _rule_message(kind: int, rule: RuleKey, sequence: int) -> bytes:
    """Encode an RTM_NEWRULE or RTM_DELRULE request (struct fib_rule_hdr and attributes)."""
    source_length = 0
    attributes = [
        _attribute(FRA_PRIORITY, struct.pack("=I", rule.priority)),
        _attribute(FRA_TABLE, struct.pack("=I", rule.table)),
        _attribute(FRA_PROTOCOL, struct.pack("=B", RTPROT_USERBOUND)),
    ]
    if rule.fwmark:
        attributes.append(_attribute(FRA_FWMARK, struct.pack("=I", rule.fwmark)))
        attributes.append(_attribute(FRA_FWMASK, struct.pack("=I", 0xFFFFFFFF)))
    else:
        attributes.append(_attribute(FRA_IIFNAME, b"lo\0"))
        if rule.source:
            network = ipaddress.ip_network(rule.source)
            source_length = network.prefixlen
            attributes.append(_attribute(FRA_SRC, network.network_address.packed))
        else:
            uids = struct.pack("=II", rule.uid_start, rule.uid_end)
            attributes.append(_attribute(FRA_UID_RANGE, uids))
    # The table field of the header holds only 8 bits; FRA_TABLE carries the real one.
    header = struct.pack("=BBBBBBBBI", rule.family, 0, source_length, 0, 0, 0, 0, FR_ACT_TO_TBL, 0)
    body = header + b"".join(attributes)
    flags = NLM_F_REQUEST | NLM_F_ACK
    if kind == RTM_NEWRULE:
        flags |= NLM_F_CREATE | NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(body), kind, flags, sequence, 0) + body


def _acks(data: bytes) -> list[tuple[int, int]]:
    """Return (sequence, errno) for each acknowledgement in a netlink reply."""
    acks = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, sequence, _ = struct.unpack_from("=IHHII", data, offset)
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            acks.append((sequence, -code))
        offset += (length + 3) & ~3
    return acks


class LinkEvents:
    """A netlink socket that calls back when any link appears, changes or goes away."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._socket.bind((0, RTMGRP_LINK))
        self._socket.setblocking(False)  # noqa: FBT003 - the socket module's own signature

    def fileno(self) -> int:
        return self._socket.fileno()

    def readable(self) -> None:
        """Drain pending messages; the content does not matter, only that something changed."""
        try:
            while self._socket.recv(65536):
                pass
        except BlockingIOError:
            pass
        except OSError as error:
            # ENOBUFS means events were lost: a reconciliation covers them too.
            logger.debug("link event socket: %s", error)
        self._callback()

    def close(self) -> None:
        self._socket.close()
