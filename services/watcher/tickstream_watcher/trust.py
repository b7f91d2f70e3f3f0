"""TrustRules: when a live value may be published as final (clock, plausibility, reconciliation)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

# Closed bars kept per market (by minute, not by count of updates): the reference of the
# plausibility check, what a late final candle is compared with, and what reconciliation
# checks against REST. A minute older than this behind the market's newest is forgotten.
RECENT_MINUTES: Final = 60


@dataclass(frozen=True, slots=True)
class TrustRules:
    """The watcher's rules for trusting live data; every number is a setting (WATCHER_*).

    - `max_ahead_ms`: an update stamped (or of a minute starting) further ahead of the
      watcher's receive clock is refused and counted; stamps within it are clamped to the
      receive time, so the shared event-time clock never runs ahead of wall time.
    - `price_factor`, `volume_factor`: a bar whose high is above `price_factor` x the median
      close of the market's recent closed bars (or whose low is below the median divided by
      it), or whose volume is above `volume_factor` x their largest volume, is implausible:
      it is not published until the exchange's REST candle confirms its minute. 0 turns a
      check off. Checked once the market has `min_reference_bars` recent closed bars.
    - `reconcile_after_ms`: every closed minute is compared with the REST candle once it is
      this old (or as soon after as the exchange's request limits allow); `reconcile_settle_ms`
      is how long after its end a minute's REST candle is taken as final. 0 turns it off.
    """

    max_ahead_ms: int = 5_000
    price_factor: float = 3.0
    volume_factor: float = 100.0
    min_reference_bars: int = 5
    reconcile_after_ms: int = 300_000
    reconcile_settle_ms: int = 60_000

    def __post_init__(self) -> None:
        if self.max_ahead_ms < 0 or self.min_reference_bars < 1:
            raise ValueError("max_ahead_ms must be >= 0 and min_reference_bars >= 1")
        if not (self.price_factor == 0 or self.price_factor > 1):
            raise ValueError(f"price_factor must be 0 (off) or above 1, got {self.price_factor}")
        if not (self.volume_factor == 0 or self.volume_factor > 1):
            raise ValueError(f"volume_factor must be 0 (off) or above 1, got {self.volume_factor}")
        if self.reconcile_after_ms < 0 or self.reconcile_settle_ms < 0:
            raise ValueError("reconcile_after_ms and reconcile_settle_ms must be >= 0")


@dataclass(frozen=True, slots=True)
class Reference:
    """What a market's recent closed bars make plausible: their median close, largest volume."""

    median_close: float
    max_volume: float

    @classmethod
    def of(cls, bars: Iterable[tuple[float, float]], minimum: int) -> Reference | None:
        """From (close, volume) pairs; None with fewer than `minimum` (nothing to judge by)."""
        closes, volumes = [], []
        for close, volume in bars:
            closes.append(close)
            volumes.append(volume)
        if len(closes) < minimum:
            return None
        return cls(statistics.median(closes), max(volumes))

    def admits(self, rules: TrustRules, high: float, low: float, volume: float) -> bool:
        """True if a bar with this high, low and volume is plausible by `rules`."""
        factor = rules.price_factor
        if factor and (high > self.median_close * factor or low < self.median_close / factor):
            return False
        limit = rules.volume_factor * self.max_volume
        # A market whose recent minutes had no volume at all gives no volume scale to judge by.
        return not (rules.volume_factor and self.max_volume > 0 and volume > limit)
