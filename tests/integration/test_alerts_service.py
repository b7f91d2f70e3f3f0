"""Alerts service on real broker and PostgreSQL: warm-up from stored bars and stored alerts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import deadline, running_infra, unique_exchange
from tickstream_alerts.service import run
from tickstream_shared import alert_store, db
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Alert, Tick
from tickstream_shared.settings import ServiceSettings


@pytest.fixture
def own_infra() -> Iterator[LocalInfra]:
    """A broker and PostgreSQL for this test alone: the `alerts` group reads every tick topic."""
    with running_infra("tickstream-alerts-") as running:
        yield running


def bar(market: Market, seq: int, minute: int, volume: float) -> Tick:
    ts = minute + 59_000
    return Tick(market.id, minute, seq, ts, ts, 100.0, 100.0, 100.0, 100.0, volume, 5, True)


async def test_restart_keeps_the_hour_and_the_cooldown(own_infra: LocalInfra) -> None:
    """Stored bars form the first tick's baseline and a stored alert's cooldown still holds."""
    infra = own_infra
    settings = ServiceSettings.from_env(infra.environment())
    assert settings.alerts.cooldown_seconds == 3600  # the defaults under test
    market = Market(unique_exchange(), "btc", "usdt")
    volume_metric = market.metric_id("volume")
    now_minute = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
    start = now_minute - 3 * 3_600_000

    def at(index: int) -> int:
        return start + index * MINUTE_MS

    pool = await db.create_pool(settings.database)
    try:
        await db.ensure_schema(pool, settings.database)
        # What an earlier run left: minutes 0..89 stored by stats, a volume alert at minute 40,
        # and a stored bar of minute 89 that was updated after the first tick to evaluate.
        stored = [bar(market, i, at(i), 10.0) for i in range(89)]
        stored.append(bar(market, 1000, at(89), 10.0))
        await db.store_bars(pool, stored)
        earlier = Alert(
            alert_id=f"{volume_metric}@{at(40)}",
            metric=volume_metric,
            kind="volume",
            minute=at(40),
            exchange_ts=at(40) + 59_000,
            seq=40,
            value=100.0,
            mean=10.0,
            factor=3.0,
            ratio=10.0,
            window_minutes=60,
            samples=40,
        )
        await alert_store.store_alerts(pool, [earlier])
        await alert_store.mark_published(pool, [earlier])
    finally:
        await pool.close()

    # Minute 90 is 50 minutes after the stored alert (cooldown); minute 100 is 60 after it.
    ticks = [bar(market, 900, at(90), 100.0), bar(market, 901, at(100), 1000.0)]
    await ensure_topics(settings.kafka, [market.topic])
    producer = make_producer(settings.kafka, client_id="test")
    await producer.start()
    try:
        for tick in ticks:
            await producer.send(market.topic, tick.encode(), key=tick.market.encode())
        await producer.flush()
    finally:
        await producer.stop()

    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, stop))
    offsets = AIOKafkaConsumer(bootstrap_servers=infra.kafka_bootstrap_servers, group_id="alerts")
    await offsets.start()
    conn = await asyncpg.connect(infra.database_url)
    try:
        # Committed means evaluated, stored and published: then the table is final.
        async with asyncio.timeout(deadline(60)):
            while await offsets.committed(TopicPartition(market.topic, 0)) != len(ticks):
                assert not service.done(), service
                await asyncio.sleep(0.1)
        rows = await conn.fetch(
            "SELECT alert_id, minute, seq, value, mean, samples, published FROM alerts "
            "WHERE metric LIKE $1 ORDER BY minute",
            f"{market.id}:%",
        )
    finally:
        stop.set()
        await asyncio.wait_for(service, deadline(30))
        await conn.close()
        await offsets.stop()
    # Minute 89 was left out (seq 1000 is newer than the first tick), so minute 100's hour
    # holds minutes 40..88 and 90: mean (49 x 10 + 100) / 50 = 11.8.
    assert [tuple(r) for r in rows] == [
        (earlier.alert_id, at(40), 40, 100.0, 10.0, 40, True),
        (f"{volume_metric}@{at(100)}", at(100), 901, 1000.0, 11.8, 50, True),
    ]


async def commit_as(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    """Commit `offset` for `group` as a consumer that never joins it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


async def test_warm_up_waits_for_what_stats_has_not_stored_yet(
    own_infra: LocalInfra, caplog: pytest.LogCaptureFixture
) -> None:
    """Alerts restarted ahead of a lagging stats waits, then judges the whole hour."""
    infra = own_infra
    settings = ServiceSettings.from_env(infra.environment())
    market = Market(unique_exchange(), "eth", "usdt")
    now_minute = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
    start = now_minute - 3 * 3_600_000

    def volume(i: int) -> float:
        return 100.0 if i == 69 else 40.0 if 60 <= i <= 64 else 10.0

    ticks = [bar(market, i, start + i * MINUTE_MS, volume(i)) for i in range(70)]
    await ensure_topics(settings.kafka, [market.topic])
    producer = make_producer(settings.kafka, client_id="test")
    await producer.start()
    try:
        for tick in ticks:
            await producer.send(market.topic, tick.encode(), key=tick.market.encode())
        await producer.flush()
    finally:
        await producer.stop()
    tp = TopicPartition(market.topic, 0)
    # Before the restart: alerts had consumed minutes 0..64; stats had stored only 0..59.
    pool = await db.create_pool(settings.database)
    try:
        await db.ensure_schema(pool, settings.database)
        await db.store_bars(pool, ticks[:60])
        await commit_as(infra.kafka_bootstrap_servers, "alerts", tp, 65)
        await commit_as(infra.kafka_bootstrap_servers, "stats", tp, 60)

        stop = asyncio.Event()
        service = asyncio.create_task(run(settings, stop))
        offsets = AIOKafkaConsumer(
            bootstrap_servers=infra.kafka_bootstrap_servers, group_id="alerts"
        )
        await offsets.start()
        try:
            async with asyncio.timeout(deadline(30)):  # joined, polled, waiting for stats
                while "waiting for stats to store" not in caplog.text:
                    assert not service.done(), service
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            assert await offsets.committed(tp) == 65
            # stats catches up
            await db.store_bars(pool, ticks[60:])
            await commit_as(infra.kafka_bootstrap_servers, "stats", tp, 70)
            async with asyncio.timeout(deadline(60)):
                while await offsets.committed(tp) != 70:
                    assert not service.done(), service
                    await asyncio.sleep(0.1)
            rows = await pool.fetch(
                "SELECT minute, mean, samples FROM alerts WHERE metric = $1",
                market.metric_id("volume"),
            )
        finally:
            stop.set()
            await asyncio.wait_for(service, deadline(30))
            await offsets.stop()
    finally:
        await pool.close()
    # The hour before minute 69 is minutes 9..68: 51 x 10, 5 x 40 (stored late), 4 x 10.
    assert [tuple(r) for r in rows] == [(start + 69 * MINUTE_MS, 12.5, 60)]
