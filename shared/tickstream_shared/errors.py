"""The one exception tree of tickstream; retry decisions are made by type, never by message."""

from __future__ import annotations

from typing import Final

# Error messages quote untrusted input (a client's frame, a record's key) at most this long,
# so a client never gets kilobytes of its own frame back and logs stay readable.
MAX_ECHO_CHARS: Final = 64


def echo(value: str) -> str:
    """The repr of at most MAX_ECHO_CHARS characters of `value`, marked `…` when cut."""
    if len(value) <= MAX_ECHO_CHARS:
        return repr(value)
    return f"{value[:MAX_ECHO_CHARS]!r}…"


class TickstreamError(Exception):
    """Base class of every error tickstream raises on purpose."""


class ConfigError(TickstreamError):
    """A setting is missing or cannot be parsed; carries the variable name."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class BadMessage(TickstreamError):
    """A message could not be decoded or failed validation; it is counted and skipped."""

    def __init__(self, problem: str, raw: bytes | str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.raw = raw


class BadIdentifier(TickstreamError):
    """A market or metric id does not follow `<exchange>:<base>-<quote>[:<kind>]`."""


class InfraError(TickstreamError):
    """A local infrastructure process (broker, Redis, PostgreSQL) failed to start or stop."""


class DependencyUnavailable(TickstreamError):
    """A server the request needs (`dependency`: PostgreSQL, Redis, the broker) is unreachable
    or failing; the gateway answers 503 and the request may be tried again later."""

    def __init__(self, dependency: str, cause: BaseException) -> None:
        super().__init__(f"{dependency} is unavailable: {cause!r}")
        self.dependency = dependency
        self.cause = cause
