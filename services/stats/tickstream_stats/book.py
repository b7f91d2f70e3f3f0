"""MetricBook: the minute windows of the markets this instance owns, on one event-time clock."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from tickstream_shared.naming import Market, MetricKind, market_of
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_stats.window import MinuteWindow, WindowStats


@dataclass(frozen=True, slots=True)
class MetricUpdate:
    """What Redis must hold for one metric; `stats` None means its window became empty."""

    metric_id: str
    kind: MetricKind
    stats: WindowStats | None
    last_value: float  # the metric's value in the market's newest minute
    minute: int  # the market's newest minute
    last_ts: int  # the newest exchange_ts applied
    stale: bool
    clock: int  # the minute every window ends at

    @property
    def gone(self) -> bool:
        return self.stats is None


# The turnover window's close column is never read: one constant close keeps its close and
# log-return bookkeeping idle (a replaced minute's close never changes, no return is logged).
_NO_CLOSE: Final = 1.0


class _MarketState:
    __slots__ = (
        "last_close",
        "last_seq",
        "last_ts",
        "last_turnover",
        "last_volume",
        "listed",
        "newest",
        "price_id",
        "turnover",
        "turnover_id",
        "turnover_listed",
        "turnover_minute",
        "volume_id",
        "window",
        "window_minutes",
    )

    def __init__(self, market: Market, window_minutes: int) -> None:
        self.window_minutes = window_minutes
        self.window = MinuteWindow(window_minutes)
        self.price_id = market.metric_id("price")
        self.volume_id = market.metric_id("volume")
        self.turnover_id = market.metric_id("turnover")
        self.last_seq = -1
        self.last_ts = -1
        self.newest = -1  # newest minute applied
        self.last_close = 0.0
        self.last_volume = 0.0
        self.listed = False  # whether the last updates returned said it has data
        # The minutes whose quote volume is known, in a window of their own (its volume column
        # is the turnover): created by the first tick that says it, so a market whose source
        # never does costs nothing more and has no turnover metric (unknown is not zero).
        self.turnover: MinuteWindow | None = None
        self.turnover_listed = False
        self.turnover_minute = -1  # the newest minute with a known turnover, as last reported
        self.last_turnover = 0.0

    def set_turnover(self, minute: int, quote_volume: float | None) -> None:
        """Record the newest word on `minute`'s turnover; the minute is inside the market's
        window. A word without quote volume makes the minute's turnover unknown: a value known
        from an earlier word of that minute leaves the window rather than stay as if current.
        """
        turnover = self.turnover
        if quote_volume is not None:
            if turnover is None:
                turnover = self.turnover = MinuteWindow(self.window_minutes)
            turnover.advance(self.window.clock)
            turnover.set(minute, _NO_CLOSE, quote_volume)
        elif turnover is not None and turnover.bar(minute) is not None:
            self.turnover = _without(turnover, minute, self.window_minutes)


class MetricBook:
    """Windows of the owned markets, all ending at the book's event-time clock.

    The clock is the newest minute seen, by this book's ticks or from outside
    (`advance_clock`, the clock shared by every stats instance); it never goes back, so every
    window ends at the same minute and a silent market's window ages. A market is stale when
    the clock is more than `stale_seconds` past its newest minute. A tick whose seq is not
    above its market's last applied seq is skipped (`skipped_stale`): a re-delivery after a
    restart or an out-of-order tick. A tick older than the window is skipped (`skipped_old`).
    """

    def __init__(self, window_minutes: int = 1440, stale_seconds: int = 300) -> None:
        self.window_minutes = window_minutes
        self.stale_ms = stale_seconds * 1000
        self.clock = -1
        self.skipped_stale = 0
        self.skipped_old = 0
        self._markets: dict[Market, _MarketState] = {}

    def __contains__(self, market: Market) -> bool:
        return market in self._markets

    @property
    def markets(self) -> list[Market]:
        return list(self._markets)

    def forget(self, market: Market) -> None:
        """Drop a market's state (its partition moved elsewhere). Idempotent."""
        self._markets.pop(market, None)

    def advance_clock(self, minute: int) -> list[MetricUpdate]:
        """Raise the clock to `minute`; updates of every market whose window ends there now.

        Returns nothing when `minute` is not after the clock.
        """
        if not self.raise_clock(minute):
            return []
        return [update for updates in self.age() for update in updates]

    def raise_clock(self, minute: int) -> bool:
        """Move the clock to `minute` if that is later; windows follow when applied or aged.

        Returns whether the clock moved.
        """
        if minute <= self.clock:
            return False
        self.clock = minute
        return True

    def age(self) -> Iterator[list[MetricUpdate]]:
        """Yield the updates of each market whose window ended before the clock, aged to it.

        Lets a caller give the event loop a turn between markets (with a thousand markets one
        clock minute is milliseconds of work) and do it less often than the clock moves (a
        market that ticks is aged by `apply` anyway). Safe to stop early: a market not aged
        yet is aged by its next `apply` or `age`.
        """
        clock = self.clock
        for state in list(self._markets.values()):
            if state.window.clock < clock:
                yield self._updates((state,))

    def current(self) -> Iterator[list[MetricUpdate]]:
        """Yield every market's updates as they stand (aged to the clock): a full rewrite."""
        for state in list(self._markets.values()):
            yield self._updates((state,))

    def apply(self, ticks: Iterable[Tick]) -> list[MetricUpdate]:
        """Apply ticks in order; updates for the markets they changed (all, if the clock moved)."""
        clock_before = self.clock
        touched: dict[Market, _MarketState] = {}
        for tick in ticks:
            market = market_of(tick.market)
            state = self._markets.get(market)
            if state is None:
                state = self._markets[market] = _MarketState(market, self.window_minutes)
            if tick.seq <= state.last_seq:
                self.skipped_stale += 1
                continue
            state.last_seq = tick.seq
            minute = tick.minute
            if minute > self.clock:
                self.clock = minute
            window = state.window
            if window.clock < self.clock:
                window.advance(self.clock)
            if not window.set(minute, tick.close, tick.volume):
                self.skipped_old += 1
                continue
            state.set_turnover(minute, tick.quote_volume)
            if minute >= state.newest:
                state.newest = minute
                state.last_close = tick.close
                state.last_volume = tick.volume
            if tick.exchange_ts > state.last_ts:
                state.last_ts = tick.exchange_ts
            touched[market] = state
        if self.clock > clock_before:
            return self._updates(self._markets.values())
        return self._updates(touched.values())

    def warm(self, market: Market, bars: Iterable[Tick]) -> list[MetricUpdate]:
        """Replace a market's state with stored bars; its updates (all, if the clock moved).

        Of several bars of one minute the largest seq wins, so nothing is counted twice, and
        ticks re-delivered later are skipped up to the largest seq loaded. Idempotent.
        """
        newest: dict[int, Tick] = {}
        for bar in bars:
            held = newest.get(bar.minute)
            if held is None or bar.seq > held.seq:
                newest[bar.minute] = bar
        state = self._markets[market] = _MarketState(market, self.window_minutes)
        clock_before = self.clock
        if newest:
            self.clock = max(self.clock, max(newest))
        state.window.advance(self.clock)
        for minute in sorted(newest):
            bar = newest[minute]
            state.last_seq = max(state.last_seq, bar.seq)
            state.last_ts = max(state.last_ts, bar.exchange_ts)
            state.window.set(minute, bar.close, bar.volume)
            state.set_turnover(minute, bar.quote_volume)
            state.newest, state.last_close, state.last_volume = minute, bar.close, bar.volume
        if self.clock > clock_before:
            return self._updates(self._markets.values())
        return self._updates([state])

    def window_start(self) -> int:
        """The oldest minute in every window at the current clock (the clock must be set)."""
        return self.clock - (self.window_minutes - 1) * MINUTE_MS

    def _updates(self, states: Iterable[_MarketState]) -> list[MetricUpdate]:
        clock = self.clock
        updates: list[MetricUpdate] = []
        for state in states:
            window = state.window
            window.advance(clock)
            self._turnover_update(state, updates)
            both = window.stats()
            if both is None:
                if state.listed:
                    state.listed = False
                    updates.append(self._gone(state, "price"))
                    updates.append(self._gone(state, "volume"))
                continue
            state.listed = True
            stale = clock - state.newest > self.stale_ms
            price, volume = both
            updates.append(
                MetricUpdate(
                    state.price_id,
                    "price",
                    price,
                    state.last_close,
                    state.newest,
                    state.last_ts,
                    stale,
                    clock,
                )
            )
            updates.append(
                MetricUpdate(
                    state.volume_id,
                    "volume",
                    volume,
                    state.last_volume,
                    state.newest,
                    state.last_ts,
                    stale,
                    clock,
                )
            )
        return updates

    def _turnover_update(self, state: _MarketState, updates: list[MetricUpdate]) -> None:
        """Append the market's turnover update, if it has one: as volume's, except that its
        minute, last value and staleness are those of its newest minute with a known value."""
        turnover = state.turnover
        if turnover is None:
            return
        clock = self.clock
        turnover.advance(clock)
        both = turnover.stats()
        newest = turnover.newest
        if both is None or newest is None:
            if state.turnover_listed:
                state.turnover_listed = False
                updates.append(self._gone(state, "turnover"))
            return
        state.turnover_listed = True
        newest_bar = turnover.bar(newest)
        assert newest_bar is not None  # the newest minute present has a bar
        state.turnover_minute, state.last_turnover = newest, newest_bar[1]
        stale = clock - newest > self.stale_ms
        updates.append(
            MetricUpdate(
                state.turnover_id,
                "turnover",
                both[1],
                state.last_turnover,
                newest,
                state.last_ts,
                stale,
                clock,
            )
        )

    def _gone(self, state: _MarketState, kind: MetricKind) -> MetricUpdate:
        if kind == "price":
            metric_id, last, minute = state.price_id, state.last_close, state.newest
        elif kind == "volume":
            metric_id, last, minute = state.volume_id, state.last_volume, state.newest
        else:
            metric_id, last, minute = state.turnover_id, state.last_turnover, state.turnover_minute
        return MetricUpdate(metric_id, kind, None, last, minute, state.last_ts, True, self.clock)


def _without(window: MinuteWindow, minute: int, window_minutes: int) -> MinuteWindow:
    """`window` less `minute`: rebuilt from the others in O(window), which is fine for what
    calls it (a minute whose newer word lacks the quote volume an older one had: a correction
    from a REST candle that does not carry it, a few a day at most)."""
    rebuilt = MinuteWindow(window_minutes)
    clock = window.clock
    rebuilt.advance(clock)
    for present in range(clock - (window_minutes - 1) * MINUTE_MS, clock + MINUTE_MS, MINUTE_MS):
        bar = window.bar(present)
        if bar is not None and present != minute:
            rebuilt.set(present, *bar)
    return rebuilt
