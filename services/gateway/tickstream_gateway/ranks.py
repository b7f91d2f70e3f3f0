"""Rank snapshots read from Redis: metrics of one kind ordered by standard deviation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import redis.asyncio as redis

from tickstream_shared.naming import MetricKind, rank_key, stats_key


@dataclass(frozen=True, slots=True)
class RankEntry:
    metric: str
    position: int
    total: int
    label: str
    std: float
    mean: float | None
    count: int


def rank_label(position: int, total: int) -> str:
    """The rank as users read it: largest standard deviation is "1/<total>"."""
    return f"{position}/{total}"


async def rank_snapshot(client: redis.Redis, kind: MetricKind) -> dict[str, Any]:
    """Every metric of `kind`, position 1 = largest standard deviation.

    Ties keep Redis' order (member name, descending), so positions are always 1..N.
    """
    members = await _ranked_with_scores(client, kind)
    total = len(members)
    async with client.pipeline(transaction=False) as pipe:
        for metric, _ in members:
            pipe.hmget(stats_key(metric), "mean", "count")
        details = await pipe.execute() if members else []
    entries = [
        RankEntry(
            metric=metric,
            position=i + 1,
            total=total,
            label=rank_label(i + 1, total),
            std=float(std),
            mean=float(mean) if mean is not None else None,
            count=int(count) if count is not None else 0,
        )
        for i, ((metric, std), (mean, count)) in enumerate(zip(members, details, strict=True))
    ]
    return {"kind": kind, "total": total, "ranks": [asdict(e) for e in entries]}


async def _ranked_with_scores(client: redis.Redis, kind: MetricKind) -> list[tuple[str, float]]:
    return cast(
        list[tuple[str, float]], await client.zrevrange(rank_key(kind), 0, -1, withscores=True)
    )


async def ranked_metrics(client: redis.Redis, kind: MetricKind) -> list[str]:
    """Metric ids of one kind, largest standard deviation first (the order of rank_snapshot)."""
    return [metric for metric, _ in await _ranked_with_scores(client, kind)]


async def metric_rank(client: redis.Redis, metric_id: str, kind: MetricKind) -> tuple[int, int]:
    """(position, total) of one metric; position 0 when it is not ranked."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.zrevrank(rank_key(kind), metric_id)
        pipe.zcard(rank_key(kind))
        index, total = await pipe.execute()
    return (0 if index is None else int(index) + 1), int(total)
