"""Each market's bars in memory: what the feed brought and, once loaded, the whole history."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from tickstream_shared.schemas import MINUTE_MS, Tick

# Until a market's history is loaded, the live bars kept bridge what the gateway has seen and
# what stats has stored (one batch: under a second of wall time; a stats restart: seconds). A
# bar stays while it is within RECENT_MINUTES of its market's newest minute (live feeds) or was
# updated less than RECENT_SECONDS ago (a replay runs event time far faster than the wall
# clock, so ten event minutes may pass in a few milliseconds). The bound is time, never an
# update count.
RECENT_MINUTES: Final = 10
RECENT_SECONDS: Final = 60.0


class _Market:
    __slots__ = (
        "bars",
        "first_live_seq",
        "loaded",
        "newest",
        "seen",
        "settled",
        "version",
        "whole",
    )

    def __init__(self, newest: int) -> None:
        # minute -> newest update. Minutes normally arrive in order, so the first entry is the
        # oldest minute; a late minute is dropped a little later than it could be, and never
        # kept beyond max_bars.
        self.bars: dict[int, Tick] = {}
        self.seen: dict[int, float] = {}  # minute -> time.monotonic() of its update (not whole)
        self.newest = newest
        self.whole = False  # the whole history window is kept (it was loaded once)
        self.loaded = False  # what is held is all there is to know (see RecentBars.load)
        self.first_live_seq: int | None = None  # seq of the first update since the feed started
        self.version = 0  # changes whenever a bar does
        self.settled = 0  # changes whenever a bar other than the newest minute's does


class RecentBars:
    """Per market, the newest update (largest seq) of each minute kept.

    A market the gateway only saw live keeps its recent minutes (RECENT_MINUTES, RECENT_SECONDS);
    once its history is loaded from storage (`load`) it keeps the whole history window,
    `max_bars` minutes (GATEWAY_HISTORY_MINUTES + 1) up to its newest. Memory is therefore
    bounded by markets x max_bars bars whatever the update rate. A forming bar's updates
    replace each other in place.
    """

    def __init__(
        self,
        *,
        minutes: int = RECENT_MINUTES,
        seconds: float = RECENT_SECONDS,
        max_bars: int = 1441,
    ) -> None:
        self.minutes = minutes
        self.seconds = seconds
        self.max_bars = max_bars
        self._markets: dict[str, _Market] = {}
        self._changes = 0

    def add(self, tick: Tick, now: float) -> bool:
        """Keep `tick` if it is the newest update of its minute; returns True when kept.

        `now` is `time.monotonic()`. Amortised O(1): each minute is dropped once, from the
        front, when it falls out of the market's bound (see the class docstring).
        """
        market = self._markets.get(tick.market)
        if market is None:
            market = self._markets[tick.market] = _Market(tick.minute)
        if market.first_live_seq is None:
            market.first_live_seq = tick.seq
        bars = market.bars
        minute = tick.minute
        held = bars.get(minute)
        if held is None:
            if minute < market.newest - self._span(market):
                return False  # a late update of a minute already out of the bound
        elif held.seq >= tick.seq:
            return False
        bars[minute] = tick
        if not market.whole:
            market.seen[minute] = now
        self._changes += 1
        market.version = self._changes
        if minute != market.newest:
            market.settled = self._changes
            if minute > market.newest:
                market.newest = minute
        self._trim(market, now)
        return True

    def load(self, market_id: str, stored: Sequence[Tick], now: float) -> None:
        """Merge the market's stored history (the larger seq wins per minute) and keep it whole.

        The market is then `loaded` (nothing more to read from storage until the feed restarts)
        if storage held an update at least as new as the first one the feed delivered since it
        started: stats stores a market's updates in order, so everything the feed did not
        deliver was stored by then. Otherwise (stats behind, or the feed not yet consuming the
        market's topic) the next subscriber loads again. Nothing is kept for a market with no
        bars at all.
        """
        market = self._markets.get(market_id)
        if market is None:
            if not stored:
                return
            market = self._markets[market_id] = _Market(max(t.minute for t in stored))
        merged = dict(market.bars)
        for tick in stored:
            held = merged.get(tick.minute)
            if held is None or tick.seq > held.seq:
                merged[tick.minute] = tick
        market.bars = {minute: merged[minute] for minute in sorted(merged)}
        market.seen = {}  # only markets not kept whole age in wall time
        if market.bars:
            market.newest = max(market.newest, next(reversed(market.bars)))
        market.whole = True
        first_live = market.first_live_seq
        if first_live is not None and any(t.seq >= first_live for t in stored):
            market.loaded = True
        self._changes += 1
        market.version = market.settled = self._changes
        self._trim(market, now)

    def feed_started(self) -> None:
        """The feed (re)started from the newest offsets: what it missed may be in storage only."""
        self.restart_feed(self._markets)

    def restart_feed(self, market_ids: Iterable[str]) -> None:
        """The feed stopped reading these markets, or starts again from their newest record:
        what it missed may be in storage only, so their next subscriber reads it again."""
        for market_id in market_ids:
            market = self._markets.get(market_id)
            if market is not None:
                market.loaded = False
                market.first_live_seq = None

    def is_followed(self, market_id: str) -> bool:
        """Whether the feed delivered an update of the market since it (re)started reading it."""
        market = self._markets.get(market_id)
        return market is not None and market.first_live_seq is not None

    def is_loaded(self, market_id: str) -> bool:
        market = self._markets.get(market_id)
        return market is not None and market.loaded

    def version(self, market_id: str) -> int:
        """Changes whenever one of the market's bars does; -1 for a market without bars."""
        market = self._markets.get(market_id)
        return -1 if market is None else market.version

    def settled_version(self, market_id: str) -> int:
        """Changes whenever a bar other than the newest minute's does (or a new minute starts)."""
        market = self._markets.get(market_id)
        return -1 if market is None else market.settled

    def window_start(self, market_id: str) -> int | None:
        """The first minute of the market's history window (newest - max_bars + 1 minutes)."""
        market = self._markets.get(market_id)
        return None if market is None else market.newest - (self.max_bars - 1) * MINUTE_MS

    def newest_bar(self, market_id: str) -> Tick | None:
        market = self._markets.get(market_id)
        return None if market is None else market.bars.get(market.newest)

    def bars_from(self, market_id: str, first: int, *, before: int | None = None) -> list[Tick]:
        """The market's bars of minutes first <= m (< before), oldest first."""
        market = self._markets.get(market_id)
        if market is None:
            return []
        bars = market.bars
        minutes = sorted(m for m in bars if m >= first and (before is None or m < before))
        return [bars[minute] for minute in minutes]

    def of(self, market_id: str) -> list[Tick]:
        """The market's bars held, oldest minute first."""
        market = self._markets.get(market_id)
        if market is None:
            return []
        return [market.bars[minute] for minute in sorted(market.bars)]

    @property
    def markets(self) -> Iterable[str]:
        return self._markets.keys()

    def bars_held(self) -> int:
        """Bars held over every market (the memory bound is markets x max_bars)."""
        return sum(len(market.bars) for market in self._markets.values())

    def _span(self, market: _Market) -> int:
        minutes = self.max_bars - 1 if market.whole else self.minutes
        return minutes * MINUTE_MS

    def _trim(self, market: _Market, now: float) -> None:
        bars, seen = market.bars, market.seen
        first = market.newest - self._span(market)
        while bars:
            oldest = next(iter(bars))
            if len(bars) <= self.max_bars and oldest >= first:
                break
            recent = not market.whole and now - seen[oldest] < self.seconds
            if recent and len(bars) <= self.max_bars:
                break  # a replay's minutes stay while recent in wall time
            del bars[oldest]
            seen.pop(oldest, None)
            market.settled = self._changes


def merge_history(
    stored: Iterable[Tick], recent: Iterable[Tick], minutes: int, since: int | None = None
) -> list[Tick]:
    """One bar per minute from storage and live bars (the larger seq wins), oldest first.

    Keeps the `minutes` minutes before the newest minute and that minute (at most
    minutes + 1 bars), and with `since` only minutes >= since.
    """
    by_minute: dict[int, Tick] = {}
    for tick in (*stored, *recent):
        held = by_minute.get(tick.minute)
        if held is None or tick.seq > held.seq:
            by_minute[tick.minute] = tick
    if not by_minute:
        return []
    first = max(by_minute) - minutes * MINUTE_MS
    if since is not None:
        first = max(first, since)
    return [by_minute[minute] for minute in sorted(by_minute) if minute >= first]
