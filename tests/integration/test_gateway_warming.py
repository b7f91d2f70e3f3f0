"""`/api/ranks` says `warming` until the rankings hold every market its watcher publishes."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as redis

from tests.conftest import deadline
from tests.integration.test_gateway_api import http_fresh, http_json, write_stats
from tickstream_gateway.service import run
from tickstream_shared.feed_status import FEEDS_KEY, FeedStatus
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import Market
from tickstream_shared.settings import (
    DatabaseSettings,
    GatewaySettings,
    KafkaSettings,
    RedisSettings,
    ServiceSettings,
)

REDIS_DB = 9  # this test's alone: warming depends on every market in it


def _report(data: bool) -> bytes:
    now = time.time_ns() // 1_000_000
    return FeedStatus("synthetic", "synthetic", "live", now, now if data else None).encode()


async def test_ranks_say_warming_until_every_publishing_market_is_ranked(
    infra: LocalInfra,
) -> None:
    """Empty ranks are warming; a publishing market without stats keeps them warming; once
    every one has stats (ranked, or stale on purpose) `warming` is false."""
    port = free_port()
    redis_url = f"redis://127.0.0.1:{infra.redis_port}/{REDIS_DB}"
    settings = ServiceSettings(
        kafka=KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers),
        redis=RedisSettings(url=redis_url),
        database=DatabaseSettings(url=infra.database_url),
        gateway=GatewaySettings(port=port, rank_interval_ms=100),
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    stop = asyncio.Event()
    serving = asyncio.create_task(run(settings, stop))
    base = f"127.0.0.1:{port}"
    exchange = f"t{uuid.uuid4().hex[:10]}"
    first, second, quiet, waiting = (
        Market(exchange, base_name, "usd") for base_name in ("btc", "eth", "sol", "xrp")
    )
    path = "/api/ranks?kind=price"
    try:
        async with asyncio.timeout(deadline(60)):
            while (await http_json(base, "/healthz"))[0] != 200:
                assert not serving.done(), "gateway stopped"
                await asyncio.sleep(0.1)
        status, body = await http_json(base, path)
        assert (status, body["total"], body["warming"]) == (200, 0, True)

        reports = {m.id: _report(data=True) for m in (first, second, quiet)}
        # A market connecting, with no data yet, is not waited for.
        reports[waiting.id] = _report(data=False)
        await client.hset(FEEDS_KEY, mapping=reports)  # type: ignore[arg-type]
        await write_stats(client, first, std=1.0, cv=0.1, logret=0.01, stale=False)
        _, body = await http_fresh(base, path, lambda b: b["total"] == 1)
        assert body["warming"] is True, "second and quiet publish but have no stats yet"

        await write_stats(client, second, std=2.0, cv=0.2, logret=0.02, stale=False)
        await write_stats(client, quiet, std=2.0, cv=0.2, logret=0.02, stale=True)
        _, body = await http_fresh(base, path, lambda b: not b["warming"])
        assert body["total"] == 2
        assert [r["metric"] for r in body["ranks"]] == [
            second.metric_id("price"),
            first.metric_id("price"),
        ]
    finally:
        stop.set()
        await serving
        await client.flushdb()
        await client.aclose()
