"""Stats killed mid-stream and restarted: ticks stored once, windows not double-counted."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import redis.asyncio as redis

from tests.conftest import deadline, unique_exchange
from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market, rank_key, stats_key
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import DatabaseSettings, KafkaSettings

TICKS = 3000
MINUTE_MS = 60_000
DAY_MS = 86_400_000


def price(i: int) -> float:
    return 30_000 + 500 * math.sin(i / 50) + (i % 7) * 0.01


def start_stats(infra: LocalInfra, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **infra.environment(), "STATS_BATCH_MAX": "100"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tickstream_stats"], env=env, stdout=out, stderr=out
        )


async def poll_until(check: Callable[[], Awaitable[bool]], within: float = 60) -> None:
    async with asyncio.timeout(deadline(within)):
        while not await check():  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.1)


async def test_kill_and_restart_stores_once_and_counts_once(
    infra: LocalInfra, tmp_path: Path
) -> None:
    """After SIGKILL and restart rows are exactly once, stats exact, and Redis is rebuilt."""
    market = Market(unique_exchange(), "btc", "usdt")
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    await ensure_topics(kafka, [market.topic])
    ticks = [
        Tick(market.exchange, "btc", "usdt", i, (i + 1) * MINUTE_MS, 0, price(i), 1.0 + i % 5)
        for i in range(TICKS)
    ]
    producer = make_producer(kafka, client_id="test")
    await producer.start()
    try:
        for tick in ticks:
            await producer.send(market.topic, tick.encode(), key=market.id.encode())
        await producer.flush()
    finally:
        await producer.stop()

    pool = await db.create_pool(DatabaseSettings(url=infra.database_url))
    try:
        await db.ensure_schema(pool)
    finally:
        await pool.close()
    conn = await asyncpg.connect(infra.database_url)
    client = redis.Redis.from_url(infra.redis_url, decode_responses=True)
    log = tmp_path / "stats.log"
    stats = start_stats(infra, log)
    try:

        async def stored() -> int:
            value = await conn.fetchval("SELECT count(*) FROM ticks WHERE market=$1", market.id)
            return int(value or 0)

        async def partly_stored() -> bool:
            assert stats.poll() is None, log.read_text()
            return await stored() >= 800

        await poll_until(partly_stored)
        stats.send_signal(signal.SIGKILL)  # mid-stream: no clean commit of what is in flight
        stats.wait()
        assert await stored() < TICKS
        stats = start_stats(infra, log)

        async def all_counted() -> bool:
            assert stats.poll() is None, log.read_text()
            last_ts = await client.hget(stats_key(market.metric_id("price")), "last_ts")
            return last_ts == str(ticks[-1].exchange_ts) and await stored() == TICKS

        await poll_until(all_counted)
        distinct = await conn.fetchval(
            "SELECT count(DISTINCT (exchange_ts, seq)) FROM ticks WHERE market=$1", market.id
        )
        assert distinct == TICKS
        raw = await client.hgetall(stats_key(market.metric_id("price")))
        window = [t.price for t in ticks if t.exchange_ts > ticks[-1].exchange_ts - DAY_MS]
        assert int(raw["count"]) == len(window) == 1440
        assert math.isclose(float(raw["std"]), statistics.pstdev(window), rel_tol=1e-9)
        assert math.isclose(float(raw["mean"]), statistics.fmean(window), rel_tol=1e-12)
        assert float(raw["min"]) == min(window) and float(raw["max"]) == max(window)

        # Redis is derived state: wiped, with no new ticks, a restart restores it from storage.
        stats.send_signal(signal.SIGTERM)
        assert stats.wait(deadline(30)) == 0, "stats did not stop cleanly on SIGTERM"
        await client.delete(stats_key(market.metric_id("price")))
        await client.zrem(rank_key("price"), market.metric_id("price"))
        stats = start_stats(infra, log)

        async def restored() -> bool:
            assert stats.poll() is None, log.read_text()
            std = await client.hget(stats_key(market.metric_id("price")), "std")
            return std is not None and math.isclose(float(std), float(raw["std"]), rel_tol=1e-9)

        await poll_until(restored)
        score = await client.zscore(rank_key("price"), market.metric_id("price"))
        assert score is not None and math.isclose(score, float(raw["std"]), rel_tol=1e-9)
    finally:
        if stats.poll() is None:
            stats.send_signal(signal.SIGTERM)
            stats.wait(deadline(30))
        await client.aclose()
        await conn.close()
    assert stats.returncode == 0, "stats did not stop cleanly on SIGTERM"
