"""Redis adapter: metric hashes, rank sets, the metric set and the shared event-time clock."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as redis

from tickstream_shared.naming import (
    CLOCK_KEY,
    CLOCK_MEMBER,
    MEASURES_BY_KIND,
    METRICS_KEY,
    RankMeasure,
    rank_key,
    stats_key,
)
from tickstream_stats.book import MetricUpdate
from tickstream_stats.window import WindowStats


def _score(stats: WindowStats, measure: RankMeasure) -> float:
    if measure == "std":
        return stats.std
    if measure == "cv":
        return stats.cv
    return stats.logret or 0.0


def _fields(update: MetricUpdate, stats: WindowStats) -> dict[str, str | int]:
    fields: dict[str, str | int] = {
        "count": stats.count,
        "mean": repr(stats.mean),
        "std": repr(stats.std),
        "min": repr(stats.min),
        "max": repr(stats.max),
        "cv": repr(stats.cv),
        "last": repr(update.last_value),
        "minute": update.minute,
        "last_ts": update.last_ts,
        "stale": "1" if update.stale else "0",
        "clock": update.clock,
    }
    if stats.logret is not None:
        fields["logret"] = repr(stats.logret)
    return fields


async def write_stats(client: redis.Redis, updates: Sequence[MetricUpdate]) -> None:
    """Write all updates in one MULTI/EXEC so readers never see half a batch.

    A metric with data gets its hash and joins METRICS_KEY, and every rank set of its kind
    unless it is stale (then it leaves them); a gone metric loses its hash and leaves every
    set. Idempotent: writing the same updates twice leaves the same state.
    """
    if not updates:
        return
    async with client.pipeline(transaction=True) as pipe:
        for update in updates:
            metric_id = update.metric_id
            measures = MEASURES_BY_KIND[update.kind]
            stats = update.stats
            if stats is None:
                pipe.delete(stats_key(metric_id))
                pipe.srem(METRICS_KEY, metric_id)
                for measure in measures:
                    pipe.zrem(rank_key(update.kind, measure), metric_id)
                continue
            pipe.hset(stats_key(metric_id), mapping=_fields(update, stats))  # type: ignore[arg-type]
            pipe.sadd(METRICS_KEY, metric_id)
            for measure in measures:
                if update.stale:
                    pipe.zrem(rank_key(update.kind, measure), metric_id)
                else:
                    pipe.zadd(rank_key(update.kind, measure), {metric_id: _score(stats, measure)})
        await pipe.execute()


async def raise_clock(client: redis.Redis, minute: int) -> int:
    """Raise the shared event-time clock to `minute` (never lower it); returns the clock.

    One MULTI of ZADD GT and ZSCORE, so the value read is the one this write left or a newer
    one. Idempotent.
    """
    async with client.pipeline(transaction=True) as pipe:
        pipe.zadd(CLOCK_KEY, {CLOCK_MEMBER: minute}, gt=True)
        pipe.zscore(CLOCK_KEY, CLOCK_MEMBER)
        _, score = await pipe.execute()
    return int(score)


async def read_clock(client: redis.Redis) -> int | None:
    """The shared event-time clock, or None if no stats instance has set it yet."""
    score = await client.zscore(CLOCK_KEY, CLOCK_MEMBER)
    return None if score is None else int(score)


async def clock_present(client: redis.Redis) -> bool:
    """Whether the shared clock exists: gone means Redis lost the derived state."""
    return bool(await client.exists(CLOCK_KEY))
