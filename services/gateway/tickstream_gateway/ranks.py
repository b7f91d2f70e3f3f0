"""Metric stats and rank boards read from Redis, as the stats service writes them."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import redis.asyncio as redis
from redis.client import NEVER_DECODE

from tickstream_gateway.feeds import decode_feeds
from tickstream_gateway.rankboard import RankBoard, RankEntry, rank_label
from tickstream_shared.errors import BadIdentifier
from tickstream_shared.feed_status import FEEDS_KEY
from tickstream_shared.naming import (
    MEASURES_BY_KIND,
    METRIC_KINDS,
    METRICS_KEY,
    MetricKind,
    RankMeasure,
    market_of,
    rank_key,
    stats_key,
)

# A rank set: one kind ordered by one measure.
Ranking = tuple[MetricKind, RankMeasure]
# Every (kind, measure) with a rank set, in a fixed order.
RANKINGS: Final[tuple[Ranking, ...]] = tuple(
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


# The fields of a stats hash the gateway reads (`logret` only where the kind has it).
STATS_FIELDS: Final = (
    "count",
    "mean",
    "std",
    "min",
    "max",
    "cv",
    "logret",
    "last",
    "minute",
    "last_ts",
    "stale",
    "clock",
)
# Keys per script call: Redis runs a script alone, so a long one would hold up every other
# client (about 3 ms for 1,000 HMGETs); the calls of one read go in one pipeline.
_HMGET_CHUNK: Final = 1000
# HMGET of the same fields of many keys in one command: redis-py spends about 35 µs of
# Python per pipelined command (75 ms of CPU for 2,000 HMGETs), the script's one reply about
# 5 (9 ms). Read-only, touches only the keys it is given.
_HMGET_MANY: Final = """
local replies = {}
for i, key in ipairs(KEYS) do
  replies[i] = redis.call('HMGET', key, unpack(ARGV))
end
return replies
"""


async def hmget_many(
    client: redis.Redis, keys: Sequence[str], fields: Sequence[str]
) -> list[list[str | None]]:
    """The values of `fields` (None where absent) of every key, in order, in one round trip.

    Raises what redis-py raises (the script is loaded again if Redis forgot it). Safe to
    cancel: it only reads.
    """
    if not keys:
        return []
    script = client.register_script(_HMGET_MANY)
    async with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(keys), _HMGET_CHUNK):
            await script(keys=keys[start : start + _HMGET_CHUNK], args=fields, client=pipe)
        chunks = cast(list[list[list[str | None]]], await pipe.execute())
    return [values for chunk in chunks for values in chunk]


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


def ranked(order: list[str], stats: Mapping[str, MetricStats | None]) -> list[str]:
    """A rank set's members that can be ranked: with stats and not stale, in the set's order.

    Stats keeps stale metrics out of the rank sets; filtering again here keeps every view
    consistent while stats is between writing a hash and its rank sets.
    """
    return [m for m in order if (s := stats.get(m)) is not None and not s.stale]


async def read_boards(
    client: redis.Redis, held: Mapping[Ranking, RankBoard], reread_all: bool = True
) -> dict[Ranking, RankBoard]:
    """Every ranking as Redis holds it now; a board equal to the one `held` is that one.

    Cost, whatever the update rate: one MULTI of a ZREVRANGE WITHSCORES per ranking (every
    measure's value of every live metric, in one round trip), then one pipeline of HMGET
    `mean count stale` for the metrics whose values differ from `held` (new, or rewritten by
    stats since), or for all of them with `reread_all`. A metric whose values did not move
    keeps the mean and count `held` has (see run_rank_poller for how long at most).
    A metric is ranked only when it is in every rank set of its kind and its hash says it is
    not stale (stats writes both in one MULTI; this keeps an older writer's half-state out).
    Ties keep Redis' order (member name, descending), so positions are always 1..N.
    """
    async with client.pipeline(transaction=True) as pipe:
        for kind, measure in RANKINGS:
            pipe.zrevrange(rank_key(kind, measure), 0, -1, withscores=True)
        replies = cast(list[list[tuple[str, float]]], await pipe.execute())
    orders = dict(zip(RANKINGS, replies, strict=True))
    await _let_others_run()
    known = {e.metric: e for board in held.values() for e in board.entries}
    values: dict[str, tuple[tuple[RankMeasure, float], ...]] = {}
    entries: dict[str, RankEntry] = {}
    unread: list[str] = []
    for kind in METRIC_KINDS:
        measures = MEASURES_BY_KIND[kind]
        scores = [dict(orders[kind, measure]) for measure in measures]
        # In every rank set of the kind (set operations: this runs per metric per poll).
        for metric in set(scores[0]).intersection(*scores[1:]):
            column = [by_measure[metric] for by_measure in scores]
            measured = values[metric] = tuple(zip(measures, column, strict=True))
            entry = known.get(metric)
            if entry is not None and not reread_all and entry.measures == measured:
                entries[metric] = entry
            else:
                unread.append(metric)
        await _let_others_run()
    if unread:
        keys = [stats_key(metric) for metric in unread]
        fields = await hmget_many(client, keys, ("mean", "count", "stale"))
        for metric, (mean, count, stale) in zip(unread, fields, strict=True):
            entry = _entry(metric, values[metric], mean, count, stale)
            if entry is not None:
                entries[metric] = entry
    ranked_markets = {m.rsplit(":", 1)[0] for m in entries if m.endswith(":price")}
    warming = await stats_warming(client, ranked_markets)
    boards: dict[Ranking, RankBoard] = {}
    for (kind, measure), order in orders.items():
        ranked_entries = tuple(entries[m] for m, _ in order if m in entries)
        board = RankBoard(kind, measure, ranked_entries, warming)
        previous = held.get((kind, measure))
        same = previous is not None and board.same_as(previous)
        boards[kind, measure] = previous if same and previous is not None else board
        await _let_others_run()
    return boards


async def stats_warming(client: redis.Redis, ranked_markets: Collection[str]) -> bool:
    """True while the rankings hold no market at all, or a market its watcher reports data
    for has no stats yet: stats is warming up after a start or restart (or has not caught up
    with a new market). A stale market has stats (it left the ranks on purpose): not warming.

    One HGETALL of the feed reports (market ids and small structs), and an SMISMEMBER only
    for reported markets that are not ranked (usually none). Raises what redis-py raises.
    """
    if not ranked_markets:
        return True
    raw = await client.execute_command(  # type: ignore[no-untyped-call]
        "HGETALL", FEEDS_KEY, **{NEVER_DECODE: True}
    )
    publishing = [m for m, feed in decode_feeds(raw).items() if feed.last_data_ms is not None]
    missing = [m for m in publishing if m not in ranked_markets]
    if not missing:
        return False
    known = await client.smismember(METRICS_KEY, [f"{m}:price" for m in missing])
    return not all(known)


async def _let_others_run() -> None:
    # A poll is ~35 ms of CPU at 1,000 markets (7 rankings); in one stretch it held every
    # HTTP request waiting meanwhile, once a second, which was /api/ranks' p99. Handing the
    # loop back between kinds and rankings cuts it into stretches of a few ms
    # (docs/performance.md). Nothing read so far is shared until the poll returns.
    await asyncio.sleep(0)


def _entry(
    metric: str,
    measured: tuple[tuple[RankMeasure, float], ...],
    mean: str | None,
    count: str | None,
    stale: str | None,
) -> RankEntry | None:
    """The entry of a ranked metric, or None without a complete, live stats hash."""
    if mean is None or count is None or stale != "0":
        return None
    try:
        return RankEntry(
            metric, market_of(metric.rsplit(":", 1)[0]), measured, float(mean), int(count)
        )
    except (ValueError, BadIdentifier):
        return None


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
