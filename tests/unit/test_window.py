"""Unit tests for the rolling event-time window statistics."""

import math
import random
from collections import deque
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tickstream_stats.window import RollingWindow, WindowStats

_SPANS = st.sampled_from([1, 3, 10, 60, 1000])
# Magnitudes from 1e-6 to 1e6 plus a few repeated values, so that ties, constant stretches and
# windows whose spread collapses after an outlier leaves all come up.
_VALUES = st.one_of(
    st.sampled_from([0.0, 1.0, -2.5, 0.1, 1e5, 100000.000001]),
    st.floats(min_value=-1e6, max_value=1e6, allow_subnormal=False).map(
        lambda x: x if abs(x) >= 1e-6 else 0.0
    ),
)
_STEPS = st.tuples(st.integers(min_value=0, max_value=20), _VALUES)


class _Reference:
    """The same window kept as a plain deque, with statistics in exact rational arithmetic."""

    def __init__(self, span_ms: int) -> None:
        self.span_ms = span_ms
        self.items: deque[tuple[int, float]] = deque()
        # Exact sums of x and x**2 over the window: rational add and subtract never drift.
        self.total = Fraction(0)
        self.squares = Fraction(0)

    def add(self, ts_ms: int, value: float) -> None:
        self.items.append((ts_ms, value))
        self.total += Fraction(value)
        self.squares += Fraction(value) ** 2
        while self.items[0][0] <= ts_ms - self.span_ms:
            _, old = self.items.popleft()
            self.total -= Fraction(old)
            self.squares -= Fraction(old) ** 2

    def check(self, stats: WindowStats | None, *, rel: float, scale_tol: float) -> None:
        """Assert ``stats`` match the exact values within ``rel`` (and ``scale_tol`` x scale)."""
        values = [value for _, value in self.items]
        n = len(values)
        mean = self.total / n
        variance = self.squares / n - mean**2
        scale = max(abs(value) for value in values)
        assert stats is not None
        assert stats.count == n
        assert stats.min == min(values)
        assert stats.max == max(values)
        assert math.isclose(stats.mean, float(mean), rel_tol=rel, abs_tol=scale_tol * scale)
        assert math.isclose(stats.std, math.sqrt(variance), rel_tol=rel, abs_tol=scale_tol * scale)
        if min(values) == max(values):
            assert stats.mean == values[0]
            assert stats.std == 0.0


def _run(span_ms: int, steps: list[tuple[int, float]], *, rel: float, scale_tol: float) -> None:
    window = RollingWindow(span_ms)
    reference = _Reference(span_ms)
    ts = 1_700_000_000_000
    for increment, value in steps:
        ts += increment
        window.add(ts, value)
        reference.add(ts, value)
        assert window.latest_ts == ts
        assert len(window) == len(reference.items)
        reference.check(window.stats(), rel=rel, scale_tol=scale_tol)


@settings(max_examples=150, deadline=None)
@given(span_ms=_SPANS, steps=st.lists(_STEPS, min_size=1, max_size=150))
def test_stats_match_exact_reference_after_every_add(
    span_ms: int, steps: list[tuple[int, float]]
) -> None:
    """Count, min and max are exact and mean and std match exact arithmetic after every add."""
    _run(span_ms, steps, rel=1e-9, scale_tol=1e-12)


def _long_stream(rng: random.Random, length: int) -> list[tuple[int, float]]:
    """Runs of jittered prices, constant runs and lone far outliers, as (increment, value)."""
    steps: list[tuple[int, float]] = []
    level = rng.choice([1.0, 250.5, 100000.0])
    while len(steps) < length:
        kind = rng.random()
        if kind < 0.15:
            steps += [(rng.randint(0, 3), level) for _ in range(rng.randint(1, 40))]
        elif kind < 0.3:
            steps.append((rng.randint(0, 3), level * rng.choice([1e4, -1e3, 1e-4, 0.0])))
        else:
            jitter = level * 10.0 ** rng.randint(-12, -1)
            steps += [
                (rng.randint(0, 3), level + rng.uniform(-jitter, jitter))
                for _ in range(rng.randint(1, 40))
            ]
    return steps[:length]


@settings(max_examples=100, deadline=None)
@given(span_ms=st.sampled_from([3, 10, 60]), seed=st.integers(min_value=0, max_value=2**64))
def test_long_streams_with_many_rebuilds_match_exact_reference(span_ms: int, seed: int) -> None:
    """Streams many windows long, so the exact rebuild runs many times, stay exact."""
    # A seeded generator rather than a drawn list: 600 drawn steps overrun Hypothesis's buffer.
    _run(span_ms, _long_stream(random.Random(seed), 600), rel=1e-9, scale_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    span_ms=st.sampled_from([5, 50, 500]),
    increments=st.lists(st.integers(min_value=0, max_value=3), min_size=300, max_size=400),
    jitter=st.lists(st.integers(min_value=-1000, max_value=1000), min_size=400, max_size=400),
)
def test_prices_near_1e5_with_tiny_jitter_match_exact_reference(
    span_ms: int, increments: list[int], jitter: list[int]
) -> None:
    """Prices near 1e5 moving in the 1e-9s give std within 1e-9 relative of the exact value."""
    steps = [
        (increment, 100000.0 + j * 1e-9) for increment, j in zip(increments, jitter, strict=False)
    ]
    _run(span_ms, steps, rel=1e-9, scale_tol=0.0)


def test_linear_prices_near_1e5_match_exact_reference() -> None:
    """The series 100000 + i*1e-6 gives std within 1e-9 relative of the exact value."""
    steps = [(1, 100000.0 + i * 1e-6) for i in range(3000)]
    _run(100, steps, rel=1e-9, scale_tol=0.0)


def test_std_stays_exact_after_a_spike_leaves_a_calm_window() -> None:
    """A large outlier leaving the window does not leave its rounding error in the std."""
    rng = random.Random(7)
    steps = [(1, 100000.0 + rng.uniform(-1e-6, 1e-6)) for _ in range(500)]
    steps[100] = (1, 1e9)
    steps[250] = (1, -3e8)
    _run(50, steps, rel=1e-9, scale_tol=0.0)


def test_constant_series_is_exact() -> None:
    """A constant series has mean exactly the constant and std exactly 0.0."""
    window = RollingWindow(10)
    for ts in range(100):
        window.add(ts, 0.1)
        assert window.stats() == WindowStats(
            count=min(ts + 1, 10), mean=0.1, std=0.0, min=0.1, max=0.1
        )


def test_constant_tail_is_exact_after_differing_values_leave() -> None:
    """Once the differing values are evicted, a constant tail gives exactly (c, 0.0)."""
    window = RollingWindow(5)
    for ts, value in enumerate([3.3, 1e5, -7.25, 0.3, 99999.999999]):
        window.add(ts, value)
    for ts in range(5, 10):
        window.add(ts, 0.7)
    assert window.stats() == WindowStats(count=5, mean=0.7, std=0.0, min=0.7, max=0.7)


@settings(max_examples=50, deadline=None)
@given(
    prefix=st.lists(_VALUES, max_size=30),
    constant=_VALUES,
    tail=st.integers(min_value=10, max_value=60),
)
def test_constant_tail_after_random_prefix_is_exact(
    prefix: list[float], constant: float, tail: int
) -> None:
    """Any prefix followed by a constant tail longer than the span ends exactly (c, 0.0)."""
    window = RollingWindow(10)
    for ts, value in enumerate([*prefix, *[constant] * tail]):
        window.add(ts, value)
    assert window.stats() == WindowStats(
        count=10, mean=constant, std=0.0, min=constant, max=constant
    )


def test_value_at_exactly_span_before_latest_is_evicted() -> None:
    """A value at latest_ts - span_ms leaves the window; one at latest_ts - span_ms + 1 stays."""
    window = RollingWindow(1000)
    window.add(0, 1.0)
    window.add(1, 3.0)
    window.add(1000, 5.0)
    assert len(window) == 2
    assert window.stats() == WindowStats(count=2, mean=4.0, std=1.0, min=3.0, max=5.0)
    window.add(1001, 5.0)
    assert window.stats() == WindowStats(count=2, mean=5.0, std=0.0, min=5.0, max=5.0)


def test_small_window_values_are_exact() -> None:
    """Values whose statistics are exact in binary come out exactly."""
    window = RollingWindow(60_000)
    for ts, value in [(0, 2.0), (10, 4.0), (10, 4.0), (20, 4.0), (30, 5.0), (40, 5.0)]:
        window.add(ts, value)
    window.add(50, 7.0)
    window.add(60, 9.0)
    assert window.stats() == WindowStats(count=8, mean=5.0, std=2.0, min=2.0, max=9.0)


def test_gap_longer_than_span_empties_the_window_but_the_new_value() -> None:
    """After a gap longer than the span only the new value remains."""
    window = RollingWindow(1000)
    for ts in range(0, 500, 10):
        window.add(ts, float(ts))
    window.add(10_000, 42.5)
    assert len(window) == 1
    assert window.stats() == WindowStats(count=1, mean=42.5, std=0.0, min=42.5, max=42.5)


def test_empty_window() -> None:
    """A window that was never added to has no stats, no latest_ts and length 0."""
    window = RollingWindow(1000)
    assert window.stats() is None
    assert window.latest_ts is None
    assert len(window) == 0


def test_equal_timestamps_are_accepted() -> None:
    """Several values at the same timestamp all count."""
    window = RollingWindow(1)
    for value in (1.0, 2.0, 3.0):
        window.add(7, value)
    assert window.stats() == WindowStats(count=3, mean=2.0, std=math.sqrt(2 / 3), min=1.0, max=3.0)


def test_decreasing_timestamp_raises_and_leaves_window_unchanged() -> None:
    """add with a timestamp older than latest_ts raises ValueError and changes nothing."""
    window = RollingWindow(1000)
    window.add(100, 1.0)
    window.add(200, 3.0)
    with pytest.raises(ValueError, match="older than the newest"):
        window.add(199, 5.0)
    assert window.latest_ts == 200
    assert window.stats() == WindowStats(count=2, mean=2.0, std=1.0, min=1.0, max=3.0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_value_raises(value: float) -> None:
    """add rejects NaN and infinities, which would poison every later statistic."""
    window = RollingWindow(1000)
    with pytest.raises(ValueError, match="finite"):
        window.add(0, value)
    assert window.stats() is None


@pytest.mark.parametrize("span_ms", [0, -1])
def test_non_positive_span_raises(span_ms: int) -> None:
    """A window must span at least 1 ms."""
    with pytest.raises(ValueError, match="span_ms"):
        RollingWindow(span_ms)
