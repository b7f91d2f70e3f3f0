"""MarketWatchdog: finds a market gone silent while its connection stays busy with others."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from tickstream_shared.naming import Market

# Weight of the newest gap in a market's usual gap (an exponential moving average).
_GAP_WEIGHT: Final = 0.2


@dataclass(slots=True)
class _Heard:
    last_ms: int
    gap_ms: float | None = None  # the usual time between two events of the market


@dataclass
class MarketWatchdog:
    """Per market: when it was last heard of (an update, a trade, its own heartbeat) and its
    usual gap between events.

    A market is silent when nothing was heard of it for `factor` x its usual gap (at least
    `min_silence_ms`, at most `max_silence_ms`; `max_silence_ms` / 6 until a gap is known)
    while another market of the same connection was heard within `min_silence_ms`: the
    connection is alive, so the connection's own watchdog cannot see it. A silent market
    stays `stale` until it is heard of again. One entry per watched market: bounded by the
    markets, not by the rate. `min_silence_ms` = 0 turns it off.
    """

    min_silence_ms: int = 60_000
    max_silence_ms: int = 1_800_000
    factor: float = 10.0
    stale: set[Market] = field(default_factory=set)
    detected: dict[str, int] = field(default_factory=dict)  # silences found, per exchange
    _heard: dict[Market, _Heard] = field(default_factory=dict)

    def heard(self, market: Market, now_ms: int) -> None:
        """Something of `market` arrived at `now_ms`."""
        entry = self._heard.get(market)
        if entry is None:
            self._heard[market] = _Heard(now_ms)
            return
        gap = now_ms - entry.last_ms
        if gap > 0:
            entry.gap_ms = (
                gap if entry.gap_ms is None else entry.gap_ms + _GAP_WEIGHT * (gap - entry.gap_ms)
            )
            entry.last_ms = now_ms
        self.stale.discard(market)

    def expect(self, markets: Iterable[Market], now_ms: int) -> None:
        """A connection subscribed `markets` at `now_ms`: one never heard of is timed from now."""
        for market in markets:
            self._heard.setdefault(market, _Heard(now_ms))

    def last_heard(self, market: Market) -> int | None:
        entry = self._heard.get(market)
        return None if entry is None else entry.last_ms

    def silent(self, markets: Iterable[Market], now_ms: int) -> list[Market]:
        """The markets of one connection that went silent since the last call (now `stale`)."""
        if not self.min_silence_ms:
            return []
        entries = [(m, self._heard.get(m)) for m in markets]
        if not any(e is not None and now_ms - e.last_ms < self.min_silence_ms for _, e in entries):
            return []  # the whole connection is quiet: the connection's watchdog's business
        found = []
        for market, entry in entries:
            if entry is None or market in self.stale:
                continue
            if now_ms - entry.last_ms > self._bound(entry):
                self.stale.add(market)
                self.detected[market.exchange] = self.detected.get(market.exchange, 0) + 1
                found.append(market)
        return found

    def _bound(self, entry: _Heard) -> float:
        if entry.gap_ms is None:
            return max(self.min_silence_ms, self.max_silence_ms / 6)
        return min(max(self.factor * entry.gap_ms, self.min_silence_ms), self.max_silence_ms)
