"""LiveSource in process against local exchanges: each exchange starts on its own, a failing
task ends the source loudly, and a silent market on a busy connection is found and repaired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import serve

from tests.conftest import deadline
from tests.e2e.exchange_fakes import rest_server
from tests.e2e.soak_fakes import Injections, SoakBinance, SoakKraken, now_ms
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import ExchangeSettings, WatcherSettings, load
from tickstream_watcher.live import LiveSource

M = 60_000


@contextlib.asynccontextmanager
async def exchange_urls(*fakes: Any) -> AsyncIterator[dict[str, str]]:
    """Each fake's REST and WebSocket server on local ports, as exchange settings."""
    async with contextlib.AsyncExitStack() as stack:
        env = {}
        for fake in fakes:
            rest = await stack.enter_async_context(rest_server(fake.route))
            ws = await stack.enter_async_context(serve(fake.ws, "127.0.0.1", 0))
            env[f"{fake.name.upper()}_WS_URL"] = f"ws://127.0.0.1:{ws.sockets[0].getsockname()[1]}"
            env[f"{fake.name.upper()}_REST_URL"] = rest
        yield env


def source_of(env: dict[str, str], **settings: str) -> LiveSource:
    environ = {"WATCHER_SOURCE": "live", "WATCHER_BACKFILL_MINUTES": "10", **settings, **env}
    return LiveSource(load(WatcherSettings, environ), load(ExchangeSettings, environ))


def quiet_fakes(soak_s: float = 3600) -> tuple[SoakBinance, SoakKraken]:
    """Binance and Kraken that tell the truth (no lie falls within the test)."""
    lies = Injections(1, now_ms() + 3_600_000, soak_s)
    return (
        SoakBinance({"BTCUSDT": 30_000.0, "ETHUSDT": 2_000.0}, lies),
        SoakKraken({"BTC/USD": 30_100.0, "ETH/USD": 2_010.0}, lies),
    )


class ListingDown:
    """Wraps a fake: its listing answers 400 until `up` is set."""

    def __init__(self, fake: Any, listing: str) -> None:
        self.fake, self.listing, self.up = fake, listing, False
        self.name, self.ws = fake.name, fake.ws

    def route(self, path: str, query: dict[str, str]) -> Any:
        if path == self.listing and not self.up:
            return 400, {"error": ["EService:Unavailable"]}
        return self.fake.route(path, query)


async def test_an_exchange_whose_listing_fails_does_not_stop_the_others() -> None:
    """Binance streams while Kraken's listing fails; Kraken's markets are reported
    unreachable, and once its listing answers they join the running source (Binance's
    connection untouched)."""
    binance, kraken = quiet_fakes()
    down = ListingDown(kraken, "/0/public/AssetPairs")
    async with exchange_urls(binance, down) as env:
        source = source_of(env, WATCHER_MARKETS="binance:btc-usdt,kraken:btc-usd")
        await source.start()
        assert [m.id for m in source.markets] == ["binance:btc-usdt"]
        reports = source.feed_reports(now_ms())
        assert reports["kraken:btc-usd"].state == "unreachable"
        source._relist_every_s = 0.2
        got: list[Tick] = []
        async with asyncio.timeout(deadline(20)):
            async for chunk in source.chunks():
                got += chunk
                if any(t.closed for t in got):
                    down.up = True  # Kraken's listing answers from now on
                if any(t.market == "kraken:btc-usd" and t.closed for t in got):
                    break
        assert not down.up or source.unlisted == {}
        assert [m.id for m in source.markets] == ["binance:btc-usdt", "kraken:btc-usd"]
        assert source.feed_reports(now_ms())["kraken:btc-usd"].state == "live"
    binance_feed, kraken_feed = source.feeds
    assert (binance_feed.counters.connects, kraken_feed.counters.connects) == (1, 1)


async def test_a_task_of_the_source_that_fails_ends_it_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error in a feed's delivery ends `chunks` with that error, logged with its
    traceback, instead of a task dying unnoticed while the others go on."""
    binance, _ = quiet_fakes()
    async with exchange_urls(binance) as env:
        source = source_of(env, WATCHER_MARKETS="binance:btc-usdt")
        await source.start()

        def broken(*_: Any) -> list[Tick]:
            raise RuntimeError("a bug in the bar builder")

        source.bars.candle = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR), pytest.raises(ExceptionGroup) as failed:
            async with asyncio.timeout(deadline(10)):
                async for _ in source.chunks():
                    pass
    assert failed.group_contains(RuntimeError, match="a bug in the bar builder")
    (record,) = [r for r in caplog.records if "the live source failed" in r.message]
    assert record.exc_info is not None


async def test_a_market_silent_on_a_busy_connection_is_stale_resubscribed_and_repaired() -> None:
    """Binance keeps streaming BTC while ETH goes silent: ETH is reported stale and its
    connection renewed once; when ETH speaks again it is live again."""
    binance, _ = quiet_fakes()
    start = now_ms()
    binance.silent = ("ETHUSDT", start + 3_000, start + 20_000)
    async with exchange_urls(binance) as env:
        source = source_of(
            env,
            WATCHER_MARKETS="binance:btc-usdt,binance:eth-usdt",
            WATCHER_MARKET_SILENCE_MS="3000",
        )
        await source.start()
        seen_stale = False
        async with asyncio.timeout(deadline(40)):
            async for _ in source.chunks():
                state = source.feed_reports(now_ms())["binance:eth-usdt"].state
                seen_stale = seen_stale or state == "stale"
                if seen_stale and state == "live" and now_ms() > start + 21_000:
                    break
    assert source.watchdog.detected == {"binance": 1}
    (feed,) = source.feeds
    assert feed.counters.connects == 2  # renewed once for the silent market
