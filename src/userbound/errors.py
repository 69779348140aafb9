"""Error classes shared by the daemon, the control API and the CLI.

Every error that crosses the control socket carries a stable short code; the
CLI maps each code to a documented exit code.
"""

from __future__ import annotations

# CLI exit codes, listed in `userbound --help`.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_PERMITTED = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_FOUND = 5
EXIT_LAB_BROKEN = 6  # userbound lab could not build or play its testbed
EXIT_INTERRUPTED = 130  # as a shell reports a program ended by SIGINT


class UserboundError(Exception):
    """Root of all errors raised on purpose by userbound."""

    code = "internal-error"
    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidConfig(UserboundError, ValueError):
    """A WireGuard configuration file or a setting in it is invalid."""

    code = "invalid-config"
    exit_code = EXIT_USAGE


class InvalidRequest(UserboundError, ValueError):
    """A control request is malformed or names an invalid value."""

    code = "invalid-request"
    exit_code = EXIT_USAGE


class NotPermitted(UserboundError, PermissionError):
    """The caller may not perform the request."""

    code = "not-permitted"
    exit_code = EXIT_NOT_PERMITTED


class NotFound(UserboundError, LookupError):
    """The named tunnel or user does not exist."""

    code = "not-found"
    exit_code = EXIT_NOT_FOUND


class Conflict(UserboundError):
    """The request clashes with an existing tunnel, interface or route."""

    code = "conflict"


class InternalError(UserboundError):
    """A kernel or data-plane operation failed unexpectedly."""

    code = "internal-error"


class DaemonUnreachable(UserboundError, ConnectionError):
    """The CLI could not reach the daemon's control socket."""

    code = "daemon-unreachable"
    exit_code = EXIT_UNREACHABLE


class DaemonNotRunning(DaemonUnreachable):
    """Nothing listens on the control socket: no daemon runs there."""


ERRORS_BY_CODE: dict[str, type[UserboundError]] = {
    cls.code: cls
    for cls in (InvalidConfig, InvalidRequest, NotPermitted, NotFound, Conflict, InternalError)
}


def error_from_code(code: str, message: str) -> UserboundError:
    """Rebuild the error a daemon reply describes; unknown codes become internal errors."""
    return ERRORS_BY_CODE.get(code, InternalError)(message)
