"""Stats lifecycle: consume bar updates, store them, update minute windows and ranks, commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from tickstream_shared import db, redis_client
from tickstream_shared.consuming import ConsumerRuntime, DecodedBatch, retry_until_done
from tickstream_shared.deadletter import DeadLetterSender
from tickstream_shared.kafka import RenewableProducer, ensure_topics, make_consumer
from tickstream_shared.naming import DEADLETTER_TOPIC, STATS_GROUP, TICK_TOPIC_PATTERN, Market
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import DatabaseSettings, ServiceSettings
from tickstream_stats.book import MetricBook, MetricUpdate
from tickstream_stats.store import clock_present, raise_clock, read_clock, write_stats

log = logging.getLogger("tickstream.stats")
_REPORT_EVERY_S = 30.0
# How often the markets that did not tick are aged to the clock (and written), and how often
# an idle instance reads the shared clock. Every batch moves the clock during a catch-up;
# rewriting every market each time would cost O(markets) per batch, so those that did not tick
# follow at most this late, in wall time.
_AGE_EVERY_S = 1.0
_RETENTION_EVERY_S = 3600.0
# How often stats checks that Redis still holds its derived state (see _repair_redis_if_lost).
_REDIS_CHECK_EVERY_S = 2.0
# Work done between two turns of the event loop, so heartbeats and the rebalance listener are
# never held up for long: ticks applied (a few us each) and markets aged when the clock moves
# (about 6 us each, more when a clock jump evicts many minutes).
_APPLY_SLICE = 256
_AGE_SLICE = 64


class _StatsHandler:
    """Stats' part of each batch (see ConsumerRuntime): store, raise the clock, apply, write.

    The book holds the markets of the owned partitions (and, during a rebalance, of those the
    runtime holds until it knows whether they stay): warmed from stored bars when they arrive,
    forgotten when they leave, kept as they are when they stay. Markets that did not tick are
    aged to the clock at most once every _AGE_EVERY_S.
    """

    def __init__(self, pool: Any, redis: Any, book: MetricBook) -> None:
        self.pool = pool
        self.redis = redis
        self.book = book
        self.stored = 0
        self._next_aging = time.monotonic() + _AGE_EVERY_S
        self._next_redis_check = time.monotonic() + _REDIS_CHECK_EVERY_S
        self._next_report = time.monotonic() + _REPORT_EVERY_S

    async def assigned(self, markets: set[Market]) -> None:
        await _warm(self.pool, self.redis, self.book, markets)

    def revoked(self, markets: set[Market]) -> None:
        for market in markets:
            self.book.forget(market)

    async def handle(self, batch: DecodedBatch, stop: asyncio.Event) -> bool:
        if not await self._repair_redis_if_lost(stop):
            return False
        new_rows = await _apply_batch(
            stop, self.pool, self.redis, self.book, batch.ticks, age=self._aging_due()
        )
        if new_rows is None:
            return False  # stopping: nothing committed, the batch is re-read on restart
        self.stored += new_rows
        self._report()
        return True

    async def idle(self, stop: asyncio.Event) -> bool:
        if not await self._repair_redis_if_lost(stop):
            return False
        if self._aging_due() and not await _age(stop, self.redis, self.book):
            return False
        self._report()
        return True

    async def _repair_redis_if_lost(self, stop: asyncio.Event) -> bool:
        """Rewrite every owned metric if Redis lost its content; False if stopped first.

        Redis holds derived state only: after a flush or a restart without persistence the
        shared clock is gone, so every _REDIS_CHECK_EVERY_S the clock's key is looked for, and
        if missing the clock and all of this instance's metrics (ticking or not) are written.
        """
        if time.monotonic() < self._next_redis_check or self.book.clock < 0:
            return True
        self._next_redis_check = time.monotonic() + _REDIS_CHECK_EVERY_S
        present = await retry_until_done("check redis", lambda: clock_present(self.redis), stop)
        if present is None:
            return False
        if present:
            return True
        log.warning(
            "Redis lost the stats (flushed or restarted): rewriting %d markets",
            len(self.book.markets),
        )
        clock = self.book.clock

        async def restore_clock() -> int:
            return await raise_clock(self.redis, clock)

        if await retry_until_done("restore clock", restore_clock, stop) is None:
            return False
        updates: list[MetricUpdate] = []
        for count, market_updates in enumerate(self.book.current(), start=1):
            updates.extend(market_updates)
            if count % _AGE_SLICE == 0:
                await asyncio.sleep(0)
        return await _write(stop, self.redis, updates)

    def _aging_due(self) -> bool:
        if time.monotonic() < self._next_aging:
            return False
        self._next_aging = time.monotonic() + _AGE_EVERY_S
        return True

    def _report(self) -> None:
        if time.monotonic() < self._next_report:
            return
        self._next_report = time.monotonic() + _REPORT_EVERY_S
        log.info(
            "stored=%d skipped_stale=%d skipped_old=%d clock=%d markets=%d",
            self.stored,
            self.book.skipped_stale,
            self.book.skipped_old,
            self.book.clock,
            len(self.book.markets),
        )


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Consume until `stop`; a batch's offsets are committed only after Redis and PostgreSQL."""
    pool = await db.create_pool(settings.database)
    redis = redis_client.connect(settings.redis)
    consumer = make_consumer(
        settings.kafka, group_id=STATS_GROUP, client_id="tickstream-stats", role="batch"
    )
    producer = RenewableProducer(settings.kafka, client_id="tickstream-stats")
    book = MetricBook(settings.stats.window_minutes, settings.stats.stale_seconds)
    runtime = ConsumerRuntime(
        consumer,
        _StatsHandler(pool, redis, book),
        DeadLetterSender(producer, STATS_GROUP),
        batch_max=settings.stats.batch_max,
        batch_wait_ms=settings.stats.batch_wait_ms,
        stop=stop,
    )
    retention: asyncio.Task[None] | None = None
    try:
        await db.ensure_schema(pool, settings.database)
        await ensure_topics(settings.kafka, [DEADLETTER_TOPIC])
        await producer.start()
        consumer.subscribe(pattern=TICK_TOPIC_PATTERN, listener=runtime.listener)
        await consumer.start()
        retention = asyncio.create_task(_retention(pool, settings.database, stop))
        await runtime.run()
    finally:
        if retention is not None:
            retention.cancel()
            await asyncio.wait([retention])
        await consumer.stop()
        await producer.stop()
        await redis.aclose()
        await pool.close()


async def _retention(pool: Any, settings: DatabaseSettings, stop: asyncio.Event) -> None:
    """Drop expired bars and alerts now and every hour; a failure waits for the next hour."""
    while not stop.is_set():
        try:
            dropped = await db.drop_expired(pool, settings)
            log.info(
                "retention: dropped %d bars older than %d days", dropped, settings.retention_days
            )
        except Exception:
            log.exception("retention job failed; retrying in an hour")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=_RETENTION_EVERY_S)


async def _warm(pool: Any, redis: Any, book: MetricBook, markets: set[Market]) -> None:
    """Load the window of each market from stored bars, in one query, and write their stats.

    The runtime passes at most WARM_BATCH_MARKETS markets, which bounds the query's rows. The
    clock is the newest of the shared clock and the newest stored minute (Redis is derived
    state and may have been wiped). Redis may be empty, and ranks must not wait for the next
    tick of every market. The event loop gets a turn after each market (about 10 ms of window
    inserts for a full day). Idempotent.
    """
    clock = max(await read_clock(redis) or -1, await db.newest_minute(pool) or -1)
    updates: dict[str, MetricUpdate] = {}
    if clock >= 0:
        clock = await raise_clock(redis, clock)
        updates.update((u.metric_id, u) for u in book.advance_clock(clock))
    stored: dict[str, list[Tick]] = {}
    if book.clock >= 0:
        ids = sorted(market.id for market in markets)
        stored = await db.bars_of_markets(pool, ids, book.window_start(), book.clock)
    for market in sorted(markets):
        bars = stored.get(market.id, [])
        updates.update((u.metric_id, u) for u in book.warm(market, bars))
        log.info("warmed %s with %d stored bars", market.id, len(bars))
        await asyncio.sleep(0)
    await write_stats(redis, list(updates.values()))


async def _apply_batch(
    stop: asyncio.Event, pool: Any, redis: Any, book: MetricBook, ticks: list[Tick], *, age: bool
) -> int | None:
    """Store, raise the shared clock, apply and write one batch; None if stopped first.

    With `age`, the markets the batch did not touch are aged to the clock too and written in
    the same transaction.
    """

    async def store() -> int:
        return await db.store_bars(pool, ticks)

    new_rows = await retry_until_done("store bars", store, stop)
    if new_rows is None:
        return None
    updates: dict[str, MetricUpdate] = {}
    if ticks:
        newest = max(tick.minute for tick in ticks)

        async def clock() -> int:
            return await raise_clock(redis, newest)

        shared = await retry_until_done("raise clock", clock, stop)
        if shared is None:
            return None
        book.raise_clock(shared)
        # The clock is already at the batch's newest minute, so apply ages no other market.
        for start in range(0, len(ticks), _APPLY_SLICE):
            updates.update(
                (u.metric_id, u) for u in book.apply(ticks[start : start + _APPLY_SLICE])
            )
            await asyncio.sleep(0)
    if not await _write(stop, redis, list(updates.values())):
        return None
    return new_rows


async def _age(stop: asyncio.Event, redis: Any, book: MetricBook) -> bool:
    """Advance the book to the shared clock and write what aged; False if stopped first."""
    shared = await retry_until_done("read clock", lambda: read_clock(redis), stop)
    if shared is None:
        return not stop.is_set()  # no clock yet, or stopping
    book.raise_clock(shared)
    return await _write(stop, redis, await _age_in_slices(book))


async def _age_in_slices(book: MetricBook) -> list[MetricUpdate]:
    """`book.age()`, giving the event loop a turn every _AGE_SLICE markets."""
    updates: list[MetricUpdate] = []
    for count, market_updates in enumerate(book.age(), start=1):
        updates.extend(market_updates)
        if count % _AGE_SLICE == 0:
            await asyncio.sleep(0)
    return updates


async def _write(stop: asyncio.Event, redis: Any, updates: list[MetricUpdate]) -> bool:
    async def write() -> bool:
        await write_stats(redis, updates)
        return True

    return await retry_until_done("write stats", write, stop) is not None
