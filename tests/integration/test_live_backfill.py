"""LiveSource at many markets against a local Binance and OKX: the socket is read while the
publisher stalls, one backfill per market runs however often the connection drops, and OKX's
day takes its documented page sizes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

from tests.conftest import deadline
from tests.e2e.many_markets import (
    DAY_MINUTES,
    M,
    ManyBinance,
    ManyOkx,
    now_ms,
    okx_symbols,
    symbols,
)
from tests.integration.test_live_source import exchange_urls, source_of
from tickstream_shared.observability import READINGS
from tickstream_shared.schemas import Tick


def backfill_readings() -> dict[str, float]:
    """The exported tickstream_live_backfill_* values of Binance now, by name."""
    values = {
        family.name: value
        for (family, labels), value in READINGS.values().items()
        if family.name.startswith("tickstream_live_backfill_") and labels == ("binance",)
    }
    names = ("requests_total", "minutes_total", "markets_pending", "markets_done")
    full = [f"tickstream_live_backfill_{name}" for name in names]
    return {name: values.get(name, 0.0) for name in full}


async def test_a_stalled_publisher_does_not_stop_the_socket_being_read() -> None:
    """While nothing takes the source's ticks, 5 s of every market updating ten times a second
    are read, the exchange's pings are answered on the same connection, and what waits stays
    one tick per market and minute."""
    markets = 20
    fake = ManyBinance(symbols(markets), flood=50)
    async with exchange_urls(fake) as env:
        source = source_of(env, WATCHER_MARKETS="binance:*-usdt", WATCHER_BACKFILL_MINUTES="0")
        await source.start()
        chunks = source.chunks()
        try:
            async with asyncio.timeout(deadline(10)):
                await anext(chunks)  # the source runs; from now on nothing is taken
            async with asyncio.timeout(deadline(20)):
                await fake.answered.wait()
            (feed,) = source.feeds
            assert (feed.counters.connects, feed.counters.reconnects) == (1, 0)
            assert feed.counters.frames >= 50 * markets
            # Per market its forming minute (two if a minute ended meanwhile), not 400 updates.
            assert source.waiting <= 2 * markets
            got: list[Tick] = []
            async with asyncio.timeout(deadline(10)):
                while {t.market for t in got} != {m.id for m in source.markets}:
                    got += await anext(chunks)
        finally:
            await chunks.aclose()
    assert len(fake.connections) == 1


async def test_a_reconnect_mid_backfill_does_not_start_a_second_backfill() -> None:
    """The exchange drops the connection after 20 of the 60 candle requests a day of 30
    markets needs: no market is asked for its day twice (2 pages; one request more at most
    for a backfill running at the drop), and every market's day is published once."""
    markets = 30
    fake = ManyBinance(symbols(markets), drop_after=20)
    gc.collect()  # sources of earlier tests stop reporting their gauges
    before = backfill_readings()
    async with exchange_urls(fake) as env:
        source = source_of(
            env,
            WATCHER_MARKETS="binance:*-usdt",
            WATCHER_BACKFILL_MINUTES=str(DAY_MINUTES),
            WATCHER_RECONCILE_AFTER_MS="0",  # every candle request counted is the backfill's
        )
        await source.start()
        queue = source.backfills["binance"]
        closed: dict[str, list[int]] = {m.id: [] for m in source.markets}
        async with contextlib.aclosing(source.chunks()) as chunks, asyncio.timeout(deadline(60)):
            async for chunk in chunks:
                for tick in chunk:
                    if tick.closed:
                        closed[tick.market].append(tick.minute)
                done = len(fake.connections) >= 2 and queue.done == markets
                # A minute the stream closed (one that ended meanwhile) may come a chunk later.
                if done and min(len(minutes) for minutes in closed.values()) >= DAY_MINUTES:
                    break
    assert len(fake.connections) == 2
    assert sorted(fake.klines) == sorted(symbols(markets))
    assert max(fake.klines.values()) <= 3, fake.klines
    # Only a backfill running at the drop (one per worker) may need one request more.
    assert sum(fake.klines.values()) <= 2 * markets + 4, fake.klines
    # The source stopped with at most one request per worker on its way.
    assert queue.requests <= sum(fake.klines.values()) <= queue.requests + 4
    after = backfill_readings()
    exported = {name: after[name] - before[name] for name in after}
    assert exported == {
        "tickstream_live_backfill_requests_total": queue.requests,
        "tickstream_live_backfill_minutes_total": queue.minutes,
        "tickstream_live_backfill_markets_pending": 0,
        "tickstream_live_backfill_markets_done": markets,
    }
    for market_id, minutes in closed.items():
        assert len(minutes) == len(set(minutes)), f"{market_id}: a minute closed twice"
        assert len(minutes) >= DAY_MINUTES, market_id
        span = sorted(minutes)
        assert span == list(range(span[0], span[-1] + M, M)), f"{market_id}: a gap"
    # A market whose minute ended while it waited has that minute from the stream instead.
    assert queue.minutes >= markets * (DAY_MINUTES - 1)


async def test_a_market_listed_while_running_joins_and_a_delisted_one_leaves() -> None:
    """A symbol added to the listing is subscribed on a connection of its own, backfilled and
    published; a removed one is reported finished and publishes nothing more (but the close
    of its last minute); the first connection is never made again, and a connection whose
    only market leaves ends."""
    fake = ManyBinance(symbols(3))
    async with exchange_urls(fake) as env:
        source = source_of(
            env,
            WATCHER_MARKETS="binance:*-usdt",
            WATCHER_BACKFILL_MINUTES="30",
            WATCHER_LISTING_REFRESH_S="1",
        )
        await source.start()
        first, second, third = (m.id for m in source.markets)
        joined = "binance:c0003-usdt"
        got: list[Tick] = []
        left_at_us: int | None = None  # when the test first saw C0002 gone
        reports = {}
        async with contextlib.aclosing(source.chunks()) as chunks, asyncio.timeout(deadline(40)):
            async for chunk in chunks:
                got += chunk
                if left_at_us is None and source.gone:
                    left_at_us = time.time_ns() // 1000
                if len(fake.connections) == 1 and any(t.market == first for t in got):
                    fake.listed = [*symbols(2), "C0003USDT"]  # C0002 delisted, C0003 listed
                backfilled = {t.minute for t in got if t.market == joined and t.closed}
                live = any(t.market == joined and not t.closed for t in got)
                if not reports and len(backfilled) >= 30 and live:
                    reports = source.feed_reports(now_ms())  # while it runs
                    fake.listed = symbols(2)  # C0003 delisted again: its connection ends
                if reports and source.feeds[-1].state == "stopped":
                    break
    assert [m.id for m in source.markets] == [first, second]
    assert reports[third].state == "finished"
    assert reports[joined].state == "live"
    assert source.feed_reports(now_ms())[joined].state == "finished"
    assert fake.connections == [symbols(3), ["C0003USDT"]]
    original, added = source.feeds
    assert (original.counters.connects, added.counters.connects) == (1, 1)
    assert list(original.symbols) == symbols(2)  # C0002 is not subscribed again on reconnect
    assert left_at_us is not None
    after_leaving = [t for t in got if t.market == third and t.seq > left_at_us]
    assert len(after_leaving) <= 1 and all(t.closed for t in after_leaving)
    assert fake.klines["C0003USDT"] == 1


async def test_okx_backfills_a_day_in_five_candles_pages_per_market() -> None:
    """OKX (candles: 300 rows of its latest 1,440; history-candles: 100): each market's day is
    5 candles requests and one history-candles request for its oldest minutes (two if a
    minute began while it ran: the horizon moved), and every closed minute published equals
    the exchange's row, a whole day without a gap."""
    markets = 12
    fake = ManyOkx(okx_symbols(markets))
    async with exchange_urls(fake) as env:
        source = source_of(
            env,
            WATCHER_MARKETS="okx:*-usdt",
            WATCHER_BACKFILL_MINUTES=str(DAY_MINUTES),
            WATCHER_RECONCILE_AFTER_MS="0",  # every candle request counted is the backfill's
        )
        await source.start()
        queue = source.backfills["okx"]
        closed: dict[str, dict[int, tuple[float, ...]]] = {m.id: {} for m in source.markets}
        async with contextlib.aclosing(source.chunks()) as chunks, asyncio.timeout(deadline(60)):
            async for chunk in chunks:
                for tick in chunk:
                    if tick.closed:
                        values = (tick.open, tick.high, tick.low, tick.close, tick.volume)
                        closed[tick.market][tick.minute] = values
                if queue.done == markets and not queue.pending:
                    break
    assert len(fake.connections) == 1
    for inst in okx_symbols(markets):
        assert fake.asked["candles", inst] == 5, fake.asked
        assert 1 <= fake.asked["history-candles", inst] <= 2, fake.asked
    assert queue.requests == sum(fake.asked.values())
    for inst in okx_symbols(markets):
        minutes = closed[f"okx:{inst.lower()}"]
        span = sorted(minutes)
        assert span == list(range(span[0], span[-1] + M, M)), f"{inst}: a gap"
        assert len(span) >= DAY_MINUTES, inst
        for minute, values in minutes.items():
            _, o, h, low, c, v, *_ = ManyOkx.row(inst, minute)
            assert values == tuple(float(x) for x in (o, h, low, c, v)), (inst, minute)
