"""Metric stats and rank snapshots read from Redis, as the stats service writes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import redis.asyncio as redis

from tickstream_shared.naming import (
    MEASURES_BY_KIND,
    METRIC_KINDS,
    MetricKind,
    RankMeasure,
    rank_key,
    stats_key,
)

# Every (kind, measure) with a rank set, in a fixed order.
RANKINGS: Final[tuple[tuple[MetricKind, RankMeasure], ...]] = tuple(
    (kind, measure) for kind in METRIC_KINDS for measure in MEASURES_BY_KIND[kind]
)


@dataclass(frozen=True, slots=True)
class MetricStats:
    """One metric's stats hash, parsed (see the Redis contract in docs/architecture.md)."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    cv: float
    logret: float | None  # kinds ranked by logret only (price)
    last: float
    minute: int
    last_ts: int
    stale: bool
    clock: int

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "cv": self.cv,
        }
        if self.logret is not None:
            body["logret"] = self.logret
        body |= {
            "last": self.last,
            "minute": self.minute,
            "last_ts": self.last_ts,
            "stale": self.stale,
            "clock": self.clock,
        }
        return body


def parse_stats(kind: MetricKind, raw: Mapping[str, str]) -> MetricStats | None:
    """The stats of a hash, or None when it is missing or incomplete (being rewritten)."""
    try:
        return MetricStats(
            count=int(raw["count"]),
            mean=float(raw["mean"]),
            std=float(raw["std"]),
            min=float(raw["min"]),
            max=float(raw["max"]),
            cv=float(raw["cv"]),
            logret=float(raw["logret"]) if "logret" in MEASURES_BY_KIND[kind] else None,
            last=float(raw["last"]),
            minute=int(raw["minute"]),
            last_ts=int(raw["last_ts"]),
            stale=raw["stale"] == "1",
            clock=int(raw["clock"]),
        )
    except (KeyError, ValueError):
        return None


def rank_label(position: int, total: int) -> str:
    """The rank as users read it: the largest score is "1/<total>"."""
    return f"{position}/{total}"


def ranked(order: list[str], stats: Mapping[str, MetricStats | None]) -> list[str]:
    """A rank set's members that can be ranked: with stats and not stale, in the set's order.

    Stats keeps stale metrics out of the rank sets; filtering again here keeps every view
    consistent while stats is between writing a hash and its rank sets.
    """
    return [m for m in order if (s := stats.get(m)) is not None and not s.stale]


async def rank_snapshot(
    client: redis.Redis, kind: MetricKind, measure: RankMeasure
) -> dict[str, Any]:
    """Every live metric of `kind` ranked by `measure`, position 1 = largest score.

    Ties keep Redis' order (member name, descending), so positions are always 1..N.
    """
    scored = cast(
        list[tuple[str, float]],
        await client.zrevrange(rank_key(kind, measure), 0, -1, withscores=True),
    )
    async with client.pipeline(transaction=False) as pipe:
        for metric, _ in scored:
            pipe.hgetall(stats_key(metric))
        hashes = await pipe.execute() if scored else []
    stats = {m: parse_stats(kind, raw) for (m, _), raw in zip(scored, hashes, strict=True)}
    members = ranked([m for m, _ in scored], stats)
    scores = dict(scored)
    total = len(members)
    entries = []
    for position, metric in enumerate(members, start=1):
        s = stats[metric]
        assert s is not None  # ranked() kept only metrics with stats
        entry: dict[str, Any] = {
            "metric": metric,
            "position": position,
            "total": total,
            "label": rank_label(position, total),
            "value": scores[metric],
            "std": s.std,
            "cv": s.cv,
        }
        if s.logret is not None:
            entry["logret"] = s.logret
        entry |= {"mean": s.mean, "count": s.count}
        entries.append(entry)
    return {"kind": kind, "by": measure, "total": total, "ranks": entries}


def positions_json(positions: Mapping[RankMeasure, tuple[int | None, int]]) -> dict[str, Any]:
    """`ranks` per measure, plus top-level position/total/rank for std (older clients)."""
    ranks = {
        measure: {
            "position": position,
            "total": total,
            "rank": None if position is None else rank_label(position, total),
        }
        for measure, (position, total) in positions.items()
    }
    return {"ranks": ranks, **ranks["std"]}
