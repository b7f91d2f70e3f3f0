"""Poison records on a tick topic: stats and alerts dead-letter them, commit past, go on."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import deadline, running_infra, unique_exchange
from tickstream_alerts.service import run as run_alerts
from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import DEADLETTER_TOPIC, Market
from tickstream_shared.redis_client import connect
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import ServiceSettings
from tickstream_stats.service import run as run_stats


@pytest.fixture
def own_infra() -> Iterator[LocalInfra]:
    """A broker of its own: the stats and alerts groups read every tick topic."""
    with running_infra("tickstream-deadletter-") as running:
        yield running


def poison(market: Market, good: Tick) -> dict[str, bytes]:
    """The bad records an attacker or a broken producer could write, by name."""
    fields = json.loads(good.encode())
    year_2100 = 4_102_444_800_000 - 4_102_444_800_000 % MINUTE_MS
    future = {**fields, "minute": year_2100, "exchange_ts": year_2100, "received_ts": year_2100}
    return {
        # Deep nesting in an ignored field, small enough to pass the size bound.
        "nested": good.encode()[:-1] + b',"extra":' + b"[" * 1900 + b"]" * 1900 + b"}",
        "oversized": b"[" * 100_000 + b"]" * 100_000,
        "huge_ts": json.dumps({**fields, "exchange_ts": 1e16}).encode(),
        "nan": json.dumps({**fields, "close": float("nan")}).encode(),
        "wrong_type": json.dumps({**fields, "volume": "lots"}).encode(),
        "future": json.dumps(future).encode(),
        "other_market": json.dumps({**fields, "market": "x:y-z"}).encode(),
        "not_json": b"\xff\xfe",
    }


async def test_poison_is_dead_lettered_and_the_window_keeps_its_data(own_infra: LocalInfra) -> None:
    """Every poison record lands in `deadletter` once per group; the good ticks count."""
    infra = own_infra
    settings = ServiceSettings.from_env(infra.environment())
    market = Market(unique_exchange(), "btc", "usdt")
    now = time.time_ns() // 1_000_000
    minute = now - now % MINUTE_MS - 10 * MINUTE_MS
    good = [
        Tick(
            market.id,
            minute + i * MINUTE_MS,
            i + 1,
            minute + (i + 1) * MINUTE_MS,
            now,
            100.0 + i,
            101.0 + i,
            99.0,
            100.5,
            5.0,
            3,
            True,
        )
        for i in range(3)
    ]
    bad = poison(market, good[0])
    await ensure_topics(settings.kafka, [market.topic])
    producer = make_producer(settings.kafka, client_id="test")
    await producer.start()
    try:
        await producer.send(market.topic, good[0].encode(), key=market.id.encode())
        for value in bad.values():
            await producer.send(market.topic, value, key=market.id.encode())
        for tick in good[1:]:
            await producer.send(market.topic, tick.encode(), key=market.id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    total = len(good) + len(bad)

    stop = asyncio.Event()
    services = [
        asyncio.create_task(run_stats(settings, stop)),
        asyncio.create_task(run_alerts(settings, stop)),
    ]
    groups = {}
    for group in ("stats", "alerts"):
        groups[group] = AIOKafkaConsumer(
            bootstrap_servers=infra.kafka_bootstrap_servers, group_id=group
        )
        await groups[group].start()
    letters = AIOKafkaConsumer(
        bootstrap_servers=infra.kafka_bootstrap_servers, auto_offset_reset="earliest"
    )
    redis = connect(settings.redis)
    try:
        tp = TopicPartition(market.topic, 0)
        async with asyncio.timeout(deadline(60)):
            for consumer in groups.values():
                while await consumer.committed(tp) != total:
                    assert not any(s.done() for s in services), services
                    await asyncio.sleep(0.1)
        await letters.start()
        letters.assign([TopicPartition(DEADLETTER_TOPIC, 0)])
        received = []
        async with asyncio.timeout(deadline(30)):
            while len(received) < 2 * len(bad):
                batch = await letters.getmany(timeout_ms=500)
                received += [r for records in batch.values() for r in records]
        stats = await redis.hgetall(f"tickstream:stats:{market.metric_id('price')}")
        pool = await db.create_pool(settings.database)
        try:
            stored = await db.bars_between(pool, market.id, minute, minute + 10 * MINUTE_MS)
        finally:
            await pool.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services), deadline(30))
        for consumer in groups.values():
            await consumer.stop()
        await letters.stop()
        await redis.aclose()
    by_value: dict[bytes, set[str]] = {}
    for record in received:
        headers = {k: v.decode() for k, v in record.headers}
        assert headers["topic"] == market.topic and headers["reason"]
        assert 1 <= int(headers["offset"]) <= len(bad)
        by_value.setdefault(record.value, set()).add(headers["consumer"])
    assert by_value == {value: {"stats", "alerts"} for value in bad.values()}
    assert stored == good
    assert int(stats["count"]) == 3  # the window kept the good minutes
