"""Seeded random-walk markets as one-minute bars, each minute a function of the seed alone."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
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
# Sub-steps of one minute's path: its high and low come from them, and its trades are made at
# them.
_STEPS = 6
# Scales of the deterministic walk: level k moves over 2**k minutes, up to about 11 days.
# Beyond that the walk does not drift further: prices stay within a few percent of their level
# (a few tens of sigma-steps), so a long-running stack does not wander off to 0 or infinity.
_LEVELS = 14
# A minute later than this after the previous update is not caught up bar by bar: a clock
# jump (a suspended laptop) leaves a gap rather than a flood of bars.
MAX_CATCH_UP_MINUTES: Final = 1440
_MASKS: Final = tuple((1 << k) - 1 for k in range(_LEVELS))
# Level k's weight, divided by its span 2**k (its line is interpolated over that many minutes)
# and by sqrt(2): the levels' per-minute variances add up to about 2, one sigma per minute in all.
_LEVEL_WEIGHTS: Final = tuple(
    math.sqrt((1 << k) / 2) / (1 << k) / math.sqrt(2) for k in range(_LEVELS)
)


def next_seq(last: int, now_us: int) -> int:
    """A market's next seq: the wall clock in microseconds, and always above the last one.

    Seeding from the clock makes seqs grow across restarts, so a restarted watcher's updates
    win over the ones stored before it (the storage keeps the largest seq of a minute).
    """
    return max(last + 1, now_us)


class _Uniforms:
    """Deterministic uniform numbers in (0, 1): keyed BLAKE2b of the integers naming them."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def pair(self, *parts: int) -> tuple[float, float]:
        """Two numbers named by three integers (a shorter digest than `__call__`'s eight)."""
        digest = hashlib.blake2b(struct.pack("<3q", *parts), key=self._key, digest_size=16).digest()
        a, b = struct.unpack("<2Q", digest)
        return (a >> 11) * _TO_UNIT + _HALF_ULP, (b >> 11) * _TO_UNIT + _HALF_ULP

    def __call__(self, *parts: int) -> tuple[float, ...]:
        digest = hashlib.blake2b(struct.pack("<3q", *parts), key=self._key, digest_size=64).digest()
        return tuple((x >> 11) * _TO_UNIT + _HALF_ULP for x in struct.unpack("<8Q", digest))


_TO_UNIT = 2.0**-53
_HALF_ULP = 2.0**-54  # keeps every number strictly inside (0, 1): log() of it is finite


def _gaussians(u: Sequence[float]) -> list[float]:
    """Standard normal numbers from pairs of uniforms (Box-Muller), two per pair."""
    out = []
    for a, b in zip(u[::2], u[1::2], strict=True):
        radius = math.sqrt(-2.0 * math.log(a))
        out += [radius * math.cos(math.tau * b), radius * math.sin(math.tau * b)]
    return out


@dataclass(frozen=True, slots=True)
class _MinutePath:
    """One minute's trades: prices[0] is the open, prices[i] the price of step i (prices[-1]
    the close, the next minute's open) and volumes[i - 1] what step i traded."""

    prices: tuple[float, ...]
    volumes: tuple[float, ...]


class SyntheticMarket:
    """One market's random walk, as a one-minute bar that forms and then closes.

    Pure and deterministic in the minute: every value of a minute (open, high, low, close,
    volume, quote volume) is a function of the seed, the market and the minute alone, never of
    when or how often it was computed. A restarted watcher (or a standby) that generates minutes
    again therefore generates the same bars: nothing published changes, and no alert is raised
    again for a move that never happened. A forming update at a moment of the minute shows the
    minute's path up to that moment.
    """

    def __init__(self, market_id: str, base: str, seed: int, index: int) -> None:
        self.market = market_id
        rng = random.Random(f"{seed}:{index}:{base}")
        level = STARTING_PRICES.get(base, _DEFAULT_PRICE) * rng.uniform(0.97, 1.03)
        self._sigma = _MINUTE_SIGMA * rng.uniform(*_SIGMA_SCALE)
        self._usual_volume = _MINUTE_NOTIONAL / level * rng.uniform(0.5, 1.5)
        self._log_level = math.log(level)
        self._uniforms = _Uniforms(rng.randbytes(16))
        # Per level: (grid index j, value at j, value at j + 1) last used; minutes come in
        # order, so each level's values are computed once per 2**k minutes.
        self._grid: list[tuple[int, float, float]] = [(-1, 0.0, 0.0)] * _LEVELS
        self._held = (-1, 0.0)  # (minute index, log price) computed last
        self.seq = 0
        # The forming bar: its minute (None before the first live update) and path.
        self._minute: int | None = None
        self._path: _MinutePath | None = None
        self._last_ms = 0  # the latest wall time seen: a clock stepping back is held here

    def backfill_bar(self, minute: int, seq: int, received_ts: int) -> Tick:
        """The whole minute starting at `minute` as a closed bar (with seq at least `seq`).

        Call for consecutive minutes, oldest first, before the first `update`.
        """
        self.seq = max(seq, self.seq + 1)  # above a resumed walk's seqs too
        bar = self._tick(minute, self._minute_path(minute), 1.0, minute + MINUTE_MS, received_ts)
        self._minute = self._path = None  # closed: the next update starts a new bar
        return bar

    def update(self, now_ms: int, now_us: int) -> list[Tick]:
        """The updates that happen at wall time `now_ms`: the closed update of every minute
        that ended since the last call (up to MAX_CATCH_UP_MINUTES of them), then one forming
        update of the current minute. A clock that steps back is held at the latest time
        seen, so a bar never reopens.
        """
        now_ms = max(now_ms, self._last_ms)
        self._last_ms = now_ms
        minute = now_ms - now_ms % MINUTE_MS
        ticks: list[Tick] = []
        if self._minute != minute:
            if self._minute is not None and self._path is not None:
                ended = range(self._minute, minute, MINUTE_MS)
                for start in ended if len(ended) <= MAX_CATCH_UP_MINUTES else ended[:1]:
                    path = self._path if start == self._minute else self._minute_path(start)
                    self.seq = next_seq(self.seq, now_us)
                    ticks.append(self._tick(start, path, 1.0, start + MINUTE_MS, now_ms))
            self._minute, self._path = minute, self._minute_path(minute)
        assert self._path is not None
        self.seq = next_seq(self.seq, now_us)
        fraction = (now_ms - minute) / MINUTE_MS
        ticks.append(self._tick(minute, self._path, fraction, now_ms, now_ms, closed=False))
        return ticks

    def _log_price(self, minute_index: int) -> float:
        """The log price at the start of minute `minute_index` (minutes since the epoch): a sum
        of levels, each a line through seeded normal values 2**k minutes apart, weighted so
        that each level adds about the same variance per minute as a random walk would."""
        if minute_index == self._held[0]:
            return self._held[1]  # a minute's close is asked again as the next one's open
        total = 0.0
        grid = self._grid
        for k in range(_LEVELS):
            j = minute_index >> k
            held_j, left, right = grid[k]
            if held_j != j:
                left = right if held_j == j - 1 else self._grid_value(k, j)
                right = self._grid_value(k, j + 1)
                grid[k] = (j, left, right)
            total += _LEVEL_WEIGHTS[k] * (
                left * (1 << k) + (right - left) * (minute_index & _MASKS[k])
            )
        log_price = self._log_level + self._sigma * total
        self._held = (minute_index, log_price)
        return log_price

    def _grid_value(self, level: int, j: int) -> float:
        a, b = self._uniforms.pair(1, level, j)
        return math.sqrt(-2.0 * math.log(a)) * math.cos(math.tau * b)

    def _minute_path(self, minute: int) -> _MinutePath:
        """The minute's trades, from its open to its close (the next minute's open)."""
        n = minute // MINUTE_MS
        first, last = math.exp(self._log_price(n)), math.exp(self._log_price(n + 1))
        u = self._uniforms(2, n, 0) + self._uniforms(2, n, 1)
        # A Brownian bridge from the open to the close through _STEPS - 1 inner points.
        steps = _gaussians(u[:_STEPS])
        step_sigma = self._sigma / math.sqrt(_STEPS)
        lo, lc = math.log(first), math.log(last)
        walk = list(itertools.accumulate(z * step_sigma for z in steps))
        inner = [
            math.exp(lo + (lc - lo) * i / _STEPS + walk[i - 1] - walk[-1] * i / _STEPS)
            for i in range(1, _STEPS)
        ]
        volume_z = _gaussians(u[_STEPS : _STEPS + 2])[0]
        minute_volume = self._usual_volume * math.exp(_MINUTE_VOLUME_SPREAD * volume_z)
        spike, size = u[_STEPS + 2], u[_STEPS + 3]
        if spike < SPIKE_PROBABILITY:
            minute_volume *= _SPIKE_RANGE[0] + (_SPIKE_RANGE[1] - _SPIKE_RANGE[0]) * size
        # Trades arrive unevenly, but only a little: the minute-to-minute spread comes from
        # the minute's own volume, not from how its steps share it.
        weights = [0.5 + w for w in u[_STEPS + 4 : 2 * _STEPS + 4]]
        scale = minute_volume / sum(weights)
        return _MinutePath((first, *inner, last), tuple(w * scale for w in weights))

    def _tick(
        self,
        minute: int,
        path: _MinutePath,
        fraction: float,
        exchange_ts: int,
        received_ts: int,
        *,
        closed: bool = True,
    ) -> Tick:
        """The bar of `path` up to `fraction` of its minute: whole steps, then the part of the
        current one, traded at the price reached (linear within a step, so high and low
        never fall back between two updates)."""
        prices, volumes = path.prices, path.volumes
        done, part = divmod(fraction * _STEPS, 1.0)
        whole = min(int(done), _STEPS)
        price = prices[whole]
        high = low = prices[0]
        volume = quote_volume = 0.0
        for i in range(1, whole + 1):
            high, low = max(high, prices[i]), min(low, prices[i])
            volume += volumes[i - 1]
            quote_volume += prices[i] * volumes[i - 1]
        if whole < _STEPS and part > 0:
            price = prices[whole] + (prices[whole + 1] - prices[whole]) * part
            high, low = max(high, price), min(low, price)
            traded = volumes[whole] * part
            volume += traded
            quote_volume += price * traded
        return Tick(
            self.market,
            minute,
            self.seq,
            exchange_ts,
            received_ts,
            prices[0],
            high,
            low,
            price,
            volume,
            None,
            closed,
            quote_volume,
        )
