"""The gateway's resources, opened by the lifespan and shared by every request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis

from tickstream_gateway.history import MarketHistory
from tickstream_gateway.httpcache import ResponseCache
from tickstream_gateway.hub import Hub
from tickstream_shared.settings import ServiceSettings


@dataclass
class GatewayState:
    settings: ServiceSettings
    redis: redis.Redis
    pool: Any  # asyncpg.Pool
    hub: Hub
    history: MarketHistory
    feed_ready: asyncio.Event
    # The newest failure of a background task (each is supervised and restarted).
    last_task_failure: str | None = None
    task_failures: int = 0
    # Encoded HTTP answers, refreshed when they change or age (the rank poller fills ranks).
    cache: ResponseCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = ResponseCache(self.settings.gateway.rank_interval_ms / 1000)

    def task_failed(self, error: BaseException) -> None:
        """Remember a background task's failure for /readyz; the supervisor restarts it."""
        self.task_failures += 1
        self.last_task_failure = repr(error)[:200]
