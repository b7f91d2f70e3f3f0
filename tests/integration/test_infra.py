"""The real broker, Redis and PostgreSQL through tickstream's own client helpers."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import msgspec
import redis.asyncio as redis

from tests.conftest import unique_exchange
from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics, make_consumer, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick, decode_tick
from tickstream_shared.settings import DatabaseSettings, KafkaSettings

BASE_MINUTE = 1_700_000_040_000  # 2023-11-14, a whole minute
MINUTE_MS = 60_000


def bar(market: Market, minute_index: int, seq: int, close: float, *, closed: bool) -> Tick:
    minute = BASE_MINUTE + minute_index * MINUTE_MS
    return Tick(
        market=market.id,
        minute=minute,
        seq=seq,
        exchange_ts=minute + 1_000,
        received_ts=minute + 1_005,
        open=10.0,
        high=max(10.0, close),
        low=min(10.0, close),
        close=close,
        volume=float(seq),
        trades=seq,
        closed=closed,
    )


def bars_for(market: Market, count: int) -> list[Tick]:
    return [bar(market, i, i, 10.0 + i, closed=True) for i in range(count)]


async def test_idempotent_producer_round_trip_with_group_commit(infra: LocalInfra) -> None:
    """acks=all idempotent producer works on the broker; a group reads all and commits."""
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    market = Market(unique_exchange(), "btc", "usdt")
    assert await ensure_topics(kafka, [market.topic]) == [market.topic]
    assert await ensure_topics(kafka, [market.topic]) == []  # idempotent
    producer = make_producer(kafka, client_id="test")
    await producer.start()
    try:
        sent = bars_for(market, 500)
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
    now_ms = BASE_MINUTE + 1000 * MINUTE_MS
    try:
        async with asyncio.timeout(30):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    received.extend(decode_tick(r.value, now_ms=now_ms) for r in records)
                await consumer.commit()
        (partition,) = consumer.assignment()
        assert await consumer.committed(partition) == len(sent)
    finally:
        await consumer.stop()
    assert received == sent


async def test_bars_upsert_by_seq_and_store_twice_keeps_one_row_each(infra: LocalInfra) -> None:
    """One row per market and minute: a later seq wins; older or repeated updates change nothing."""
    pool = await db.create_pool(DatabaseSettings(url=infra.database_url))
    try:
        await asyncio.gather(db.ensure_schema(pool), db.ensure_schema(pool))
        market = Market(unique_exchange(), "eth", "usdt")
        # Minute 0 closed; minute 1 forming, three updates in one batch: only the newest is kept.
        first = [
            bar(market, 0, 0, 11.0, closed=True),
            bar(market, 1, 1, 12.0, closed=False),
            bar(market, 1, 2, 13.0, closed=False),
            bar(market, 1, 3, 14.0, closed=False),
        ]
        assert await db.store_bars(pool, first) == 2
        assert await db.store_bars(pool, first) == 0  # a redelivery changes nothing
        # The bar closes (seq 4); a replayed older update (seq 2) arriving later never wins.
        assert await db.store_bars(pool, [bar(market, 1, 4, 15.0, closed=True)]) == 1
        assert await db.store_bars(pool, [bar(market, 1, 2, 13.0, closed=False)]) == 0
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT minute, seq, close, volume, trades, closed FROM bars"
                " WHERE market=$1 ORDER BY minute",
                market.id,
            )
        assert [tuple(r) for r in rows] == [
            (BASE_MINUTE, 0, 11.0, 0.0, 0, True),
            (BASE_MINUTE + MINUTE_MS, 4, 15.0, 4.0, 4, True),
        ]
        stored = await db.bars_between(pool, market.id, BASE_MINUTE, BASE_MINUTE + MINUTE_MS)
        assert stored == [first[0], bar(market, 1, 4, 15.0, closed=True)]
        many = [bar(market, i, 10 + i, 20.0 + i, closed=True) for i in range(2, 40)]
        assert await db.store_bars(pool, many) == 38
        history = await db.recent_bars(pool, market.id, 10)
        assert [b.minute for b in history] == [BASE_MINUTE + i * MINUTE_MS for i in range(29, 40)]
        since = BASE_MINUTE + 35 * MINUTE_MS
        missed = await db.recent_bars(pool, market.id, 10, since_minute=since)
        assert [b.seq for b in missed] == [10 + i for i in range(35, 40)]
    finally:
        await pool.close()


_BARS_BEFORE_QUOTE_VOLUME = """
CREATE TABLE bars (
    market text NOT NULL, minute bigint NOT NULL, seq bigint NOT NULL,
    exchange_ts bigint NOT NULL, received_ts bigint NOT NULL,
    open double precision NOT NULL, high double precision NOT NULL,
    low double precision NOT NULL, close double precision NOT NULL,
    volume double precision NOT NULL, trades bigint, closed boolean NOT NULL,
    PRIMARY KEY (market, minute)
);
"""


async def test_quote_volume_round_trips_and_old_tables_gain_it_unknown(infra: LocalInfra) -> None:
    """A bars table from before quote_volume gains it (old rows unknown, NULL); a stored quote
    volume reads back exactly, and a newer update without one makes the minute unknown."""
    name = f"quote_{uuid.uuid4().hex[:10]}"
    server = infra.database_url.rsplit("/", 1)[0]
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        conn = await asyncpg.connect(f"{server}/{name}")
        try:
            await conn.execute(_BARS_BEFORE_QUOTE_VOLUME)
            market = Market(unique_exchange(), "btc", "usdt")
            old = bar(market, 0, 1, 11.0, closed=True)
            await conn.execute(
                "INSERT INTO bars VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                *(getattr(old, field) for field in old.__struct_fields__[:12]),
            )
            pool = await db.create_pool(DatabaseSettings(url=f"{server}/{name}"))
            try:
                await db.ensure_schema(pool)
                await db.ensure_schema(pool)
                assert await db.bars_between(pool, market.id, BASE_MINUTE, BASE_MINUTE) == [old]
                # A value that is not a short decimal, and a zero: both stored as they are.
                minute_1 = bar(market, 1, 2, 12.0, closed=True)
                minute_2 = bar(market, 2, 3, 13.0, closed=True)
                priced = [
                    msgspec.structs.replace(minute_1, quote_volume=24.000000000000004),
                    msgspec.structs.replace(minute_2, quote_volume=0.0),
                ]
                assert await db.store_bars(pool, priced) == 2
                assert await db.store_bars(pool, priced) == 0
                last = BASE_MINUTE + 2 * MINUTE_MS
                assert await db.bars_between(pool, market.id, BASE_MINUTE, last) == [old, *priced]
                # A REST correction of minute 1 that does not carry the quote volume.
                corrected = bar(market, 1, 9, 12.5, closed=True)
                assert await db.store_bars(pool, [corrected]) == 1
                assert await db.recent_bars(pool, market.id, 2) == [old, corrected, priced[1]]
            finally:
                await pool.close()
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


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
