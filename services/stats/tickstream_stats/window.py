"""Rolling event-time window: count, mean, population std, min and max in O(1) per add."""

import math
from collections import deque
from dataclasses import dataclass

# Rebuild early when M2 has fallen this far below the magnitude of the updates applied to it
# since the last rebuild: the rounding error of those updates would otherwise be a large part
# of what is left (a price spike leaving a calm window). 2**-20 keeps the relative error of M2
# near 2**-53 * 2**20 ~ 1e-10 yet does not fire on steady streams, where the updates since
# the last rebuild add up to a few times M2.
_CANCELLATION_RATIO = 2.0**-20


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Statistics of the values in a window; ``std`` is the population standard deviation."""

    count: int
    mean: float
    std: float  # population standard deviation (divides by count)
    min: float
    max: float


class RollingWindow:
    """The values whose timestamp t satisfies ``latest_ts - span_ms < t <= latest_ts``.

    ``add`` costs O(1) amortised whatever the window length. Mean and variance are kept with
    Welford updates (and their inverse on eviction) on values shifted by a reference close to
    the data, and recomputed exactly from the window after as many evictions as the window
    holds, or sooner if evicting a far outlier left mostly rounding error behind, so rounding
    error cannot build up. Not thread-safe; one window per series.
    """

    __slots__ = (
        "_churn",
        "_items",
        "_latest_ts",
        "_m2",
        "_maxs",
        "_mean",
        "_mins",
        "_removals",
        "_shift",
        "_span_ms",
    )

    def __init__(self, span_ms: int) -> None:
        if span_ms <= 0:
            raise ValueError(f"span_ms must be positive, got {span_ms}")
        self._span_ms = span_ms
        self._items: deque[tuple[int, float]] = deque()
        # Monotonic deques of (ts, value): values rise front to back in _mins and fall in
        # _maxs, so the front is the extreme and evicting by timestamp keeps them valid.
        self._mins: deque[tuple[int, float]] = deque()
        self._maxs: deque[tuple[int, float]] = deque()
        self._latest_ts: int | None = None
        # Welford state over (value - _shift): prices near 1e5 that differ in the 1e-6s would
        # lose most of their digits in the squares if the large common part were kept.
        self._shift = 0.0
        self._mean = 0.0
        self._m2 = 0.0
        self._removals = 0
        self._churn = 0.0

    @property
    def latest_ts(self) -> int | None:
        """Newest timestamp added, or None if nothing was ever added."""
        return self._latest_ts

    def __len__(self) -> int:
        return len(self._items)

    def add(self, ts_ms: int, value: float) -> None:
        """Add a value, evicting those that fall out of the window ending at ``ts_ms``.

        Raises ValueError if ``ts_ms`` is older than ``latest_ts`` (equal is allowed) or if
        ``value`` is not finite; the window is left unchanged in that case.
        """
        if self._latest_ts is not None and ts_ms < self._latest_ts:
            raise ValueError(
                f"timestamp {ts_ms} is older than the newest in the window ({self._latest_ts});"
                " out-of-order values must be filtered before add"
            )
        if not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value!r}")
        self._latest_ts = ts_ms
        self._evict(ts_ms - self._span_ms)
        if not self._items:
            # A fresh window shifts by its first value, so the first deviations are exact.
            self._reset(shift=value)
        self._items.append((ts_ms, value))
        self._push_extremes(ts_ms, value)
        n = len(self._items)
        dev = value - self._shift
        delta = dev - self._mean
        self._mean += delta / n
        term = delta * (dev - self._mean)
        self._m2 += term
        self._churn += abs(term)
        # A rebuild every len(window) evictions is paid for by them: O(1) amortised. The early
        # rebuild needs the spread to collapse ~1000-fold since the last one, which is rare.
        if self._removals >= n or self._m2 < self._churn * _CANCELLATION_RATIO:
            self._rebuild()

    def stats(self) -> WindowStats | None:
        """Statistics of the values in the window, or None if it holds none."""
        n = len(self._items)
        if n == 0:
            return None
        lo = self._mins[0][1]
        hi = self._maxs[0][1]
        if lo == hi:
            # A constant window has exactly this mean and no spread; no rounding may show.
            return WindowStats(count=n, mean=lo, std=0.0, min=lo, max=hi)
        # Rounding may put the mean a hair outside the values it averages.
        mean = min(max(self._shift + self._mean, lo), hi)
        std = math.sqrt(self._m2 / n)
        return WindowStats(count=n, mean=mean, std=std, min=lo, max=hi)

    def _evict(self, cutoff: int) -> None:
        items = self._items
        while items and items[0][0] <= cutoff:
            self._remove(items.popleft()[1])
        mins = self._mins
        while mins and mins[0][0] <= cutoff:
            mins.popleft()
        maxs = self._maxs
        while maxs and maxs[0][0] <= cutoff:
            maxs.popleft()

    def _remove(self, value: float) -> None:
        # Inverse Welford step: undo the update that added ``value`` to the remaining n.
        n = len(self._items)
        if n == 0:
            self._reset(shift=0.0)
            return
        dev = value - self._shift
        mean = self._mean - (dev - self._mean) / n
        term = (dev - mean) * (dev - self._mean)
        self._mean = mean
        # Cancellation can leave a tiny negative M2 where the exact value is 0 or near it.
        self._m2 = max(self._m2 - term, 0.0)
        self._churn += abs(term)
        self._removals += 1

    def _push_extremes(self, ts_ms: int, value: float) -> None:
        # Equal values are dropped from the back too: the newer copy outlives the older.
        mins = self._mins
        while mins and mins[-1][1] >= value:
            mins.pop()
        mins.append((ts_ms, value))
        maxs = self._maxs
        while maxs and maxs[-1][1] <= value:
            maxs.pop()
        maxs.append((ts_ms, value))

    def _rebuild(self) -> None:
        # Two passes with exactly rounded sums; the new shift is the window's mean, which keeps
        # later deviations small (and exact for values within a factor 2 of it).
        values = [value for _, value in self._items]
        n = len(values)
        shift = math.fsum(values) / n
        devs = [value - shift for value in values]
        mean = math.fsum(devs) / n
        self._reset(shift=shift)
        self._mean = mean
        self._m2 = math.fsum((dev - mean) ** 2 for dev in devs)

    def _reset(self, shift: float) -> None:
        self._shift = shift
        self._mean = 0.0
        self._m2 = 0.0
        self._removals = 0
        self._churn = 0.0
