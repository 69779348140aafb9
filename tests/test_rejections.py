"""Bad input: a clear error naming the line or field, exit code 2, and no kernel change."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import ALICE, Lab, kernel_state

pytestmark = pytest.mark.root

KEY = "YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PEER = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
PEER2 = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0="


def conf(interface: str = "", peer: str = "") -> str:
    return (
        "[Interface]\n"
        f"PrivateKey = {KEY}\n"
        "Address = 10.64.0.2/24\n"
        f"{interface}"
        "\n[Peer]\n"
        f"PublicKey = {PEER}\n"
        "AllowedIPs = 10.99.0.0/24\n"
        "Endpoint = 10.200.2.2:51820\n"
        f"{peer}"
    )


# (configuration text, line the error must name, words the message must contain)
BAD_CONFIGS = [
    (conf("PostUp = iptables -F\n"), 4, "PostUp"),
    (conf("PreUp = touch /tmp/x\n"), 4, "PreUp"),
    (conf("PreDown = rm -rf /\n"), 4, "PreDown"),
    (conf("postdown = reboot\n"), 4, "postdown"),
    (conf("SaveConfig = true\n"), 4, "SaveConfig"),
    (conf("Table = off\n"), 4, "Table"),
    (conf("Colour = blue\n"), 4, "unknown key Colour"),
    (conf("Address = 10.64.0.300/24\n"), 4, "Address"),
    (conf("MTU = big\n"), 4, "MTU"),
    (conf("MTU = 100\n"), 4, "MTU 100"),
    (conf("ListenPort = 70000\n"), 4, "ListenPort"),
    (conf("FwMark = mark\n"), 4, "FwMark"),
    (conf("DNS = not a domain!\n"), 4, "DNS entry"),
    (conf("DNS = 192.0.2.53\n"), 4, "outside every peer's AllowedIPs"),
    (conf("PrivateKey = " + KEY + "\n"), 4, "repeats line 2"),
    (conf("Address =\n"), 4, "has no value"),
    (conf("just some words\n"), 4, "expected 'Key = Value'"),
    (conf(peer="AllowedIPs = 10.0.0.0/33\n"), 9, "AllowedIPs entry"),
    (conf(peer="PersistentKeepalive = -1\n"), 9, "PersistentKeepalive"),
    (conf(peer=f"[Peer]\nPublicKey = {PEER}\n"), 9, "repeats the peer on line 5"),
    (conf(peer="[Peers]\n"), 9, "unknown section"),
    (conf(peer=f"[Peer]\nPublicKey = {PEER2}\nEndpoint = 10.0.0.1\n"), 11, "Endpoint"),
    (conf(peer=f"[Peer]\nPublicKey = {PEER2}\nEndpoint = [fd00::1:51820\n"), 11, "Endpoint"),
    (conf(peer="[Peer]\nAllowedIPs = 10.1.0.0/16\n"), 9, "no PublicKey"),
    (conf().replace(KEY, "c2hvcnQ="), 2, "PrivateKey is not a WireGuard key"),
    ("PrivateKey = " + KEY + "\n", 1, "before any [Interface]"),
    ("[Peer]\nPublicKey = " + PEER + "\n", 0, "missing [Interface]"),
    ("[Interface]\nPrivateKey = " + KEY + "\n", 0, "missing [Peer]"),
    ("[Interface]\nAddress = 10.64.0.2/24\n[Peer]\nPublicKey = " + PEER + "\n", 1, "no PrivateKey"),
]


def snapshot(lab: Lab) -> str:
    return kernel_state(lab.bed.host)


@pytest.fixture
def busy_lab(lab: Lab) -> Lab:
    """A lab with one tunnel up, so that a careless change would have something to break."""
    lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))
    return lab


def test_bad_configs_rejected(busy_lab: Lab) -> None:
    before = snapshot(busy_lab)
    assert len(BAD_CONFIGS) >= 20

    for text, line, words in BAD_CONFIGS:
        result = busy_lab.up(ALICE, text)
        assert result.returncode == 2, (text, result.stderr)
        assert words in result.stderr, (text, result.stderr)
        if line:
            assert f"line {line}:" in result.stderr, (text, result.stderr)
        assert KEY not in result.stderr

    assert snapshot(busy_lab) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["up"],
        ["up", "/nonexistent/corp.conf"],
        ["up", "CONF", "--name", "name with spaces"],
        ["up", "CONF", "--name", "much-too-long-for-linux"],
        ["status", "--colour"],
        ["frobnicate"],
        ["allow", "tunnel"],
    ],
)
def test_bad_usage_rejected(busy_lab: Lab, argv: list[str]) -> None:
    before = snapshot(busy_lab)
    path = busy_lab.bed.write_config(busy_lab.bed.client_config(busy_lab.bed.add_client()), ALICE)
    argv = [str(path) if a == "CONF" else a for a in argv]

    result = busy_lab.bed.cli(ALICE, *argv)

    assert result.returncode == 2, result.stderr
    assert result.stderr
    assert snapshot(busy_lab) == before


def request(lab: Lab, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(lab.bed.control_socket))
        try:
            sock.sendall(payload + b"\n")
        except BrokenPipeError:
            pass  # the daemon stopped reading an oversized request, and has replied
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, "daemon closed the connection"
            reply += chunk
    return dict(json.loads(reply))


def up_request(**params: object) -> bytes:
    return json.dumps(
        {"version": 1, "command": "up", "params": {"config": conf(), **params}}
    ).encode()


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"this is not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"version": 2, "command": "status"}', "field 'version'"),
        (b'{"version": 1}', "field 'command'"),
        (b'{"version": 1, "command": "status", "params": []}', "field 'params'"),
        (b'{"version": 1, "command": "explode"}', "unknown command 'explode'"),
        (b'{"version": 1, "command": "up", "params": {"name": "x"}}', "field 'config'"),
        (up_request(name=5), "field 'name'"),
        (up_request(name="x", colour="red"), "unknown field 'colour'"),
        (up_request(name="x", kill_switch="yes"), "field 'kill_switch'"),
        (up_request(name="x", allow="bob"), "field 'allow'"),
        (up_request(name="x", allow=[True]), "field 'allow'"),
        (up_request(name="x", owner=[]), "field 'owner'"),
        (up_request(name="x/y"), "field 'name'"),
        (up_request(name="x", config=7), "field 'config'"),
        (b'{"version": 1, "command": "down", "params": {}}', "field 'name'"),
        (
            b'{"version": 1, "command": "allow", "params": {"name": "x", "add": "bob"}}',
            "field 'add'",
        ),
        (b'{"version": 1, "command": "status", "params": {"name": ["x"]}}', "field 'name'"),
    ],
)
def test_bad_requests_rejected(busy_lab: Lab, payload: bytes, words: str) -> None:
    before = snapshot(busy_lab)

    reply = request(busy_lab, payload)

    assert reply["ok"] is False
    error = reply["error"]
    assert isinstance(error, dict)
    assert error["code"] in ("invalid-request", "invalid-config")
    assert words in error["message"]
    assert snapshot(busy_lab) == before


def test_oversized_request_rejected(busy_lab: Lab) -> None:
    before = snapshot(busy_lab)

    reply = request(busy_lab, up_request(name="big", config="#" * (2 * 1024 * 1024)))

    assert reply["ok"] is False
    assert snapshot(busy_lab) == before


def test_binary_config_rejected(busy_lab: Lab) -> None:
    before = snapshot(busy_lab)
    path = busy_lab.bed.write_config("", ALICE, "binary.conf")
    path.write_bytes(b"\xff\xfe\x00\x01" * 64)

    result = busy_lab.bed.cli(ALICE, "up", str(path), "--name", busy_lab.bed.tunnel_name())

    assert result.returncode == 2
    assert "not UTF-8 text" in result.stderr
    assert snapshot(busy_lab) == before
