"""The error types whose messages tlray shows without a traceback: bad input (exit 2) and a data
store that kept failing (exit 3)."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class UserError(Exception):
    """Bad input — spec, data or paths. The CLI prints the message, no traceback, and exits 2."""


class ReadFailure(Exception):
    """An image that could not be *read* (not: could not be decoded) after retries. It stops the
    run (exit 3) and is never counted as a bad image; running the same command again resumes."""

    def __init__(self, location: str, reason: str, attempts: int):
        # not `.cause`: Ray's wrapped errors keep the original exception under that name
        self.location, self.reason, self.attempts = location, reason, attempts
        super().__init__(f"{READ_FAILURE_PREFIX} cannot read {location} after {attempts} attempt(s): {reason}")

    def __reduce__(self):  # crosses process boundaries (Ray task -> train worker -> driver) intact
        return type(self), (self.location, self.reason, self.attempts)


READ_FAILURE_PREFIX = "I/O failure:"  # Ray Data retries map tasks whose error message matches it


def user_error_inside(exc: BaseException) -> UserError | None:
    """The UserError behind an exception that Ray wrapped (task, actor and worker-group errors)."""
    return error_inside(exc, UserError)


def error_inside(exc: BaseException, kind: type[E]) -> E | None:
    """The `kind` error behind an exception that Ray wrapped (task, actor and worker-group errors)."""
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError(X) is an X whose .cause is the original
        cause = cause if isinstance(cause, BaseException) else None
        if isinstance(current, kind) and not isinstance(cause, kind):
            return current
        stack += [current.__cause__, current.__context__, cause]
        stack += list((getattr(current, "worker_failures", None) or {}).values())
    return None
