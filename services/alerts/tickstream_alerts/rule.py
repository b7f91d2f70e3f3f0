"""Spike rule: a value more than ``factor`` times the mean of the span before it."""

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Spike:
    """A value that exceeded ``factor`` times the mean of the values before it in the span."""

    value: float
    mean: float  # mean of the values before this one in the span, excluding it
    ratio: float  # value / mean
    samples: int  # number of values the mean was taken over


class SpikeRule:
    """Flags a value above ``factor`` times the mean of the values in the preceding span.

    The mean is over the values observed strictly before the current one whose timestamp t
    satisfies ``ts_ms - span_ms < t <= ts_ms``; it is trusted only once it is taken over at
    least ``min_samples`` values, and only a positive mean can be exceeded. ``observe`` costs
    O(1) amortised. Not thread-safe; one rule per series.
    """

    __slots__ = (
        "_comp",
        "_factor",
        "_items",
        "_latest_ts",
        "_min_samples",
        "_removals",
        "_span_ms",
        "_sum",
    )

    def __init__(self, factor: float, span_ms: int, min_samples: int) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be positive and finite, got {factor!r}")
        if span_ms <= 0:
            raise ValueError(f"span_ms must be positive, got {span_ms}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        self._factor = factor
        self._span_ms = span_ms
        self._min_samples = min_samples
        self._items: deque[tuple[int, float]] = deque()
        self._latest_ts: int | None = None
        # Neumaier-compensated running sum: _comp holds the low-order part that _sum could not
        # represent, so a large value leaving the window does not take small ones with it.
        self._sum = 0.0
        self._comp = 0.0
        self._removals = 0

    def __len__(self) -> int:
        return len(self._items)

    def observe(self, ts_ms: int, value: float) -> Spike | None:
        """Judge ``value`` against the span before it, then add it to the window.

        Returns a Spike if ``value > factor * mean``, else None. Raises ValueError if
        ``ts_ms`` is older than the previous observation (equal is allowed) or if ``value``
        is not finite; the rule is left unchanged in that case.
        """
        if self._latest_ts is not None and ts_ms < self._latest_ts:
            raise ValueError(
                f"timestamp {ts_ms} is older than the previous observation ({self._latest_ts});"
                " out-of-order values must be filtered before observe"
            )
        if not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value!r}")
        self._latest_ts = ts_ms
        items = self._items
        cutoff = ts_ms - self._span_ms
        while items and items[0][0] <= cutoff:
            self._accumulate(-items.popleft()[1])
            self._removals += 1
        # Each exact re-sum is paid for by the len(window) evictions before it: O(1) amortised.
        if self._removals and self._removals >= len(items):
            self._resum()
        spike = self._judge(value)
        items.append((ts_ms, value))
        self._accumulate(value)
        return spike

    def _judge(self, value: float) -> Spike | None:
        samples = len(self._items)
        if samples < self._min_samples:
            return None
        mean = (self._sum + self._comp) / samples
        # Strictly greater: a value of exactly factor x mean is not a spike.
        if mean > 0 and value > self._factor * mean:
            return Spike(value=value, mean=mean, ratio=value / mean, samples=samples)
        return None

    def _accumulate(self, value: float) -> None:
        total = self._sum + value
        if abs(self._sum) >= abs(value):
            self._comp += (self._sum - total) + value
        else:
            self._comp += (value - total) + self._sum
        self._sum = total

    def _resum(self) -> None:
        values = [value for _, value in self._items]
        self._sum = math.fsum(values)
        # What the rounded sum left out; dropping it would lose small values to a large one
        # that is later evicted.
        self._comp = math.fsum([*values, -self._sum])
        self._removals = 0
