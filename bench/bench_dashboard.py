"""Bytes a dashboard loads and then receives per second at N markets, in a real browser.

Starts the real stack (LocalInfra: broker, redis-server, PostgreSQL) and the gateway process;
writes N markets' stats hashes and rank sets into Redis as stats writes them, and rewrites
every market's values each second (as if each market had an update a second: every rank
moves); stores one day of minute bars of the market the page opens on in PostgreSQL. Then
opens the dashboard in headless Debian chromium (Playwright for Python, `/usr/bin/chromium`,
never a downloaded browser) and counts the bytes on the wire from the browser's own network
events (Chrome DevTools Protocol): every HTTP response's encoded length (headers included,
gzip as sent) and every WebSocket frame's payload.

"load" is everything until the page shows its rank tables and charts, plus 3 s; "after" is
what arrives over the next `--seconds` (the ranks pushes, the 5 s stats poll, bars), with the
gateway process's CPU meanwhile (mostly its rank poller, with every ranking changing).

    .venv/bin/pip install playwright   # the Python package only: its browser is not used
    .venv/bin/python bench/bench_dashboard.py --markets 100 1000 2000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from typing import Any

import redis.asyncio as redis
from playwright.async_api import async_playwright

from fanout_stack import Stack
from tickstream_shared import db
from tickstream_shared.naming import (
    MEASURES_BY_KIND,
    METRIC_KINDS,
    METRICS_KEY,
    Market,
    rank_key,
    stats_key,
)
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import DatabaseSettings

CHROMIUM = "/usr/bin/chromium"


def markets(count: int) -> list[Market]:
    return [Market("binance", f"m{i:04d}", "usdt") for i in range(count)]


async def write_stats(client: redis.Redis, all_markets: list[Market], minute: int) -> None:
    """Every market's hashes and rank sets with fresh random values, in one pipeline."""
    async with client.pipeline(transaction=False) as pipe:
        for market in all_markets:
            for kind in METRIC_KINDS:
                metric = market.metric_id(kind)
                values = {m: random.uniform(0.0001, 2.0) for m in MEASURES_BY_KIND[kind]}
                fields = {
                    "count": "1440",
                    "mean": repr(random.uniform(1, 50_000)),
                    "min": "1.0",
                    "max": "60000.0",
                    "last": repr(random.uniform(1, 50_000)),
                    "minute": str(minute),
                    "last_ts": str(minute + 30_000),
                    "stale": "0",
                    "clock": str(minute),
                    **{m: repr(v) for m, v in values.items()},
                }
                pipe.hset(stats_key(metric), mapping=fields)
                pipe.sadd(METRICS_KEY, metric)
                for measure, value in values.items():
                    pipe.zadd(rank_key(kind, measure), {metric: value})
        await pipe.execute()


async def keep_stats_moving(client: redis.Redis, all_markets: list[Market], minute: int) -> None:
    while True:
        await write_stats(client, all_markets, minute)
        await asyncio.sleep(1.0)


async def store_day(database_url: str, market: Market, newest: int) -> None:
    pool = await db.create_pool(DatabaseSettings(url=database_url))
    try:
        await db.ensure_schema(pool)
        bars = []
        for i in range(1441):
            minute = newest - (1440 - i) * MINUTE_MS
            close = 100.0 + 10 * random.random()
            volume = random.uniform(1, 1000)
            bars.append(
                Tick(
                    market=market.id,
                    minute=minute,
                    seq=i,
                    exchange_ts=minute + 59_000,
                    received_ts=minute + 59_000,
                    open=close,
                    high=close,
                    low=close,
                    close=close,
                    volume=volume,
                    closed=True,
                    quote_volume=volume * close,  # the turnover chart's day
                )
            )
        await db.store_bars(pool, bars)
    finally:
        await pool.close()


class Wire:
    """Bytes the browser received, from its DevTools network events."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.count: Counter[str] = Counter()
        self.sizes: Counter[str] = Counter()  # bytes by path, since the start
        self._paths: dict[str, str] = {}

    def request(self, event: dict[str, Any]) -> None:
        url = event["request"]["url"]
        self._paths[event["requestId"]] = url.split("/", 3)[-1].split("?")[0]

    def http(self, event: dict[str, Any]) -> None:
        size = int(event.get("encodedDataLength", 0))
        self.bytes["http"] += size
        self.count["http"] += 1
        self.sizes["/" + self._paths.get(event["requestId"], "?")] += size

    def ws(self, event: dict[str, Any]) -> None:
        self.bytes["ws"] += len(event["response"]["payloadData"].encode())
        self.count["ws"] += 1

    def take(self) -> tuple[Counter[str], Counter[str]]:
        taken = (self.bytes.copy(), self.count.copy())
        self.bytes.clear()
        self.count.clear()
        return taken


def describe(sizes: Counter[str], counts: Counter[str]) -> str:
    total = sizes["http"] + sizes["ws"]
    return (
        f"{total:,} bytes (HTTP {sizes['http']:,} in {counts['http']} responses,"
        f" WebSocket {sizes['ws']:,} in {counts['ws']} frames)"
    )


async def measure(count: int, seconds: float) -> None:
    all_markets = markets(count)
    newest = (int(time.time() * 1000) // MINUTE_MS) * MINUTE_MS
    with Stack() as stack:
        assert stack.infra is not None
        env = stack.env()
        client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
        await client.flushdb()
        await write_stats(client, all_markets, newest)
        await store_day(env["DATABASE_URL"], all_markets[0], newest)
        gateway = stack.start_gateway()
        if not await gateway.healthy(60):
            raise SystemExit("gateway did not become healthy")
        moving = asyncio.create_task(keep_stats_moving(client, all_markets, newest))
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = await browser.new_page()
                cdp = await page.context.new_cdp_session(page)
                wire = Wire()
                cdp.on("Network.requestWillBeSent", wire.request)
                cdp.on("Network.loadingFinished", wire.http)
                cdp.on("Network.webSocketFrameReceived", wire.ws)
                await cdp.send("Network.enable")
                started = time.monotonic()
                await page.goto(f"http://127.0.0.1:{gateway.port}/")
                await page.wait_for_selector('[data-testid="ranks-price"] tr[data-metric]')
                await page.wait_for_function("document.body.dataset.bars !== '0'")
                shown_s = time.monotonic() - started
                await asyncio.sleep(3)
                load = wire.take()
                largest = wire.sizes.most_common(6)
                cpu_before = gateway.cpu()
                await asyncio.sleep(seconds)
                after = wire.take()
                cpu_share = (gateway.cpu() - cpu_before) / seconds
                rows = await page.locator('[data-testid="ranks-price"] tr[data-metric]').count()
                await browser.close()
        finally:
            moving.cancel()
            await asyncio.gather(moving, return_exceptions=True)
            await client.aclose()
    per_s = Counter({k: round(v / seconds) for k, v in after[0].items()})
    print(f"{count:,} markets: shown after {shown_s:.1f} s, {rows} price rank rows")
    print(f"  load:  {describe(*load)}")
    print("  largest HTTP at load: " + ", ".join(f"{path} {size:,}" for path, size in largest))
    print(f"  after: {describe(*after)} in {seconds:g} s = {sum(per_s.values()):,} bytes/s")
    print(f"  gateway CPU meanwhile: {cpu_share:.0%} of a core (rank poller, one page, one client)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, nargs="+", default=[1000])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    for count in args.markets:
        asyncio.run(measure(count, args.seconds))


if __name__ == "__main__":
    main()
