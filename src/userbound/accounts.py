"""Look up users by name or uid; a uid without a passwd entry is still a user."""

from __future__ import annotations

import pwd

from userbound.errors import NotFound

MAX_UID = 0xFFFFFFFE  # (uid_t)-1 means "no uid" to the kernel


def user_name(uid: int) -> str | None:
    """Return the user name of a uid, or None for a uid without a passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def resolve_user(user: str | int) -> int:
    """Return the uid for a user name or a numeric uid.

    Raises NotFound for a name without a passwd entry.
    """
    if isinstance(user, str) and is_uid_text(user):
        user = int(user)
    if isinstance(user, int):
        if not 0 <= user <= MAX_UID:
            raise NotFound(f"uid {user} is outside 0..{MAX_UID}")
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):
        # ValueError: a name with a NUL byte, which no passwd entry can have.
        raise NotFound(
            f"user {user[:64]!r} not found; give an existing user name or a uid"
        ) from None


def is_uid_text(text: str) -> bool:
    """Return whether text is a uid written in ASCII digits."""
    return text.isascii() and text.isdigit() and len(text) <= 10
