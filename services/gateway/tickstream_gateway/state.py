"""The gateway's resources, opened by the lifespan and shared by every request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from tickstream_gateway.hub import Hub
from tickstream_shared.settings import ServiceSettings


@dataclass
class GatewayState:
    settings: ServiceSettings
    redis: redis.Redis
    pool: Any  # asyncpg.Pool
    hub: Hub
    feed_ready: asyncio.Event
