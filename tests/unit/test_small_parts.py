"""Small parts: uid ranges, full-tunnel extras, UAPI text, request parsing, the audit file."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from userbound import wgconfig
from userbound.audit import AuditLog
from userbound.control import Params, parse_request
from userbound.errors import InvalidRequest
from userbound.names import check_name
from userbound.routing import uid_ranges
from userbound.tunnels import full_tunnel_extras
from userbound.wireguard import parse_uapi_get, uapi_set_request

CONFIG = """\
[Interface]
PrivateKey = YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
[Peer]
PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
Endpoint = 192.0.2.1:51820
AllowedIPs = 10.0.0.0/8
"""


@pytest.mark.parametrize(
    ("uids", "ranges"),
    [
        ([], []),
        ([5], [(5, 5)]),
        ([3, 1, 2], [(1, 3)]),
        ([1, 3, 4, 10], [(1, 1), (3, 4), (10, 10)]),
        ([4294967294, 4294967293], [(4294967293, 4294967294)]),
    ],
)
def test_uid_ranges_collapse(uids: list[int], ranges: list[tuple[int, int]]) -> None:
    assert uid_ranges(uids) == ranges


@pytest.mark.parametrize(
    ("networks", "extras"),
    [
        (["0.0.0.0/0"], ["::/0"]),
        (["::/0"], ["0.0.0.0/0"]),
        (["0.0.0.0/0", "::/0"], []),
        (["0.0.0.0/0", "fd00::/64"], []),
        (["10.0.0.0/8"], []),
    ],
)
def test_full_tunnel_extras(networks: list[str], extras: list[str]) -> None:
    parsed = [ipaddress.ip_network(n) for n in networks]

    assert [str(n) for n in full_tunnel_extras(parsed)] == extras


def test_uapi_request_replaces_everything() -> None:
    config = wgconfig.parse(CONFIG)

    text = uapi_set_request(config, 52000, {config.peers[0].public_key.base64(): "192.0.2.1:51820"})

    assert text.startswith("set=1\nprivate_key=")
    assert "fwmark=52000\n" in text
    assert "replace_peers=true\n" in text
    assert "allowed_ip=10.0.0.0/8\n" in text
    assert text.endswith("\n\n")


def test_uapi_reply_compares_private_key() -> None:
    config = wgconfig.parse(CONFIG)
    peer = config.peers[0].public_key
    reply = (
        f"private_key={config.private_key.hex()}\nlisten_port=4000\nfwmark=52000\n"
        f"public_key={peer.hex()}\nendpoint=192.0.2.1:51820\nlast_handshake_time_sec=100\n"
        "last_handshake_time_nsec=500000000\nrx_bytes=10\ntx_bytes=20\nallowed_ip=10.0.0.0/8\nerrno=0\n\n"
    )

    status = parse_uapi_get(reply, config.private_key)

    assert status.private_key_matches
    assert status.fwmark == 52000
    assert status.peers[0].public_key == peer.base64()
    assert status.peers[0].last_handshake == 100.5
    assert (status.peers[0].rx_bytes, status.peers[0].tx_bytes) == (10, 20)
    assert config.private_key.hex() not in repr(status)


@pytest.mark.parametrize("name", ["corp", "wg0", "a.b-c_d=e+f", "x" * 15])
def test_valid_names_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 16, "a b", "a/b", "..", "é", "all", "default"])
def test_invalid_names_rejected(name: str) -> None:
    with pytest.raises(InvalidRequest, match="field 'name'"):
        check_name(name)


def test_request_version_checked() -> None:
    with pytest.raises(InvalidRequest, match="version"):
        parse_request(b'{"version": 0, "command": "status"}')


def test_params_name_wrong_type() -> None:
    with pytest.raises(InvalidRequest, match="field 'kill_switch' must be true or false"):
        Params({"kill_switch": 1}).boolean("kill_switch", default=True)


def test_params_booleans_are_not_uids() -> None:
    with pytest.raises(InvalidRequest, match="field 'owner'"):
        Params({"owner": True}).user("owner")


def test_params_error_on_deep_nesting() -> None:
    nested: list[Any] = []
    for _ in range(5000):
        nested = [nested]

    with pytest.raises(InvalidRequest, match="nested too deeply"):
        Params({"name": nested}).string("name")


def test_audit_load_keeps_each_owners_events(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", rotate_bytes=20_000)
    log.add({"event": "up", "owner_uid": 2001, "tunnel": "alice"})
    for number in range(2000):
        log.add({"event": "up", "owner_uid": 2002, "tunnel": f"bob{number}"})

    restarted = AuditLog(tmp_path / "audit.log", rotate_bytes=20_000)
    restarted.load()

    assert [e["tunnel"] for e in restarted.recent_of(2001)] == ["alice"]
    assert len(restarted.recent_of(2002)) == 1000
    assert len(restarted.recent) == 1000
