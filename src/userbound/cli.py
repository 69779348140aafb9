"""The `userbound` command: the daemon's entry point and the client commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from userbound import __version__
from userbound.accounts import is_uid_text
from userbound.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LAB_BROKEN,
    EXIT_NOT_FOUND,
    EXIT_NOT_PERMITTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    DaemonNotRunning,
    InvalidRequest,
    UserboundError,
)
from userbound.names import NAME_PATTERN, RESERVED_NAMES
from userbound.policy import MAX_GRACE_PERIOD
from userbound.protocol import call, socket_path, stream
from userbound.sessions.model import SOURCES, describe_event, printable
from userbound.wgconfig import MAX_CONFIG_BYTES

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  success
  {EXIT_FAILED}  operation failed (also: name or AllowedIPs conflict)
  {EXIT_USAGE}  invalid usage or input (configuration file, option or request)
  {EXIT_NOT_PERMITTED}  not permitted
  {EXIT_UNREACHABLE}  daemon unreachable
  {EXIT_NOT_FOUND}  not found (tunnel or user)
  {EXIT_LAB_BROKEN}  userbound lab could not build or play its testbed
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

environment:
  USERBOUND_SOCKET  control socket path, when --control-socket is not given
"""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with the documented code."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


EXIT_BROKEN_PIPE = 128 + 13  # as a program killed by SIGPIPE
FOLLOW_LIMIT = 10_000  # events queued for --follow before it shows the whole state instead
MIN_RESYNC_INTERVAL = 1.0
MAX_RESYNC_INTERVAL = 86400.0


def _seconds(low: float, high: float) -> Callable[[str], float]:
    """Return an argument type for seconds from low to high; NaN and infinity are invalid."""

    def parse(text: str) -> float:
        try:
            seconds = float(text)
        except ValueError:
            seconds = float("nan")
        if not low <= seconds <= high:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: give seconds from {low:.0f} to {high:.0f}"
            )
        return seconds

    return parse


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    # SUPPRESS: the option may stand before or after the command, and the
    # command's parser must not overwrite a value given before it with None.
    common.add_argument(
        "--control-socket",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="control socket of the daemon "
        "(default: $USERBOUND_SOCKET or /run/userbound/control.sock)",
    )
    parser = Parser(
        prog="userbound",
        description="Keep a VPN tunnel bound to the user who opened it.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"userbound {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    def add_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = commands.add_parser(
            name,
            parents=[common],
            help=help_text,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return command

    daemon = add_command("daemon", "run the root daemon in the foreground")
    daemon.add_argument(
        "--state-dir",
        metavar="DIR",
        default=os.environ.get("USERBOUND_STATE_DIR", "/run/userbound"),
        help="folder for the tunnel state file, which only root can read "
        "(default: $USERBOUND_STATE_DIR or /run/userbound)",
    )
    daemon.add_argument(
        "--data-plane",
        choices=("auto", "kernel", "wireguard-go"),
        default="auto",
        help="WireGuard implementation: the kernel module if loaded, else wireguard-go "
        "(default: auto)",
    )
    daemon.add_argument(
        "--restart-delay",
        metavar="SECONDS",
        type=float,
        default=1.0,
        help="wait before restarting a data plane that exited; doubles on each failure, "
        "up to 30 s (default: 1)",
    )
    daemon.add_argument(
        "--sessions",
        choices=SOURCES,
        default="auto",
        help="where sessions come from: logind on the system bus ($DBUS_SYSTEM_BUS_ADDRESS), "
        "or utmp on machines without logind (default: auto, logind where the machine has one)",
    )
    daemon.add_argument(
        "--resync-interval",
        metavar="SECONDS",
        type=_seconds(MIN_RESYNC_INTERVAL, MAX_RESYNC_INTERVAL),
        default=30.0,
        help="read the whole session state again this often, even without a signal; "
        f"{MIN_RESYNC_INTERVAL:.0f} to {MAX_RESYNC_INTERVAL:.0f} (default: 30)",
    )
    daemon.add_argument(
        "--policy",
        metavar="FILE",
        help="policy file (default: /etc/userbound/policy.toml when it exists, else the "
        "built-in defaults); SIGHUP reads it again",
    )
    daemon.add_argument("--debug", action="store_true", help="log debug messages")

    up = add_command("up", "bring up a tunnel from a wg-quick file")
    up.add_argument(
        "config", metavar="CONF", help="WireGuard configuration file in wg-quick format"
    )
    up.add_argument(
        "--name", help="tunnel and interface name (default: the file name without .conf)"
    )
    up.add_argument(
        "--owner", metavar="USER", help="owner, as user name or uid (root only; default: you)"
    )
    add_settings(up)

    down = add_command("down", "bring a tunnel down and remove it")
    down.add_argument("name", metavar="NAME")

    resume = add_command(
        "resume", "resume a tunnel the policy suspended once its cause has cleared"
    )
    resume.add_argument("name", metavar="NAME")

    events = add_command(
        "events",
        "show the audit events: what the policy decided for each tunnel and why "
        "(a user sees those of their own tunnels)",
    )
    events.add_argument("--json", action="store_true", help="print one JSON object a line")
    events.add_argument("--follow", action="store_true", help="then print each new event")

    status = add_command("status", "show tunnels")
    status.add_argument("name", metavar="NAME", nargs="?")
    status.add_argument("--json", action="store_true", help="print JSON")

    allow = add_command("allow", "change which users enter a tunnel (root only)")
    allow.add_argument("name", metavar="NAME")
    allow.add_argument("users", metavar="USER", nargs="+", help="user name or uid")
    allow.add_argument(
        "--remove", action="store_true", help="remove these users instead of adding them"
    )

    sessions = add_command(
        "sessions",
        "show who uses the machine: each seat's session in front, every session "
        "(exit code 1 when sessions are unknown)",
    )
    sessions.add_argument("--json", action="store_true", help="print JSON")
    sessions.add_argument(
        "--follow",
        action="store_true",
        help="then print each change as it happens (with --json: one JSON object a line)",
    )
    sessions.add_argument(
        "--direct",
        action="store_true",
        help="read logind or utmp in this process instead of asking the daemon "
        "(what happens anyway when no daemon runs)",
    )
    sessions.add_argument(
        "--source",
        choices=SOURCES,
        help="read this source directly (implies --direct): logind, utmp, or auto, which "
        "picks logind where the machine has one (default for direct reading: auto)",
    )

    lab = commands.add_parser(
        "lab",
        help="play a shared machine's story in namespaces of its own and show whose packets "
        "reach alice's private network (root)",
        description="""\
Build a shared machine, a public side, a WireGuard server and a private web
server in network namespaces, and run the daemon with a simulated logind, or
with real elogind and real logins (--real-logind). Then play a story: alice
(uid 2001) logs in and connects, bob (uid 2002) takes the screen, alice locks
it, logind restarts, she unlocks, bob logs in over ssh, alice logs out. bob's
job probes the private server all along. Each step shows who is in front of
seat0, the tunnel's state and whose packets arrived, each checked against the
policy.
Everything is removed at the end (see docs/lab.md).""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
exit codes:
  {EXIT_OK}  every expectation held
  {EXIT_FAILED}  an expectation failed (the report says which and why)
  {EXIT_USAGE}  invalid option or policy file
  {EXIT_NOT_PERMITTED}  not run as root
  {EXIT_LAB_BROKEN}  the lab could not be built or played (a tool missing or failing)
  {EXIT_INTERRUPTED}  interrupted before the story ended (the lab is removed)
""",
    )
    lab.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="play under this policy file (default: the built-in defaults); use [users.2001] "
        "for alice, who has no account",
    )
    lab.add_argument(
        "--without-userbound",
        action="store_true",
        help="play the same story with a plain system-wide wireguard-go tunnel, as VPN clients "
        "set up today; the checks show what goes wrong",
    )
    lab.add_argument(
        "--real-logind",
        action="store_true",
        help="play with elogind from a Debian chroot (built with debootstrap on first use, "
        "then cached): PAM logins on VT5 and VT6, chvt, loginctl, ssh (needs virtual terminals)",
    )
    lab.add_argument(
        "--json", action="store_true", help="print a JSON report (the timeline goes to stderr)"
    )
    lab.add_argument(
        "--plot", type=Path, metavar="FILE.svg", help="draw the timeline into an SVG file"
    )
    lab.add_argument(
        "--keep",
        action="store_true",
        help="after the story, leave the lab running until Ctrl-C; the exit code is still "
        "the story's",
    )
    return parser


ACTIONS = ("keep", "suspend", "disconnect")


def add_settings(up: argparse.ArgumentParser) -> None:
    """Add the policy's per-tunnel settings as options of `up`."""
    group = up.add_argument_group(
        "settings",
        "Each overrides the policy for this tunnel. A user may ask for stricter values than "
        "the policy gives (keep < suspend < disconnect, kill switch on, fewer users, a "
        "shorter grace period), never looser ones; root may ask for any.",
    )
    group.add_argument("--scope", choices=("owner", "system"), help="who enters the tunnel")
    group.add_argument(
        "--allow",
        metavar="USER",
        action="append",
        help="let this user into the tunnel, in place of the policy's allow_users (repeatable)",
    )
    group.add_argument(
        "--allow-group",
        metavar="GROUP",
        action="append",
        help="let this group's members in, in place of the policy's allow_groups (repeatable)",
    )
    group.add_argument(
        "--only-owner",
        action="store_true",
        help="let no other user in, whatever allow_users and allow_groups the policy gives",
    )
    for rule, choices, condition in (
        ("switch-away", ACTIONS, "another session takes the owner's seat"),
        ("lock", ACTIONS, "the owner's sessions are locked"),
        ("remote-session", ACTIONS, "another user has a remote session"),
        ("owner-logout", ("keep", "disconnect"), "the owner's last session ends"),
    ):
        group.add_argument(f"--on-{rule}", choices=choices, help=f"what happens when {condition}")
    group.add_argument(
        "--reconnect-on-return",
        action=argparse.BooleanOptionalAction,
        help="undo a suspend or disconnect once its cause clears",
    )
    group.add_argument(
        "--grace-period",
        metavar="SECONDS",
        type=_seconds(0, MAX_GRACE_PERIOD),
        help="how long a cause must last before its action",
    )
    group.add_argument(
        "--kill-switch",
        action=argparse.BooleanOptionalAction,
        help="block the owner's traffic to the tunnel's networks while it is not up",
    )


def requested_settings(arguments: argparse.Namespace) -> dict[str, Any]:
    """Return the settings given as options of `up`, as the policy file names them."""
    settings: dict[str, Any] = {}
    for key in (
        "scope",
        "on_switch_away",
        "on_lock",
        "on_remote_session",
        "on_owner_logout",
        "reconnect_on_return",
        "grace_period",
        "kill_switch",
    ):
        value = getattr(arguments, key)
        if value is not None:
            settings[key] = value
    if arguments.only_owner:
        if arguments.allow or arguments.allow_group:
            raise InvalidRequest("--only-owner contradicts --allow and --allow-group; give one")
        settings["allow_users"], settings["allow_groups"] = [], []
    if arguments.allow:
        settings["allow_users"] = _users(arguments.allow)
    if arguments.allow_group:
        settings["allow_groups"] = arguments.allow_group
    return settings


def _option_of(match: re.Match[str]) -> str:
    key = match.group(1)
    option = {"allow_users": "allow", "allow_groups": "allow-group"}.get(key, key)
    return "--" + option.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "daemon":
            return run_daemon(arguments)
        if arguments.command == "lab":
            from userbound.lab import Options, run_lab

            return run_lab(
                Options(
                    policy=arguments.policy,
                    json_output=arguments.json,
                    plot=arguments.plot,
                    without_userbound=arguments.without_userbound,
                    keep=arguments.keep,
                    real_logind=arguments.real_logind,
                )
            )
        path = socket_path(getattr(arguments, "control_socket", None))
        if arguments.command == "up":
            return command_up(path, arguments)
        if arguments.command == "down":
            call(path, "down", {"name": arguments.name})
            return EXIT_OK
        if arguments.command == "resume":
            result = call(path, "resume", {"name": arguments.name})
            print(f"{result['name']}: {result['state']}")
            return EXIT_OK
        if arguments.command == "events":
            return command_events(path, arguments)
        if arguments.command == "status":
            return command_status(path, arguments)
        if arguments.command == "sessions":
            return command_sessions(path, arguments)
        if arguments.command == "allow":
            key = "remove" if arguments.remove else "add"
            result = call(path, "allow", {"name": arguments.name, key: _users(arguments.users)})
            print("allowed uids: " + " ".join(str(u) for u in result["allowed_uids"]))
            return EXIT_OK
    except UserboundError as error:
        print(f"userbound: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # `userbound sessions | head` ends quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    raise AssertionError(arguments.command)


def _stdout_closed() -> bool:
    """Return whether the reader of standard output has gone (a pipe's reader exited)."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _users(values: list[str]) -> list[str | int]:
    return [int(v) if is_uid_text(v) else v for v in values]


def run_daemon(arguments: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("userbound: the daemon must run as root", file=sys.stderr)
        return EXIT_NOT_PERMITTED
    import asyncio

    from userbound.daemon import Daemon

    under_journal = "JOURNAL_STREAM" in os.environ
    logging.basicConfig(
        level=logging.DEBUG if arguments.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s"
        if under_journal
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not arguments.restart_delay > 0:
        raise InvalidRequest(f"--restart-delay {arguments.restart_delay} must be above 0 seconds")

    async def run() -> None:
        daemon = Daemon(
            socket_path(getattr(arguments, "control_socket", None)),
            arguments.state_dir,
            arguments.data_plane,
            arguments.restart_delay,
            arguments.sessions,
            arguments.resync_interval,
            arguments.policy,
        )
        await daemon.run()

    asyncio.run(run())
    return EXIT_OK


def command_up(path: str, arguments: argparse.Namespace) -> int:
    config = Path(arguments.config)
    # The file is read here, with the caller's own rights: the daemon never
    # opens a user-supplied path as root.
    try:
        text = config.read_text()
        mode = config.stat().st_mode
    except OSError as error:
        raise InvalidRequest(f"cannot read configuration file {config}: {error}") from None
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"configuration file {config} is not UTF-8 text; give a WireGuard file in "
            "wg-quick format"
        ) from None

    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise InvalidRequest(
            f"configuration file {config} is larger than {MAX_CONFIG_BYTES} bytes; "
            "give a WireGuard file in wg-quick format"
        )

    name = arguments.name
    if name is None:
        name = config.name.removesuffix(".conf")
        if not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
            raise InvalidRequest(
                f"the file name {config.name!r} does not give a valid tunnel name; "
                "choose one with --name (1 to 15 letters, digits or _=+.-)"
            )
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(
            f"userbound: warning: {config} is readable by other users and contains a private key; "
            f"run: chmod 600 {config}",
            file=sys.stderr,
        )

    params: dict[str, Any] = {
        "config": text,
        "name": name,
        "settings": requested_settings(arguments),
    }
    if arguments.owner is not None:
        owner = arguments.owner
        params["owner"] = int(owner) if is_uid_text(owner) else owner
    try:
        result = call(path, "up", params)
    except UserboundError as error:
        # The daemon names settings as the policy file does; name the options instead.
        error.message = re.sub(r"\bsettings\.(\w+)", _option_of, error.message)
        raise
    print(result["name"])
    if result["state"] != "up":
        print(
            f"userbound: tunnel {result['name']} is {result['state']}: {result['reason']}",
            file=sys.stderr,
        )
    return EXIT_OK


def command_status(path: str, arguments: argparse.Namespace) -> int:
    params = {"name": arguments.name} if arguments.name else {}
    result = call(path, "status", params)
    if arguments.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    tunnels = result["tunnels"]
    if not tunnels:
        print("no tunnels")
        return EXIT_OK
    for tunnel in tunnels:
        owner = tunnel["owner_name"] or str(tunnel["owner_uid"])
        print(f"{tunnel['name']}: {tunnel['state']}, owner {owner}")
        if "interface" not in tunnel:
            continue
        handshake = tunnel["last_handshake"]
        ago = f"{time.time() - handshake:.0f} s ago" if handshake else "never"
        plane = tunnel["data_plane"] or "no data plane"
        print(f"  interface:      {tunnel['interface']} ({plane})")
        allowed = tunnel["allowed_uids"]
        if isinstance(allowed, list):
            allowed = " ".join(str(u) for u in allowed)
        print(f"  allowed uids:   {allowed}")
        print(f"  kill switch:    {'on' if tunnel['kill_switch'] else 'off'}")
        policy = tunnel["policy"]
        if policy["rule"] is None:
            print("  policy:         no rule applies")
        else:
            print(f"  policy:         {policy['rule']} = {policy['action']}: {policy['reason']}")
        if policy["pending"]:
            remaining = max(0.0, policy["pending_at"] - time.time())
            print(f"                  {policy['pending']} in {remaining:.1f} s if the cause lasts")
        if policy["waits_for_resume"]:
            print(
                f"                  held {policy['applied']} until `userbound resume "
                f"{tunnel['name']}` (reconnect_on_return is off)"
            )
        print("  settings:")
        for key, setting in tunnel["settings"].items():
            value = setting["value"]
            if isinstance(value, list):
                value = " ".join(str(v) for v in value) or "-"
            elif isinstance(value, bool):
                value = "true" if value else "false"
            print(f"    {key:<20} {value!s:<11} ({setting['source']})")
        dns = " ".join(tunnel["dns_servers"]) or "-"
        if tunnel["dns_search"]:
            dns += " (search domains, not applied: " + " ".join(tunnel["dns_search"]) + ")"
        print(f"  dns:            {dns}")
        print(f"  endpoint:       {tunnel['endpoint'] or '-'}")
        print(f"  last handshake: {ago}")
        print(f"  transfer:       {tunnel['rx_bytes']} B received, {tunnel['tx_bytes']} B sent")
    return EXIT_OK


def command_events(path: str, arguments: argparse.Namespace) -> int:
    if not arguments.follow:
        for event in call(path, "events", {})["events"]:
            show_audit_event(event, as_json=arguments.json)
        return EXIT_OK
    try:
        replies = stream(path, "watch-events", {})
        for event in next(replies)["events"]:
            show_audit_event(event, as_json=arguments.json)
        for event in replies:
            show_audit_event(event, as_json=arguments.json)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def show_audit_event(event: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(event), flush=True)
        return
    if event["event"] == "missed":
        print(f"(missed {event['missed']} event(s))", flush=True)
        return
    moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    print(f"{moment} {printable(describe_audit_event(event))}", flush=True)


def describe_audit_event(event: dict[str, Any]) -> str:
    kind = event["event"]
    if "tunnel" not in event:
        detail = event.get("reason") or event.get("path") or ""
        return f"{kind} {detail}".rstrip()
    owner = event["owner_name"] or f"uid {event['owner_uid']}"
    text = f"{event['tunnel']} ({owner}): {kind}"
    if "by" in event:
        text += f" by uid {event['by']}"
    if event["previous_state"] != event["state"]:
        text += f", {event['previous_state'] or 'new'} -> {event['state']}"
    else:
        text += f", stays {event['state']}"
    if event.get("keys"):
        text += " in " + ", ".join(event["keys"])
    if event.get("latency_ms") is not None:
        text += f" in {event['latency_ms']:.1f} ms"
    if event["rule"]:
        text += f"; {event['rule']} = {event['action']}: {event['reason']}"
    if event.get("pending"):
        text += f" ({event['pending']} after the grace period)"
    if event.get("session_event"):
        text += f" [after {event['session_event']['description']}]"
    return text


def command_sessions(path: str, arguments: argparse.Namespace) -> int:
    """Show sessions from the daemon, or read them directly when no daemon runs."""
    direct = arguments.direct or arguments.source is not None
    named = getattr(arguments, "control_socket", None) or os.environ.get("USERBOUND_SOCKET")
    if not direct:
        try:
            return sessions_from_daemon(path, arguments)
        except DaemonNotRunning:
            # Only the default socket falls back: a socket the caller named
            # must be the daemon they meant.
            if named:
                raise
            print(f"userbound: no daemon at {path}; reading sessions directly", file=sys.stderr)
    return sessions_direct(arguments)


def sessions_from_daemon(path: str, arguments: argparse.Namespace) -> int:
    if not arguments.follow:
        snapshot = call(path, "sessions", {})
        show_sessions(snapshot, as_json=arguments.json)
        return EXIT_OK if snapshot["state"] == "known" else EXIT_FAILED
    try:
        replies = stream(path, "watch-sessions", {})
        show_sessions(next(replies), as_json=arguments.json, follow=True)
        for event in replies:
            show_event(event, as_json=arguments.json)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def sessions_direct(arguments: argparse.Namespace) -> int:
    """Read sessions in this process, as the daemon would."""
    import asyncio

    from userbound.sessions import open_monitor
    from userbound.sessions.monitor import Follower

    # The output shows when sessions are unknown, and the reason.
    logging.basicConfig(level=logging.ERROR, format="userbound: %(message)s")

    async def read() -> int:
        monitor = await open_monitor(arguments.source or "auto")
        try:
            snapshot = monitor.snapshot.to_json()
            show_sessions(snapshot, as_json=arguments.json, follow=arguments.follow)
            if not arguments.follow:
                return EXIT_OK if snapshot["state"] == "known" else EXIT_FAILED
            async for event in Follower(monitor, FOLLOW_LIMIT).events():
                show_event(event, as_json=arguments.json)
            return EXIT_OK
        finally:
            await monitor.close()

    try:
        return asyncio.run(read())
    except KeyboardInterrupt:
        return EXIT_OK


def show_sessions(snapshot: dict[str, Any], *, as_json: bool, follow: bool = False) -> None:
    if as_json:
        if follow:
            # One object a line: the state first, then one event each.
            print(json.dumps({"event": "snapshot", "snapshot": snapshot}), flush=True)
        else:
            print(json.dumps(snapshot, indent=2))
        return
    print(f"source: {snapshot['source']}")
    if snapshot["state"] == "unknown":
        print(f"sessions unknown: {printable(snapshot['reason'])}", flush=True)
        return
    if snapshot["seats"] is None:
        print("seats: unknown (no logind: switching and locks are not known either)")
    elif not snapshot["seats"]:
        print("seats: none")
    else:
        rows = [["SEAT", "IN FRONT"]]
        for seat in snapshot["seats"]:
            front = "-"
            if seat["active_session"]:
                front = f"session {seat['active_session']}"
                if seat["user"] is not None:
                    front = f"{seat['user']} ({seat['class']}, session {seat['active_session']})"
            rows.append([seat["id"], front])
        _print_table(rows)
    print()
    if not snapshot["sessions"]:
        print("no sessions", flush=True)
        return
    rows = [["SESSION", "USER", "UID", "SEAT", "VT", "CLASS", "TYPE", "REMOTE", "STATE", "LOCK"]]
    for session in snapshot["sessions"]:
        remote = session["remote_host"] or ("yes" if session["remote"] else "-")
        if session["locked"] is None:
            lock = "-"  # utmp does not show locks
        else:
            lock = "locked" if session["locked"] else "unlocked"
        rows.append(
            [
                session["id"],
                session["user"],
                "-" if session["uid"] is None else str(session["uid"]),
                session["seat"] or "-",
                str(session["vt"] or "-"),
                session["class"],
                session["type"] or "-",
                remote,
                session["state"],
                lock,
            ]
        )
    _print_table(rows)
    sys.stdout.flush()


def show_event(event: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(event), flush=True)
        return
    if event["event"] == "snapshot":
        # The daemon sends the whole state again to a follower that fell behind.
        print(f"(missed {event['missed']} event(s); the state now:)")
        show_sessions(event["snapshot"], as_json=False)
        return
    moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    print(f"{moment} {describe_event(event)}", flush=True)


def _print_table(rows: list[list[str]]) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
