"""Minute spike rule: a minute's value above factor x the mean of the minutes before it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from tickstream_shared.moments import ExactMoments
from tickstream_shared.naming import AlertKind
from tickstream_shared.schemas import MINUTE_MS

# An Alert's floats are bounded (schemas._Finite); a ratio over a mean that underflowed is capped.
_MAX_RATIO: Final = 1e300


@dataclass(frozen=True, slots=True)
class Spike:
    """A value of the judged minute above the rule's threshold for its metric."""

    kind: AlertKind
    value: float
    mean: float  # the exact mean of the trailing minutes' values, correctly rounded
    ratio: float  # value / mean
    samples: int  # minutes present in the trailing window


class MinuteSpikeRule:
    """The spike rule for one market's two metrics (price = close, volume), minute by minute.

    Keeps the values of the newest `window_minutes + 1 + correction_minutes` minutes in a ring
    indexed by minute, so its size is bounded by time whatever the update rate. `observe` judges
    only updates of the market's newest minute, against the minutes `minute - window ..
    minute - 1` that are present (their latest values). A value is a spike if, exactly (integer
    arithmetic, no rounding): at least `min_samples` minutes are present, at least
    `min_active_minutes` of them have non-zero volume, their mean is positive,
    value > factor x mean, and value > mean + min_zscore x (population std of those values).
    A late update of an earlier minute replaces that minute's value for later windows and is
    not judged by `observe`; `judge` judges a minute up to `correction_minutes` before the newest
    again, with its latest value against its own trailing window (a closing or corrected bar).

    The newest minute's trailing sums are kept exactly (ExactMoments) and moved, not recomputed:
    an update of the forming minute costs O(1), a new minute costs the minutes it moves over
    (each minute enters and leaves once); `judge` of an earlier minute sums its window afresh
    (O(window)), which only alerts being re-judged need. Not thread-safe.
    """

    __slots__ = (
        "_active",
        "_closes",
        "_correction",
        "_factor",
        "_min_active",
        "_min_samples",
        "_min_zscore",
        "_minutes",
        "_newest",
        "_price",
        "_size",
        "_volume",
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
        correction_minutes: int = 0,
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
        if correction_minutes < 0:
            raise ValueError(f"correction_minutes must be >= 0, got {correction_minutes}")
        # Exact rationals of the floats given, so verdicts never depend on rounding.
        self._factor = Fraction(factor)
        self._min_zscore = Fraction(min_zscore)
        self._window = window_minutes
        self._min_samples = min_samples
        self._min_active = min_active_minutes
        self._correction = correction_minutes
        # One slot per minute of the window, the newest minute and the minutes `judge` may
        # still reach back to (with their windows); a slot is valid only while its minute tag
        # matches, so a gap needs no clean-up.
        self._size = window_minutes + 1 + correction_minutes
        self._minutes = [-1] * self._size
        self._closes = [0.0] * self._size
        self._volumes = [0.0] * self._size
        self._newest = -1
        # Sums over the trailing window of the newest minute: the present minutes in
        # [newest - window, newest - 1], and how many of them have non-zero volume.
        self._price = ExactMoments()
        self._volume = ExactMoments()
        self._active = 0

    @property
    def newest_minute(self) -> int | None:
        return self._newest if self._newest >= 0 else None

    def remember(self, minute: int, close: float, volume: float) -> None:
        """Record a minute's latest value without judging it (warm-up from stored bars)."""
        self._store(minute, close, volume)

    def observe(self, minute: int, close: float, volume: float) -> tuple[Spike, ...]:
        """Record the update of `minute`; return the spikes it shows (none, one or both kinds)."""
        if not self._store(minute, close, volume):
            return ()
        return self._verdict(close, volume, self._price, self._volume, self._active)

    def holds(self, minute: int) -> bool:
        """Whether `judge` can judge `minute`: held, at most correction_minutes before newest."""
        if not self._newest - self._correction * MINUTE_MS <= minute <= self._newest:
            return False
        return self._minutes[(minute // MINUTE_MS) % self._size] == minute

    def judge(self, minute: int) -> tuple[Spike, ...]:
        """The spikes of `minute`'s latest value against its own trailing window, now.

        The same verdict `observe` gives an update of the newest minute, for any minute `holds`;
        raises ValueError for one it does not hold.
        """
        if not self.holds(minute):
            raise ValueError(f"minute {minute} is not held (newest {self._newest})")
        slot = (minute // MINUTE_MS) % self._size
        close, volume = self._closes[slot], self._volumes[slot]
        if minute == self._newest:
            return self._verdict(close, volume, self._price, self._volume, self._active)
        price, volumes = ExactMoments(), ExactMoments()
        active = 0
        for earlier in range(minute - self._window * MINUTE_MS, minute, MINUTE_MS):
            slot = (earlier // MINUTE_MS) % self._size
            if self._minutes[slot] == earlier:
                price.add(self._closes[slot])
                volumes.add(self._volumes[slot])
                active += self._volumes[slot] != 0.0
        return self._verdict(close, volume, price, volumes, active)

    def _verdict(
        self, close: float, volume: float, price: ExactMoments, volumes: ExactMoments, active: int
    ) -> tuple[Spike, ...]:
        """The rule itself: the spikes of (close, volume) over a window's sums."""
        if price.count < self._min_samples or active < self._min_active:
            return ()
        spikes: tuple[Spike, ...] = ()
        if self._exceeds(close, price):
            spikes = (_spike("price", close, price),)
        if self._exceeds(volume, volumes):
            spikes = (*spikes, _spike("volume", volume, volumes))
        return spikes

    def _store(self, minute: int, close: float, volume: float) -> bool:
        """Put the value in its slot and keep the sums true; True if `minute` is the newest."""
        newest = self._newest
        if minute > newest:
            if newest >= 0:
                self._slide(newest, minute)
            self._newest = minute
            self._put(minute, close, volume)
            return True
        if minute == newest:
            self._put(minute, close, volume)  # the forming minute: not in its own window
            return True
        if minute < newest - (self._window + self._correction) * MINUTE_MS:
            return False  # older than any window still to be judged: cannot matter
        slot = (minute // MINUTE_MS) % self._size
        if minute >= newest - self._window * MINUTE_MS:
            # A late update of a minute inside the newest minute's window changes its baseline.
            if self._minutes[slot] == minute:
                self._leave(self._closes[slot], self._volumes[slot])
            self._enter(close, volume)
        self._put(minute, close, volume)
        return False

    def _slide(self, newest: int, minute: int) -> None:
        """Move the trailing window from before `newest` to before `minute` (> newest)."""
        size = self._size
        first_kept = minute - self._window * MINUTE_MS
        if first_kept > newest:
            # Nothing of the old window, nor the old newest minute, is in the new one.
            self._price.clear()
            self._volume.clear()
            self._active = 0
            return
        # Minutes [newest - window, first_kept) leave the sums (their slots stay valid for
        # `judge` until reused); the old newest minute enters.
        leaving = newest - self._window * MINUTE_MS
        while leaving < first_kept:
            slot = (leaving // MINUTE_MS) % size
            if self._minutes[slot] == leaving:
                self._leave(self._closes[slot], self._volumes[slot])
            leaving += MINUTE_MS
        slot = (newest // MINUTE_MS) % size
        self._enter(self._closes[slot], self._volumes[slot])

    def _put(self, minute: int, close: float, volume: float) -> None:
        slot = (minute // MINUTE_MS) % self._size
        self._minutes[slot] = minute
        self._closes[slot] = close
        self._volumes[slot] = volume

    def _enter(self, close: float, volume: float) -> None:
        self._price.add(close)
        self._volume.add(volume)
        if volume != 0.0:
            self._active += 1

    def _leave(self, close: float, volume: float) -> None:
        self._price.remove(close)
        self._volume.remove(volume)
        if volume != 0.0:
            self._active -= 1

    def _exceeds(self, value: float, window: ExactMoments) -> bool:
        """value > factor x mean and value > mean + min_zscore x std, exactly; mean > 0."""
        if window.s1 <= 0 or not window.exceeds_factor(value, self._factor):
            return False
        return not self._min_zscore or window.exceeds_zscore(value, self._min_zscore)


def _spike(kind: AlertKind, value: float, window: ExactMoments) -> Spike:
    mean = window.mean()
    ratio = value / mean if mean > 0.0 else _MAX_RATIO
    return Spike(
        kind=kind, value=value, mean=mean, ratio=min(ratio, _MAX_RATIO), samples=window.count
    )
