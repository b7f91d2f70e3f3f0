"""LiveBars: minute bars of live markets from exchange candles or trades, checked, corrected."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_watcher.exchange import MAX_VOLUME, CandleUpdate, Trade
from tickstream_watcher.trust import RECENT_MINUTES, Reference, TrustRules

# A minute whose trades the stream is known to have missed (or whose data was implausible) is
# closed from the exchange's REST candle instead: asked for this long after the minute ends
# (the exchange needs a moment to finish its candle), and if none comes within
# REPAIR_GIVE_UP_MS, closed from the trades seen (an implausible bar is then not published).
REPAIR_DELAY_MS: Final = 10_000
REPAIR_GIVE_UP_MS: Final = 180_000
# After a failed REST request for a market, its next one waits this long, doubling per
# failure in a row up to REST_RETRY_MAX_MS.
REST_RETRY_MS: Final = 5_000
REST_RETRY_MAX_MS: Final = 300_000
# Most minutes one trade-id gap marks for repair (the newest ones); older are counted only.
MAX_REPAIR_MINUTES: Final = 10
# No backfill reaches further back (WATCHER_BACKFILL_MINUTES is at most 1440): what earlier
# connections delivered before that is forgotten.
_BACKFILL_HORIZON_MS: Final = 1440 * MINUTE_MS
_RECENT_MS: Final = RECENT_MINUTES * MINUTE_MS
# Volumes summed from trades differ from the exchange's decimal total in the last bits.
_VOLUME_REL_TOL: Final = 1e-9


@dataclass(slots=True)
class _Bar:
    minute: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int | None
    exchange_ts: int
    # The exchange's own final word on the minute (a closed kline, a REST candle): only another
    # final word replaces it.
    final: bool = False
    # Quote units traded: the exchange's (candles) or the sum of price x size (trades); None
    # when the source does not say it (Coinbase REST candles).
    quote_volume: float | None = None

    def same_values(self, other: _Bar) -> bool:
        """Equal prices and trade count (where both know it), volume and quote volume (where
        both know it) up to summation rounding. A side without a quote volume is no
        difference: a REST candle that does not carry it never corrects a minute for it."""
        return (
            (self.open, self.high, self.low, self.close)
            == (other.open, other.high, other.low, other.close)
            and math.isclose(self.volume, other.volume, rel_tol=_VOLUME_REL_TOL)
            and (self.trades is None or other.trades is None or self.trades == other.trades)
            and (
                self.quote_volume is None
                or other.quote_volume is None
                or math.isclose(self.quote_volume, other.quote_volume, rel_tol=_VOLUME_REL_TOL)
            )
        )


@dataclass(slots=True, eq=False)
class _MarketState:
    market: Market
    order: int  # creation order: markets due at the same minute come in this order
    market_id: str
    exchange: str
    forming: _Bar | None = None
    # The forming bar failed the plausibility check: not published until it changes (candles)
    # or its minute closes and REST decides (trades: the bar keeps the trade).
    held: bool = False
    # The newest minute closed (by the stream or a backfill): the stream's updates of it and
    # of older minutes are late, unless they are the exchange's newer word (see `candle`).
    closed_through: int = -1
    # Every minute up to this one is dealt with: published, left to the stream, or fetched
    # from REST without a candle; the next backfill starts after it. A reconnect moves it only
    # when nothing before it is missing, so one while a backfill runs does not hide its gap.
    backfilled_through: int = -1
    # The minutes earlier connections delivered after `backfilled_through`, as (first, last):
    # the stream closes those itself (also the one forming when a connection dropped), so a
    # backfill leaves them out. Bounded by the backfill horizon.
    streamed: list[tuple[int, int]] = field(default_factory=list)
    # The first and newest minute the current connection delivered; a backfill stops at the
    # first (None: nothing yet).
    session_first: int | None = None
    session_last: int = -1
    last_seq: int = -1
    # A minute closed by the previous publisher, published again as it was (see `resume`):
    # never closed from the stream or the backfill.
    republished: int = -1
    # Minutes (forming or later) the stream missed trades of, or whose data was implausible:
    # closed from REST, not from the stream. At most MAX_REPAIR_MINUTES + the forming one.
    unfinished: set[int] = field(default_factory=set)
    # Ended unfinished minutes waiting for their REST candle, with the bar the stream gave
    # (None: a minute of a trade-id gap in which no trade was delivered). A minute leaves it
    # REPAIR_GIVE_UP_MS after its end at the latest, so it holds a few minutes at most.
    awaiting: dict[int, _Bar | None] = field(default_factory=dict)
    # Minutes with an implausible update (a subset of unfinished and awaiting ones).
    implausible: set[int] = field(default_factory=set)
    # Closed bars published, by minute, for the newest RECENT_MINUTES minutes.
    recent: dict[int, _Bar] = field(default_factory=dict)
    reference: Reference | None = None
    # Reconciliation: every minute up to this one was compared with REST (or is older than
    # what this publisher can compare: a previous publisher's); `check_from` asks for an
    # early pass from that minute on (the watchdog suspects a gap).
    reconciled_through: int = -1
    check_from: int | None = None
    # After a REST request for this market failed: no repair or reconciliation request before
    # this (ms), so one market the exchange refuses never takes the others' turns.
    rest_not_before: int = -1
    rest_failures: int = 0
    last_trade_id: int = -1
    last_trade_minute: int = -1
    pending: bool = False  # the forming bar changed since it was last published
    published_at: int = -1  # received time (ms) of the last published update
    # The reconciliation schedule's entry for this market (see LiveBars._schedule): valid
    # while equal to the ticket it was pushed with; `touched` while waiting to be rescheduled.
    ticket: int = -1
    touched: bool = False


@dataclass
class LiveBarCounters:
    """What the builder refused, corrected or could not verify, by reason (none fatal)."""

    late: int = 0  # an update or trade of a minute already closed and not a newer final word
    duplicate_trades: int = 0  # a trade id at or below the last one seen
    trade_gaps: int = 0  # trade ids skipped: trades the stream never delivered
    repaired: int = 0  # minutes held for REST (missed trades, implausible) closed from REST
    unrepaired: int = 0  # ... closed from the stream's bar: no candle came in time
    unrepairable: int = 0  # minutes a gap spans beyond MAX_REPAIR_MINUTES
    ahead: int = 0  # stamped more than max_ahead_ms after the watcher received it
    corrected: int = 0  # closed minutes published again with the exchange's differing word
    implausible: int = 0  # updates held back by the plausibility check
    implausible_dropped: int = 0  # minutes never published: implausible and REST never answered
    reconciled: int = 0  # closed minutes compared with the exchange's REST candle
    filled: int = 0  # minutes REST had that the stream never published, published by reconciling
    unconfirmed: int = 0  # published minutes for which REST had no candle when compared
    bad_rest_rows: int = 0  # REST candle rows skipped as invalid (the rest of the page kept)


@dataclass
class LiveBars:
    """Per market, the forming one-minute bar, published as `Tick` updates, and the trust rules.

    A bar is built from the exchange's own candle updates (Binance kline, Kraken ohlc: each
    replaces the bar) or from trades (Coinbase matches: the watcher aggregates). Updates of a
    forming bar are conflated: at most one per market every `min_interval_ms` of receive time
    (the rest wait in `pending` and go out with `flush`), so what is published is bounded by
    time, not by the trade rate. A bar closes when the exchange says so, when a later minute
    starts, or when `close_due` finds its minute over by `close_grace_ms`. A minute without
    data gets no bar.

    The exchange's final word wins: a closed candle (or, without a final flag, a newer update)
    of a minute already closed that differs from what was published is published again as a
    correction (a closed tick with a larger seq). Updates stamped more than
    `rules.max_ahead_ms` after their receipt are refused; implausible values (see
    TrustRules) are not published, and their minute closes from REST. A trade-built minute
    the stream is known to have missed trades of (a trade-id gap, the first minute seen) waits
    for the exchange's REST candle too (`repairs_due`, `repair`). `reconcile_due` and
    `reconcile` compare every closed minute with REST later and correct what differs.
    `seq` is the receive time in microseconds (or one more than the last), so it grows per
    market across restarts and across a standby watcher taking over. Counters are kept per
    exchange (`counters`).
    """

    min_interval_ms: int = 250
    close_grace_ms: int = 5_000
    rules: TrustRules = field(default_factory=TrustRules)
    counters: dict[str, LiveBarCounters] = field(default_factory=dict)
    _markets: dict[Market, _MarketState] = field(default_factory=dict)
    # Reconciliation schedule: (due ms, ticket, state), earliest first; a state's entry is its
    # newest ticket. States whose due time may have moved wait in `_touched` for the next
    # reconcile_due, so a turn costs O(markets touched or due), never a scan of all markets.
    _schedule: list[tuple[int, int, _MarketState]] = field(default_factory=list)
    _touched: list[_MarketState] = field(default_factory=list)
    _tickets: itertools.count[int] = field(default_factory=itertools.count)

    def total(self) -> LiveBarCounters:
        """Every exchange's counters added up."""
        total = LiveBarCounters()
        for counters in self.counters.values():
            for name, value in vars(counters).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def candle(self, update: CandleUpdate, received_us: int) -> list[Tick]:
        """Apply an exchange candle update; the ticks to publish now (maybe none)."""
        state = self._state(update.market)
        received_ms = received_us // 1000
        if self._ahead(state, update.minute, update.exchange_ts, received_ms):
            return []
        # A candle sent after its minute ended (a snapshot, a late update) is as of the end.
        stamp = min(update.exchange_ts, update.minute + MINUTE_MS, received_ms)
        bar = _Bar(
            update.minute,
            update.open,
            update.high,
            update.low,
            update.close,
            update.volume,
            update.trades,
            max(stamp, update.minute),
            update.closed,
            update.quote_volume,
        )
        forming = state.forming
        if (
            update.minute <= state.closed_through
            or update.minute == state.republished
            or (forming is not None and update.minute < forming.minute)
        ):
            return self._late_word(state, bar, received_us)
        out = self._roll(state, update.minute, received_us)
        state.forming = bar
        state.held = not self._plausible(state, bar)
        if state.held:
            self._count(state).implausible += 1
            state.unfinished.add(bar.minute)
            state.implausible.add(bar.minute)
        if update.closed:
            out.extend(self._close(state, received_us))
        else:
            state.pending = True
            out.extend(self._publish_if_due(state, received_us))
        return out

    def trade(self, trade: Trade, received_us: int) -> list[Tick]:
        """Add a trade to its minute's bar; the ticks to publish now (maybe none)."""
        state = self._state(trade.market)
        if trade.trade_id <= state.last_trade_id:
            self._count(state).duplicate_trades += 1
            return []
        received_ms = received_us // 1000
        minute = trade.exchange_ts - trade.exchange_ts % MINUTE_MS
        if self._ahead(state, minute, trade.exchange_ts, received_ms):
            return []
        if state.last_trade_id < 0:
            # The first trade seen: its minute's earlier trades were before the connection.
            # (After a reconnect, trade ids tell whether any were missed: a gap, below.)
            self._mark_unfinished(state, minute, minute)
        elif trade.trade_id > state.last_trade_id + 1:
            self._count(state).trade_gaps += trade.trade_id - state.last_trade_id - 1
            self._mark_unfinished(state, state.last_trade_minute, minute)
        state.last_trade_id = trade.trade_id
        state.last_trade_minute = max(state.last_trade_minute, minute)
        forming = state.forming
        if (
            minute <= state.closed_through
            or minute == state.republished
            or (forming is not None and minute < forming.minute)
        ):
            self._count(state).late += 1  # a trade cannot correct a closed sum: REST does
            return []
        out = self._roll(state, minute, received_us)
        bar = state.forming
        price = trade.price
        stamp = min(trade.exchange_ts, received_ms)
        if bar is None:
            # A minute built from trades knows its quote volume: the sum of price x size.
            bar = _Bar(minute, price, price, price, price, 0.0, 0, stamp, quote_volume=0.0)
            state.forming = bar
        bar.high = max(bar.high, price)
        bar.low = min(bar.low, price)
        bar.close = price
        bar.volume += trade.size
        if bar.quote_volume is not None:
            quote_volume = bar.quote_volume + price * trade.size
            # Beyond the bound every reader enforces the sum is no number to publish: unknown.
            bar.quote_volume = quote_volume if quote_volume <= MAX_VOLUME else None
        bar.trades = (bar.trades or 0) + 1
        bar.exchange_ts = max(bar.exchange_ts, stamp)
        reference = state.reference
        wild = reference is not None and not reference.admits(self.rules, price, price, 0.0)
        if wild or (not state.held and not self._plausible(state, bar)):
            # Each implausible trade is counted. The bar keeps it (a sum cannot drop one), so
            # the minute is held for the rest of it and closes from REST.
            self._count(state).implausible += 1
            state.held = True
            state.unfinished.add(minute)
            state.implausible.add(minute)
        state.pending = True
        out.extend(self._publish_if_due(state, received_us))
        return out

    def flush(self, received_us: int) -> list[Tick]:
        """Publish every conflated update whose interval has passed."""
        out: list[Tick] = []
        for state in self._markets.values():
            out.extend(self._publish_if_due(state, received_us))
        return out

    def close_due(self, now_us: int) -> list[Tick]:
        """Close every forming bar whose minute ended `close_grace_ms` or more before now."""
        now_ms = now_us // 1000
        out = []
        for state in self._markets.values():
            bar = state.forming
            if bar is not None and now_ms >= bar.minute + MINUTE_MS + self.close_grace_ms:
                out.extend(self._close(state, now_us))
            if state.unfinished:
                self._end_unfinished(state, now_ms - MINUTE_MS - self.close_grace_ms)
        return out

    def connected(self, markets: Iterable[Market]) -> None:
        """A new connection delivers `markets` from now on: remember what the last one did.

        What a backfill may publish is then every closed minute not yet backfilled, not
        delivered by an earlier connection, and before the first minute this one delivers.
        """
        for market in markets:
            state = self._state(market)
            if state.session_first is None:
                pass  # the last connection delivered nothing of this market
            elif state.backfilled_through >= state.session_first - MINUTE_MS:
                # Nothing before its first minute is missing, and it delivered every minute
                # with trades from there on: a later backfill need not look before its last.
                state.backfilled_through = max(state.backfilled_through, state.session_last)
            else:
                state.streamed.append((state.session_first, state.session_last))
                horizon = state.session_last - _BACKFILL_HORIZON_MS
                state.streamed = [span for span in state.streamed if span[1] >= horizon]
            state.session_first = None
            state.session_last = -1

    def backfill(self, market: Market, candles: Iterable[CandleUpdate], now_us: int) -> list[Tick]:
        """Closed bars for the minutes the stream missed (see `connected`).

        `candles` are closed REST candles, oldest first. Left out: minutes an earlier backfill
        dealt with, minutes a connection delivered (the stream closes them), minutes from the
        first one the current connection delivered on, and a minute still forming at the
        exchange. Each minute is published once, however often and in whatever order with the
        stream this is called (also by two backfills at once, page by page).
        """
        state = self._state(market)
        out: list[Tick] = []
        for candle in candles:
            if state.session_first is not None and candle.minute >= state.session_first:
                break  # the current connection delivers this minute on
            if candle.minute + MINUTE_MS > now_us // 1000:
                break  # still forming at the exchange
            if candle.minute <= state.backfilled_through:
                continue
            state.backfilled_through = candle.minute
            if candle.minute == state.republished:
                continue  # closed by the previous publisher, already published again
            bar = _candle_bar(candle)
            published = state.recent.get(candle.minute)
            if published is not None and published.same_values(bar):
                continue  # reconciliation got there first
            if candle.minute in state.awaiting:
                del state.awaiting[candle.minute]  # a minute held for REST, repaired early
                state.implausible.discard(candle.minute)
                self._count(state).repaired += 1
            elif any(first <= candle.minute <= last for first, last in state.streamed):
                continue
            # The reference once per page, not per bar: it was 45% of a day's backfill.
            out.append(self._emit_closed(state, bar, now_us, judge=False))
        if out:
            self._judge_by_recent(state)
        state.streamed = [span for span in state.streamed if span[1] > state.backfilled_through]
        return out

    def rest_failed(self, market: Market, now_ms: int) -> None:
        """A REST request for `market` failed, or its answer had bad rows: its next one waits
        (doubling from REST_RETRY_MS to REST_RETRY_MAX_MS) until `rest_answered`."""
        state = self._state(market)
        wait = min(REST_RETRY_MS * 2**state.rest_failures, REST_RETRY_MAX_MS)
        state.rest_failures = min(state.rest_failures + 1, 30)
        state.rest_not_before = now_ms + wait
        self._touch(state)

    def rest_answered(self, market: Market) -> None:
        """A REST request for `market` was answered in full: its next one need not wait."""
        state = self._state(market)
        state.rest_failures, state.rest_not_before = 0, -1
        self._touch(state)

    def repairs_due(self, now_ms: int) -> dict[Market, tuple[int, int]]:
        """Markets with minutes to repair now: the first and last such minute of each."""
        due = {}
        for market, state in self._markets.items():
            if now_ms < state.rest_not_before:
                # Still asked with no candles, so that held minutes give up in time.
                minutes = [m for m in state.awaiting if now_ms >= m + MINUTE_MS + REPAIR_GIVE_UP_MS]
                if minutes:
                    due[market] = (min(minutes), max(minutes))
                continue
            minutes = [m for m in state.awaiting if now_ms >= m + MINUTE_MS + REPAIR_DELAY_MS]
            if minutes:
                due[market] = (min(minutes), max(minutes))
        return due

    def repair(self, market: Market, candles: Iterable[CandleUpdate], now_us: int) -> list[Tick]:
        """Close the market's minutes held for REST from the exchange's REST `candles`.

        A minute without a candle waits for a later call, until REPAIR_GIVE_UP_MS after its
        end: then it is closed from the stream's bar (counted unrepaired), unless that bar is
        implausible (not published: counted implausible_dropped) or there is none (a gap minute
        with no trade delivered: nothing to publish; reconciliation publishes it if REST has it
        later). Call with no candles when the exchange cannot be asked, so nothing waits forever.
        """
        state = self._state(market)
        counters = self._count(state)
        by_minute = {candle.minute: candle for candle in candles}
        out = []
        for minute in sorted(state.awaiting):
            candle = by_minute.get(minute)
            held = state.awaiting[minute]
            bar: _Bar | None
            if candle is not None:
                bar = _candle_bar(candle)
                counters.repaired += 1
            elif now_us // 1000 >= minute + MINUTE_MS + REPAIR_GIVE_UP_MS:
                bar = held
                if bar is not None and not self._plausible(state, bar):
                    counters.implausible_dropped += 1
                    bar = None
                elif bar is not None:
                    counters.unrepaired += 1
            else:
                continue
            del state.awaiting[minute]
            state.implausible.discard(minute)
            published = state.recent.get(minute)
            if bar is not None and (published is None or not published.same_values(bar)):
                if published is not None:
                    counters.corrected += 1
                out.append(self._emit_closed(state, bar, now_us))
        return out

    def reconcile_due(self, now_ms: int) -> list[tuple[Market, int, int]]:
        """(market, first, last) minute ranges to compare with REST now, most overdue first.

        A market is due once its oldest closed, unreconciled minute ended
        `rules.reconcile_after_ms` ago (or at once after `suspect`); its range runs to the
        newest minute that ended `rules.reconcile_settle_ms` ago, within RECENT_MINUTES.
        """
        rules = self.rules
        if not rules.reconcile_after_ms:
            return []
        for state in self._touched:
            state.touched = False
            self._plan(state, due_at(state, rules))
        self._touched.clear()
        found: list[tuple[int, int, _MarketState, int]] = []
        late: list[_MarketState] = []
        schedule = self._schedule
        while schedule and schedule[0][0] <= now_ms:
            _, ticket, state = heapq.heappop(schedule)
            if ticket != state.ticket:
                continue  # superseded by a later entry
            entry = due_range(state, now_ms, rules)
            if entry is None:
                late.append(state)  # not due after all: a guard, see due_at
            else:
                found.append((entry[0], state.order, state, entry[1]))
        for state in late:
            self._plan(state, max(due_at(state, rules) or now_ms + 1, now_ms + 1))
        found.sort(key=lambda item: item[:2])
        for _, _, state, _ in found:
            # Due until its state changes; planned at its due time (not now), so an earlier
            # `now_ms` on a later call finds what a scan would.
            self._plan(state, due_at(state, rules))
        return [(state.market, first, last) for first, _, state, last in found]

    def _plan(self, state: _MarketState, at: int | None) -> None:
        """Schedule the state's next reconciliation check at `at` (None: never)."""
        state.ticket = next(self._tickets)
        if at is not None:
            heapq.heappush(self._schedule, (at, state.ticket, state))

    def _touch(self, state: _MarketState) -> None:
        """A field reconcile_due reads changed: reschedule the state at its next call."""
        if not state.touched:
            state.touched = True
            self._touched.append(state)

    def reconcile(
        self,
        market: Market,
        candles: Iterable[CandleUpdate],
        first: int,
        last: int,
        now_us: int,
        *,
        complete: bool = True,
    ) -> list[Tick]:
        """Compare the closed minutes first..last with the exchange's REST `candles` for them.

        A published minute that differs is corrected (a closed tick with a larger seq); a
        minute REST has that was never published (a gap nothing else repaired) is published
        (counted filled); a published minute REST has no candle for is counted unconfirmed and
        kept (a bar cannot be unpublished). Minutes still held for REST are left to `repair`.
        Not `complete` (REST's page had bad rows): the range is due again (`recheck`).
        Idempotent: a second call with the same candles publishes nothing.
        """
        state = self._state(market)
        counters = self._count(state)
        out = []
        by_minute = {c.minute: c for c in candles if first <= c.minute <= last}
        for minute in range(first, last + MINUTE_MS, MINUTE_MS):
            if minute in state.awaiting or minute == state.republished:
                continue
            if minute > state.closed_through:
                break  # not closed yet (the caller's range is older; a guard, not a rule)
            candle, published = by_minute.get(minute), state.recent.get(minute)
            if candle is None:
                if published is not None:
                    counters.unconfirmed += 1
                continue
            counters.reconciled += 1
            bar = _candle_bar(candle)
            if published is None:
                counters.filled += 1
            elif published.same_values(bar):
                published.final = True
                continue
            else:
                counters.corrected += 1
            out.append(self._emit_closed(state, bar, now_us))
        state.reconciled_through = max(state.reconciled_through, last)
        if state.check_from is not None and state.check_from <= last:
            state.check_from = None
        if not complete:
            _recheck(state, first)
        self._touch(state)
        return out

    def recheck(self, market: Market, from_minute: int) -> None:
        """Reconcile the market's minutes from `from_minute` on as soon as REST has settled
        them (a REST page had a bad row: its minute is missing until then)."""
        state = self._state(market)
        _recheck(state, from_minute)
        self._touch(state)

    def suspect(self, market: Market, since_ms: int) -> None:
        """The market went silent at `since_ms` while others updated: what it published since
        may be partial. Its forming minute closes from REST, and the minutes since are
        reconciled as soon as their REST candles settle."""
        state = self._state(market)
        if state.forming is not None:
            state.unfinished.add(state.forming.minute)
        self.recheck(market, since_ms - since_ms % MINUTE_MS)

    def resume(
        self, market: Market, closed_through: int | None, last_seq: int, republished: int | None
    ) -> None:
        """Continue a previous publisher: minutes up to `closed_through` are final, seqs stay
        above `last_seq`, and the minute `republished` (one of its closes, sent again as it
        was) is left alone too. Call before any data of `market`.
        """
        state = self._state(market)
        if closed_through is not None:
            state.closed_through = max(state.closed_through, closed_through)
            state.backfilled_through = max(state.backfilled_through, closed_through)
            # What the previous publisher stored is not known here: not reconciled by this one.
            state.reconciled_through = max(state.reconciled_through, closed_through)
            self._touch(state)
        state.last_seq = max(state.last_seq, last_seq)
        if republished is not None and republished > state.closed_through:
            state.republished = republished

    def backfilled(self, market: Market, through: int) -> None:
        """A backfill has passed every candle REST had up to minute `through` to `backfill`.

        If the current connection has delivered its first minute, every minute before that
        one (and up to `through`) is then dealt with: one without a candle had no trade, and
        no later backfill asks for it again. The exchange had reached that first minute, so
        its REST held the ones before; before it, REST may not have the newest minutes yet.
        """
        state = self._state(market)
        if state.session_first is None:
            return
        through = min(through, state.session_first - MINUTE_MS)
        state.backfilled_through = max(state.backfilled_through, through)
        state.streamed = [span for span in state.streamed if span[1] > state.backfilled_through]

    def bad_rest_rows(self, market: Market, count: int) -> None:
        """Count REST candle rows of `market` skipped as invalid."""
        self._count(self._state(market)).bad_rest_rows += count

    def backfilled_through(self, market: Market) -> int | None:
        """The newest minute backfills have dealt with (the next one starts after it), or None."""
        state = self._markets.get(market)
        return None if state is None or state.backfilled_through < 0 else state.backfilled_through

    def streams_from(self, market: Market) -> int | None:
        """The first minute the current connection delivered of `market` (a backfill has
        nothing to publish from it on), or None before its first update."""
        state = self._markets.get(market)
        return None if state is None else state.session_first

    def closed_through(self, market: Market) -> int | None:
        """The newest minute of `market` closed so far, or None."""
        state = self._markets.get(market)
        return None if state is None or state.closed_through < 0 else state.closed_through

    def last_update_ms(self, market: Market) -> int | None:
        """Receive time (ms) of the newest update of `market` published, or None."""
        state = self._markets.get(market)
        return None if state is None or state.published_at < 0 else state.published_at

    def _state(self, market: Market) -> _MarketState:
        state = self._markets.get(market)
        if state is None:
            state = _MarketState(market, len(self._markets), market.id, market.exchange)
            self._markets[market] = state
            self.counters.setdefault(market.exchange, LiveBarCounters())
        return state

    def _count(self, state: _MarketState) -> LiveBarCounters:
        return self.counters[state.exchange]

    def _ahead(self, state: _MarketState, minute: int, stamp: int, received_ms: int) -> bool:
        """True (and counted) if the update is dated further ahead of its receipt than allowed."""
        limit = received_ms + self.rules.max_ahead_ms
        if stamp > limit or minute > limit:
            self._count(state).ahead += 1
            return True
        return False

    def _plausible(self, state: _MarketState, bar: _Bar) -> bool:
        reference = state.reference
        return reference is None or reference.admits(self.rules, bar.high, bar.low, bar.volume)

    def _late_word(self, state: _MarketState, bar: _Bar, received_us: int) -> list[Tick]:
        """A candle of a minute already closed: the exchange's newer word replaces what was
        published if it differs (a correction); anything else is late."""
        counters = self._count(state)
        minute = bar.minute
        if minute in state.awaiting:
            # Held for REST: keep the stream's newest word for a give-up, REST still decides.
            held = state.awaiting[minute]
            if held is None or bar.final or bar.exchange_ts >= held.exchange_ts:
                state.awaiting[minute] = bar
            return []
        published = state.recent.get(minute)
        if (
            published is None
            or minute == state.republished
            or (published.final and not bar.final)
            or (not bar.final and bar.exchange_ts <= published.exchange_ts)
        ):
            counters.late += 1
            return []
        if published.same_values(bar):
            published.final = published.final or bar.final
            return []
        if not self._plausible(state, bar):
            counters.implausible += 1  # the published bar stands until REST decides
            state.implausible.add(minute)
            state.awaiting[minute] = bar
            return []
        counters.corrected += 1
        return [self._emit_closed(state, bar, received_us)]

    def _roll(self, state: _MarketState, minute: int, received_us: int) -> list[Tick]:
        """Make `minute` (not older than the forming one) the forming one."""
        if state.session_first is None:
            state.session_first = minute  # the stream covers this minute on: backfills stop here
        state.session_last = max(state.session_last, minute)
        bar = state.forming
        out: list[Tick] = []
        if bar is not None and minute > bar.minute:
            out = self._close(state, received_us)  # a later minute started: this one is done
        if state.unfinished:
            self._end_unfinished(state, minute - MINUTE_MS)
        return out

    def _end_unfinished(self, state: _MarketState, through: int) -> None:
        """Unfinished minutes up to `through` that never got a bar wait for REST without one."""
        forming = state.forming.minute if state.forming is not None else None
        for minute in [m for m in state.unfinished if m <= through and m != forming]:
            state.unfinished.discard(minute)
            state.awaiting.setdefault(minute, None)
            state.closed_through = max(state.closed_through, minute)
            self._touch(state)

    def _publish_if_due(self, state: _MarketState, received_us: int) -> list[Tick]:
        received_ms = received_us // 1000
        if not state.pending or state.forming is None or state.held:
            return []
        if state.published_at >= 0 and received_ms - state.published_at < self.min_interval_ms:
            return []
        return [self._tick(state, received_us, closed=False)]

    def _close(self, state: _MarketState, received_us: int) -> list[Tick]:
        """Close the forming bar: published now, or held for its REST candle if unfinished."""
        bar = state.forming
        assert bar is not None
        state.forming = None
        state.held = False
        state.pending = False
        if bar.minute in state.unfinished:
            state.unfinished.discard(bar.minute)
            state.awaiting[bar.minute] = bar
            state.closed_through = max(state.closed_through, bar.minute)  # never reopened
            self._touch(state)
            return []
        state.published_at = received_us // 1000
        return [self._emit_closed(state, bar, received_us)]

    def _emit_closed(
        self, state: _MarketState, bar: _Bar, received_us: int, *, judge: bool = True
    ) -> Tick:
        """Publish `bar` as its minute's closed bar, remembered for corrections and checks
        (without `judge`, the caller renews the plausibility reference: `_judge_by_recent`)."""
        # max: a backfill may close later minutes before this one (out of order).
        state.closed_through = max(state.closed_through, bar.minute)
        if not bar.final and bar.minute <= state.reconciled_through:
            # Closed after reconciliation passed its minute (out of order): checked again.
            _recheck(state, bar.minute)
        recent = state.recent
        recent[bar.minute] = bar
        horizon = max(recent) - _RECENT_MS
        if min(recent) <= horizon:
            for minute in [m for m in recent if m <= horizon]:
                del recent[minute]
        if judge:
            self._judge_by_recent(state)
        self._touch(state)
        return self._bar_tick(state, bar, received_us, closed=True)

    def _judge_by_recent(self, state: _MarketState) -> None:
        pairs = ((b.close, b.volume) for b in state.recent.values())
        state.reference = Reference.of(pairs, self.rules.min_reference_bars)

    def _mark_unfinished(self, state: _MarketState, first: int, last: int) -> None:
        """Minutes first..last lack trades: close them from REST (newest MAX_REPAIR_MINUTES)."""
        first = max(first, state.closed_through + MINUTE_MS)
        oldest = last - (MAX_REPAIR_MINUTES - 1) * MINUTE_MS
        if first < oldest:
            self._count(state).unrepairable += (oldest - first) // MINUTE_MS
            first = oldest
        state.unfinished.update(range(first, last + MINUTE_MS, MINUTE_MS))

    def _tick(self, state: _MarketState, received_us: int, *, closed: bool) -> Tick:
        bar = state.forming
        assert bar is not None
        state.pending = False
        state.published_at = received_us // 1000
        return self._bar_tick(state, bar, received_us, closed=closed)

    def _bar_tick(self, state: _MarketState, bar: _Bar, received_us: int, *, closed: bool) -> Tick:
        state.last_seq = seq = max(state.last_seq + 1, received_us)
        return Tick(
            state.market_id,
            bar.minute,
            seq,
            bar.exchange_ts,
            received_us // 1000,
            bar.open,
            bar.high,
            bar.low,
            bar.close,
            bar.volume,
            bar.trades,
            closed,
            bar.quote_volume,
        )


def _recheck(state: _MarketState, from_minute: int) -> None:
    state.check_from = (
        from_minute if state.check_from is None else min(state.check_from, from_minute)
    )


def _candle_bar(candle: CandleUpdate) -> _Bar:
    """A closed REST candle as a final bar, stamped at its minute's end."""
    return _Bar(
        candle.minute,
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
        candle.trades,
        candle.minute + MINUTE_MS,
        final=True,
        quote_volume=candle.quote_volume,
    )


def due_range(state: _MarketState, now_ms: int, rules: TrustRules) -> tuple[int, int] | None:
    """The minutes (first, last) of the market to compare with REST at `now_ms`, or None.

    Due once its oldest closed, unreconciled minute ended `rules.reconcile_after_ms` ago (or
    at once after `suspect`); the range runs to the newest minute that ended
    `rules.reconcile_settle_ms` ago, within RECENT_MINUTES.
    """
    if not state.recent or now_ms < state.rest_not_before:
        return None
    # Nothing before the oldest bar remembered: older ones are out of reach, and before the
    # first one this publisher closed, what is stored is not known.
    first = _first_unreconciled(state)
    settled = now_ms - rules.reconcile_settle_ms - MINUTE_MS
    last = min(state.closed_through, settled - settled % MINUTE_MS)
    if last < first:
        return None
    urgent = state.check_from is not None and state.check_from <= last
    if urgent or now_ms >= first + MINUTE_MS + rules.reconcile_after_ms:
        return first, last
    return None


def due_at(state: _MarketState, rules: TrustRules) -> int | None:
    """The earliest `now_ms` at which due_range is not None while the state does not change
    (None: not before it does). Each condition of due_range only becomes true as time passes,
    so this is a time, not a guess: from then on the market stays due until reconciled."""
    if not state.recent:
        return None
    first = _first_unreconciled(state)
    if state.closed_through < first:
        return None
    # floor(now - settle - MINUTE to a minute) >= m  <=>  now >= ceil(m to a minute) + ...
    wait = rules.reconcile_settle_ms + MINUTE_MS
    at = max(state.rest_not_before, _ceil_minute(first) + wait)
    plain = first + MINUTE_MS + rules.reconcile_after_ms
    check_from = state.check_from
    if check_from is not None and check_from <= state.closed_through:
        return max(at, min(plain, _ceil_minute(check_from) + wait))
    return max(at, plain)


def _first_unreconciled(state: _MarketState) -> int:
    oldest = min(state.recent)
    first = max(state.reconciled_through + MINUTE_MS, oldest)
    if state.check_from is not None:
        first = max(min(first, state.check_from), oldest)
    return first


def _ceil_minute(ms: int) -> int:
    return -(-ms // MINUTE_MS) * MINUTE_MS
