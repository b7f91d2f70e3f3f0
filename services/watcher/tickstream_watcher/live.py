"""LiveSource: the exchanges' public feeds as minute-bar ticks, backfilled, checked, reconciled."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Final, Literal

from tickstream_shared.feed_status import FeedStatus, ReportedState
from tickstream_shared.naming import Market
from tickstream_shared.observability import READINGS, Family, Reading
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import ExchangeSettings, WatcherSettings
from tickstream_watcher.checkpoints import ResumePlan
from tickstream_watcher.exchange import (
    BadFrame,
    CandlePage,
    CandleUpdate,
    ExchangeProtocol,
    FeedEvent,
    Heartbeat,
    Trade,
)
from tickstream_watcher.feed import ExchangeFeed
from tickstream_watcher.live_bars import LiveBarCounters, LiveBars
from tickstream_watcher.market_spec import parse_specs, resolve
from tickstream_watcher.registry import EXCHANGES
from tickstream_watcher.rest import RestClient, RestUnavailable
from tickstream_watcher.sources import SourceRestart
from tickstream_watcher.trust import TrustRules
from tickstream_watcher.watchdog import MarketWatchdog

log = logging.getLogger(__name__)

# Chunks of ticks waiting for the publisher. When full, `deliver` waits, so reading from the
# sockets waits too (the exchange's data stays in the kernel buffer) instead of memory growing.
_QUEUE_CHUNKS: Final = 256
# How often forming bars are flushed (conflated updates) and silent minutes closed.
_CLOCK_TICK_S: Final = 0.25
# How often markets are checked for silence, and the shortest time between two renewals of
# one connection because of a silent market (a thin market must not make it flap).
_WATCHDOG_EVERY_S: Final = 1.0
_RENEW_AT_MOST_EVERY_S: Final = 60.0
# How often REST work (repairs, reconciliation) is looked for when there was none.
_VERIFY_EVERY_S: Final = 1.0
# An exchange whose listing could not be read at start is asked again this often.
_RELIST_EVERY_S: Final = 30.0


class ListingsChanged(SourceRestart):
    """An exchange whose listing was unreachable at start answers now: start the source again
    (the watcher hands its lease on and takes it again, with the new markets)."""


def now_us() -> int:
    return time.time_ns() // 1000


def _family(name: str, help_text: str, kind: Literal["counter", "gauge"] = "counter") -> Family:
    return Family(f"tickstream_live_{name}", help_text, kind, ("exchange",))


# What LiveBars counts, exported per exchange (docs/operations.md says what to do about each).
_BAR_FAMILIES: Final = {
    "late": _family("late_total", "Updates of minutes already closed, dropped."),
    "ahead": _family("ahead_total", "Updates dated too far ahead of their receipt, refused."),
    "duplicate_trades": _family("duplicate_trades_total", "Trades seen twice, dropped."),
    "trade_gaps": _family("trade_gaps_total", "Trades the stream skipped (trade-id gaps)."),
    "repaired": _family("repaired_total", "Minutes held for REST closed from its candle."),
    "unrepaired": _family(
        "unrepaired_total", "Minutes held for REST closed from the stream: no candle in time."
    ),
    "unrepairable": _family(
        "unrepairable_total", "Minutes of a trade gap beyond the repair bound."
    ),
    "corrected": _family(
        "corrected_total", "Closed minutes published again with the exchange's differing word."
    ),
    "implausible": _family("implausible_total", "Updates held back as implausible."),
    "implausible_dropped": _family(
        "implausible_dropped_total", "Implausible minutes never confirmed by REST, not published."
    ),
    "reconciled": _family("reconciled_total", "Closed minutes compared with the REST candle."),
    "filled": _family("filled_total", "Minutes only REST had, published by reconciliation."),
    "unconfirmed": _family(
        "unconfirmed_total", "Published minutes REST had no candle for when compared."
    ),
    "bad_rest_rows": _family("bad_rest_rows_total", "REST candle rows skipped as invalid."),
}
_STALE_DETECTED: Final = _family(
    "stale_detected_total", "Markets found silent while their connection was busy."
)
_STALE_MARKETS: Final = _family(
    "stale_markets", "Markets silent while their connection is busy, now.", "gauge"
)
_UNREACHABLE: Final = _family(
    "exchange_unreachable", "1 while the exchange's listing or feed cannot be reached.", "gauge"
)


def _bar_totals(counters: dict[str, LiveBarCounters], detected: dict[str, int]) -> list[Reading]:
    readings: list[Reading] = []
    for exchange, counted in counters.items():
        for name, family in _BAR_FAMILIES.items():
            readings.append((family, (exchange,), getattr(counted, name)))
    readings += [(_STALE_DETECTED, (ex,), count) for ex, count in detected.items()]
    return readings


class LiveSource:
    """Minute bars of WATCHER_MARKETS from Binance, Coinbase, Kraken and OKX, live.

    `start` reads each exchange's listing, each on its own (one that cannot be read is
    logged, its markets shown unreachable, and asked again in the background: when it
    answers, `chunks` raises ListingsChanged). `chunks` then runs, in one task group: per
    exchange, its feed connections and, after every connect, a REST backfill of the closed
    minutes not yet published (up to WATCHER_BACKFILL_MINUTES); per exchange a verifier that
    repairs held minutes and reconciles closed ones with REST; a clock that flushes conflated
    updates, closes silent minutes and runs the per-market watchdog. A task that fails ends
    the group, and `chunks` raises its error: the watcher stops and a standby takes over.
    """

    resumable = True

    def __init__(self, settings: WatcherSettings, exchanges: ExchangeSettings) -> None:
        self._specs = parse_specs(settings.markets)
        self._max_markets = settings.max_markets
        self._backfill_minutes = settings.backfill_minutes
        self._silence_ms = settings.feed_silence_ms
        unknown = {spec.exchange for spec in self._specs} - set(EXCHANGES)
        if unknown:
            raise ValueError(f"WATCHER_MARKETS names exchanges with no live feed: {unknown}")
        self._endpoints = {name: exchanges.endpoints(name) for name in EXCHANGES}
        rules = TrustRules(
            max_ahead_ms=settings.max_ahead_ms,
            price_factor=settings.plausible_price_factor,
            volume_factor=settings.plausible_volume_factor,
            reconcile_after_ms=settings.reconcile_after_ms,
            reconcile_settle_ms=settings.reconcile_settle_ms,
        )
        self.markets: list[Market] = []
        self.bars = LiveBars(rules=rules)
        self.watchdog = MarketWatchdog(min_silence_ms=settings.market_silence_ms)
        self._protocols: dict[str, ExchangeProtocol] = {}
        self._symbols: dict[str, dict[Market, str]] = {}
        self._rest: dict[str, RestClient] = {}
        self.feeds: list[ExchangeFeed] = []
        self._feed_of: dict[Market, ExchangeFeed] = {}
        self._markets_of: dict[int, list[Market]] = {}  # id(feed) -> its markets
        self._renewed_at: dict[int, float] = {}  # id(feed) -> monotonic time of the last renewal
        # Exchanges whose listing could not be read: their exact markets are shown unreachable.
        self.unlisted: dict[str, list[Market]] = {}
        self._relist_every_s = _RELIST_EVERY_S
        READINGS.track(
            self,
            totals=functools.partial(_bar_totals, self.bars.counters, self.watchdog.detected),
            current=LiveSource._current_readings,
        )

    def _current_readings(self) -> list[Reading]:
        stale: dict[str, int] = {}
        for market in self.watchdog.stale:
            stale[market.exchange] = stale.get(market.exchange, 0) + 1
        readings: list[Reading] = [
            (_STALE_MARKETS, (exchange,), float(stale.get(exchange, 0)))
            for exchange in {*self._protocols, *self.unlisted}
        ]
        down = {feed.protocol.name for feed in self.feeds if feed.unreachable}
        for exchange in {*self._protocols, *self.unlisted}:
            value = 1.0 if exchange in self.unlisted or exchange in down else 0.0
            readings.append((_UNREACHABLE, (exchange,), value))
        return readings

    async def start(self) -> None:
        """Resolve the markets against the listings, each exchange on its own; raises
        RestUnavailable if no exchange's listing could be read."""
        exchanges = sorted({spec.exchange for spec in self._specs})
        for exchange in exchanges:
            spec = EXCHANGES[exchange]
            self._rest[exchange] = RestClient(
                self._endpoints[exchange][1],
                min_interval_s=spec.rest_interval_s,
                throttled_body=spec.rest_throttled,
            )
        found = await asyncio.gather(*(self._listing(exchange) for exchange in exchanges))
        listings = {ex: listing for ex, listing in zip(exchanges, found, strict=True) if listing}
        self.unlisted = {
            exchange: [
                Market(exchange, spec.base, spec.quote)
                for spec in self._specs
                if spec.exchange == exchange and not spec.is_pattern
            ]
            for exchange in exchanges
            if exchange not in listings
        }
        if not listings:
            for rest in self._rest.values():
                await rest.aclose()  # the next attempt makes a new source
            raise RestUnavailable(f"no listing could be read ({', '.join(exchanges)})")
        # The markets of an exchange without a listing are reported unreachable, not unknown.
        listed = [spec for spec in self._specs if spec.exchange in listings]
        resolution = resolve(listed, listings, self._max_markets)
        for entry in resolution.unknown:
            log.warning("market %s is not listed by its exchange: skipped", entry)
        if resolution.capped:
            log.warning("%d markets left out by WATCHER_MAX_MARKETS", resolution.capped)
        self._symbols = resolution.symbols
        self._protocols = {
            ex: EXCHANGES[ex].from_listing(by_market) for ex, by_market in self._symbols.items()
        }
        self.markets = resolution.markets
        log.info("watching %d live markets: %s", len(self.markets), [m.id for m in self.markets])

    async def _listing(self, exchange: str) -> dict[Market, str] | None:
        """The exchange's listing, or None (logged) if it cannot be read now."""
        parser = EXCHANGES[exchange].from_listing({})
        try:
            return dict(parser.parse_listing(await self._rest[exchange].get(parser.listing_path())))
        except (RestUnavailable, BadFrame) as exc:
            log.error("%s: listing unavailable, its markets wait for it: %s", exchange, exc)
            return None

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
            last = self.bars.last_update_ms(market)
            state = self._state_of(market)
            reports[market.id] = FeedStatus("live", market.exchange, state, now_ms, last)
        for exchange, markets in self.unlisted.items():
            for market in markets:
                reports[market.id] = FeedStatus("live", exchange, "unreachable", now_ms, None)
        return reports

    def _state_of(self, market: Market) -> ReportedState:
        feed = self._feed_of.get(market)
        if feed is None or (feed.state == "connecting" and feed.failures == 0):
            return "connecting"
        if feed.unreachable:
            return "unreachable"
        if feed.state != "live":
            return "reconnecting"
        return "stale" if market in self.watchdog.stale else "live"

    async def chunks(self) -> AsyncGenerator[list[Tick]]:
        queue: asyncio.Queue[list[Tick]] = asyncio.Queue(_QUEUE_CHUNKS)
        stop = asyncio.Event()
        # The task group lives in a task of its own, never across a `yield`: cancelling the
        # consumer of this generator must not be mistaken for a failure of the group.
        runner = asyncio.create_task(self._run(queue, stop), name="live-source")
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, runner}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                try:
                    runner.result()
                except* ListingsChanged as changed:
                    raise changed.exceptions[0] from None
                except* Exception:
                    log.exception("the live source failed; stopping it")
                    raise
                return
        finally:
            stop.set()
            if not runner.done():  # a finished runner's error was raised above
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
            for rest in self._rest.values():
                await rest.aclose()

    async def _run(self, queue: asyncio.Queue[list[Tick]], stop: asyncio.Event) -> None:
        """Every task of the source in one group, until cancelled or one of them fails."""
        async with asyncio.TaskGroup() as group:
            for exchange, protocol in self._protocols.items():
                self._start_exchange(group, exchange, protocol, queue, stop)
                group.create_task(self._verify(exchange, queue, stop), name=f"{exchange}-rest")
            group.create_task(self._clock(queue, stop), name="live-clock")
            for exchange in self.unlisted:
                group.create_task(self._relist(exchange, stop), name=f"{exchange}-listing")

    def _start_exchange(
        self,
        group: asyncio.TaskGroup,
        exchange: str,
        protocol: ExchangeProtocol,
        queue: asyncio.Queue[list[Tick]],
        stop: asyncio.Event,
    ) -> None:
        symbols = sorted(self._symbols[exchange].values())
        size = EXCHANGES[exchange].markets_per_connection or len(symbols)
        for start in range(0, len(symbols), size):
            feed = self._feed(exchange, protocol, symbols[start : start + size], queue)
            served = set(feed.symbols)
            markets = [m for m, symbol in self._symbols[exchange].items() if symbol in served]
            feed.on_connected = self._backfill_on_connect(group, exchange, markets, queue)
            self.feeds.append(feed)
            self._markets_of[id(feed)] = markets
            for market in markets:
                self._feed_of[market] = feed
            group.create_task(feed.run(stop), name=f"{exchange}-feed-{start}")

    def _feed(
        self,
        exchange: str,
        protocol: ExchangeProtocol,
        symbols: list[str],
        queue: asyncio.Queue[list[Tick]],
    ) -> ExchangeFeed:
        bars, watchdog = self.bars, self.watchdog

        async def deliver(events: list[FeedEvent], received_us: int) -> None:
            ticks: list[Tick] = []
            received_ms = received_us // 1000
            for event in events:
                if isinstance(event, CandleUpdate):
                    watchdog.heard(event.market, received_ms)
                    ticks += bars.candle(event, received_us)
                elif isinstance(event, Trade):
                    watchdog.heard(event.market, received_ms)
                    ticks += bars.trade(event, received_us)
                elif isinstance(event, Heartbeat) and event.market is not None:
                    watchdog.heard(event.market, received_ms)
            if ticks:
                await queue.put(ticks)

        limits = EXCHANGES[exchange].limits
        if self._silence_ms:
            limits = dataclasses.replace(limits, silence_s=self._silence_ms / 1000)
        return ExchangeFeed(protocol, self._endpoints[exchange][0], symbols, limits, deliver)

    def _backfill_on_connect(
        self,
        group: asyncio.TaskGroup,
        exchange: str,
        markets: list[Market],
        queue: asyncio.Queue[list[Tick]],
    ) -> Callable[[], Awaitable[None]]:
        async def on_connected() -> None:
            self.bars.connected(markets)  # before the first frame of this connection is read
            self.watchdog.expect(markets, now_us() // 1000)
            # In a task of its own: the connection must keep reading while REST answers come.
            group.create_task(self._backfill(exchange, markets, queue))

        return on_connected

    async def _backfill(
        self, exchange: str, markets: list[Market], queue: asyncio.Queue[list[Tick]]
    ) -> None:
        """Publish the closed minutes of `markets` missed so far, oldest first, per market."""
        if self._backfill_minutes == 0:
            return
        page = EXCHANGES[exchange].page_minutes * MINUTE_MS
        for market in markets:
            now = now_us() // 1000
            current = now - now % MINUTE_MS
            first = current - self._backfill_minutes * MINUTE_MS
            after = self.bars.backfilled_through(market)
            if after is not None:
                first = max(first, after + MINUTE_MS)
            filled = 0
            try:
                for start in range(first, current, page):
                    end = min(start + page, current) - MINUTE_MS
                    candles = await self._candles(exchange, market, start, end)
                    ticks = self.bars.backfill(market, candles.candles, now_us())
                    if candles.bad_rows:
                        self.bars.recheck(market, start)  # reconciled once REST is asked again
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

    async def _candles(self, exchange: str, market: Market, first: int, last: int) -> CandlePage:
        """REST candles of `market` from `first` to `last`; bad rows counted and logged once
        per page (the caller asks for their minutes again: `bars.recheck`, once it has used
        the page). Raises RestUnavailable or BadFrame."""
        protocol, symbol = self._protocols[exchange], self._symbols[exchange][market]
        page = protocol.parse_candles(
            market, await self._rest[exchange].get(protocol.candles_path(symbol, first, last))
        )
        if page.bad_rows:
            self.bars.bad_rest_rows(market, len(page.bad_rows))
            log.warning(
                "%s: %d bad REST candle rows skipped (%s)",
                market.id,
                len(page.bad_rows),
                page.bad_rows[0],
            )
        return page

    def _answered(self, market: Market, page: CandlePage) -> None:
        """After a REST answer: a page with bad rows makes the market's next request wait (an
        exchange that keeps sending a bad row costs a request every few minutes, not every
        turn); a clean one ends any wait."""
        if page.bad_rows:
            self.bars.rest_failed(market, now_us() // 1000)
        else:
            self.bars.rest_answered(market)

    async def _verify(
        self, exchange: str, queue: asyncio.Queue[list[Tick]], stop: asyncio.Event
    ) -> None:
        """The exchange's REST work after the stream: repairs of held minutes first (they are
        due within seconds), then one reconciliation request for the most overdue market, in
        turn. Every request goes through the exchange's paced client, so the pace never
        exceeds its documented limits; when more is due than they allow, it goes as fast as
        they allow, and a market's next request covers every minute it has due by then.
        """
        while not stop.is_set():
            now_ms = now_us() // 1000
            worked = False
            for market, (first, last) in self.bars.repairs_due(now_ms).items():
                if market.exchange != exchange:
                    continue
                candles: list[CandleUpdate] = []
                try:
                    page = await self._candles(exchange, market, first, last)
                except (RestUnavailable, BadFrame) as exc:
                    log.warning("repair of %s: no candles: %s", market.id, exc)
                    self.bars.rest_failed(market, now_us() // 1000)
                else:
                    candles = page.candles
                    self._answered(market, page)
                await self._put(queue, self.bars.repair(market, candles, now_us()))
                worked = True
            due = [
                entry for entry in self.bars.reconcile_due(now_ms) if entry[0].exchange == exchange
            ]
            if due:
                market, first, last = due[0]
                try:
                    page = await self._candles(exchange, market, first, last)
                except (RestUnavailable, BadFrame) as exc:
                    # Not marked reconciled: asked again on a later turn (a 429 is waited out
                    # by the client; an outage is caught up when the exchange answers again).
                    log.warning("reconciliation of %s: %s", market.id, exc)
                    self.bars.rest_failed(market, now_us() // 1000)
                else:
                    complete = not page.bad_rows  # else the refused rows, on a later turn
                    ticks = self.bars.reconcile(
                        market, page.candles, first, last, now_us(), complete=complete
                    )
                    self._answered(market, page)
                    if ticks:
                        log.warning(
                            "%s: %d minutes corrected or filled from REST", market.id, len(ticks)
                        )
                    await self._put(queue, ticks)
                worked = True
            if not worked:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=_VERIFY_EVERY_S)

    async def _clock(self, queue: asyncio.Queue[list[Tick]], stop: asyncio.Event) -> None:
        next_watch = time.monotonic()
        while not stop.is_set():
            now = now_us()
            await self._put(queue, self.bars.close_due(now) + self.bars.flush(now))
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + _WATCHDOG_EVERY_S
                self._watch(now // 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_CLOCK_TICK_S)

    def _watch(self, now_ms: int) -> None:
        """Markets silent on a busy connection: stale, repaired from REST, resubscribed."""
        for feed in self.feeds:
            if feed.state != "live":
                continue
            silent = self.watchdog.silent(self._markets_of[id(feed)], now_ms)
            for market in silent:
                since = self.watchdog.last_heard(market) or now_ms
                log.warning(
                    "%s: silent for %.0fs while its connection is busy: stale, resubscribing",
                    market.id,
                    (now_ms - since) / 1000,
                )
                self.bars.suspect(market, since)
            renewed = self._renewed_at.get(id(feed), float("-inf"))
            if silent and time.monotonic() - renewed >= _RENEW_AT_MOST_EVERY_S:
                self._renewed_at[id(feed)] = time.monotonic()
                feed.renew()

    async def _relist(self, exchange: str, stop: asyncio.Event) -> None:
        """Ask an unlisted exchange for its listing until it answers, then raise
        ListingsChanged: the source starts again with its markets."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._relist_every_s)
            if not stop.is_set() and await self._listing(exchange) is not None:
                raise ListingsChanged(f"{exchange}: listing readable again")

    @staticmethod
    async def _put(queue: asyncio.Queue[list[Tick]], ticks: list[Tick]) -> None:
        if ticks:
            await queue.put(ticks)
