"""Minute spike rule: a minute's value above factor x the mean of the minutes before it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from tickstream_shared.naming import MetricKind
from tickstream_shared.schemas import MINUTE_MS

# Float verdicts are trusted only when the value is clear of the threshold by this much
# (relative to the magnitudes involved; float errors here are ~1e-15). Closer than that the
# verdict is computed with fractions, so it never depends on how a sum was rounded.
_CLEAR_MARGIN: Final = 1e-9
# Below this a float threshold may have lost precision to underflow: decide exactly.
_TINY: Final = 1e-290
# An Alert's floats are bounded (schemas._Finite); a ratio over a mean that underflowed is capped.
_MAX_RATIO: Final = 1e300


@dataclass(frozen=True, slots=True)
class Spike:
    """A value of the judged minute above the rule's threshold for its metric."""

    kind: MetricKind
    value: float
    mean: float  # math.fsum of the trailing minutes' values / samples
    ratio: float  # value / mean
    samples: int  # minutes present in the trailing window


@dataclass(slots=True)
class _Baseline:
    """One metric's trailing values before the judged minute, summarised once per minute."""

    values: list[float]
    total: float  # math.fsum(values): correctly rounded, so its sign is the exact sum's sign
    mean: float
    std: float | None = None  # population std, computed the first time the z guard needs it

    def deviation(self) -> float:
        if self.std is None:
            mean = self.mean
            self.std = math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / len(self.values))
        return self.std


def _baseline(values: list[float]) -> _Baseline:
    total = math.fsum(values)
    return _Baseline(values, total, total / len(values) if values else 0.0)


@dataclass(frozen=True, slots=True)
class _Trailing:
    """The window before one minute, computed once per minute (not once per update)."""

    minute: int
    samples: int
    eligible: bool  # enough samples and enough active minutes
    price: _Baseline
    volume: _Baseline


class MinuteSpikeRule:
    """The spike rule for one market's two metrics (price = close, volume), minute by minute.

    Keeps the values of the newest `window_minutes + 1` minutes in a ring indexed by minute, so
    its size is bounded by time whatever the update rate. Only updates of the market's newest
    minute are judged, against the minutes `minute - window .. minute - 1` that are present
    (their latest values). A value is a spike if, exactly (fractions on near-ties):
    at least `min_samples` minutes are present, at least `min_active_minutes` of them have
    non-zero volume, their mean is positive, value > factor x mean, and
    value > mean + min_zscore x (population std of those values). A late update of an earlier
    minute replaces that minute's value for later windows and is not judged. Not thread-safe.
    """

    __slots__ = (
        "_closes",
        "_factor",
        "_min_active",
        "_min_samples",
        "_min_zscore",
        "_minutes",
        "_newest",
        "_size",
        "_trailing",
        "_volumes",
        "_window",
    )

    def __init__(
        self,
        factor: float,
        window_minutes: int,
        min_samples: int,
        min_active_minutes: int = 0,
        min_zscore: float = 0.0,
    ) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be positive and finite, got {factor!r}")
        if window_minutes < 1:
            raise ValueError(f"window_minutes must be at least 1, got {window_minutes}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        if min_active_minutes < 0:
            raise ValueError(f"min_active_minutes must be >= 0, got {min_active_minutes}")
        if not (math.isfinite(min_zscore) and min_zscore >= 0):
            raise ValueError(f"min_zscore must be >= 0 and finite, got {min_zscore!r}")
        self._factor = factor
        self._window = window_minutes
        self._min_samples = min_samples
        self._min_active = min_active_minutes
        self._min_zscore = min_zscore
        # One slot per minute of the window plus the judged one; a slot is valid only while its
        # minute tag matches, so a gap needs no clean-up.
        self._size = window_minutes + 1
        self._minutes = [-1] * self._size
        self._closes = [0.0] * self._size
        self._volumes = [0.0] * self._size
        self._newest = -1
        self._trailing: _Trailing | None = None

    @property
    def newest_minute(self) -> int | None:
        return self._newest if self._newest >= 0 else None

    def remember(self, minute: int, close: float, volume: float) -> None:
        """Record a minute's latest value without judging it (warm-up from stored bars)."""
        self._store(minute, close, volume)

    def observe(self, minute: int, close: float, volume: float) -> tuple[Spike, ...]:
        """Record the update of `minute`; return the spikes it shows (none, one or both kinds).

        The trailing window is summarised once per judged minute and reused by every further
        update of that minute, until a late update to an earlier minute changes it.
        """
        if not self._store(minute, close, volume):
            return ()
        trailing = self._trailing
        if trailing is None or trailing.minute != minute:
            trailing = self._trailing = self._trail(minute)
        if not trailing.eligible:
            return ()
        spikes: tuple[Spike, ...] = ()
        if self._exceeds(close, trailing.price):
            spikes = (_spike("price", close, trailing.price.mean, trailing.samples),)
        if self._exceeds(volume, trailing.volume):
            spikes = (*spikes, _spike("volume", volume, trailing.volume.mean, trailing.samples))
        return spikes

    def _store(self, minute: int, close: float, volume: float) -> bool:
        """Put the value in its slot; True if `minute` is the newest (so it is judged)."""
        if minute < self._newest - self._window * MINUTE_MS:
            return False  # older than any window still to be judged: cannot matter
        slot = (minute // MINUTE_MS) % self._size
        self._minutes[slot] = minute
        self._closes[slot] = close
        self._volumes[slot] = volume
        if minute >= self._newest:
            self._newest = minute
            return True
        # A late update of a minute inside the newest minute's window changes its baseline.
        self._trailing = None
        return False

    def _trail(self, minute: int) -> _Trailing:
        closes: list[float] = []
        volumes: list[float] = []
        ring = self._minutes
        size = self._size
        for earlier in range(minute - self._window * MINUTE_MS, minute, MINUTE_MS):
            slot = (earlier // MINUTE_MS) % size
            if ring[slot] == earlier:
                closes.append(self._closes[slot])
                volumes.append(self._volumes[slot])
        samples = len(closes)
        active = sum(1 for v in volumes if v > 0.0)
        eligible = samples >= self._min_samples and active >= self._min_active
        return _Trailing(minute, samples, eligible, _baseline(closes), _baseline(volumes))

    def _exceeds(self, value: float, base: _Baseline) -> bool:
        """value > factor x mean and value > mean + min_zscore x std, exactly; mean > 0."""
        if base.total <= 0.0:
            return False  # only a positive mean can be exceeded
        threshold = self._factor * base.mean
        if threshold >= _TINY and value < threshold * (1.0 - _CLEAR_MARGIN):
            return False
        if not (threshold >= _TINY and value > threshold * (1.0 + _CLEAR_MARGIN)):
            exact_total = sum(map(Fraction, base.values), Fraction(0))
            if Fraction(value) * len(base.values) <= Fraction(self._factor) * exact_total:
                return False
        if self._min_zscore == 0.0:
            return True
        # The float error of excess and bar is ~1e-16 of value + mean + bar: far inside tolerance.
        excess = value - base.mean
        bar = self._min_zscore * base.deviation()
        tolerance = _CLEAR_MARGIN * (value + base.mean + bar)
        if excess - bar > tolerance and base.mean >= _TINY:
            return True
        if excess - bar < -tolerance and base.mean >= _TINY:
            return False
        return _exceeds_zscore_exactly(value, base.values, self._min_zscore)


def _exceeds_zscore_exactly(value: float, values: list[float], zscore: float) -> bool:
    """value - mean > zscore x population std, in exact rational arithmetic."""
    count = len(values)
    exact = [Fraction(v) for v in values]
    mean = sum(exact, Fraction(0)) / count
    excess = Fraction(value) - mean
    if excess <= 0:
        return False
    variance = sum(((v - mean) ** 2 for v in exact), Fraction(0)) / count
    return excess * excess > Fraction(zscore) ** 2 * variance


def _spike(kind: MetricKind, value: float, mean: float, samples: int) -> Spike:
    ratio = value / mean if mean > 0.0 else _MAX_RATIO
    return Spike(kind=kind, value=value, mean=mean, ratio=min(ratio, _MAX_RATIO), samples=samples)
