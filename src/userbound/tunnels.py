"""The tunnel model: the daemon's record of each tunnel, and how it is stored.

The state file lets a restarted daemon adopt the tunnels an earlier process
left.  It holds each tunnel's configuration, private key included, so it is
created with mode 0600, like the files wg-quick reads from /etc/wireguard.
Its folder stays open to all users: by default it also contains the control socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from userbound import wgconfig
from userbound.accounts import user_name
from userbound.firewall import TunnelRules
from userbound.policy import Action, Decision, Hold, Settings, grace_deadline
from userbound.routing import TunnelRoutes, dns_mark
from userbound.wgconfig import IPNetwork, WireGuardConfig
from userbound.wireguard import DataPlane, DeviceStatus

logger = logging.getLogger(__name__)

STATE_FILE_VERSION = 2


class State(StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    SUSPENDED = "suspended"
    DISCONNECTED = "disconnected"
    DOWN = "down"
    FAILED = "failed"


def full_tunnel_extras(networks: list[IPNetwork]) -> list[IPNetwork]:
    """Return the default route of the family a one-family full tunnel leaves out.

    A configuration that sends all IPv4 traffic through the tunnel expects no
    IPv6 traffic to leave outside it either, and the other way round.
    """
    extras: list[IPNetwork] = []
    versions = {n.version for n in networks}
    if ipaddress.ip_network("0.0.0.0/0") in networks and 6 not in versions:
        extras.append(ipaddress.ip_network("::/0"))
    if ipaddress.ip_network("::/0") in networks and 4 not in versions:
        extras.append(ipaddress.ip_network("0.0.0.0/0"))
    return extras


@dataclass
class Tunnel:
    """One owner-bound tunnel."""

    name: str
    owner: int
    config_text: str
    config: WireGuardConfig
    table: int
    fwmark: int
    allowed_uids: set[int]
    kill_switch: bool = True
    # Every uid enters the tunnel (scope "system"); allowed_uids is then unused.
    everyone: bool = False
    settings: Settings = field(default_factory=Settings)
    # The settings the request asked for, as sent, and whether root sent them:
    # a reloaded policy is applied to them again.
    request: dict[str, Any] = field(default_factory=dict)
    privileged: bool = False
    # Root's changes with `userbound allow`, applied on top of the settings.
    extra_uids: set[int] = field(default_factory=set)
    removed_uids: set[int] = field(default_factory=set)
    hold: Hold = field(default_factory=Hold)
    decision: Decision = field(default_factory=Decision)
    owner_seen: bool = False
    state: State = State.CONNECTING
    data_plane: DataPlane | None = None
    created: float = field(default_factory=time.time)
    failures: int = 0
    removed: bool = False
    # The state the kernel rules were last built for, and the interface as last read.
    enforced_state: State | None = None
    link_index: int | None = None
    link_up: bool = False

    @property
    def interface(self) -> str:
        return self.name

    @property
    def held(self) -> bool:
        """Whether the policy suspends or disconnects the tunnel."""
        return self.hold.action is not Action.KEEP

    def running(self) -> bool:
        """Return whether the data plane runs with its link up: the tunnel is up or suspended.

        A suspended tunnel keeps its routes.  The firewall rejects what would
        enter it, so resuming rewrites one nftables set and nothing else.
        """
        return self.state in (State.UP, State.SUSPENDED)

    def running_state(self) -> State:
        """Return the state of a tunnel whose data plane runs: up, or suspended by the policy."""
        return State.SUSPENDED if self.held else State.UP

    @property
    def blocking(self) -> bool:
        """Whether the owner's traffic to the tunnel's networks is blocked when it is not up.

        A tunnel the policy suspends or disconnects blocks it even without
        the kill switch: the policy took the tunnel away, not a failure.
        """
        return self.kill_switch or self.held

    def networks(self) -> list[IPNetwork]:
        return self.config.allowed_ips()

    def blocked_networks(self) -> list[IPNetwork]:
        """Return the networks behind the kill switch: AllowedIPs and full-tunnel extras."""
        networks = self.networks()
        return networks + full_tunnel_extras(networks)

    def firewall_rules(self) -> TunnelRules:
        return TunnelRules(
            interface=self.interface,
            allowed_uids=frozenset(self.allowed_uids),
            networks=tuple(self.blocked_networks()),
            fwmark=self.fwmark,
            dns_mark=dns_mark(self.table),
            addresses=tuple(a.ip for a in self.config.addresses),
            kill_switch=self.blocking,
            engaged=self.state is not State.UP,
            dns_servers=tuple(self.config.dns_servers),
            everyone=self.everyone,
        )

    def routes(self) -> TunnelRoutes:
        return TunnelRoutes(
            interface=self.interface,
            table=self.table,
            fwmark=self.fwmark,
            dns_mark=dns_mark(self.table),
            allowed_uids=frozenset(self.allowed_uids),
            addresses=tuple(self.config.addresses),
            networks=tuple(self.networks()),
            blocked=tuple(full_tunnel_extras(self.networks())),
            kill_switch=self.blocking,
            link_index=self.link_index if self.link_up and self.running() else None,
            everyone=self.everyone,
        )

    def summary(self) -> dict[str, Any]:
        """Describe the tunnel to a user who does not own it."""
        return {
            "name": self.name,
            "owner_uid": self.owner,
            "owner_name": user_name(self.owner),
            "state": self.state.value,
        }

    def details(self, device: DeviceStatus | None) -> dict[str, Any]:
        """Describe the tunnel to its owner or root; never includes a private or preshared key."""
        live = {p.public_key: p for p in device.peers} if device else {}
        peers: list[dict[str, Any]] = []
        for peer in self.config.peers:
            status = live.get(peer.public_key.base64())
            configured = str(peer.endpoint) if peer.endpoint else None
            peers.append(
                {
                    "public_key": peer.public_key.base64(),
                    "endpoint": (status.endpoint if status else None) or configured,
                    "allowed_ips": [str(n) for n in peer.allowed_ips],
                    "last_handshake": status.last_handshake if status else None,
                    "rx_bytes": status.rx_bytes if status else 0,
                    "tx_bytes": status.tx_bytes if status else 0,
                    "persistent_keepalive": peer.persistent_keepalive,
                }
            )
        handshakes = [p.last_handshake for p in live.values() if p.last_handshake]
        return {
            **self.summary(),
            "interface": self.interface,
            "data_plane": self.data_plane.kind if self.data_plane else None,
            "allowed_uids": "all" if self.everyone else sorted(self.allowed_uids),
            "kill_switch": self.kill_switch,
            "settings": self.settings.to_json(),
            "policy": self.policy_json(),
            "public_key": wgconfig.public_key(self.config.private_key).base64(),
            "addresses": [str(a) for a in self.config.addresses],
            "dns_servers": [str(a) for a in self.config.dns_servers],
            "dns_search": list(self.config.dns_search),
            "table": self.table,
            "endpoint": peers[0]["endpoint"] if peers else None,
            "last_handshake": max(handshakes) if handshakes else None,
            "rx_bytes": sum(p.rx_bytes for p in live.values()),
            "tx_bytes": sum(p.tx_bytes for p in live.values()),
            "peers": peers,
            "created": self.created,
        }

    def policy_json(self) -> dict[str, Any]:
        """Describe the policy's decision, the action in force and what waits."""
        deadline = grace_deadline(self.hold, self.settings)
        return {
            **self.decision.to_json(),
            "applied": self.hold.action.value,
            "pending": self.hold.pending.value if self.hold.pending else None,
            # Seconds since the epoch at which the pending action applies.
            "pending_at": time.time() + deadline - time.monotonic() if deadline else None,
            # Suspended with no cause left, and reconnect_on_return off.
            "waits_for_resume": self.held and self.decision.action is Action.KEEP,
        }

    def record(self) -> dict[str, Any]:
        """Return what the state file keeps of this tunnel."""
        pid = getattr(self.data_plane, "pid", None)
        return {
            "name": self.name,
            "owner": self.owner,
            "config": self.config_text,
            "table": self.table,
            "fwmark": self.fwmark,
            "request": self.request,
            "privileged": self.privileged,
            "extra_uids": sorted(self.extra_uids),
            "removed_uids": sorted(self.removed_uids),
            "hold": self.hold.action.value,
            "pending": self.hold.pending.value if self.hold.pending else None,
            "pending_since": self.hold.pending_since,
            "owner_seen": self.owner_seen,
            "data_plane": self.data_plane.kind if self.data_plane else None,
            "pid": pid,
            "created": self.created,
        }


class StateFile:
    """The tunnels of the running daemon, kept on disk for the next one."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "tunnels.json"

    def save(self, tunnels: list[Tunnel]) -> None:
        """Write the tunnels; a failure is logged, since the kernel's rules matter more."""
        try:
            self._write(tunnels)
        except OSError as error:
            logger.error("cannot write the state file %s: %s", self.path, error)

    def _write(self, tunnels: list[Tunnel]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        temporary = self.path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            json.dump(
                {"version": STATE_FILE_VERSION, "tunnels": [t.record() for t in tunnels]}, stream
            )
        os.replace(temporary, self.path)

    def load(self) -> list[dict[str, Any]]:
        """Return the stored tunnel records; an unreadable file is logged and ignored."""
        try:
            data = json.loads(self.path.read_text())
            records = data["tunnels"] if data.get("version") == STATE_FILE_VERSION else []
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, AttributeError) as error:
            logger.error("ignoring unreadable state file %s: %s", self.path, error)
            return []
        return [r for r in records if isinstance(r, dict)]

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
