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
from tickstream_watcher.backfill import BackfillQueue
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
from tickstream_watcher.outbox import TickOutbox
from tickstream_watcher.registry import EXCHANGES
from tickstream_watcher.rest import RestClient, RestUnavailable
from tickstream_watcher.sources import CHUNK_TICKS
from tickstream_watcher.trust import TrustRules
from tickstream_watcher.watchdog import MarketWatchdog

log = logging.getLogger(__name__)

# Ticks REST work (backfill, repairs, reconciliation) may add to the outbox only while fewer
# than this wait for the publisher: about 10 s of publishing on this machine, and 14 Binance
# backfill pages. The stream never waits (see TickOutbox).
_REST_ROOM: Final = 20_000
# How often backfill progress is logged while backfills are pending.
_PROGRESS_EVERY_S: Final = 10.0
# How often forming bars are flushed (conflated updates) and silent minutes closed.
_CLOCK_TICK_S: Final = 0.25
# How often markets are checked for silence, and the shortest time between two renewals of
# one connection because of a silent market (a thin market must not make it flap).
_WATCHDOG_EVERY_S: Final = 1.0
_RENEW_AT_MOST_EVERY_S: Final = 60.0
# How often REST work (repairs, reconciliation) is looked for when there was none.
_VERIFY_EVERY_S: Final = 1.0
# An exchange whose listing could not be read (at start, or since) is asked again this often.
_RELIST_EVERY_S: Final = 30.0


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
_BACKFILL_REQUESTS: Final = _family("backfill_requests_total", "REST requests made by backfills.")
_BACKFILL_MINUTES: Final = _family(
    "backfill_minutes_total", "Closed minutes backfills published from REST candles."
)
_BACKFILL_PENDING: Final = _family(
    "backfill_markets_pending", "Markets waiting for a backfill or being backfilled.", "gauge"
)
_BACKFILL_DONE: Final = _family(
    "backfill_markets_done",
    "Markets whose backfill reached the minutes their connection streams.",
    "gauge",
)


def _bar_totals(
    counters: dict[str, LiveBarCounters],
    detected: dict[str, int],
    backfills: dict[str, BackfillQueue],
) -> list[Reading]:
    readings: list[Reading] = []
    for exchange, counted in counters.items():
        for name, family in _BAR_FAMILIES.items():
            readings.append((family, (exchange,), getattr(counted, name)))
    readings += [(_STALE_DETECTED, (ex,), count) for ex, count in detected.items()]
    for exchange, queue in backfills.items():
        readings.append((_BACKFILL_REQUESTS, (exchange,), queue.requests))
        readings.append((_BACKFILL_MINUTES, (exchange,), queue.minutes))
    return readings


class LiveSource:
    """Minute bars of WATCHER_MARKETS from Binance, Coinbase, Kraken and OKX, live.

    `start` reads each exchange's listing, each on its own (one that cannot be read is
    logged and its markets shown unreachable). `chunks` then runs, in one task group: per
    exchange, its feed connections; backfill workers that, after every connect, fetch from
    REST the closed minutes of the connection's markets not yet published (up to
    WATCHER_BACKFILL_MINUTES; one backfill per market at a time, see BackfillQueue); a
    verifier that repairs held minutes and reconciles closed ones with REST; a task that
    reads the listing again (every WATCHER_LISTING_REFRESH_S, or every 30 s while it cannot
    be read), so that new markets join on a connection of their own and delisted ones leave,
    without touching the other markets' connections; and a clock that flushes conflated
    updates, closes silent minutes, runs the per-market watchdog and logs backfill progress.
    Everything waits for the publisher in a TickOutbox the stream never waits on. A task
    that fails ends the group, and `chunks` raises its error: the watcher stops and a
    standby takes over.
    """

    resumable = True

    def __init__(self, settings: WatcherSettings, exchanges: ExchangeSettings) -> None:
        self._specs = parse_specs(settings.markets)
        self._max_markets = settings.max_markets
        self._backfill_minutes = settings.backfill_minutes
        self._backfill_workers = settings.backfill_workers
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
        self._listing_refresh_s = settings.listing_refresh_s
        # Markets that left their exchange's listing while running: reported finished, their
        # events ignored until their connection drops them. Bounded by the markets delisted.
        self.gone: set[Market] = set()
        self._group: asyncio.TaskGroup | None = None  # the running group, for markets joining
        # What the stream and REST made, waiting for the publisher (see TickOutbox).
        self._outbox = TickOutbox(_REST_ROOM)
        # Per exchange: its markets' backfills (one at a time each, owned here, not by a
        # connection), the event its workers wait on, and when its pending backfills began.
        self.backfills: dict[str, BackfillQueue] = {}
        self._backfill_wake: dict[str, asyncio.Event] = {}
        self._backfill_since: dict[str, float] = {}
        READINGS.track(
            self,
            totals=functools.partial(
                _bar_totals, self.bars.counters, self.watchdog.detected, self.backfills
            ),
            current=LiveSource._current_readings,
        )

    @property
    def waiting(self) -> int:
        """Ticks made and not yet taken by the publisher."""
        return len(self._outbox)

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
        for exchange, queue in self.backfills.items():
            readings.append((_BACKFILL_PENDING, (exchange,), float(queue.pending)))
            readings.append((_BACKFILL_DONE, (exchange,), float(queue.done)))
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
                paces=spec.rest_paces,
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
        for exchange in self._protocols:
            self._add_backfills(exchange)
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
        for market in self.gone:
            last = self.bars.last_update_ms(market)
            reports[market.id] = FeedStatus("live", market.exchange, "finished", now_ms, last)
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
        outbox = self._outbox
        stop = asyncio.Event()
        # The task group lives in a task of its own, never across a `yield`: cancelling the
        # consumer of this generator must not be mistaken for a failure of the group.
        runner = asyncio.create_task(self._run(stop), name="live-source")
        try:
            while True:
                if not runner.done():
                    if len(outbox):
                        yield outbox.take(CHUNK_TICKS)
                        continue
                    ready = asyncio.ensure_future(outbox.wait_ready())
                    try:
                        await asyncio.wait({ready, runner}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        ready.cancel()
                    continue
                try:
                    runner.result()
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

    async def _run(self, stop: asyncio.Event) -> None:
        """Every task of the source in one group, until cancelled or one of them fails."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            for exchange in list(self._protocols):
                self._start_exchange(group, exchange, stop)
            group.create_task(self._clock(stop), name="live-clock")
            for exchange in self._rest:
                group.create_task(self._refresh(exchange, stop), name=f"{exchange}-listing")

    def _start_exchange(self, group: asyncio.TaskGroup, exchange: str, stop: asyncio.Event) -> None:
        """The exchange's REST tasks and the connections of all its markets."""
        group.create_task(self._verify(exchange, stop), name=f"{exchange}-rest")
        for worker in range(self._backfill_workers):
            group.create_task(self._backfill_worker(exchange), name=f"{exchange}-backfill-{worker}")
        self._connect(group, exchange, sorted(self._symbols[exchange].values()), stop)

    def _add_backfills(self, exchange: str) -> None:
        self.backfills[exchange] = BackfillQueue(exchange)
        self._backfill_wake[exchange] = asyncio.Event()

    def _connect(
        self, group: asyncio.TaskGroup, exchange: str, symbols: list[str], stop: asyncio.Event
    ) -> None:
        """New connections for `symbols` (as many markets on each as the exchange allows)."""
        protocol = self._protocols[exchange]
        size = EXCHANGES[exchange].markets_per_connection or len(symbols)
        for start in range(0, len(symbols), size):
            feed = self._feed(exchange, protocol, symbols[start : start + size])
            served = set(feed.symbols)
            markets = [m for m, symbol in self._symbols[exchange].items() if symbol in served]
            feed.on_connected = self._backfill_on_connect(exchange, markets)
            self.feeds.append(feed)
            self._markets_of[id(feed)] = markets
            for market in markets:
                self._feed_of[market] = feed
            number = len(self.feeds)
            group.create_task(feed.run(stop), name=f"{exchange}-feed-{number}")

    def _feed(
        self,
        exchange: str,
        protocol: ExchangeProtocol,
        symbols: list[str],
    ) -> ExchangeFeed:
        bars, watchdog, outbox, gone = self.bars, self.watchdog, self._outbox, self.gone

        async def deliver(events: list[FeedEvent], received_us: int) -> None:
            ticks: list[Tick] = []
            received_ms = received_us // 1000
            for event in events:
                if isinstance(event, CandleUpdate):
                    if event.market not in gone:
                        watchdog.heard(event.market, received_ms)
                        ticks += bars.candle(event, received_us)
                elif isinstance(event, Trade):
                    if event.market not in gone:
                        watchdog.heard(event.market, received_ms)
                        ticks += bars.trade(event, received_us)
                elif isinstance(event, Heartbeat) and event.market is not None:
                    watchdog.heard(event.market, received_ms)
            # Never waits: reading the connection never waits on the publisher (TickOutbox).
            outbox.put(ticks)

        limits = EXCHANGES[exchange].limits
        if self._silence_ms:
            limits = dataclasses.replace(limits, silence_s=self._silence_ms / 1000)
        return ExchangeFeed(protocol, self._endpoints[exchange][0], symbols, limits, deliver)

    def _backfill_on_connect(
        self, exchange: str, markets: list[Market]
    ) -> Callable[[], Awaitable[None]]:
        async def on_connected() -> None:
            self.bars.connected(markets)  # before the first frame of this connection is read
            self.watchdog.expect(markets, now_us() // 1000)
            # Workers of the source do it: the connection keeps reading while REST answers,
            # and a reconnect never starts a second backfill of a market (BackfillQueue).
            self._want_backfill(exchange, markets)

        return on_connected

    def _want_backfill(self, exchange: str, markets: list[Market]) -> None:
        if self._backfill_minutes == 0 or not markets:
            return
        queue = self.backfills[exchange]
        if not queue.pending:
            self._backfill_since[exchange] = time.monotonic()
        queue.want(markets)
        self._backfill_wake[exchange].set()

    async def _backfill_worker(self, exchange: str) -> None:
        """Backfill the exchange's waiting markets one after the other, until cancelled."""
        queue, wake = self.backfills[exchange], self._backfill_wake[exchange]
        while True:
            market = queue.claim()
            if market is None:
                wake.clear()  # nothing waits now; `want` sets it again
                await wake.wait()
                continue
            complete = False
            try:
                complete = await self._backfill(exchange, market, queue)
            finally:
                queue.finished(market, complete=complete)
                wake.set()  # it may wait again (a reconnect came while it ran)

    async def _backfill(self, exchange: str, market: Market, queue: BackfillQueue) -> bool:
        """Publish the closed minutes of `market` missed so far, oldest first; False if REST
        failed (logged; asked again at the next connect)."""
        spec = EXCHANGES[exchange]
        now = now_us() // 1000
        current = now - now % MINUTE_MS
        first = current - self._backfill_minutes * MINUTE_MS
        after = self.bars.backfilled_through(market)
        if after is not None:
            first = max(first, after + MINUTE_MS)
        # Nothing from the minute the connection streams from on: after a short reconnect,
        # a market already backfilled usually needs no request at all.
        streamed = self.bars.streams_from(market)
        if streamed is not None:
            current = min(current, streamed)
        filled = 0
        complete = True
        try:
            start = first
            while start < current:
                if market in self.gone:
                    return False  # delisted meanwhile: the rest is not asked for
                # Each page planned when it is asked: as time passes, the exchange's horizon
                # of larger recent pages (OKX) moves, and the page must fit where it is now.
                end = spec.page_last(start, current, now_us() // 1000)
                try:
                    candles = await self._candles(exchange, market, start, end)
                except (RestUnavailable, BadFrame):
                    queue.requests += 1  # counted once answered, not when cancelled on the way
                    raise
                queue.requests += 1
                # Room first, ticks after: none is made with a seq older than a stream tick
                # already waiting (each market's ticks leave in seq order).
                await self._outbox.wait_for_room()
                ticks = self.bars.backfill(market, candles.candles, now_us())
                if candles.bad_rows:
                    self.bars.recheck(market, start)  # reconciled once REST is asked again
                filled += len(ticks)
                queue.minutes += len(ticks)
                self._outbox.put(ticks)
                start = end + MINUTE_MS
            self.bars.backfilled(market, current - MINUTE_MS)
        except (RestUnavailable, BadFrame) as exc:
            # Not marked as backfilled: the next connect's backfill asks again.
            log.warning("backfill of %s stopped: %s", market.id, exc)
            complete = False
        missing = (current - first) // MINUTE_MS - filled
        log.info(
            "backfilled %s: %d closed minutes (%d minutes without a candle or not offered)",
            market.id,
            filled,
            max(missing, 0),
        )
        return complete

    async def _candles(self, exchange: str, market: Market, first: int, last: int) -> CandlePage:
        """REST candles of `market` from `first` to `last`, one page (the backfill plans
        its pages; repairs and reconciliation ask at most an hour of recent minutes, one page
        on every exchange); bad rows counted and logged once per page (the caller asks for
        their minutes again: `bars.recheck`, once it has used the page). Raises
        RestUnavailable or BadFrame."""
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

    async def _verify(self, exchange: str, stop: asyncio.Event) -> None:
        """The exchange's REST work after the stream: repairs of held minutes first (they are
        due within seconds), then, once no backfill of the exchange is pending, one
        reconciliation request for the most overdue market, in turn. Every request goes
        through the exchange's paced client, so the pace never exceeds its documented limits;
        when more is due than they allow, it goes as fast as they allow, and a market's next
        request covers every minute it has due by then.
        """
        while not stop.is_set():
            now_ms = now_us() // 1000
            worked = False
            for market, (first, last) in self.bars.repairs_due(now_ms).items():
                if market.exchange != exchange or market in self.gone:
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
                await self._outbox.wait_for_room()  # before the ticks are made: see _backfill
                self._outbox.put(self.bars.repair(market, candles, now_us()))
                worked = True
            # Reconciliation waits while backfills are pending: they come first (the day of
            # every market, not a second look at minutes REST just gave), and a backfill
            # publishing between a reconciliation's request and its answer could move the
            # market's remembered minutes under it.
            due = []
            if not self.backfills[exchange].pending:
                due = [
                    entry
                    for entry in self.bars.reconcile_due(now_ms)
                    if entry[0].exchange == exchange and entry[0] not in self.gone
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
                    await self._outbox.wait_for_room()
                    ticks = self.bars.reconcile(
                        market, page.candles, first, last, now_us(), complete=complete
                    )
                    self._answered(market, page)
                    if ticks:
                        log.warning(
                            "%s: %d minutes corrected or filled from REST", market.id, len(ticks)
                        )
                    self._outbox.put(ticks)
                worked = True
            if not worked:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=_VERIFY_EVERY_S)

    async def _clock(self, stop: asyncio.Event) -> None:
        next_watch = next_progress = time.monotonic()
        while not stop.is_set():
            now = now_us()
            self._outbox.put(self.bars.close_due(now) + self.bars.flush(now))
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + _WATCHDOG_EVERY_S
                self._watch(now // 1000)
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + _PROGRESS_EVERY_S
                self._log_backfill_progress()
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

    async def _refresh(self, exchange: str, stop: asyncio.Event) -> None:
        """Read the exchange's listing again and again (every 30 s while it cannot be read,
        then every WATCHER_LISTING_REFRESH_S, if not 0) and apply what changed."""
        while not stop.is_set():
            unread = exchange not in self._protocols
            every = self._relist_every_s if unread else self._listing_refresh_s
            if not every:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)
            if stop.is_set():
                return
            listing = await self._listing(exchange)
            if listing is not None:
                self._relisted(exchange, listing, stop)

    def _relisted(self, exchange: str, listing: dict[Market, str], stop: asyncio.Event) -> None:
        """Markets of WATCHER_MARKETS the listing no longer offers leave; new ones join (up to
        WATCHER_MAX_MARKETS in all). The other markets and their connections are untouched."""
        specs = [spec for spec in self._specs if spec.exchange == exchange]
        resolution = resolve(specs, {exchange: listing}, self._max_markets)
        wanted = resolution.symbols.get(exchange, {})
        current = self._symbols.get(exchange, {})
        gone = [market for market in current if market not in wanted]
        if gone:
            self._leave(exchange, gone)
        fresh = {market: symbol for market, symbol in wanted.items() if market not in current}
        room = max(self._max_markets - len(self.markets), 0)
        if len(fresh) > room:
            log.warning("%d new markets left out by WATCHER_MAX_MARKETS", len(fresh) - room)
            fresh = dict(list(fresh.items())[:room])
        if exchange in self.unlisted:
            del self.unlisted[exchange]  # its markets are now listed, or unknown (logged)
            for entry in resolution.unknown:
                log.warning("market %s is not listed by its exchange: skipped", entry)
        if fresh:
            self._join(exchange, fresh, stop)

    def _join(self, exchange: str, fresh: dict[Market, str], stop: asyncio.Event) -> None:
        """Watch `fresh` markets: on new connections of their own, backfilled once connected."""
        assert self._group is not None, "markets join a running source"
        symbols = self._symbols.setdefault(exchange, {})
        symbols.update(fresh)
        self.gone.difference_update(fresh)
        self.markets += list(fresh)
        # A superset of the previous protocol (the feeds already running keep theirs).
        first = exchange not in self._protocols
        self._protocols[exchange] = EXCHANGES[exchange].from_listing(symbols)
        if first:
            self._add_backfills(exchange)
            self._start_exchange(self._group, exchange, stop)
        else:
            self._connect(self._group, exchange, sorted(fresh.values()), stop)
        log.info("%s: %d markets join: %s", exchange, len(fresh), [m.id for m in fresh])

    def _leave(self, exchange: str, gone: list[Market]) -> None:
        """Stop watching `gone` markets (delisted): reported finished, their events ignored,
        left out of their connection's next subscribe (a connection left with none ends)."""
        symbols = self._symbols[exchange]
        for market in gone:
            symbol = symbols.pop(market)
            self.gone.add(market)
            self.markets.remove(market)
            self.watchdog.stale.discard(market)  # finished, not stale
            feed = self._feed_of.pop(market, None)
            if feed is not None:
                self._markets_of[id(feed)].remove(market)
                feed.symbols = [s for s in feed.symbols if s != symbol]
                if not feed.symbols:
                    feed.retire()
        self.backfills[exchange].forget(gone)
        log.info("%s: %d markets left the listing: %s", exchange, len(gone), [m.id for m in gone])

    def _log_backfill_progress(self) -> None:
        """Per exchange with backfills pending: how far they are; once when they are all done."""
        for exchange, queue in self.backfills.items():
            since = self._backfill_since.get(exchange)
            if since is None:
                continue
            elapsed = time.monotonic() - since
            if queue.pending:
                log.info("%s", queue.progress(elapsed))
            else:
                log.info("%s (all done in %.0fs)", queue.progress(elapsed), elapsed)
                del self._backfill_since[exchange]
