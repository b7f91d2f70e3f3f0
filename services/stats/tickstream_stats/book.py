"""MetricBook: every metric's rolling window, fed in event time, with duplicate/stale skipping."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tickstream_shared.naming import METRIC_KINDS, Market, MetricKind
from tickstream_shared.schemas import Tick
from tickstream_stats.window import RollingWindow, WindowStats


@dataclass(frozen=True, slots=True)
class MetricUpdate:
    """The new stats of one metric after a batch."""

    metric_id: str
    kind: MetricKind
    stats: WindowStats
    last_value: float
    last_ts: int


@dataclass
class _MarketState:
    windows: dict[MetricKind, RollingWindow]
    last_ts: int = -1
    last_seq: int = -1
    last_values: dict[MetricKind, float] = field(default_factory=dict)


@dataclass
class MetricBook:
    """Windows for the markets this instance owns.

    A tick at or before the last applied (exchange time, seq) of its market is skipped: that is
    a re-delivery after a restart (already counted) or an out-of-order tick, which an event-time
    window in arrival order cannot take without breaking its O(1) eviction.
    """

    span_ms: int
    skipped_stale: int = 0
    _markets: dict[Market, _MarketState] = field(default_factory=dict)

    def __contains__(self, market: Market) -> bool:
        return market in self._markets

    def forget(self, market: Market) -> None:
        self._markets.pop(market, None)

    def apply(self, ticks: Iterable[Tick]) -> list[MetricUpdate]:
        """Feed ticks in order; return one update per metric that changed."""
        touched: dict[Market, _MarketState] = {}
        for tick in ticks:
            market = tick.market
            state = self._markets.get(market)
            if state is None:
                windows = {kind: RollingWindow(self.span_ms) for kind in METRIC_KINDS}
                state = self._markets[market] = _MarketState(windows)
            if (tick.exchange_ts, tick.seq) <= (state.last_ts, state.last_seq):
                self.skipped_stale += 1
                continue
            for kind in METRIC_KINDS:
                value = tick.value(kind)
                state.windows[kind].add(tick.exchange_ts, value)
                state.last_values[kind] = value
            state.last_ts, state.last_seq = tick.exchange_ts, tick.seq
            touched[market] = state
        updates = []
        for market, state in touched.items():
            for kind in METRIC_KINDS:
                stats = state.windows[kind].stats()
                if stats is not None:
                    updates.append(
                        MetricUpdate(
                            market.metric_id(kind),
                            kind,
                            stats,
                            state.last_values[kind],
                            state.last_ts,
                        )
                    )
        return updates
