"""Redis connection helper shared by stats (writer) and gateway (reader)."""

from __future__ import annotations

import redis.asyncio as redis

from tickstream_shared.settings import RedisSettings


def connect(settings: RedisSettings) -> redis.Redis:
    """A client with decoded responses; caller calls `aclose()`. Connects lazily."""
    return redis.Redis.from_url(settings.url, decode_responses=True)
