"""Stats warm-up bench: N markets x 24 h from PostgreSQL, one query each (old) or a batch each."""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from tickstream_shared import db, redis_client
from tickstream_shared.consuming import WARM_BATCH_MARKETS
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import DatabaseSettings, RedisSettings
from tickstream_stats.book import MetricBook
from tickstream_stats.service import _warm
from tickstream_stats.store import write_stats

WINDOW = 1440


async def fill(pool: object, markets: list[Market], last: int, seed: int) -> None:
    """A day of closed bars per market, stored as stats stores them."""
    rng = random.Random(seed)
    for market in markets:
        price = rng.uniform(0.01, 50_000.0)
        ticks = []
        for i in range(WINDOW):
            price *= 1 + rng.gauss(0, 1e-3)
            minute = last - (WINDOW - 1 - i) * MINUTE_MS
            ts = minute + 59_000
            ticks.append(
                Tick(market.id, minute, i, ts, ts, price, price, price, price, 1.0, 1, True)
            )
        await db.store_bars(pool, ticks)


async def longest_stall(stop: asyncio.Event, result: list[float]) -> None:
    """The longest the event loop went without giving this task a turn (heartbeats wait)."""
    before = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        result[0] = max(result[0], now - before)
        before = now


async def old_warm(pool: object, redis: object, book: MetricBook, markets: list[Market]) -> None:
    """As before issue 14: one query per market, all in one listener call (no loop turn)."""
    updates = []
    for market in sorted(markets):
        bars = await db.bars_between(pool, market.id, book.window_start(), book.clock)
        updates.extend(book.warm(market, bars))
    await write_stats(redis, updates)  # type: ignore[arg-type]


async def bench(count: int, seed: int, batch: int) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-warmup-") as data_dir,
        LocalInfra(Path(data_dir)) as infra,
    ):
        database = DatabaseSettings(url=infra.database_url)
        pool = await db.create_pool(database)
        redis = redis_client.connect(RedisSettings(url=infra.redis_url))
        try:
            await db.ensure_schema(pool, database)
            now = time.time_ns() // 1_000_000
            last = now - now % MINUTE_MS - 3_600_000
            markets = [Market("bench", f"c{i:04d}", "usdt") for i in range(count)]
            started = time.perf_counter()
            await fill(pool, markets, last, seed)
            print(
                f"{count:,} markets x {WINDOW} minutes stored in"
                f" {time.perf_counter() - started:.1f} s"
            )
            for name in ("old: one query per market", f"new: {batch} markets per query"):
                book = MetricBook(WINDOW)
                book.advance_clock(last)
                stop, stall = asyncio.Event(), [0.0]
                ticker = asyncio.create_task(longest_stall(stop, stall))
                holds = []
                started = time.perf_counter()
                if name.startswith("old"):
                    await old_warm(pool, redis, book, markets)
                    holds.append(time.perf_counter() - started)
                else:
                    for first in range(0, count, batch):
                        hold = time.perf_counter()
                        chunk = set(markets[first : first + batch])
                        await _warm(pool, redis, book, chunk)
                        holds.append(time.perf_counter() - hold)
                        await asyncio.sleep(0)  # the runtime's loop polls between two chunks
                total = time.perf_counter() - started
                stop.set()
                await ticker
                print(
                    f"    {name:<28} all warm in {total:6.2f} s; lock held at most"
                    f" {max(holds) * 1000:7.0f} ms at a time; event loop stalled at most"
                    f" {stall[0] * 1000:5.0f} ms; {len(book.markets):,} markets"
                )
        finally:
            await redis.aclose()
            await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markets", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--batch", type=int, default=WARM_BATCH_MARKETS, help="markets per warm-up query"
    )
    args = parser.parse_args()
    asyncio.run(bench(args.markets, args.seed, args.batch))


if __name__ == "__main__":
    main()
