"""Probes and servers for the lab: small network clients and servers with clear results.

`python -m userbound.lab.probe tcp|udp|icmp|dns HOST PORT [--interface IF]`
prints `ok`, or `error: REASON`, and exits 0 or 1.  `serve` runs the private
server: a line-based TCP responder, a UDP echo and a UDP responder on port 53.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import socketserver
import struct
import threading
import time

REPLY = b"private\n"


def _bind_device(sock: socket.socket, interface: str | None) -> None:
    if interface:
        # Any user may bind a socket to an interface; this is the bypass
        # `curl --interface` uses, and the firewall must stop it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def probe_tcp(host: str, port: int, interface: str | None, timeout: float) -> str:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _bind_device(sock, interface)
        sock.connect((host, port))
        sock.sendall(b"hello\n")
        data = sock.recv(64)
    return "ok" if data == REPLY else f"error: unexpected reply {data!r}"


def probe_udp(host: str, port: int, interface: str | None, timeout: float) -> str:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        _bind_device(sock, interface)
        sock.connect((host, port))
        sock.send(b"hello\n")
        data = sock.recv(64)
    return "ok" if data in (b"hello\n", REPLY) else f"error: unexpected reply {data!r}"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def probe_icmp(host: str, port: int, interface: str | None, timeout: float) -> str:
    family = _family(host)
    protocol = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    kind = 128 if family == socket.AF_INET6 else 8
    # An unprivileged ICMP socket: the kernel fills in the identifier and, for IPv6, the checksum.
    with socket.socket(family, socket.SOCK_DGRAM, protocol) as sock:
        sock.settimeout(timeout)
        _bind_device(sock, interface)
        header = struct.pack("!BBHHH", kind, 0, 0, 0, 1)
        payload = b"userbound"
        checksum = _checksum(header + payload)
        sock.sendto(struct.pack("!BBHHH", kind, 0, checksum, 0, 1) + payload, (host, 0))
        data = sock.recv(128)
    return "ok" if data[0] in (0, 129) else f"error: ICMP type {data[0]}"


PROBES = {"tcp": probe_tcp, "udp": probe_udp, "icmp": probe_icmp, "dns": probe_udp}


class _LineHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        # One reply per line until the client closes: probes send one line,
        # long-lived connections keep sending.
        for line in self.rfile:
            if line.startswith(b"GET "):
                # Enough HTTP for curl: the page, then close.
                header = f"HTTP/1.0 200 OK\r\nContent-Length: {len(REPLY)}\r\n\r\n"
                self.wfile.write(header.encode() + REPLY)
                return
            self.wfile.write(REPLY)


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


def serve(addresses: list[str], port: int) -> None:
    """Answer each TCP line with REPLY on `port`, echo UDP on 7 and answer UDP on 53."""
    selector = selectors.DefaultSelector()
    for address in addresses:
        server_class = _TCP6Server if _family(address) == socket.AF_INET6 else _TCPServer
        server = server_class((address, port), _LineHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for udp_port, role in ((7, "echo"), (53, "dns")):
            udp = socket.socket(_family(address), socket.SOCK_DGRAM)
            udp.bind((address, udp_port))
            selector.register(udp, selectors.EVENT_READ, role)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data, peer = sock.recvfrom(2048)
            sock.sendto(data if key.data == "echo" else REPLY, peer)


def main() -> int:
    parser = argparse.ArgumentParser(prog="userbound-probe")
    parser.add_argument("kind", choices=[*PROBES, "serve", "loop"])
    parser.add_argument("host", help="address to probe; for serve, comma-separated addresses")
    parser.add_argument("port", type=int, nargs="?", default=80)
    parser.add_argument("--interface")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--interval", type=float, default=0.01, help="loop: seconds between probes")
    parser.add_argument("--output", help="loop: file that gets one line per probe")
    parser.add_argument(
        "--session", action="store_true", help="loop: probe over one TCP connection"
    )
    arguments = parser.parse_args()
    if arguments.kind == "serve":
        serve(arguments.host.split(","), arguments.port)
        return 0
    if arguments.kind == "loop":
        return probe_loop(arguments)
    try:
        print(
            PROBES[arguments.kind](
                arguments.host, arguments.port, arguments.interface, arguments.timeout
            )
        )
    except OSError as error:
        print(f"error: {error.strerror or error}")
        return 1
    return 0


def probe_loop(arguments: argparse.Namespace) -> int:
    """Probe every interval until killed, appending `time ok|error: ...` lines to a file.

    With --session, all probes share one TCP connection, opened before the first.
    """
    assert arguments.output
    session: socket.socket | None = None
    if arguments.session:
        session = socket.create_connection((arguments.host, arguments.port), arguments.timeout)
    with open(arguments.output, "a", buffering=1) as output:
        while True:
            # Each line carries the time the probe was sent, so that a reply
            # to a packet sent before some event is not counted after it.
            sent = time.time()
            try:
                if session is not None:
                    session.sendall(b"hello\n")
                    data = session.recv(64)
                    result = "ok" if data == REPLY else f"error: unexpected reply {data!r}"
                else:
                    result = probe_udp(
                        arguments.host, arguments.port, arguments.interface, arguments.timeout
                    )
            except OSError as error:
                result = f"error: {error.strerror or error}"
            output.write(f"{sent:.3f} {result}\n")
            time.sleep(arguments.interval)


if __name__ == "__main__":
    os.umask(0o022)
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        # Ctrl-C on the lab reaches its whole process group: end quietly.
        raise SystemExit(130) from None
