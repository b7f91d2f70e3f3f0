"""Seedable random-walk markets as one-minute bars: forming updates, then one closed update."""

from __future__ import annotations

import math
import random
from typing import Final

from tickstream_shared.schemas import MINUTE_MS, Tick

# Rough late-2024 price levels, so charts and ranks look like real markets.
STARTING_PRICES: Final[dict[str, float]] = {
    "btc": 65000.0,
    "eth": 3400.0,
    "sol": 150.0,
    "bnb": 580.0,
    "xrp": 0.55,
    "ada": 0.45,
    "doge": 0.12,
    "dot": 6.5,
    "link": 14.0,
    "ltc": 80.0,
    "avax": 30.0,
    "atom": 8.0,
    "matic": 0.7,
}
_DEFAULT_PRICE = 100.0
# Standard deviation of one minute's log return, scaled per market so that ranks differ.
_MINUTE_SIGMA = 0.0008
_SIGMA_SCALE = (0.5, 2.0)
# Notional traded per minute, roughly equal across markets: cheap coins trade more units.
_MINUTE_NOTIONAL = 2_000_000.0
_MINUTE_VOLUME_SPREAD = 0.35  # sigma of the log of a minute's volume around its market's level
# About six spike minutes a day per market, 5 to 25 times the usual volume: enough for the
# alert rule to have something to find, few enough to read.
SPIKE_PROBABILITY: Final = 0.004
_SPIKE_RANGE = (5.0, 25.0)
# Sub-steps that make up one backfilled minute (its high and low come from them).
_BACKFILL_STEPS = 6


def next_seq(last: int, now_us: int) -> int:
    """A market's next seq: the wall clock in microseconds, and always above the last one.

    Seeding from the clock makes seqs grow across restarts, so a restarted watcher's updates
    win over the ones stored before it (the storage keeps the largest seq of a minute).
    """
    return max(last + 1, now_us)


class SyntheticMarket:
    """One market's seeded random walk, as a one-minute bar that forms and then closes.

    Pure: the caller passes the wall time in; the same seed and times give the same ticks.
    """

    def __init__(self, market_id: str, base: str, seed: int, index: int) -> None:
        self.market = market_id
        self._rng = random.Random(f"{seed}:{index}:{base}")
        rng = self._rng
        self._price = STARTING_PRICES.get(base, _DEFAULT_PRICE) * rng.uniform(0.97, 1.03)
        self._sigma = _MINUTE_SIGMA * rng.uniform(*_SIGMA_SCALE)
        self._usual_volume = _MINUTE_NOTIONAL / self._price * rng.uniform(0.5, 1.5)
        self.seq = 0
        # The forming bar: its minute (None before the first live update), prices and volume.
        self._minute: int | None = None
        self._open = self._high = self._low = self._price
        self._volume = 0.0
        self._quote_volume = 0.0  # the value of the forming minute's trades, in quote units
        self._minute_volume = 0.0  # what the forming minute trades in all, on average
        self._last_ms = 0  # wall time the walk has been simulated up to

    def resume(self, last_closed: Tick, seed: int, index: int) -> None:
        """Continue the walk of a previous publisher after its newest closed bar `last_closed`:
        from its close price and above its seq, with the market's level and spread unchanged.

        The minutes it published are not generated again: replacing them with other values
        would raise alerts for moves that never happened and leave its alerts on bars that
        changed. The walk's randomness is drawn afresh from the resume minute, so it does not
        repeat the previous walk's steps.
        """
        self._price = self._open = self._high = self._low = last_closed.close
        self.seq = max(self.seq, last_closed.seq)
        self._rng = random.Random(f"{seed}:{index}:{self.market}:{last_closed.minute}")

    def backfill_bar(self, minute: int, seq: int, received_ts: int) -> Tick:
        """Simulate the whole minute starting at `minute` and return it as a closed bar.

        Call for consecutive minutes, oldest first, before the first `update`.
        """
        self._start_bar(minute)
        for _ in range(_BACKFILL_STEPS):
            self._walk(MINUTE_MS / _BACKFILL_STEPS)
        self.seq = max(seq, self.seq + 1)  # above a resumed walk's seqs too
        bar = self._tick(minute + MINUTE_MS, received_ts, closed=True)
        self._minute = None  # closed: the next update starts a new bar
        return bar

    def update(self, now_ms: int, now_us: int) -> list[Tick]:
        """Advance to wall time `now_ms` and return the updates that happen at it.

        One forming update of the current minute's bar, preceded by the previous bar's closed
        update when the minute changed since the last call. A clock that steps back is held
        at the latest time seen, so a bar never reopens.
        """
        now_ms = max(now_ms, self._last_ms)
        minute = now_ms - now_ms % MINUTE_MS
        ticks: list[Tick] = []
        if self._minute != minute:
            if self._minute is not None:
                # Simulate the rest of the old minute so the closed bar covers all of it.
                bar_end = self._minute + MINUTE_MS
                self._walk(bar_end - self._last_ms)
                self.seq = next_seq(self.seq, now_us)
                ticks.append(self._tick(bar_end, now_ms, closed=True))
            self._start_bar(minute)
        self._walk(now_ms - self._last_ms)
        self._last_ms = now_ms
        self.seq = next_seq(self.seq, now_us)
        ticks.append(self._tick(now_ms, now_ms, closed=False))
        return ticks

    def _start_bar(self, minute: int) -> None:
        self._minute = minute
        self._open = self._high = self._low = self._price
        self._volume = self._quote_volume = 0.0
        self._last_ms = minute
        rng = self._rng
        minute_volume = self._usual_volume * rng.lognormvariate(0.0, _MINUTE_VOLUME_SPREAD)
        if rng.random() < SPIKE_PROBABILITY:
            minute_volume *= rng.uniform(*_SPIKE_RANGE)
        self._minute_volume = minute_volume

    def _walk(self, elapsed_ms: float) -> None:
        """Move the walk `elapsed_ms` on: price diffuses, volume accrues at the minute's rate.

        Each step is one trade of the volume it adds at the price it reaches, so the minute's
        quote volume is the exact sum of those trades' price x size.
        """
        if elapsed_ms <= 0:
            return
        fraction = elapsed_ms / MINUTE_MS
        rng = self._rng
        self._price *= math.exp(rng.gauss(0.0, self._sigma * math.sqrt(fraction)))
        self._high = max(self._high, self._price)
        self._low = min(self._low, self._price)
        # Trades arrive unevenly, but only a little: the minute-to-minute spread comes from
        # the minute's own volume, not from how many updates the minute happened to get.
        size = self._minute_volume * fraction * rng.uniform(0.5, 1.5)
        self._volume += size
        self._quote_volume += self._price * size

    def _tick(self, exchange_ts: int, received_ts: int, *, closed: bool) -> Tick:
        assert self._minute is not None
        return Tick(
            self.market,
            self._minute,
            self.seq,
            exchange_ts,
            received_ts,
            self._open,
            self._high,
            self._low,
            self._price,
            self._volume,
            None,
            closed,
            self._quote_volume,
        )
