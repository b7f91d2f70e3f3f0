"""The real broker, Redis and PostgreSQL through tickstream's own client helpers."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as redis

from tests.conftest import unique_exchange
from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics, make_consumer, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick, decode_tick
from tickstream_shared.settings import DatabaseSettings, KafkaSettings


def ticks_for(market: Market, count: int, start_ts: int = 1_000_000) -> list[Tick]:
    return [
        Tick(market.exchange, market.base, market.quote, i, start_ts + i * 60_000, 0, 10.0 + i, 1.0)
        for i in range(count)
    ]


async def test_idempotent_producer_round_trip_with_group_commit(infra: LocalInfra) -> None:
    """acks=all idempotent producer works on the broker; a group reads all and commits."""
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    market = Market(unique_exchange(), "btc", "usdt")
    assert await ensure_topics(kafka, [market.topic]) == [market.topic]
    assert await ensure_topics(kafka, [market.topic]) == []  # idempotent
    producer = make_producer(kafka, client_id="test")
    await producer.start()
    try:
        sent = ticks_for(market, 500)
        for tick in sent:
            await producer.send(market.topic, tick.encode(), key=market.id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    group = f"g-{market.exchange}"
    consumer = make_consumer(kafka, group_id=group, client_id="test")
    consumer.subscribe(pattern=rf"^ticks\.{market.exchange}\..*")
    await consumer.start()
    received: list[Tick] = []
    try:
        async with asyncio.timeout(30):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    received.extend(decode_tick(r.value) for r in records)
                await consumer.commit()
        (partition,) = consumer.assignment()
        assert await consumer.committed(partition) == len(sent)
    finally:
        await consumer.stop()
    assert received == sent


async def test_store_ticks_twice_keeps_one_row_each(infra: LocalInfra) -> None:
    """Re-storing a batch (a redelivery after restart) adds no rows."""
    pool = await db.create_pool(DatabaseSettings(url=infra.database_url))
    try:
        await asyncio.gather(db.ensure_schema(pool), db.ensure_schema(pool))
        market = Market(unique_exchange(), "eth", "usdt")
        batch = ticks_for(market, 100)
        assert await db.store_ticks(pool, batch) == 100
        assert await db.store_ticks(pool, batch[50:] + ticks_for(market, 120)[100:]) == 20
        async with pool.acquire() as conn:
            count = await conn.fetchval("SELECT count(*) FROM ticks WHERE market=$1", market.id)
        assert count == 120
        day = await db.recent_ticks(pool, market.id, span_ms=10 * 60_000)
        assert [t.seq for t in day] == list(range(110, 120))
        assert day[-1] == ticks_for(market, 120)[-1]
    finally:
        await pool.close()


async def test_redis_and_postgres_answer(infra: LocalInfra) -> None:
    """The local Redis and PostgreSQL are real servers on real connections."""
    client = redis.Redis.from_url(infra.redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()
    conn = await asyncpg.connect(infra.database_url)
    try:
        version = await conn.fetchval("SHOW server_version")
        assert int(version.split(".")[0]) >= 15
    finally:
        await conn.close()
