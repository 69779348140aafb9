"""Parse WireGuard configuration files in the format wg-quick reads.

Keys are case-insensitive, `#` starts a comment, list-valued keys (Address,
DNS, AllowedIPs) take comma-separated values and may repeat.  Keys that make
wg-quick run commands or change routing as root are rejected, because the
daemon applies a user's file with root rights.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass, field

from userbound.errors import InvalidConfig

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_CONFIG_BYTES = 64 * 1024
MAX_NETWORKS = 1024  # AllowedIPs entries in one file; each becomes one or two routes

# Keys wg-quick accepts that would run commands or change routing with root rights.
REJECTED_KEYS = {
    "preup": "runs a command as root",
    "postup": "runs a command as root",
    "predown": "runs a command as root",
    "postdown": "runs a command as root",
    "saveconfig": "writes the configuration file as root",
    "table": "changes the routing tables; userbound chooses the table itself",
}

_KEY_NAME = re.compile(r"^[A-Za-z]{1,32}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+$")


class Key:
    """A 32-byte WireGuard key whose text form never shows its value."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    @property
    def raw(self) -> bytes:
        return self._raw

    def hex(self) -> str:
        return self._raw.hex()

    def base64(self) -> str:
        return base64.b64encode(self._raw).decode()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return "Key(<hidden>)"

    __str__ = __repr__


def public_key(private: Key) -> Key:
    """Derive the Curve25519 public key of a WireGuard private key."""
    return Key(_x25519_base(private.raw))


@dataclass(frozen=True)
class Endpoint:
    """A peer's UDP endpoint as written in the file: a host name or address, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class Peer:
    """One [Peer] section."""

    public_key: Key
    line: int
    preshared_key: Key | None = None
    endpoint: Endpoint | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    persistent_keepalive: int = 0


@dataclass
class WireGuardConfig:
    """A parsed wg-quick file: the [Interface] section and its peers."""

    private_key: Key
    addresses: list[IPInterface] = field(default_factory=list)
    dns_servers: list[IPAddress] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    mtu: int | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    peers: list[Peer] = field(default_factory=list)

    def allowed_ips(self) -> list[IPNetwork]:
        """Return every peer's AllowedIPs, collapsed per address family."""
        v4 = [n for p in self.peers for n in p.allowed_ips if n.version == 4]
        v6 = [n for p in self.peers for n in p.allowed_ips if n.version == 6]
        return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def parse(text: str) -> WireGuardConfig:
    """Parse the text of a wg-quick configuration file.

    Raises InvalidConfig naming the line and the key of the first problem.
    """
    if len(text.encode(errors="replace")) > MAX_CONFIG_BYTES:
        raise InvalidConfig(f"configuration is larger than {MAX_CONFIG_BYTES} bytes")
    if "\0" in text:
        raise InvalidConfig("configuration contains a NUL byte; is this a text file?")

    interface: dict[str, tuple[int, str]] = {}
    interface_lists: dict[str, list[tuple[int, str]]] = {"address": [], "dns": []}
    interface_line: int | None = None
    peers: list[tuple[int, dict[str, tuple[int, str]], list[tuple[int, str]]]] = []
    section: str | None = None

    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise InvalidConfig(f"line {number}: invalid section header {line!r}")
            name = line[1:-1].strip().lower()
            if name == "interface":
                if interface_line is not None:
                    raise InvalidConfig(
                        f"line {number}: second [Interface] section; "
                        f"the first is on line {interface_line}"
                    )
                interface_line = number
            elif name == "peer":
                peers.append((number, {}, []))
            else:
                raise InvalidConfig(
                    f"line {number}: unknown section [{line[1:-1].strip()}]; "
                    "expected [Interface] or [Peer]"
                )
            section = name
            continue
        # Lines that do not parse are never echoed: they may hold a private key.
        if "=" not in line:
            raise InvalidConfig(f"line {number}: expected 'Key = Value'")
        key, value = (part.strip() for part in line.split("=", 1))
        if not _KEY_NAME.match(key):
            raise InvalidConfig(f"line {number}: expected 'Key = Value' with a key of letters")
        lowered = key.lower()
        if lowered in REJECTED_KEYS:
            raise InvalidConfig(
                f"line {number}: {key} is not supported because it {REJECTED_KEYS[lowered]}; "
                "remove it from the file"
            )
        if section is None:
            raise InvalidConfig(f"line {number}: {key} appears before any [Interface] or [Peer]")
        if not value:
            raise InvalidConfig(f"line {number}: {key} has no value")
        if section == "interface":
            if lowered in interface_lists:
                interface_lists[lowered].append((number, value))
            elif lowered in _INTERFACE_KEYS:
                _store_once(interface, lowered, key, number, value)
            else:
                raise InvalidConfig(
                    f"line {number}: unknown key {key} in [Interface]; expected PrivateKey, "
                    "Address, DNS, MTU, ListenPort or FwMark"
                )
        else:
            _, values, allowed = peers[-1]
            if lowered == "allowedips":
                allowed.append((number, value))
            elif lowered in _PEER_KEYS:
                _store_once(values, lowered, key, number, value)
            else:
                raise InvalidConfig(
                    f"line {number}: unknown key {key} in [Peer]; expected PublicKey, "
                    "PresharedKey, Endpoint, AllowedIPs or PersistentKeepalive"
                )

    if interface_line is None:
        raise InvalidConfig("missing [Interface] section")
    if "privatekey" not in interface:
        raise InvalidConfig(f"line {interface_line}: [Interface] has no PrivateKey")
    config = WireGuardConfig(private_key=_key(*interface["privatekey"], "PrivateKey"))
    for number, value in interface_lists["address"]:
        for item in _split_list(number, "Address", value):
            config.addresses.append(_interface_address(number, item))
    for number, value in interface_lists["dns"]:
        for item in _split_list(number, "DNS", value):
            try:
                config.dns_servers.append(ipaddress.ip_address(item))
            except ValueError:
                if not _HOSTNAME.match(item):
                    raise InvalidConfig(
                        f"line {number}: DNS entry {item!r} is neither an IP address "
                        "nor a search domain"
                    ) from None
                config.dns_search.append(item.rstrip("."))
    if "mtu" in interface:
        config.mtu = _integer(*interface["mtu"], "MTU", 576, 65535)
        if config.mtu < 1280 and any(a.version == 6 for a in config.addresses):
            raise InvalidConfig(
                f"line {interface['mtu'][0]}: MTU {config.mtu} is below 1280, "
                "the minimum for IPv6 addresses"
            )
    if "listenport" in interface:
        config.listen_port = _integer(*interface["listenport"], "ListenPort", 0, 65535)
    if "fwmark" in interface:
        number, value = interface["fwmark"]
        if value.lower() != "off":
            config.fwmark = _integer(number, value, "FwMark", 1, 0xFFFFFFFF) or None

    if not peers:
        raise InvalidConfig("missing [Peer] section: a tunnel needs at least one peer")
    seen: dict[Key, int] = {}
    for header, values, allowed in peers:
        if "publickey" not in values:
            raise InvalidConfig(f"line {header}: [Peer] has no PublicKey")
        peer = Peer(public_key=_key(*values["publickey"], "PublicKey"), line=header)
        if peer.public_key in seen:
            raise InvalidConfig(
                f"line {header}: this peer's PublicKey repeats the peer on line "
                f"{seen[peer.public_key]}"
            )
        seen[peer.public_key] = header
        if "presharedkey" in values:
            peer.preshared_key = _key(*values["presharedkey"], "PresharedKey")
        if "endpoint" in values:
            peer.endpoint = _endpoint(*values["endpoint"])
        if "persistentkeepalive" in values:
            number, value = values["persistentkeepalive"]
            if value.lower() != "off":
                peer.persistent_keepalive = _integer(number, value, "PersistentKeepalive", 0, 65535)
        for number, value in allowed:
            for item in _split_list(number, "AllowedIPs", value):
                peer.allowed_ips.append(_network(number, item))
        config.peers.append(peer)
    networks = config.allowed_ips()
    if sum(len(p.allowed_ips) for p in config.peers) > MAX_NETWORKS:
        raise InvalidConfig(
            f"AllowedIPs lists more than {MAX_NETWORKS} networks; merge them into larger ones"
        )
    for number, value in interface_lists["dns"]:
        for item in _split_list(number, "DNS", value):
            if _is_address(item) and not any(ipaddress.ip_address(item) in n for n in networks):
                raise InvalidConfig(
                    f"line {number}: DNS server {item} is outside every peer's AllowedIPs, so "
                    "queries to it could not pass through the tunnel; add it to AllowedIPs"
                )
    if public_key(config.private_key) in seen:
        raise InvalidConfig(
            f"line {seen[public_key(config.private_key)]}: the peer's PublicKey is this "
            "interface's own key"
        )
    return config


_INTERFACE_KEYS = {"privatekey", "mtu", "listenport", "fwmark"}
_PEER_KEYS = {"publickey", "presharedkey", "endpoint", "persistentkeepalive"}


def _store_once(
    values: dict[str, tuple[int, str]], lowered: str, key: str, number: int, value: str
) -> None:
    if lowered in values:
        raise InvalidConfig(
            f"line {number}: {key} repeats line {values[lowered][0]}; give it once per section"
        )
    values[lowered] = (number, value)


def _split_list(number: int, key: str, value: str) -> list[str]:
    items = [item.strip() for item in value.split(",")]
    if any(not item for item in items):
        raise InvalidConfig(f"line {number}: {key} has an empty entry in {value!r}")
    return items


def _key(number: int, value: str, key: str) -> Key:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        # The value may be a private key with one character wrong: never echo it.
        raise InvalidConfig(
            f"line {number}: {key} is not a WireGuard key (44 characters of base64, "
            "as `wg genkey` prints)"
        )
    return Key(raw)


def _integer(number: int, value: str, key: str, low: int, high: int) -> int:
    try:
        result = int(value, 0)
    except ValueError:
        raise InvalidConfig(f"line {number}: {key} {value!r} is not a number") from None
    if not low <= result <= high:
        raise InvalidConfig(f"line {number}: {key} {result} is outside {low}..{high}")
    return result


def _interface_address(number: int, value: str) -> IPInterface:
    try:
        address = ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidConfig(
            f"line {number}: Address {value!r} is not an IP address with an optional /prefix"
        ) from None
    if address.ip.is_unspecified or address.ip.is_multicast or address.ip.is_loopback:
        raise InvalidConfig(f"line {number}: Address {value!r} cannot be assigned to a tunnel")
    return address


def _network(number: int, value: str) -> IPNetwork:
    try:
        # wg accepts host bits in AllowedIPs and masks them off.
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidConfig(
            f"line {number}: AllowedIPs entry {value!r} is not an IP network such as 10.0.0.0/8"
        ) from None


def _endpoint(number: int, value: str) -> Endpoint:
    if value.startswith("["):
        host, _, port_text = value[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    else:
        host, _, port_text = value.rpartition(":")
        if ":" in host:
            host = ""
    if not host or not (_HOSTNAME.match(host) or _is_address(host)):
        raise InvalidConfig(
            f"line {number}: Endpoint {value!r} is not host:port, address:port or [IPv6]:port"
        )
    port = _integer(number, port_text, "Endpoint port", 1, 65535) if port_text else 0
    if not port:
        raise InvalidConfig(f"line {number}: Endpoint {value!r} has no port")
    return Endpoint(host=host, port=port)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# Curve25519 scalar multiplication by the base point (RFC 7748), enough to show
# the public key of a configuration without a cryptography dependency.
_P = 2**255 - 19
_A24 = 121665


def _x25519_base(scalar: bytes) -> bytes:
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    x1, x2, z2, x3, z3, swap = 9, 1, 0, 9, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")
