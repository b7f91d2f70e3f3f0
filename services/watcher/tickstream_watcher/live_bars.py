"""LiveBars: minute bars of live markets from exchange candles or trades, each closed once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MAX_CLOCK_AHEAD_MS, MINUTE_MS, Tick
from tickstream_watcher.exchange import CandleUpdate, Trade

# A minute whose trades the stream is known to have missed is closed from the exchange's REST
# candle instead: asked for this long after the minute ends (the exchange needs a moment to
# finish its candle), and if none comes within REPAIR_GIVE_UP_MS, closed from the trades seen.
REPAIR_DELAY_MS: Final = 10_000
REPAIR_GIVE_UP_MS: Final = 180_000
# Most minutes one trade-id gap marks for repair (the newest ones); older are counted only.
MAX_REPAIR_MINUTES: Final = 10
# No backfill reaches further back (WATCHER_BACKFILL_MINUTES is at most 1440): what earlier
# connections delivered before that is forgotten.
_BACKFILL_HORIZON_MS: Final = 1440 * MINUTE_MS


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


@dataclass(slots=True)
class _MarketState:
    market_id: str
    forming: _Bar | None = None
    # The newest minute closed (by the stream or a backfill): the stream's updates of it and
    # of older minutes are late.
    closed_through: int = -1
    # Every minute up to this one is dealt with: published, left to the stream, or fetched
    # from REST without a candle; the next backfill starts after it. A reconnect moves it only
    # when nothing before it is missing, so one while a backfill runs does not hide its gap.
    backfilled_through: int = -1
    # The minutes earlier connections delivered after `backfilled_through`, as (first, last):
    # the stream closes those itself (also the one forming when a connection dropped), so a
    # backfill leaves them out.
    streamed: list[tuple[int, int]] = field(default_factory=list)
    # The first and newest minute the current connection delivered; a backfill stops at the
    # first (None: nothing yet).
    session_first: int | None = None
    session_last: int = -1
    last_seq: int = -1
    # A minute closed by the previous publisher, published again as it was (see `resume`):
    # never closed from the stream or the backfill.
    republished: int = -1
    # Minutes (forming or later) the stream missed trades of: closed from REST, not the trades.
    unfinished: set[int] = field(default_factory=set)
    # Ended unfinished minutes waiting for their REST candle, with the bar from the trades seen.
    awaiting: dict[int, _Bar] = field(default_factory=dict)
    last_trade_id: int = -1
    last_trade_minute: int = -1
    pending: bool = False  # the forming bar changed since it was last published
    published_at: int = -1  # received time (ms) of the last published update


@dataclass
class LiveBarCounters:
    """What the builder refused, by reason (all counted, none fatal)."""

    late: int = 0  # an update or trade of a minute already closed (or older than the forming)
    duplicate_trades: int = 0  # a trade id at or below the last one seen
    trade_gaps: int = 0  # trade ids skipped: trades the stream never delivered
    repaired: int = 0  # minutes with missed trades closed from the exchange's REST candle
    unrepaired: int = 0  # ... closed from the trades seen: no candle came in time
    unrepairable: int = 0  # minutes a gap spans beyond MAX_REPAIR_MINUTES
    ahead: int = 0  # stamped more than MAX_CLOCK_AHEAD_MS after the watcher received it


@dataclass
class LiveBars:
    """Per market, the forming one-minute bar, published as `Tick` updates.

    A bar is built from the exchange's own candle updates (Binance kline, Kraken ohlc: each
    replaces the bar) or from trades (Coinbase matches: the watcher aggregates). Updates of a
    forming bar are conflated: at most one per market every `min_interval_ms` of receive time
    (the rest wait in `pending` and go out with `flush`), so what is published is bounded by
    time, not by the trade rate. A bar is closed exactly once: when the exchange says so, when a
    later minute starts, or when `close_due` finds its minute over by `close_grace_ms`; after
    that nothing of that minute is published again (late data is counted). A minute without
    data gets no bar. A trade-built minute the stream is known to have missed trades of (a
    trade-id gap, or the first minute seen) is not closed from the trades: it waits for the
    exchange's REST candle (`repairs_due`, `repair`), so its bar is complete when it closes.
    `seq` is the receive time in microseconds (or one more than the last), so
    it grows per market across restarts and across a standby watcher taking over.
    """

    min_interval_ms: int = 250
    close_grace_ms: int = 5_000
    counters: LiveBarCounters = field(default_factory=LiveBarCounters)
    _markets: dict[Market, _MarketState] = field(default_factory=dict)

    def candle(self, update: CandleUpdate, received_us: int) -> list[Tick]:
        """Apply an exchange candle update; the ticks to publish now (maybe none)."""
        state = self._state(update.market)
        received_ms = received_us // 1000
        if update.exchange_ts > received_ms + MAX_CLOCK_AHEAD_MS:
            self.counters.ahead += 1
            return []
        out = self._roll(state, update.minute, received_us)
        if out is None:
            return []
        # A candle sent after its minute ended (a snapshot, a late update) is as of the end.
        stamp = min(update.exchange_ts, update.minute + MINUTE_MS)
        state.forming = _Bar(
            update.minute,
            update.open,
            update.high,
            update.low,
            update.close,
            update.volume,
            update.trades,
            max(stamp, update.minute),
        )
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
            self.counters.duplicate_trades += 1
            return []
        if trade.exchange_ts > received_us // 1000 + MAX_CLOCK_AHEAD_MS:
            self.counters.ahead += 1
            return []
        minute = trade.exchange_ts - trade.exchange_ts % MINUTE_MS
        if state.last_trade_id < 0:
            # The first trade seen: its minute's earlier trades were before the connection.
            # (After a reconnect, trade ids tell whether any were missed: a gap, below.)
            self._mark_unfinished(state, minute, minute)
        elif trade.trade_id > state.last_trade_id + 1:
            self.counters.trade_gaps += trade.trade_id - state.last_trade_id - 1
            self._mark_unfinished(state, state.last_trade_minute, minute)
        state.last_trade_id = trade.trade_id
        state.last_trade_minute = max(state.last_trade_minute, minute)
        out = self._roll(state, minute, received_us)
        if out is None:
            return []
        bar = state.forming
        price = trade.price
        if bar is None:
            bar = state.forming = _Bar(
                minute, price, price, price, price, 0.0, 0, trade.exchange_ts
            )
        bar.high = max(bar.high, price)
        bar.low = min(bar.low, price)
        bar.close = price
        bar.volume += trade.size
        bar.trades = (bar.trades or 0) + 1
        bar.exchange_ts = max(bar.exchange_ts, trade.exchange_ts)
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
            if state.awaiting.pop(candle.minute, None) is not None:
                self.counters.repaired += 1  # a minute with missed trades, repaired early
            elif any(first <= candle.minute <= last for first, last in state.streamed):
                continue
            state.closed_through = max(state.closed_through, candle.minute)
            out.append(self._bar_tick(state, _candle_bar(candle), now_us, closed=True))
        state.streamed = [span for span in state.streamed if span[1] > state.backfilled_through]
        return out

    def repairs_due(self, now_ms: int) -> dict[Market, tuple[int, int]]:
        """Markets with minutes to repair now: the first and last such minute of each."""
        due = {}
        for market, state in self._markets.items():
            minutes = [m for m in state.awaiting if now_ms >= m + MINUTE_MS + REPAIR_DELAY_MS]
            if minutes:
                due[market] = (min(minutes), max(minutes))
        return due

    def repair(self, market: Market, candles: Iterable[CandleUpdate], now_us: int) -> list[Tick]:
        """Close the market's minutes with missed trades from the exchange's REST `candles`.

        A minute without a candle waits for a later call, until REPAIR_GIVE_UP_MS after its
        end: then it is closed from the trades seen (counted). Call with no candles when the
        exchange cannot be asked, so that nothing waits forever.
        """
        state = self._state(market)
        by_minute = {candle.minute: candle for candle in candles}
        out = []
        for minute in sorted(state.awaiting):
            candle = by_minute.get(minute)
            if candle is not None:
                bar = _candle_bar(candle)
                self.counters.repaired += 1
            elif now_us // 1000 >= minute + MINUTE_MS + REPAIR_GIVE_UP_MS:
                bar = state.awaiting[minute]
                self.counters.unrepaired += 1
            else:
                continue
            del state.awaiting[minute]
            out.append(self._bar_tick(state, bar, now_us, closed=True))
        return out

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

    def backfilled_through(self, market: Market) -> int | None:
        """The newest minute backfills have dealt with (the next one starts after it), or None."""
        state = self._markets.get(market)
        return None if state is None or state.backfilled_through < 0 else state.backfilled_through

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
            state = self._markets[market] = _MarketState(market.id)
        return state

    def _roll(self, state: _MarketState, minute: int, received_us: int) -> list[Tick] | None:
        """Make `minute` the forming one; None if it is too old (counted as late)."""
        bar = state.forming
        if (
            minute <= state.closed_through
            or minute == state.republished
            or (bar is not None and minute < bar.minute)
        ):
            self.counters.late += 1
            return None
        if state.session_first is None:
            state.session_first = minute  # the stream covers this minute on: backfills stop here
        state.session_last = max(state.session_last, minute)
        if bar is not None and minute > bar.minute:
            return self._close(state, received_us)  # a later minute started: this one is done
        return []

    def _publish_if_due(self, state: _MarketState, received_us: int) -> list[Tick]:
        received_ms = received_us // 1000
        if not state.pending or state.forming is None:
            return []
        if state.published_at >= 0 and received_ms - state.published_at < self.min_interval_ms:
            return []
        return [self._tick(state, received_us, closed=False)]

    def _close(self, state: _MarketState, received_us: int) -> list[Tick]:
        """Close the forming bar: published now, or held for its REST candle if unfinished."""
        bar = state.forming
        assert bar is not None
        if bar.minute in state.unfinished:
            state.unfinished.discard(bar.minute)
            state.awaiting[bar.minute] = bar
            state.closed_through = max(state.closed_through, bar.minute)  # never reopened
            state.forming = None
            return []
        tick = self._tick(state, received_us, closed=True)
        # max: a backfill may have closed later minutes before this one (out of order).
        state.closed_through = max(state.closed_through, tick.minute)
        state.forming = None
        return [tick]

    def _mark_unfinished(self, state: _MarketState, first: int, last: int) -> None:
        """Minutes first..last lack trades: close them from REST (newest MAX_REPAIR_MINUTES)."""
        first = max(first, state.closed_through + MINUTE_MS)
        oldest = last - (MAX_REPAIR_MINUTES - 1) * MINUTE_MS
        if first < oldest:
            self.counters.unrepairable += (oldest - first) // MINUTE_MS
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
        )


def _candle_bar(candle: CandleUpdate) -> _Bar:
    """A closed REST candle as a bar, stamped at its minute's end."""
    return _Bar(
        candle.minute,
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
        candle.trades,
        candle.minute + MINUTE_MS,
    )
