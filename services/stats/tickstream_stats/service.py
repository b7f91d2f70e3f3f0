"""Stats lifecycle: consume ticks, store them, update windows and ranks, then commit."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import ConsumerRebalanceListener

from tickstream_shared import db, redis_client
from tickstream_shared.consuming import (
    DecodeCounters,
    decode_batch,
    records_in_order,
    retry_until_done,
)
from tickstream_shared.kafka import make_consumer
from tickstream_shared.naming import TICK_TOPIC_PATTERN, Market
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import ServiceSettings
from tickstream_stats.book import MetricBook, MetricUpdate
from tickstream_stats.store import write_stats

log = logging.getLogger("tickstream.stats")
_REPORT_EVERY_S = 30.0


class _Ownership(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tracks which markets this instance owns, so windows are warmed or dropped on rebalance."""

    def __init__(self, book: MetricBook, pool: Any, redis: Any, stop: asyncio.Event) -> None:
        self.book = book
        self.pool = pool
        self.redis = redis
        self.stop = stop

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            self.book.forget(Market.from_topic(tp.topic))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # aiokafka awaits this before fetching from the new partitions, so windows are
        # rebuilt from stored ticks before any newer tick of those markets is applied.
        # aiokafka only logs an exception raised here, so failures are retried in place
        # rather than letting ticks into empty windows.
        markets = {Market.from_topic(tp.topic) for tp in assigned}
        new = {m for m in markets if m not in self.book}

        async def warm() -> bool:
            await _warm(self.pool, self.redis, self.book, new)
            return True

        await retry_until_done("warm windows", warm, self.stop)


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Consume until `stop`; a batch's offsets are committed only after Redis and PostgreSQL."""
    pool = await db.create_pool(settings.database)
    redis = redis_client.connect(settings.redis)
    consumer = make_consumer(settings.kafka, group_id="stats", client_id="tickstream-stats")
    book = MetricBook(span_ms=settings.stats.window_seconds * 1000)
    ownership = _Ownership(book, pool, redis, stop)
    try:
        await db.ensure_schema(pool)
        consumer.subscribe(pattern=TICK_TOPIC_PATTERN, listener=ownership)
        await consumer.start()
        await _consume(settings, stop, consumer, pool, redis, book)
    finally:
        await consumer.stop()
        await redis.aclose()
        await pool.close()


async def _warm(pool: Any, redis: Any, book: MetricBook, markets: set[Market]) -> None:
    """Rebuild windows from stored ticks, so a restart does not reset 24h of statistics.

    The rebuilt stats are written to Redis at once: Redis may be empty (it is derived state),
    and ranks must not wait for the next tick of every market. Idempotent.
    """
    for market in sorted(markets):
        book.forget(market)
        ticks = await db.recent_ticks(pool, market.id, book.span_ms)
        await write_stats(redis, book.apply(ticks))
        log.info("warmed %s with %d stored ticks", market.id, len(ticks))


async def _consume(
    settings: ServiceSettings,
    stop: asyncio.Event,
    consumer: Any,
    pool: Any,
    redis: Any,
    book: MetricBook,
) -> None:
    counters = DecodeCounters()
    stored = 0
    next_report = time.monotonic() + _REPORT_EVERY_S
    while not stop.is_set():
        batch = await consumer.getmany(
            timeout_ms=settings.stats.batch_wait_ms, max_records=settings.stats.batch_max
        )
        if not batch:
            continue
        ticks = decode_batch(records_in_order(batch), counters)

        async def _store(ticks: list[Tick] = ticks) -> int:
            return await db.store_ticks(pool, ticks)

        new_rows = await retry_until_done("store ticks", _store, stop)
        if new_rows is None:
            return  # stopping: nothing committed, the batch is re-read on restart
        stored += new_rows
        updates = book.apply(ticks)

        async def _write(updates: list[MetricUpdate] = updates) -> bool:
            await write_stats(redis, updates)
            return True

        if await retry_until_done("write stats", _write, stop) is None:
            return
        await consumer.commit()
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + _REPORT_EVERY_S
            log.info(
                "ticks decoded=%d stored=%d skipped_bad=%d skipped_stale=%d",
                counters.decoded,
                stored,
                counters.skipped_bad,
                book.skipped_stale,
            )
