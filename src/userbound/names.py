"""Tunnel names, which are also interface names."""

from __future__ import annotations

import re

from userbound.errors import InvalidRequest

# wg-quick's rule for interface names; Linux allows at most 15 characters.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")
# Linux rejects these as interface names: "." and ".." are path names, and
# "all" and "default" are taken by the per-interface sysctl folders.
RESERVED_NAMES = {".", "..", "all", "default"}


def check_name(name: str) -> str:
    """Return the name if it is a valid tunnel (and interface) name."""
    if not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
        raise InvalidRequest(
            f"field 'name': {name!r} is not a valid tunnel name; use 1 to 15 letters, digits "
            "or _=+.-, other than . .. all default (it becomes the interface name)"
        )
    return name
