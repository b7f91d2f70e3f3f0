"""Bars seen live but maybe not yet stored, and history merged from storage and them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from tickstream_shared.schemas import MINUTE_MS, Tick

# Live bars kept per market bridge the gap between what the gateway has seen and what stats
# has stored (one batch: under a second of wall time; a stats restart: seconds). A bar stays
# while it is within RECENT_MINUTES of its market's newest minute (live feeds) or was updated
# less than RECENT_SECONDS ago (a replay runs event time far faster than the wall clock, so
# ten event minutes may pass in a few milliseconds). The bound is time, never an update count.
RECENT_MINUTES: Final = 10
RECENT_SECONDS: Final = 60.0


class RecentBars:
    """Per market, the newest update (largest seq) of each recent minute.

    At most `max_bars` minutes per market (the history length: older ones could not be sent
    anyway), so memory is bounded by markets x max_bars bars whatever the update rate; with
    real-time feeds it is about RECENT_MINUTES + 1 bars per market. A forming bar's updates
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
        # Per market: minute -> (newest update, monotonic time it arrived). Minutes normally
        # arrive in order, so the first entry is the oldest minute; a late minute is dropped a
        # little later than it could be, and never kept beyond max_bars.
        self._bars: dict[str, dict[int, tuple[Tick, float]]] = {}
        self._newest: dict[str, int] = {}

    def add(self, tick: Tick, now: float) -> bool:
        """Keep `tick` if it is the newest update of its minute; returns True when kept.

        `now` is `time.monotonic()`. Amortised O(1): each minute is dropped once, from the
        front, when it is both out of the minute bound and older than the time bound, or when
        the market holds more than `max_bars` minutes.
        """
        market = tick.market
        bars = self._bars.get(market)
        if bars is None:
            bars = self._bars[market] = {}
            self._newest[market] = tick.minute
        newest = self._newest[market]
        first = newest - self.minutes * MINUTE_MS
        if tick.minute < first and tick.minute not in bars:
            return False  # a late update of a minute already out of the bound
        held = bars.get(tick.minute)
        if held is not None and held[0].seq >= tick.seq:
            return False
        bars[tick.minute] = (tick, now)
        if tick.minute > newest:
            self._newest[market] = tick.minute
            first = tick.minute - self.minutes * MINUTE_MS
        while bars:
            oldest = next(iter(bars))
            _, seen = bars[oldest]
            expired = oldest < first and now - seen >= self.seconds
            if not expired and len(bars) <= self.max_bars:
                break
            del bars[oldest]
        return True

    def of(self, market_id: str) -> list[Tick]:
        """The market's recent bars, oldest minute first."""
        bars = self._bars.get(market_id, {})
        return [bars[minute][0] for minute in sorted(bars)]

    @property
    def markets(self) -> Iterable[str]:
        return self._bars.keys()


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
