"""Writes metric stats to Redis: one hash per metric and one sorted set per kind for ranks."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as redis

from tickstream_shared.naming import rank_key, stats_key
from tickstream_stats.book import MetricUpdate


async def write_stats(client: redis.Redis, updates: Sequence[MetricUpdate]) -> None:
    """Write all updates in one MULTI/EXEC so readers never see half a batch.

    Idempotent: writing the same updates twice leaves the same state.
    """
    if not updates:
        return
    async with client.pipeline(transaction=True) as pipe:
        for update in updates:
            s = update.stats
            pipe.hset(
                stats_key(update.metric_id),
                mapping={
                    "count": s.count,
                    "mean": repr(s.mean),
                    "std": repr(s.std),
                    "min": repr(s.min),
                    "max": repr(s.max),
                    "last": repr(update.last_value),
                    "last_ts": update.last_ts,
                },
            )
            pipe.zadd(rank_key(update.kind), {update.metric_id: s.std})
        await pipe.execute()
