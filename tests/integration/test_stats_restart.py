"""Stats on real broker, Redis and PostgreSQL: kill and restart, and silent markets ageing."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from fractions import Fraction
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from tests.conftest import deadline, running_infra, unique_exchange
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import (
    CLOCK_KEY,
    CLOCK_MEMBER,
    MEASURES_BY_KIND,
    METRICS_KEY,
    Market,
    MetricKind,
    rank_key,
    stats_key,
)
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import KafkaSettings, ServiceSettings
from tickstream_stats.service import run

MINUTES = 3000
WINDOW = 1440


@pytest.fixture
def own_infra() -> Iterator[LocalInfra]:
    """A broker, Redis and PostgreSQL for this test alone.

    The event-time clock is shared through Redis and storage and the consumer group is shared
    by every stats process, so another test's ticks would move this test's clock.
    """
    with running_infra("tickstream-stats-") as running:
        yield running


def first_minute(minutes: int) -> int:
    """A start such that `minutes` minutes end an hour before now (ticks must not be future)."""
    now_minute = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
    return now_minute - 3_600_000 - minutes * MINUTE_MS


def bar(market: Market, seq: int, minute: int, close: float, volume: float, closed: bool) -> Tick:
    ts = minute + (59_000 if closed else 20_000)
    low, high = min(close, 100.0), max(close, 100_000.0)
    return Tick(market.id, minute, seq, ts, ts, close, high, low, close, volume, 3, closed)


def price(i: int) -> float:
    return 30_000 + 500 * math.sin(i / 50) + (i % 7) * 0.01


async def produce(kafka: KafkaSettings, ticks: list[Tick]) -> None:
    producer = make_producer(kafka, client_id="test")
    await producer.start()
    try:
        for tick in ticks:
            topic = Market.parse(tick.market).topic
            await producer.send(topic, tick.encode(), key=tick.market.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def poll_until(check: Callable[[], Awaitable[bool]], within: float = 60) -> None:
    async with asyncio.timeout(deadline(within)):
        while not await check():  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.1)


def exact(values: list[float]) -> tuple[float, float]:
    """(mean, population std) from exact rational moments, each rounded once."""
    n = len(values)
    mean = sum(Fraction(v) for v in values) / n
    var = sum(Fraction(v) ** 2 for v in values) / n - mean**2
    return float(mean), math.sqrt(float(var))


def expected_hash(values: list[float], kind: MetricKind) -> dict[str, str]:
    """count, mean, std, min, max, cv (and logret for price) as stats must write them."""
    mean, std = exact(values)
    fields = {
        "count": str(len(values)),
        "mean": repr(mean),
        "std": repr(std),
        "min": repr(min(values)),
        "max": repr(max(values)),
        "cv": repr(std / abs(mean) if mean else 0.0),
    }
    if kind == "price":
        returns = [math.log(b / a) for a, b in itertools.pairwise(values)]
        fields["logret"] = repr(exact(returns)[1] if returns else 0.0)
    return fields


def start_stats(infra: LocalInfra, log: Path, batch_max: int = 100) -> subprocess.Popen[bytes]:
    env = {**os.environ, **infra.environment(), "STATS_BATCH_MAX": str(batch_max)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tickstream_stats"], env=env, stdout=out, stderr=out
        )


async def test_kill_and_restart_stores_once_and_counts_once(
    own_infra: LocalInfra, tmp_path: Path
) -> None:
    """After SIGKILL and restart each minute is one row, stats are exact, Redis is rebuilt."""
    infra = own_infra
    market = Market(unique_exchange(), "btc", "usdt")
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    await ensure_topics(kafka, [market.topic])
    start = first_minute(MINUTES)
    minutes = [start + i * MINUTE_MS for i in range(MINUTES)]
    ticks = []
    for i, minute in enumerate(minutes):
        # A forming update, then the closing one that replaces it.
        ticks.append(bar(market, 2 * i, minute, price(i) + 7.0, 0.5, closed=False))
        ticks.append(bar(market, 2 * i + 1, minute, price(i), 1.0 + i % 5, closed=True))
    await produce(kafka, ticks)

    conn = await asyncpg.connect(infra.database_url)
    client = redis.Redis.from_url(infra.redis_url, decode_responses=True)
    log = tmp_path / "stats.log"
    stats = start_stats(infra, log)
    price_key = stats_key(market.metric_id("price"))
    try:

        async def stored() -> int:
            try:
                value = await conn.fetchval("SELECT count(*) FROM bars WHERE market=$1", market.id)
            except asyncpg.UndefinedTableError:
                return 0  # stats has not created the schema yet
            return int(value or 0)

        async def partly_stored() -> bool:
            assert stats.poll() is None, log.read_text()
            return await stored() >= 800

        await poll_until(partly_stored)
        stats.send_signal(signal.SIGKILL)  # mid-stream: no clean commit of what is in flight
        stats.wait()
        assert await stored() < MINUTES
        stats = start_stats(infra, log)

        async def all_counted() -> bool:
            assert stats.poll() is None, log.read_text()
            last_ts = await client.hget(price_key, "last_ts")
            return last_ts == str(ticks[-1].exchange_ts) and await stored() == MINUTES

        await poll_until(all_counted)
        rows = await conn.fetch(
            "SELECT minute, seq, close, closed FROM bars WHERE market=$1 ORDER BY minute",
            market.id,
        )
        assert [(r["minute"], r["seq"], r["close"], r["closed"]) for r in rows] == [
            (m, 2 * i + 1, price(i), True) for i, m in enumerate(minutes)
        ]

        window = range(MINUTES - WINDOW, MINUTES)
        closes = [price(i) for i in window]
        volumes = [1.0 + i % 5 for i in window]
        common = {
            "minute": str(minutes[-1]),
            "last_ts": str(ticks[-1].exchange_ts),
            "stale": "0",
            "clock": str(minutes[-1]),
        }
        expected = {
            "price": {**expected_hash(closes, "price"), **common, "last": repr(closes[-1])},
            "volume": {**expected_hash(volumes, "volume"), **common, "last": repr(volumes[-1])},
        }

        async def check_redis() -> None:
            for kind in ("price", "volume"):
                metric_id = market.metric_id(kind)
                assert await client.hgetall(stats_key(metric_id)) == expected[kind]
                for measure in MEASURES_BY_KIND[kind]:
                    score = await client.zscore(rank_key(kind, measure), metric_id)
                    assert score == float(expected[kind][measure])
            assert await client.smembers(METRICS_KEY) == {
                market.metric_id("price"),
                market.metric_id("volume"),
            }
            assert await client.zscore(CLOCK_KEY, CLOCK_MEMBER) == minutes[-1]

        await check_redis()

        # Wiped under a running stats with no new ticks: every metric is back within 10 s.
        await client.flushdb()

        async def rewritten() -> bool:
            assert stats.poll() is None, log.read_text()
            return await client.hget(price_key, "count") == str(WINDOW)

        await poll_until(rewritten, within=10)
        await check_redis()

        # Redis is derived state: wiped, with no new ticks, a restart restores it from storage.
        stats.send_signal(signal.SIGTERM)
        assert stats.wait(deadline(30)) == 0, "stats did not stop cleanly on SIGTERM"
        await client.flushdb()
        stats = start_stats(infra, log)

        async def restored() -> bool:
            assert stats.poll() is None, log.read_text()
            return await client.hget(price_key, "count") == str(WINDOW)

        await poll_until(restored)
        await check_redis()
    finally:
        if stats.poll() is None:
            stats.send_signal(signal.SIGTERM)
            stats.wait(deadline(30))
        await client.aclose()
        await conn.close()
    assert stats.returncode == 0, "stats did not stop cleanly on SIGTERM"


async def test_rebalances_while_consuming_keep_the_window_exact(
    own_infra: LocalInfra, tmp_path: Path
) -> None:
    """A second instance joining mid-stream: every minute is still counted once by the owner."""
    infra = own_infra
    market = Market(unique_exchange(), "eth", "usdt")
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    await ensure_topics(kafka, [market.topic])
    start = first_minute(MINUTES)
    ticks = []
    for i in range(MINUTES):
        minute = start + i * MINUTE_MS
        ticks.append(bar(market, 2 * i, minute, price(i) - 3.0, 0.5, closed=False))
        ticks.append(bar(market, 2 * i + 1, minute, price(i), 1.0 + i % 5, closed=True))
    await produce(kafka, ticks)
    conn = await asyncpg.connect(infra.database_url)
    client = redis.Redis.from_url(infra.redis_url, decode_responses=True)
    log = tmp_path / "stats.log"
    # Small batches keep the loop busy for many seconds, so the rebalances (a join takes
    # seconds here) land while batches are being stored and applied.
    first = start_stats(infra, log, batch_max=5)
    second: subprocess.Popen[bytes] | None = None
    price_key = stats_key(market.metric_id("price"))

    async def stored_at_least(rows: int) -> bool:
        assert first.poll() is None, log.read_text()
        try:
            value = await conn.fetchval("SELECT count(*) FROM bars WHERE market=$1", market.id)
        except asyncpg.UndefinedTableError:
            return False  # stats has not created the schema yet
        return int(value or 0) >= rows

    try:
        await poll_until(lambda: stored_at_least(200))
        # It joins: the group rebalances (revoke, then assign) while the first applies batches.
        # No second rebalance follows, which would re-warm the market and hide a bad state.
        second = start_stats(infra, log, batch_max=5)

        async def all_counted() -> bool:
            assert first.poll() is None, log.read_text()
            assert second is not None and second.poll() is None, log.read_text()
            return await client.hget(price_key, "last_ts") == str(ticks[-1].exchange_ts)

        await poll_until(all_counted, within=120)
        window = range(MINUTES - WINDOW, MINUTES)
        expected = expected_hash([price(i) for i in window], "price")
        held = await client.hgetall(price_key)
        assert {k: held[k] for k in expected} == expected
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(deadline(30))
        await client.aclose()
        await conn.close()
    assert (first.returncode, second.returncode) == (0, 0), "stats did not stop cleanly"
    # Both instances took an assignment at start, and the first one another at the join (the
    # market kept with its state, or warmed by the second).
    assert log.read_text().count("partitions (generation") >= 3, "no rebalance happened"


async def test_silent_market_ages_and_goes_stale_on_another_markets_clock(
    own_infra: LocalInfra,
) -> None:
    """A market that stops trading ages with the clock others move: stale, then gone, then back."""
    infra = own_infra
    exchange = unique_exchange()
    quiet, busy = Market(exchange, "doge", "usdt"), Market(exchange, "btc", "usdt")
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    await ensure_topics(kafka, [quiet.topic, busy.topic])
    env = {
        **infra.environment(),
        "STATS_WINDOW_MINUTES": "10",
        "STATS_STALE_SECONDS": "60",
        "STATS_BATCH_WAIT_MS": "50",
    }
    settings = ServiceSettings.from_env(env)
    start = first_minute(60)
    seqs = {quiet: 0, busy: 0}

    def bars(market: Market, first: int, last: int) -> list[Tick]:
        ticks = []
        for i in range(first, last + 1):
            seqs[market] += 1
            value = 2.0 + i if market == quiet else 100.0 + i
            ticks.append(bar(market, seqs[market], start + i * MINUTE_MS, value, 1.0, True))
        return ticks

    client = redis.Redis.from_url(infra.redis_url, decode_responses=True)
    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, stop))
    quiet_price = quiet.metric_id("price")
    quiet_key = stats_key(quiet_price)

    async def quiet_is(expected: dict[str, str] | None) -> None:
        """Wait until the quiet market's price hash has these fields (None: no hash)."""

        async def matches() -> bool:
            assert not service.done(), service
            held = await client.hgetall(quiet_key)
            if expected is None:
                return not held
            return all(held.get(k) == v for k, v in expected.items())

        await poll_until(matches)

    async def ranked() -> set[str]:
        return {
            m
            for measure in ("std", "cv", "logret")
            for m in await client.zrange(rank_key("price", measure), 0, -1)
        }

    try:
        await produce(kafka, bars(quiet, 0, 4) + bars(busy, 0, 4))
        await quiet_is({"count": "5", "stale": "0", "clock": str(start + 4 * MINUTE_MS)})
        assert await ranked() == {quiet_price, busy.metric_id("price")}

        # Only the busy market trades: three minutes on, the quiet one is stale (180 s > 60 s).
        await produce(kafka, bars(busy, 5, 7))
        await quiet_is({"count": "5", "stale": "1", "clock": str(start + 7 * MINUTE_MS)})
        assert await ranked() == {busy.metric_id("price")}
        assert quiet_price in await client.smembers(METRICS_KEY)

        # Its window ages: at clock 13 only minute 4 is inside (13 - 10, 13].
        await produce(kafka, bars(busy, 8, 13))
        await quiet_is(
            {"count": "1", "mean": repr(6.0), "stale": "1", "clock": str(start + 13 * MINUTE_MS)}
        )
        # At clock 14 its last minute leaves: the metric is gone everywhere.
        await produce(kafka, bars(busy, 14, 14))
        await quiet_is(None)
        assert quiet_price not in await client.smembers(METRICS_KEY)
        assert await ranked() == {busy.metric_id("price")}

        # It trades again: back, live and ranked.
        await produce(kafka, bars(quiet, 15, 15))
        await quiet_is({"count": "1", "stale": "0", "clock": str(start + 15 * MINUTE_MS)})
        assert await ranked() == {quiet_price, busy.metric_id("price")}

        # Another stats instance moves the shared clock: this idle one ages its markets too.
        await client.zadd(CLOCK_KEY, {CLOCK_MEMBER: start + 20 * MINUTE_MS}, gt=True)
        await quiet_is({"count": "1", "stale": "1", "clock": str(start + 20 * MINUTE_MS)})
        await client.zadd(CLOCK_KEY, {CLOCK_MEMBER: start + 25 * MINUTE_MS}, gt=True)
        await quiet_is(None)
        assert await client.smembers(METRICS_KEY) == set()
        assert await ranked() == set()
    finally:
        stop.set()
        async with asyncio.timeout(deadline(30)):
            await service
        await client.aclose()
