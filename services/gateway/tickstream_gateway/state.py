"""The gateway's resources, opened by the lifespan and shared by every request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis

from tickstream_gateway.hub import Hub
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.gateway")


@dataclass
class GatewayState:
    settings: ServiceSettings
    redis: redis.Redis
    pool: Any  # asyncpg.Pool
    hub: Hub
    feed_ready: asyncio.Event
    failed_tasks: list[str] = field(default_factory=list)

    def background_task_ended(self, task: asyncio.Task[None]) -> None:
        """Log a background task's failure when it happens; /healthz then reports it."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("background task %s failed: %r", task.get_coro(), error)
            self.failed_tasks.append(repr(error))
