"""LiveSource: the exchanges' public feeds as minute-bar ticks, backfilled after every connect."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from tickstream_shared.feed_status import FeedStatus, ReportedState
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import ExchangeSettings, WatcherSettings
from tickstream_watcher.binance import MAX_STREAMS, BinanceProtocol
from tickstream_watcher.checkpoints import ResumePlan
from tickstream_watcher.coinbase import CoinbaseProtocol
from tickstream_watcher.exchange import BadFrame, CandleUpdate, ExchangeProtocol, FeedEvent, Trade
from tickstream_watcher.feed import LIMITS, ExchangeFeed
from tickstream_watcher.kraken import KrakenProtocol
from tickstream_watcher.live_bars import LiveBars
from tickstream_watcher.market_spec import parse_specs, resolve
from tickstream_watcher.rest import RestClient, RestUnavailable

log = logging.getLogger(__name__)

# Chunks of ticks waiting for the publisher. When full, `deliver` waits, so reading from the
# sockets waits too (the exchange's data stays in the kernel buffer) instead of memory growing.
_QUEUE_CHUNKS: Final = 256
# How often forming bars are flushed (conflated updates) and silent minutes closed.
_CLOCK_TICK_S: Final = 0.25
# How often minutes with missed trades are looked for and repaired from REST candles.
_REPAIR_EVERY_S: Final = 2.0
# Candles per REST request, per exchange (their documented maxima), and the pacing of requests
# (Coinbase: 8 requests/s per IP; Kraken's public API: about 1/s; Binance: weight 2 per klines
# call out of 6,000 a minute).
_PAGE_MINUTES: Final = {"binance": 1000, "coinbase": 300, "kraken": 720}
_REST_INTERVAL_S: Final = {"binance": 0.1, "coinbase": 0.2, "kraken": 1.0}
_Protocols = dict[str, Callable[[dict[Market, str]], ExchangeProtocol]]
_PROTOCOLS: Final[_Protocols] = {
    "binance": BinanceProtocol.from_listing,
    "coinbase": CoinbaseProtocol.from_listing,
    "kraken": KrakenProtocol.from_listing,
}


@dataclass(frozen=True, slots=True)
class _Endpoints:
    ws: str
    rest: str


def _endpoints(settings: ExchangeSettings) -> dict[str, _Endpoints]:
    return {
        "binance": _Endpoints(settings.binance_ws_url, settings.binance_rest_url),
        "coinbase": _Endpoints(settings.coinbase_ws_url, settings.coinbase_rest_url),
        "kraken": _Endpoints(settings.kraken_ws_url, settings.kraken_rest_url),
    }


def now_us() -> int:
    return time.time_ns() // 1000


class LiveSource:
    """Minute bars of WATCHER_MARKETS from Binance, Coinbase and Kraken, live.

    `start` reads each exchange's listing and resolves the markets (unknown ones are logged and
    skipped). `chunks` then runs, per exchange, its feed connections and, after every connect,
    a REST backfill of the closed minutes not yet published (up to WATCHER_BACKFILL_MINUTES),
    and a clock that flushes conflated updates and closes silent minutes. Every task is owned
    by `chunks` and cancelled when it ends.
    """

    resumable = True

    def __init__(self, settings: WatcherSettings, exchanges: ExchangeSettings) -> None:
        self._specs = parse_specs(settings.markets)
        self._max_markets = settings.max_markets
        self._backfill_minutes = settings.backfill_minutes
        self._silence_ms = settings.feed_silence_ms
        self._endpoints = _endpoints(exchanges)
        unknown = {spec.exchange for spec in self._specs} - set(self._endpoints)
        if unknown:
            raise ValueError(f"WATCHER_MARKETS names exchanges with no live feed: {unknown}")
        self.markets: list[Market] = []
        self.bars = LiveBars()
        self._protocols: dict[str, ExchangeProtocol] = {}
        self._symbols: dict[str, dict[Market, str]] = {}
        self._rest: dict[str, RestClient] = {}
        self.feeds: list[ExchangeFeed] = []
        self._feed_of: dict[Market, ExchangeFeed] = {}

    async def start(self) -> None:
        """Resolve the markets against the listings; raises RestUnavailable or BadFrame."""
        listings: dict[str, dict[Market, str]] = {}
        for exchange in sorted({spec.exchange for spec in self._specs}):
            rest = self._rest[exchange] = RestClient(
                self._endpoints[exchange].rest, min_interval_s=_REST_INTERVAL_S[exchange]
            )
            parser = _PROTOCOLS[exchange]({})
            listings[exchange] = dict(parser.parse_listing(await rest.get(parser.listing_path())))
        resolution = resolve(self._specs, listings, self._max_markets)
        for entry in resolution.unknown:
            log.warning("market %s is not listed by its exchange: skipped", entry)
        if resolution.capped:
            log.warning("%d markets left out by WATCHER_MAX_MARKETS", resolution.capped)
        self._symbols = resolution.symbols
        self._protocols = {ex: _PROTOCOLS[ex](by_market) for ex, by_market in self._symbols.items()}
        self.markets = resolution.markets
        log.info("watching %d live markets: %s", len(self.markets), [m.id for m in self.markets])

    def resume(self, plan: ResumePlan) -> None:
        """Continue where the previous publisher of these markets stopped (see `leadership`)."""
        for market in self.markets:
            point, again = plan.points.get(market.id), plan.republish.get(market.id)
            self.bars.resume(
                market,
                point.minute if point else None,
                max(point.seq if point else -1, again.seq if again else -1),
                again.minute if again else None,
            )

    def feed_reports(self, now_ms: int) -> dict[str, FeedStatus]:
        reports = {}
        for market in self.markets:
            feed = self._feed_of.get(market)
            state: ReportedState = "live" if feed and feed.state == "live" else "reconnecting"
            last = self.bars.last_update_ms(market)
            reports[market.id] = FeedStatus("live", market.exchange, state, now_ms, last)
        return reports

    async def chunks(self) -> AsyncGenerator[list[Tick]]:
        queue: asyncio.Queue[list[Tick]] = asyncio.Queue(_QUEUE_CHUNKS)
        stop = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        try:
            for exchange, protocol in self._protocols.items():
                symbols = sorted(self._symbols[exchange].values())
                markets = list(self._symbols[exchange])
                # Binance takes at most MAX_STREAMS streams per connection.
                size = MAX_STREAMS if exchange == "binance" else len(symbols)
                for start in range(0, len(symbols), size):
                    feed = self._feed(exchange, protocol, symbols[start : start + size], queue)
                    feed.on_connected = self._backfill_on_connect(exchange, markets, queue, tasks)
                    self.feeds.append(feed)
                    served = set(feed.symbols)
                    for market, symbol in self._symbols[exchange].items():
                        if symbol in served:
                            self._feed_of[market] = feed
                    tasks.add(asyncio.create_task(feed.run(stop)))
            tasks.add(asyncio.create_task(self._clock(queue, stop)))
            tasks.add(asyncio.create_task(self._repairs(queue, stop)))
            while True:
                yield await queue.get()
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for rest in self._rest.values():
                await rest.aclose()

    def _feed(
        self,
        exchange: str,
        protocol: ExchangeProtocol,
        symbols: list[str],
        queue: asyncio.Queue[list[Tick]],
    ) -> ExchangeFeed:
        bars = self.bars

        async def deliver(events: list[FeedEvent], received_us: int) -> None:
            ticks: list[Tick] = []
            for event in events:
                if isinstance(event, CandleUpdate):
                    ticks += bars.candle(event, received_us)
                elif isinstance(event, Trade):
                    ticks += bars.trade(event, received_us)
            if ticks:
                await queue.put(ticks)

        limits = LIMITS[exchange]
        if self._silence_ms:
            limits = dataclasses.replace(limits, silence_s=self._silence_ms / 1000)
        return ExchangeFeed(protocol, self._endpoints[exchange].ws, symbols, limits, deliver)

    def _backfill_on_connect(
        self,
        exchange: str,
        markets: list[Market],
        queue: asyncio.Queue[list[Tick]],
        tasks: set[asyncio.Task[None]],
    ) -> Callable[[], Awaitable[None]]:
        async def on_connected() -> None:
            self.bars.connected(markets)  # before the first frame of this connection is read
            # In a task of its own: the connection must keep reading while REST answers come.
            task = asyncio.create_task(self._backfill(exchange, markets, queue))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return on_connected

    async def _backfill(
        self, exchange: str, markets: list[Market], queue: asyncio.Queue[list[Tick]]
    ) -> None:
        """Publish the closed minutes of `markets` missed so far, oldest first, per market."""
        if self._backfill_minutes == 0:
            return
        rest, protocol = self._rest[exchange], self._protocols[exchange]
        page = _PAGE_MINUTES[exchange] * MINUTE_MS
        for market in markets:
            now = now_us() // 1000
            current = now - now % MINUTE_MS
            first = current - self._backfill_minutes * MINUTE_MS
            after = self.bars.backfilled_through(market)
            if after is not None:
                first = max(first, after + MINUTE_MS)
            symbol = self._symbols[exchange][market]
            filled = 0
            try:
                for start in range(first, current, page):
                    end = min(start + page, current) - MINUTE_MS
                    body = await rest.get(protocol.candles_path(symbol, start, end))
                    candles = protocol.parse_candles(market, body)
                    ticks = self.bars.backfill(market, candles, now_us())
                    filled += len(ticks)
                    if ticks:
                        await queue.put(ticks)
                self.bars.backfilled(market, current - MINUTE_MS)
            except (RestUnavailable, BadFrame) as exc:
                # Not marked as backfilled: the next connect's backfill asks again.
                log.warning("backfill of %s stopped: %s", market.id, exc)
            missing = (current - first) // MINUTE_MS - filled
            log.info(
                "backfilled %s: %d closed minutes (%d minutes without a candle or not offered)",
                market.id,
                filled,
                max(missing, 0),
            )

    async def _repairs(self, queue: asyncio.Queue[list[Tick]], stop: asyncio.Event) -> None:
        """Close minutes whose trades the stream missed from REST candles (see LiveBars).

        One market at a time, through the exchange's paced REST client: repairs are rare (a
        trade-id gap, the first minute seen), and this keeps them inside the request limits.
        """
        while not stop.is_set():
            for market, (first, last) in self.bars.repairs_due(now_us() // 1000).items():
                exchange = market.exchange
                protocol, symbol = self._protocols[exchange], self._symbols[exchange][market]
                candles: list[CandleUpdate] = []
                try:
                    body = await self._rest[exchange].get(
                        protocol.candles_path(symbol, first, last)
                    )
                    candles = protocol.parse_candles(market, body)
                except (RestUnavailable, BadFrame) as exc:
                    log.warning("repair of %s: no candles: %s", market.id, exc)
                ticks = self.bars.repair(market, candles, now_us())
                if ticks:
                    await queue.put(ticks)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_REPAIR_EVERY_S)

    async def _clock(self, queue: asyncio.Queue[list[Tick]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = now_us()
            ticks = self.bars.close_due(now) + self.bars.flush(now)
            if ticks:
                await queue.put(ticks)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_CLOCK_TICK_S)
