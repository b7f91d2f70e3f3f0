"""Readiness: whether the broker, Redis and PostgreSQL a service uses answer it right now."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

import asyncpg
from aiokafka.client import AIOKafkaClient

from tickstream_shared import redis_client
from tickstream_shared.settings import ServiceSettings

Dependency = Literal["broker", "redis", "database"]

# What each service talks to (docs/operations.md, "Running services separately").
DEPENDENCIES: Final[Mapping[str, tuple[Dependency, ...]]] = {
    "watcher": ("broker", "redis"),
    "stats": ("broker", "redis", "database"),
    "alerts": ("broker", "database"),
    "gateway": ("broker", "redis", "database"),
}
OK: Final = "ok"


async def check_broker(settings: ServiceSettings) -> None:
    """A metadata request answered by one of the bootstrap servers; raises if none answers.

    A new client each time: it proves the broker answers now, not that a connection opened
    before an outage is still cached.
    """
    client = AIOKafkaClient(
        bootstrap_servers=settings.kafka.bootstrap_servers, client_id="tickstream-readiness"
    )
    try:
        await client.bootstrap()
    finally:
        await client.close()


async def check_redis(settings: ServiceSettings) -> None:
    """Redis answers PING; raises otherwise."""
    client = redis_client.connect(settings.redis)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def check_database(settings: ServiceSettings) -> None:
    """PostgreSQL accepts a connection and answers `SELECT 1`; raises otherwise."""
    conn: Any = await asyncpg.connect(settings.database.url)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


_CHECKS: Final[Mapping[Dependency, Callable[[ServiceSettings], Awaitable[None]]]] = {
    "broker": check_broker,
    "redis": check_redis,
    "database": check_database,
}


async def outcome(check: Callable[[], Awaitable[object]], timeout_s: float) -> str:
    """Run `check()`: "ok", or "error: ..." saying what failed; abandoned after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            await check()
    except TimeoutError:
        return f"error: no answer within {timeout_s:g}s"
    except Exception as exc:  # any failure means not ready; the reason is reported
        return f"error: {exc!r}"
    return OK


async def readiness(
    settings: ServiceSettings, dependencies: tuple[Dependency, ...]
) -> dict[str, str]:
    """Check every dependency at once, each within READINESS_TIMEOUT_MS; never raises.

    Returns each dependency's outcome, in the order given. Safe to cancel: the checks'
    connections are closed.
    """
    timeout_s = settings.observability.readiness_timeout_ms / 1000
    outcomes = await asyncio.gather(
        *(
            outcome(functools.partial(_CHECKS[dependency], settings), timeout_s)
            for dependency in dependencies
        )
    )
    return dict(zip(dependencies, outcomes, strict=True))


def health_body(checks: Mapping[str, str]) -> tuple[int, dict[str, str]]:
    """The status code and JSON body of a health answer: 200 when every check is "ok"."""
    healthy = all(value == OK for value in checks.values())
    return (200 if healthy else 503), {"status": "ok" if healthy else "unhealthy", **checks}
