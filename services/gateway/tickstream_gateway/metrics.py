"""Metric views read for the HTTP API: stats, staleness, positions under every measure, feeds."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as redis
from redis.client import NEVER_DECODE

from tickstream_gateway.feeds import decode_feeds, feeds_json, origins_json, shown_state
from tickstream_gateway.listing import ListedMetric, MetricsListing, metric_json
from tickstream_gateway.ranks import RANKINGS, STATS_FIELDS, hmget_many, parse_stats, ranked
from tickstream_shared.errors import BadIdentifier
from tickstream_shared.feed_status import FEEDS_KEY, decode_feed_status
from tickstream_shared.naming import (
    MEASURES_BY_KIND,
    METRICS_KEY,
    MetricId,
    RankMeasure,
    rank_key,
    stats_key,
)


def _wall_ms() -> int:
    # Reports carry the watcher's wall clock, so their age is measured on the wall clock too.
    return time.time_ns() // 1_000_000


async def read_listing(client: redis.Redis) -> MetricsListing:
    """The `/api/metrics` listing: every metric in METRICS_KEY with stats, stale ones too,
    sorted by id, the live order of every ranking and the feed reports (`feeds`, `origins`).

    Positions come from the same rank sets and the same filter as the rank boards, so a
    listing agrees with `/api/ranks` read at the same moment. One MULTI, the feeds hash, and
    one script call per 1,000 metrics (hmget_many): bounded by the metrics stats keeps, read
    at most once a second (see ResponseCache).
    """
    async with client.pipeline(transaction=True) as pipe:
        pipe.smembers(METRICS_KEY)
        for kind, measure in RANKINGS:
            pipe.zrevrange(rank_key(kind, measure), 0, -1)
        members, *orders = await pipe.execute()
    metrics: dict[str, MetricId] = {}
    for raw_id in sorted(members):
        try:
            metrics[raw_id] = MetricId.parse(raw_id)
        except BadIdentifier:
            continue  # not written by stats; nothing to show
    # Undecoded: a field or value that is not UTF-8 is skipped by decode_feeds rather than
    # failing the whole reply.
    raw_feeds = await client.execute_command(  # type: ignore[no-untyped-call]
        "HGETALL", FEEDS_KEY, **{NEVER_DECODE: True}
    )
    hashes = await hmget_many(client, [stats_key(m) for m in metrics], STATS_FIELDS)
    now_ms = _wall_ms()
    feeds = decode_feeds(raw_feeds)
    stats = {
        metric_id: parse_stats(
            metric.kind, {f: v for f, v in zip(STATS_FIELDS, values, strict=True) if v is not None}
        )
        for (metric_id, metric), values in zip(metrics.items(), hashes, strict=True)
    }
    live_orders = {
        ranking: ranked(order, stats) for ranking, order in zip(RANKINGS, orders, strict=True)
    }
    listed = tuple(
        ListedMetric(metric, s, shown_state(feeds.get(metric.market.id), now_ms))
        for metric_id, metric in metrics.items()
        if (s := stats[metric_id]) is not None
    )
    return MetricsListing(
        listed, live_orders, feeds_json(feeds, now_ms), origins_json(feeds, now_ms)
    )


async def feeds_listing(client: redis.Redis) -> dict[str, Any]:
    """The body of `/api/feeds`: each origin's summary (`origins`) and the reports (`feeds`)."""
    # Undecoded, as in metrics_listing.
    raw = await client.execute_command(  # type: ignore[no-untyped-call]
        "HGETALL", FEEDS_KEY, **{NEVER_DECODE: True}
    )
    now_ms = _wall_ms()
    feeds = decode_feeds(raw)
    return {"origins": origins_json(feeds, now_ms), "feeds": feeds_json(feeds, now_ms)}


async def metric_detail(client: redis.Redis, metric: MetricId) -> dict[str, Any] | None:
    """One metric's stats, position under each measure of its kind, feed; None if no stats.

    A stale metric has position null under every measure.
    """
    metric_id = str(metric)
    measures = MEASURES_BY_KIND[metric.kind]
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(stats_key(metric_id))
        for measure in measures:
            pipe.zrevrank(rank_key(metric.kind, measure), metric_id)
            pipe.zcard(rank_key(metric.kind, measure))
        raw, *ranks = await pipe.execute()
    stats = parse_stats(metric.kind, raw)
    if stats is None:
        return None
    # Undecoded, as in metrics_listing; outside the transaction, whose reply is decoded whole.
    report = await client.execute_command(  # type: ignore[no-untyped-call]
        "HGET", FEEDS_KEY, metric.market.id, **{NEVER_DECODE: True}
    )
    feed = shown_state(None if report is None else decode_feed_status(report), _wall_ms())
    positions: dict[RankMeasure, tuple[int | None, int]] = {}
    for i, measure in enumerate(measures):
        index, total = ranks[2 * i], int(ranks[2 * i + 1])
        ranked_here = index is not None and not stats.stale
        positions[measure] = (int(index) + 1 if ranked_here else None, total)
    return metric_json(metric, stats, positions, feed)
