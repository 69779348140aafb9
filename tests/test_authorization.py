"""Authorisation by peer credentials: users manage and see only their own tunnels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ALICE, BOB, Lab, kernel_state
from userbound.errors import EXIT_NOT_FOUND, EXIT_NOT_PERMITTED
from userbound.lab.testbed import USERBOUND

pytestmark = pytest.mark.root


@pytest.fixture
def alice_tunnel(lab: Lab) -> str:
    return lab.up_ok(ALICE, lab.bed.client_config(lab.bed.add_client()))


def test_other_user_cannot_bring_down(lab: Lab, alice_tunnel: str) -> None:
    before = kernel_state(lab.bed.host)

    result = lab.bed.cli(BOB, "down", alice_tunnel)

    assert result.returncode == EXIT_NOT_PERMITTED
    assert alice_tunnel in result.stderr
    assert kernel_state(lab.bed.host) == before
    assert lab.bed.probe(ALICE, "tcp") == "ok"


def test_other_user_cannot_reconfigure(lab: Lab, alice_tunnel: str) -> None:
    before = kernel_state(lab.bed.host)

    joined = lab.bed.cli(BOB, "allow", alice_tunnel, str(BOB))
    owner_adds = lab.bed.cli(ALICE, "allow", alice_tunnel, str(BOB))

    assert joined.returncode == EXIT_NOT_PERMITTED
    assert owner_adds.returncode == EXIT_NOT_PERMITTED
    assert kernel_state(lab.bed.host) == before
    assert lab.bed.probe(BOB, "tcp", timeout=0.5).startswith("error")


def test_other_user_sees_no_details(lab: Lab, alice_tunnel: str) -> None:
    bob = json.loads(lab.bed.cli(BOB, "status", "--json").stdout)
    alice = json.loads(lab.bed.cli(ALICE, "status", "--json").stdout)

    assert bob["tunnels"] == [
        {"name": alice_tunnel, "owner_uid": ALICE, "owner_name": None, "state": "up"}
    ]
    assert alice["tunnels"][0]["allowed_uids"] == [ALICE]
    assert alice["tunnels"][0]["peers"][0]["public_key"]


def test_status_never_shows_keys(lab: Lab, alice_tunnel: str) -> None:
    client = lab.bed.clients[0]
    secret = client.key.base64()

    outputs = [
        lab.bed.cli(uid, "status", *flags).stdout
        for uid in (0, ALICE, BOB)
        for flags in ([], ["--json"])
    ]

    for output in outputs:
        assert secret not in output
        assert client.key.hex() not in output
    assert secret not in lab.bed.daemon_log()
    assert "private" not in " ".join(outputs).lower()


def test_user_cannot_bring_up_for_another(lab: Lab) -> None:
    path = lab.bed.write_config(lab.bed.client_config(lab.bed.add_client()), BOB)

    result = lab.bed.cli(
        BOB, "up", str(path), "--owner", str(ALICE), "--name", lab.bed.tunnel_name()
    )
    allowed = lab.bed.cli(
        BOB, "up", str(path), "--allow", str(ALICE), "--name", lab.bed.tunnel_name()
    )

    assert result.returncode == EXIT_NOT_PERMITTED
    assert "owner" in result.stderr
    assert allowed.returncode == EXIT_NOT_PERMITTED


def test_user_cannot_read_owner_config(lab: Lab, alice_tunnel: str) -> None:
    alice_file = lab.bed.directory / f"home-{ALICE}" / f"{alice_tunnel}.conf"

    result = lab.bed.cli(BOB, "up", str(alice_file), "--name", lab.bed.tunnel_name())

    assert alice_file.exists()
    assert result.returncode == 2
    assert "Permission denied" in result.stderr


def test_unknown_tunnel_not_found(lab: Lab) -> None:
    result = lab.bed.cli(ALICE, "down", "nosuchtunnel")

    assert result.returncode == EXIT_NOT_FOUND
    assert "nosuchtunnel" in result.stderr


def test_name_conflict_rejected(lab: Lab, alice_tunnel: str) -> None:
    before = kernel_state(lab.bed.host)
    path = lab.bed.write_config(lab.bed.client_config(lab.bed.add_client()), BOB)

    result = lab.bed.cli(BOB, "up", str(path), "--name", alice_tunnel)

    assert result.returncode == 1
    assert "exists" in result.stderr
    assert kernel_state(lab.bed.host) == before


def test_daemon_unreachable_exit_code(lab: Lab) -> None:
    result = lab.bed.cli(ALICE, "status", "--control-socket", "/nonexistent/control.sock")

    assert result.returncode == 4
    assert "/nonexistent/control.sock" in result.stderr


def test_status_lists_documented_fields(lab: Lab, alice_tunnel: str) -> None:
    lab.bed.probe(ALICE, "tcp")

    tunnel = json.loads(lab.bed.cli(ALICE, "status", alice_tunnel, "--json").stdout)["tunnels"][0]

    for field in (
        "name",
        "owner_uid",
        "owner_name",
        "state",
        "interface",
        "allowed_uids",
        "kill_switch",
        "endpoint",
        "last_handshake",
        "rx_bytes",
        "tx_bytes",
    ):
        assert field in tunnel, field
    assert tunnel["endpoint"] == "10.200.2.2:51820"
    assert tunnel["last_handshake"] is not None
    assert tunnel["rx_bytes"] > 0
    assert tunnel["kill_switch"] is True


def test_readable_config_warns(lab: Lab) -> None:
    path = lab.bed.write_config(lab.bed.client_config(lab.bed.add_client()), ALICE)
    path.chmod(0o644)

    result = lab.bed.cli(ALICE, "up", str(path), "--name", lab.bed.tunnel_name())

    assert result.returncode == 0, result.stderr
    assert "readable by other users" in result.stderr
    assert f"chmod 600 {path}" in result.stderr


def test_socket_option_before_command(lab: Lab) -> None:
    socket_path = str(lab.bed.control_socket)
    env_free = [*lab.bed.prefix_command(lab.bed.host, ALICE), "env", "-u", "USERBOUND_SOCKET"]

    before = subprocess.run(
        [*env_free, str(USERBOUND), "--control-socket", socket_path, "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    after = subprocess.run(
        [*env_free, str(USERBOUND), "status", "--control-socket", socket_path],
        capture_output=True,
        text=True,
        check=False,
    )

    assert before.returncode == 0, before.stderr
    assert after.returncode == 0, after.stderr


HOLD_CONNECTIONS = """
import json, socket, sys
open_sockets = [socket.socket(socket.AF_UNIX) for _ in range(16)]
for sock in open_sockets:
    sock.connect(sys.argv[1])
extra = socket.socket(socket.AF_UNIX)
extra.connect(sys.argv[1])
extra.sendall(b'{"version": 1, "command": "status"}\\n')
print(extra.makefile().readline().strip())
"""


def test_connection_limit_per_user(lab: Lab) -> None:
    script = lab.bed.directory / "hold.py"
    script.write_text(HOLD_CONNECTIONS)
    command = [*lab.bed.prefix_command(lab.bed.host, BOB), sys.executable, str(script)]

    result = subprocess.run(
        [*command, str(lab.bed.control_socket)], capture_output=True, text=True, check=False
    )
    reply = json.loads(result.stdout)

    assert reply["ok"] is False
    assert reply["error"]["code"] == "not-permitted"
    assert "too many open control connections" in reply["error"]["message"]
    assert lab.bed.cli(BOB, "status").returncode == 0


@pytest.mark.parametrize(
    ("address", "code", "words"),
    [
        ("10.99.0.2/32", 1, "belongs to the networks or endpoint"),
        ("10.64.0.2/32", 1, "already assigned"),
        ("10.200.1.5/32", EXIT_NOT_PERMITTED, "reaches directly"),
        ("198.51.100.7/32", EXIT_NOT_PERMITTED, "not in a private range"),
    ],
)
def test_address_cannot_capture_traffic(
    lab: Lab, alice_tunnel: str, address: str, code: int, words: str
) -> None:
    before = kernel_state(lab.bed.host)
    client = lab.bed.add_client()
    config = lab.bed.client_config(client, "10.98.0.0/24", dns=None)
    config = config.replace(f"{client.address_v4}/24, {client.address_v6}/64", address)

    result = lab.up(BOB, config)

    assert result.returncode == code, result.stderr
    assert words in result.stderr
    assert kernel_state(lab.bed.host) == before


@pytest.mark.parametrize(
    ("line", "words"),
    [("FwMark = 0x75cb20", "only root may set it"), ("ListenPort = 53", "privileged")],
)
def test_user_settings_limited(lab: Lab, line: str, words: str) -> None:
    config = lab.bed.client_config(lab.bed.add_client()).replace("[Peer]", f"{line}\n\n[Peer]")

    result = lab.up(BOB, config)

    assert result.returncode == EXIT_NOT_PERMITTED
    assert words in result.stderr


def test_tunnel_address_guarded(lab: Lab, alice_tunnel: str) -> None:
    assert lab.bed.probe(ALICE, "icmp", "10.64.0.2") == "ok"
    assert lab.bed.probe(BOB, "icmp", "10.64.0.2").startswith("error")
    assert lab.bed.probe(BOB, "icmp", "10.200.1.2") == "ok"


def test_tunnels_per_user_limited(lab: Lab) -> None:
    for number in range(8):
        config = lab.bed.client_config(lab.bed.add_client(), f"10.{100 + number}.0.0/24", dns=None)
        lab.up_ok(BOB, config)

    ninth = lab.up(BOB, lab.bed.client_config(lab.bed.add_client(), "10.120.0.0/24", dns=None))

    assert ninth.returncode == EXIT_NOT_PERMITTED
    assert "bring one down first" in ninth.stderr
