"""The watcher's batching publisher against the real broker: order, keys, partitions, timestamps."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiokafka import TopicPartition

from tests.conftest import deadline, unique_exchange
from tickstream_shared.kafka import ensure_topics, make_consumer, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick, decode_tick
from tickstream_shared.settings import KafkaSettings
from tickstream_watcher.publisher import TickPublisher
from tickstream_watcher.synthetic import SyntheticMarket

T0 = 1_700_000_040_000


def backfilled(market: Market, minutes: int) -> list[Tick]:
    model = SyntheticMarket(market.id, market.base, 3, 0)
    return [
        model.backfill_bar(T0 + i * MINUTE_MS, i, T0 + minutes * MINUTE_MS) for i in range(minutes)
    ]


async def read_back(
    kafka: KafkaSettings, topic: str, partitions: int, expected: int
) -> dict[int, list[tuple[bytes, Tick, int]]]:
    """Every record of `topic`, per partition: (key, tick, timestamp)."""
    consumer = make_consumer(kafka, group_id=None, client_id="test-read-back")
    await consumer.start()
    received: dict[int, list[tuple[bytes, Tick, int]]] = {p: [] for p in range(partitions)}
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        async with asyncio.timeout(deadline(30)):
            while sum(map(len, received.values())) < expected:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    received[tp.partition].extend(
                        (r.key, decode_tick(r.value, now_ms=T0 + 10**9), r.timestamp)
                        for r in records
                    )
    finally:
        await consumer.stop()
    return received


# 500: replay-sized chunks; 3: one update per market, as the synthetic source hands them over.
@pytest.mark.parametrize("chunk", [500, 3])
async def test_published_ticks_arrive_in_order_with_key_and_event_time(
    infra: LocalInfra, chunk: int
) -> None:
    """Every tick arrives once, in order per market, keyed by market, stamped with exchange_ts."""
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    exchange = unique_exchange()
    markets = [Market(exchange, base, "usdt") for base in ("btc", "eth", "doge")]
    await ensure_topics(kafka, [m.topic for m in markets])
    per_market = {m: backfilled(m, 700) for m in markets}
    merged = sorted((t for ticks in per_market.values() for t in ticks), key=lambda t: t.minute)
    producer = make_producer(kafka, client_id="test-publisher")
    await producer.start()
    try:
        # A bound far below a chunk: publishing must wait for acknowledgements, several times.
        async with TickPublisher(producer, max_in_flight=50) as publisher:
            for start in range(0, len(merged), chunk):
                await publisher.publish(merged[start : start + chunk])
            await publisher.flush()
        assert publisher.published == len(merged)
        # Every tick here is a closed bar: the newest per market is the acknowledged close.
        assert publisher.take_acknowledged_closes() == {
            m.id: ticks[-1] for m, ticks in per_market.items()
        }
        assert publisher.take_acknowledged_closes() == {}
    finally:
        await producer.stop()
    for market, sent in per_market.items():
        received = await read_back(kafka, market.topic, 1, len(sent))
        assert received[0] == [(market.id.encode(), t, t.exchange_ts) for t in sent]


async def test_partition_is_the_one_send_would_choose(infra: LocalInfra) -> None:
    """With several partitions, a market's ticks land where producer.send() puts its key."""
    kafka = dataclasses.replace(
        KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers), topic_partitions=3
    )
    market = Market(unique_exchange(), "btc", "usdt")
    await ensure_topics(kafka, [market.topic])
    sent = backfilled(market, 20)
    producer = make_producer(kafka, client_id="test-publisher")
    await producer.start()
    try:
        async with TickPublisher(producer, max_in_flight=1000) as publisher:
            await publisher.publish(sent[:-1])
            await publisher.flush()
        reference = await producer.send_and_wait(
            market.topic,
            sent[-1].encode(),
            key=market.id.encode(),
            timestamp_ms=sent[-1].exchange_ts,
        )
    finally:
        await producer.stop()
    received = await read_back(kafka, market.topic, 3, len(sent))
    assert received[reference.partition] == [(market.id.encode(), t, t.exchange_ts) for t in sent]
