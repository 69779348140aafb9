"""The nftables table that keeps other users out of each tunnel.

userbound owns one table, `inet userbound`.  Every change is a single
libnftables transaction, so the kernel always contains either the old rules or
the new ones: the whole table is replaced, or only the sets of allowed uids
are rewritten.  The rules live in the kernel: they hold while the daemon is
restarting, hung or killed.

For each tunnel the output hook:
- accepts packets leaving through the tunnel interface only from sockets of
  allowed uids and drops the rest, including packets with no socket owner and
  other users' sockets bound to the interface with SO_BINDTODEVICE;
- while the tunnel is engaged (not up), rejects the allowed uids' packets
  that would leave through it, so applications get an error at once;
- with the kill switch on, rejects the allowed uids' packets to the tunnel's
  networks that would leave by any other interface but loopback;
- sends the allowed uids' DNS queries to the tunnel's DNS servers.
The forward hook drops packets routed into or out of a tunnel interface.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from userbound.accounts import MAX_UID
from userbound.errors import InternalError
from userbound.wgconfig import IPAddress, IPNetwork

logger = logging.getLogger(__name__)

TABLE = "userbound"
FAMILY = "inet"
ENGAGED_SET = "engaged"  # the interfaces of tunnels that are not up
ENGAGED_MARKS = "engaged-dns"  # the DNS marks of those tunnels

Json = dict[str, Any]


@dataclass(frozen=True)
class TunnelRules:
    """The firewall's view of one tunnel."""

    interface: str
    allowed_uids: frozenset[int]
    networks: tuple[IPNetwork, ...]
    fwmark: int
    dns_mark: int = 0
    addresses: tuple[IPAddress, ...] = ()
    kill_switch: bool = True
    engaged: bool = True
    dns_servers: tuple[IPAddress, ...] = field(default=())
    # Every uid enters (scope "system"); allowed_uids is then unused.
    everyone: bool = False

    def chain(self, role: str) -> str:
        return f"{self.interface}-{role}"

    @property
    def uid_set(self) -> str:
        """Name of the set of allowed uids; rules refer to it so a change rewrites only the set."""
        return f"{self.interface}-uids"


class Firewall:
    """One long-lived libnftables context that replaces the userbound table."""

    def __init__(self) -> None:
        try:
            import nftables
        except ImportError as error:
            raise InternalError(
                "the Python module 'nftables' is missing: install Debian's python3-nftables "
                "and run userbound with /usr/bin/python3 or a virtual environment created "
                "from it with --system-site-packages"
            ) from error
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._applied: list[TunnelRules] = []

    def apply(self, tunnels: Sequence[TunnelRules]) -> None:
        """Bring the table in line with these tunnels in one transaction.

        When only allowed uids or engaged tunnels changed, the transaction
        rewrites those sets and leaves the rules alone; otherwise it replaces
        the whole table.
        """
        tunnels = list(tunnels)
        if tunnels and tunnels == self._applied:
            return
        if not tunnels:
            self.remove()
        elif _only_sets_differ(self._applied, tunnels):
            self._update_sets(tunnels)
        else:
            self._run({"nftables": build_ruleset(tunnels)})
            self._verify(tunnels)
        self._applied = tunnels

    def _update_sets(self, tunnels: list[TunnelRules]) -> None:
        commands: list[Json] = []
        if [t.engaged for t in self._applied] != [t.engaged for t in tunnels]:
            for name, elements in _engaged_sets(tunnels).items():
                engaged = {"family": FAMILY, "table": TABLE, "name": name}
                commands.append({"flush": {"set": engaged}})
                if elements:
                    commands.append({"add": {"element": {**engaged, "elem": elements}}})
        for old, new in zip(self._applied, tunnels, strict=True):
            if (old.allowed_uids, old.everyone) != (new.allowed_uids, new.everyone):
                uids = {"family": FAMILY, "table": TABLE, "name": new.uid_set}
                commands.append({"flush": {"set": uids}})
                commands.append({"add": {"element": {**uids, "elem": _uid_elements(new)}}})
        try:
            self._run({"nftables": commands})
        except InternalError:
            # The table changed behind our back: rebuild it whole.
            self._run({"nftables": build_ruleset(tunnels)})
            self._verify(tunnels)

    def remove(self) -> None:
        """Delete the table if it exists."""
        self._applied = []
        self._run(
            {
                "nftables": [
                    {"add": {"table": {"family": FAMILY, "name": TABLE}}},
                    {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
                ]
            }
        )

    def exists(self) -> bool:
        """Return whether the table is installed."""
        rc, _, _ = self._nft.json_cmd({"nftables": [{"list": {"table": _table()}}]})
        return bool(rc == 0)

    def listing(self) -> list[Json]:
        """Return the installed table as nftables JSON objects, or [] when absent."""
        rc, output, _ = self._nft.json_cmd({"nftables": [{"list": {"table": _table()}}]})
        if rc != 0:
            return []
        return list(output.get("nftables", []))

    def _run(self, commands: Json) -> None:
        rc, _, error = self._nft.json_cmd(commands)
        if rc != 0:
            logger.error("nftables transaction failed: %s", error.strip())
            raise InternalError(f"nftables rejected the userbound table: {error.strip()}")

    def _verify(self, tunnels: Sequence[TunnelRules]) -> None:
        chains = {obj["chain"]["name"] for obj in self.listing() if "chain" in obj}
        expected = {t.chain("via") for t in tunnels} | {"output", "forward"}
        if not expected <= chains:
            raise InternalError(
                "nftables table read back without chains " + ", ".join(sorted(expected - chains))
            )


def _table() -> Json:
    return {"family": FAMILY, "name": TABLE}


def _rule(chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}}}


def _chain(name: str, **base: Any) -> Json:
    return {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": name, **base}}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _values(items: Sequence[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": list(items)}


def _uids(tunnel: TunnelRules) -> Json:
    return _match(_meta("skuid"), f"@{tunnel.uid_set}")


def _engaged_sets(tunnels: Sequence[TunnelRules]) -> dict[str, list[Any]]:
    """Return the elements of the sets that mark tunnels as engaged (not up)."""
    return {
        ENGAGED_SET: [t.interface for t in tunnels if t.engaged],
        ENGAGED_MARKS: [t.dns_mark for t in tunnels if t.engaged and t.dns_servers],
    }


def _uid_elements(tunnel: TunnelRules) -> list[Any]:
    if tunnel.everyone:
        return [{"range": [0, MAX_UID]}]
    return sorted(tunnel.allowed_uids)


def _only_sets_differ(old: list[TunnelRules], new: list[TunnelRules]) -> bool:
    """Return whether only the sets of allowed uids and engaged tunnels differ.

    Without the kill switch, DNS redirection depends on whether a tunnel is
    engaged, so a change of engagement then needs new rules.
    """
    if len(old) != len(new):
        return False
    return all(
        dataclasses.replace(a, allowed_uids=b.allowed_uids, everyone=b.everyone, engaged=b.engaged)
        == b
        and (a.engaged == b.engaged or a.kill_switch)
        for a, b in zip(old, new, strict=True)
    )


def _dport_53() -> list[Json]:
    # Rules start with these cheap matches so that other packets skip the socket lookup.
    return [
        _match(_meta("l4proto"), {"set": ["udp", "tcp"]}),
        _match({"payload": {"protocol": "th", "field": "dport"}}, 53),
    ]


def _prefix(network: IPNetwork) -> Json:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _destination_matches(networks: Sequence[IPNetwork]) -> list[Json]:
    """Return one match per address family that covers these networks."""
    matches = []
    for version, protocol in ((4, "ip"), (6, "ip6")):
        family = [n for n in networks if n.version == version]
        if not family:
            continue
        if any(n.prefixlen == 0 for n in family):
            matches.append(_match(_meta("nfproto"), "ipv4" if version == 4 else "ipv6"))
        else:
            daddr = {"payload": {"protocol": protocol, "field": "daddr"}}
            matches.append(_match(daddr, {"set": [_prefix(n) for n in family]}))
    return matches


def build_ruleset(tunnels: Sequence[TunnelRules]) -> list[Json]:
    """Build the commands that replace the userbound table with rules for these tunnels."""
    commands: list[Json] = [
        {"add": {"table": _table()}},
        {"delete": {"table": _table()}},
        {"add": {"table": _table()}},
        _chain("output", type="filter", hook="output", prio=0, policy="accept"),
        _chain("forward", type="filter", hook="forward", prio=0, policy="accept"),
        _chain("reject"),
        _rule("reject", _match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}),
        _rule("reject", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
    ]
    # The data plane's own packets carry its fwmark, and redirected DNS
    # queries the tunnel's DNS mark, which routes them into the tunnel or to
    # its unreachable routes.  The output hook still shows such a query's
    # first interface as oifname, so it must not meet the kill switch rules.
    # A marked query to any other address, from a flow tracked before the
    # redirection existed, goes on to them.  Setting a mark needs
    # CAP_NET_ADMIN: no ordinary user can forge one.
    # While a tunnel is engaged, its redirected DNS queries are rejected
    # here: they would otherwise return below and reach its routes.
    types = {ENGAGED_SET: "ifname", ENGAGED_MARKS: "mark"}
    for name, elements in _engaged_sets(tunnels).items():
        engaged = {"family": FAMILY, "table": TABLE, "name": name, "type": types[name]}
        commands.append({"add": {"set": {**engaged, "elem": elements} if elements else engaged}})
    commands.append(
        _rule("output", _match(_meta("mark"), f"@{ENGAGED_MARKS}"), {"goto": {"target": "reject"}})
    )
    marks = sorted({t.fwmark for t in tunnels})
    commands.append(_rule("output", _match(_meta("mark"), _values(marks)), {"return": None}))
    for tunnel in tunnels:
        for version, protocol in ((4, "ip"), (6, "ip6")):
            servers = [str(s) for s in tunnel.dns_servers if s.version == version][:1]
            if servers:
                daddr = {"payload": {"protocol": protocol, "field": "daddr"}}
                mark = _match(_meta("mark"), tunnel.dns_mark)
                commands.append(_rule("output", mark, _match(daddr, servers[0]), {"return": None}))
    for tunnel in tunnels:
        uids = {"family": FAMILY, "table": TABLE, "name": tunnel.uid_set, "type": "uid"}
        # An interval set, so that "every uid" is one range.
        set_ = {**uids, "flags": ["interval"], "elem": _uid_elements(tunnel)}
        commands.append({"add": {"set": set_}})
    if any(t.dns_servers for t in tunnels):
        # Only DNS redirection needs these chains, and with them connection
        # tracking, which costs throughput: tunnels without DNS go without.
        commands += [
            _chain("mark-dns", type="route", hook="output", prio=-150, policy="accept"),
            _chain("nat-output", type="nat", hook="output", prio=-100, policy="accept"),
            _chain("nat-postrouting", type="nat", hook="postrouting", prio=100, policy="accept"),
        ]
    for tunnel in tunnels:
        commands.extend(_dns_rules(tunnel))
    for tunnel in tunnels:
        commands.extend(_local_address_rules(tunnel))
    commands.append(_rule("output", _match(_meta("oifname"), "lo"), {"return": None}))
    interfaces = sorted(t.interface for t in tunnels)
    commands.append(_rule("forward", _match(_meta("oifname"), _values(interfaces)), {"drop": None}))
    commands.append(_rule("forward", _match(_meta("iifname"), _values(interfaces)), {"drop": None}))

    for tunnel in tunnels:
        via, owner = tunnel.chain("via"), tunnel.chain("owner")
        commands.append(_chain(via))
        commands.append(
            _rule("output", _match(_meta("oifname"), tunnel.interface), {"goto": {"target": via}})
        )
        # While the tunnel is engaged (its interface in the set), the allowed
        # uids' packets are rejected and all others dropped.  A set, so that
        # a suspend or resume rewrites one set, not the table.
        in_engaged = _match(_meta("oifname"), f"@{ENGAGED_SET}")
        commands.append(_rule(via, in_engaged, _uids(tunnel), {"goto": {"target": "reject"}}))
        commands.append(_rule(via, in_engaged, {"counter": None}, {"drop": None}))
        # Accept allowed owners, then drop the rest: a "not allowed" match
        # would let through packets that have no socket owner at all.
        commands.append(_rule(via, _uids(tunnel), {"accept": None}))
        # A packet with a socket that was not accepted above belongs to
        # another user.  A TCP packet without a socket and with the
        # tunnel's own source address is the kernel finishing a connection
        # through the tunnel, such as an ACK sent from TIME_WAIT.  Other
        # packets without a socket (IGMP and MLD reports for groups any
        # user may join) are dropped.
        any_uid = _match(_meta("skuid"), {"range": [0, 0xFFFFFFFF]})
        commands.append(_rule(via, any_uid, {"counter": None}, {"drop": None}))
        for version, protocol in ((4, "ip"), (6, "ip6")):
            own = [str(a) for a in tunnel.addresses if a.version == version]
            if own:
                saddr = {"payload": {"protocol": protocol, "field": "saddr"}}
                tcp = _match(_meta("l4proto"), "tcp")
                source = _match(saddr, _values(own))
                commands.append(_rule(via, tcp, source, {"accept": None}))
        commands.append(_rule(via, {"counter": None}, {"drop": None}))
        if tunnel.kill_switch:
            commands.append(_chain(owner))
            commands.append(_rule("output", _uids(tunnel), {"jump": {"target": owner}}))
            for match in _destination_matches(tunnel.networks):
                commands.append(_rule(owner, match, {"goto": {"target": "reject"}}))
    return commands


def _local_address_rules(tunnel: TunnelRules) -> list[Json]:
    """Keep other users' sockets away from the tunnel's own addresses.

    The addresses are local to the whole machine, so without this a listener
    of the owner on them would receive what other users send there.
    """
    local = tunnel.chain("local")
    commands = [
        _chain(local),
        _rule(local, _uids(tunnel), {"return": None}),
        _rule(
            local,
            _match(_meta("skuid"), {"range": [0, 0xFFFFFFFF]}),
            {"goto": {"target": "reject"}},
        ),
    ]
    for version, protocol in ((4, "ip"), (6, "ip6")):
        own = [str(a) for a in tunnel.addresses if a.version == version]
        if own:
            daddr = {"payload": {"protocol": protocol, "field": "daddr"}}
            commands.append(
                _rule("output", _match(daddr, _values(own)), {"jump": {"target": local}})
            )
    return commands


def _dns_rules(tunnel: TunnelRules) -> list[Json]:
    """Send the allowed uids' DNS queries to the tunnel's resolvers and nowhere else."""
    if not tunnel.dns_servers or not (tunnel.kill_switch or not tunnel.engaged):
        return []
    commands = []
    for version, protocol in ((4, "ip"), (6, "ip6")):
        server = next((s for s in tunnel.dns_servers if s.version == version), None)
        family = _match(_meta("nfproto"), "ipv4" if version == 4 else "ipv6")
        if server is None:
            # No resolver of this family in the tunnel: its queries would leave outside.
            commands.append(
                _rule("output", *_dport_53(), family, _uids(tunnel), {"goto": {"target": "reject"}})
            )
            continue
        if tunnel.kill_switch:
            # Queries redirected to the resolver returned above; any other
            # query of this family would leave outside the tunnel.
            commands.append(
                _rule("output", *_dport_53(), family, _uids(tunnel), {"goto": {"target": "reject"}})
            )
        loopback = ipaddress.ip_network("127.0.0.0/8" if version == 4 else "::1/128")
        daddr = {"payload": {"protocol": protocol, "field": "daddr"}}
        if version == 6:
            # IPv6 has no route_localnet, so a query from ::1 cannot leave through the tunnel.
            commands.append(
                _rule(
                    "output",
                    *_dport_53(),
                    _match(daddr, _prefix(loopback)),
                    _uids(tunnel),
                    {"goto": {"target": "reject"}},
                )
            )
        # The kernel reroutes a packet after NAT without its socket's uid, so
        # the uid rule cannot steer a redirected query: a mark, set on every
        # packet of the flow, selects the tunnel's table instead.  The first
        # tunnel that admits the uid wins, here as in nat-output, where dnat
        # ends the chain: a uid in several tunnels with DNS uses the oldest.
        commands.append(
            _rule(
                "mark-dns",
                *_dport_53(),
                family,
                _uids(tunnel),
                {"mangle": {"key": _meta("mark"), "value": tunnel.dns_mark}},
                {"accept": None},
            )
        )
        commands.append(
            _rule(
                "nat-output",
                *_dport_53(),
                family,
                _match(daddr, str(server), "!="),
                _uids(tunnel),
                {"dnat": {"family": protocol, "addr": str(server)}},
            )
        )
    if tunnel.dns_servers:
        # A redirected query keeps the source address of the route it was
        # sent on (127.0.0.1 for a local stub resolver); the tunnel needs its own.
        commands.append(
            _rule(
                "nat-postrouting",
                _match(_meta("oifname"), tunnel.interface),
                _match(_meta("mark"), tunnel.dns_mark),
                {"masquerade": None},
            )
        )
    return commands
