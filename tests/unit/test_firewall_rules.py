"""The nftables ruleset built for tunnels, checked as data without a kernel."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from userbound.firewall import TunnelRules, build_ruleset

NETWORKS = (ipaddress.ip_network("10.99.0.0/24"), ipaddress.ip_network("fd00:99::/64"))


def tunnel(**changes: Any) -> TunnelRules:
    settings: dict[str, Any] = {
        "interface": "corp",
        "allowed_uids": frozenset({2001}),
        "networks": NETWORKS,
        "fwmark": 52000,
        "dns_mark": 0x75CB20,
        "addresses": (ipaddress.ip_address("10.64.0.2"),),
        "kill_switch": True,
        "engaged": False,
    }
    settings.update(changes)
    return TunnelRules(**settings)


def rules_of(commands: list[dict[str, Any]], chain: str) -> list[str]:
    return [
        json.dumps(c["add"]["rule"]["expr"])
        for c in commands
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def test_table_replaced_in_one_batch() -> None:
    commands = build_ruleset([tunnel()])

    assert list(commands[0]) == ["add"]
    assert list(commands[1]) == ["delete"]
    assert "table" in commands[1]["delete"]


def engaged_set(commands: list[dict[str, Any]]) -> list[str]:
    sets = [c["add"]["set"] for c in commands if "set" in c.get("add", {})]
    (engaged,) = [s for s in sets if s["name"] == "engaged"]
    return list(engaged.get("elem", []))


def test_up_tunnel_accepts_owner_then_drops() -> None:
    commands = build_ruleset([tunnel()])
    via = rules_of(commands, "corp-via")

    # The first two rules apply only while the interface is in the engaged set.
    assert all('"@engaged"' in rule for rule in via[:2])
    assert '"accept": null' in via[2]
    assert '"skuid"' in via[2]
    assert via[-1].endswith('{"drop": null}]')
    assert engaged_set(commands) == []


def test_engaged_tunnel_rejects_owner() -> None:
    commands = build_ruleset([tunnel(engaged=True)])
    via = rules_of(commands, "corp-via")

    assert '"@engaged"' in via[0]
    assert '"skuid"' in via[0]
    assert '"target": "reject"' in via[0]
    assert '"@engaged"' in via[1]
    assert '{"drop": null}' in via[1]
    assert engaged_set(commands) == ["corp"]


def test_kill_switch_off_has_no_owner_chain() -> None:
    commands = build_ruleset([tunnel(kill_switch=False)])

    assert rules_of(commands, "corp-owner") == []


def test_full_tunnel_matches_family() -> None:
    full = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

    owner = rules_of(build_ruleset([tunnel(networks=full)]), "corp-owner")

    assert owner == [
        json.dumps(
            [
                {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
                {"goto": {"target": "reject"}},
            ]
        ),
        json.dumps(
            [
                {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
                {"goto": {"target": "reject"}},
            ]
        ),
    ]


def test_dns_redirected_only_with_servers() -> None:
    without = build_ruleset([tunnel()])
    with_dns = build_ruleset([tunnel(dns_servers=(ipaddress.ip_address("10.99.0.53"),))])

    assert rules_of(without, "nat-output") == []
    assert "10.99.0.53" in rules_of(with_dns, "nat-output")[0]
    assert rules_of(with_dns, "mark-dns")


def test_first_dns_tunnel_wins() -> None:
    first = tunnel(dns_servers=(ipaddress.ip_address("10.99.0.53"),))
    second = tunnel(
        interface="home", dns_mark=0x75CB21, dns_servers=(ipaddress.ip_address("10.98.0.53"),)
    )

    marks = rules_of(build_ruleset([first, second]), "mark-dns")
    nat = rules_of(build_ruleset([first, second]), "nat-output")

    assert all(rule.endswith('{"accept": null}]') for rule in marks)
    assert str(0x75CB20) in marks[0]
    assert "10.99.0.53" in nat[0]


def test_forwarding_dropped_both_ways() -> None:
    forward = rules_of(build_ruleset([tunnel(), tunnel(interface="home")]), "forward")

    assert len(forward) == 2
    assert all('"drop": null' in rule for rule in forward)
