"""Unit and property tests of the minute window against an exact (Fraction) reference."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tickstream_stats.window import MinuteWindow, WindowStats, _Occupancy

M = 60_000
BASE = 28_333_334 * M  # 2023-11-14, a whole minute


def exact_stats(values: list[float]) -> tuple[float, float]:
    """(mean, std) of floats: exact rational moments, each rounded once."""
    n = len(values)
    total = sum(Fraction(v) for v in values)
    squares = sum(Fraction(v) ** 2 for v in values)
    mean = total / n
    return float(mean), math.sqrt(float(squares / n - mean**2))


def reference_stats(bars: dict[int, tuple[float, float]]) -> tuple[WindowStats, WindowStats]:
    """What the window must report for `bars` (minute -> (close, volume)), by brute force."""
    minutes = sorted(bars)
    closes = [bars[m][0] for m in minutes]
    volumes = [bars[m][1] for m in minutes]
    returns = [math.log(b / a) for a, b in itertools.pairwise(closes)]
    logret = exact_stats(returns)[1] if returns else 0.0
    result = []
    for values, ret in ((closes, logret), (volumes, None)):
        mean, std = exact_stats(values)
        cv = std / abs(mean) if mean != 0.0 else 0.0
        result.append(WindowStats(len(values), mean, std, min(values), max(values), cv, ret))
    return result[0], result[1]


class Reference:
    """The window as a plain dict of minutes, evicted by brute force."""

    def __init__(self, window_minutes: int) -> None:
        self.span = window_minutes * M
        self.clock = -1
        self.bars: dict[int, tuple[float, float]] = {}
        self.refused = 0

    def advance(self, clock: int) -> None:
        self.clock = max(self.clock, clock)
        self.bars = {m: v for m, v in self.bars.items() if m > self.clock - self.span}

    def set(self, minute: int, close: float, volume: float) -> bool:
        if minute <= self.clock - self.span:
            self.refused += 1
            return False
        self.advance(minute)
        self.bars[minute] = (close, volume)
        return True


def check(window: MinuteWindow, reference: Reference) -> None:
    assert window.clock == reference.clock
    assert len(window) == len(reference.bars)
    assert window.refused == reference.refused
    if not reference.bars:
        assert window.stats() is None and window.newest is None
        return
    assert window.newest == max(reference.bars)
    assert window.stats() == reference_stats(reference.bars)


_CLOSES = st.one_of(
    st.sampled_from([1.0, 0.1, 3.0, 100000.0, 100000.000001, 99999.99999]),
    st.floats(min_value=1e-6, max_value=1e6, allow_subnormal=False),
)
_VOLUMES = st.one_of(
    st.sampled_from([0.0, 0.0, 1.5, 1e-8]),
    st.floats(min_value=0.0, max_value=1e9, allow_subnormal=False),
)
# ("set", minutes after the clock, close, volume) or ("advance", minutes): offsets reach from
# far too old, through late minutes and the forming one, to new newest minutes.
_OPS = st.one_of(
    st.tuples(st.just("set"), st.integers(-100, 3), _CLOSES, _VOLUMES),
    st.tuples(st.just("set"), st.integers(-3, 1), _CLOSES, _VOLUMES),
    st.tuples(st.just("advance"), st.integers(0, 60), st.just(0.0), st.just(0.0)),
)


def run_ops(window_minutes: int, ops: list[tuple[str, int, float, float]]) -> None:
    window = MinuteWindow(window_minutes)
    reference = Reference(window_minutes)
    for op, offset, close, volume in ops:
        clock = BASE if reference.clock < 0 else reference.clock
        minute = clock + offset * M
        if op == "set":
            assert window.set(minute, close, volume) == reference.set(minute, close, volume)
        else:
            window.advance(minute)
            reference.advance(minute)
        check(window, reference)


@settings(max_examples=300, deadline=None)
@given(
    window_minutes=st.sampled_from([1, 2, 3, 7, 40, 45, 90]),
    ops=st.lists(_OPS, min_size=1, max_size=120),
)
def test_random_sets_replacements_late_inserts_and_advances_match_reference(
    window_minutes: int, ops: list[tuple[str, int, float, float]]
) -> None:
    """After every set/replace/late insert/advance, every statistic equals the exact reference."""
    run_ops(window_minutes, ops)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_long_random_runs_over_a_day_window_match_reference(seed: int) -> None:
    """Thousands of operations on a 1440-minute window, with gaps and outliers, stay exact."""
    rng = random.Random(seed)
    level = rng.choice([0.5, 250.25, 100000.0])
    ops: list[tuple[str, int, float, float]] = []
    for _ in range(3000):
        roll = rng.random()
        close = level * (1 + rng.uniform(-1e-3, 1e-3)) if roll > 0.02 else level * 1e3
        volume = rng.choice([0.0, rng.uniform(0, 50)])
        if roll < 0.6:
            ops.append(("set", 0, close, volume))  # the forming minute, replaced
        elif roll < 0.85:
            ops.append(("set", 1, close, volume))  # the next minute
        elif roll < 0.95:
            ops.append(("set", -rng.randint(1, 1500), close, volume))  # late, maybe too old
        else:
            ops.append(("advance", rng.choice([1, 5, 200, 1439, 1440]), 0.0, 0.0))
    window = MinuteWindow(1440)
    reference = Reference(1440)
    for i, (op, offset, close, volume) in enumerate(ops):
        clock = BASE if reference.clock < 0 else reference.clock
        minute = clock + offset * M
        if op == "set":
            window.set(minute, close, volume)
            reference.set(minute, close, volume)
        else:
            window.advance(minute)
            reference.advance(minute)
        if i % 97 == 0:
            check(window, reference)
    check(window, reference)


@settings(max_examples=200, deadline=None)
@given(
    slots=st.sampled_from([1, 2, 63, 64, 65, 1440, 4096, 4097, 270_000]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 2**40)), max_size=80),
)
def test_occupancy_finds_the_same_neighbours_as_a_scan(
    slots: int, ops: list[tuple[bool, int]]
) -> None:
    """first_from/last_until equal a brute-force scan after any adds and discards, 1 to 3 levels."""
    occupancy = _Occupancy(slots)
    present: set[int] = set()
    for adding, raw in ops:
        slot = raw % slots
        if adding:
            occupancy.add(slot)
            present.add(slot)
        else:
            occupancy.discard(slot)
            present.discard(slot)
        # The domains the window uses: first_from(0..slots), last_until(-1..slots - 1).
        for probe in {0, slot, slot + 1, slots, raw % (slots + 1)}:
            after = [s for s in present if s >= probe]
            assert occupancy.first_from(probe) == (min(after) if after else -1)
        for probe in {-1, slot - 1, slot, slots - 1, raw % slots}:
            before = [s for s in present if s <= probe]
            assert occupancy.last_until(probe) == (max(before) if before else -1)
    occupancy.clear()
    assert occupancy.first_from(0) == -1 and occupancy.last_until(slots - 1) == -1


@settings(max_examples=30, deadline=None)
@given(
    window_minutes=st.sampled_from([5, 64, 200, 1440]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backfill_oldest_first_after_the_live_minute_matches_reference(
    window_minutes: int, seed: int
) -> None:
    """The live minute, then a backfill with gaps oldest first (wrapping the ring), stays exact."""
    rng = random.Random(seed)
    window = MinuteWindow(window_minutes)
    reference = Reference(window_minutes)
    live = BASE + rng.randrange(window_minutes) * M  # any ring position: the search wraps
    for target in (window, reference):
        target.set(live, 100.0, 1.0)
    for back in range(window_minutes, 0, -1):
        if rng.random() < 0.3:
            continue  # a gap in the exchange's history
        close, volume = rng.uniform(90.0, 110.0), rng.uniform(0.0, 5.0)
        minute = live - back * M
        assert window.set(minute, close, volume) == reference.set(minute, close, volume)
        if back % 17 == 0:
            check(window, reference)
    check(window, reference)


def test_forming_minute_is_replaced_not_added() -> None:
    """Each update of the forming minute replaces its value: the count stays the minute count."""
    window = MinuteWindow(10)
    window.set(BASE, 10.0, 1.0)
    for i in range(1, 61):
        window.set(BASE + M, 10.0 + i, float(i))
    stats = window.stats()
    assert stats is not None
    price, volume = stats
    assert price == WindowStats(2, 40.0, 30.0, 10.0, 70.0, 0.75, 0.0)  # one return: no spread
    assert (volume.count, volume.mean, volume.min, volume.max) == (2, 30.5, 1.0, 60.0)
    assert window.bar(BASE + M) == (70.0, 60.0)


def test_constant_series_is_exactly_zero() -> None:
    """A constant series has mean exactly the constant and std, cv and logret exactly 0."""
    window = MinuteWindow(1440)
    for i in range(3000):
        window.set(BASE + i * M, 0.1, 7.3)
        for _ in range(3):
            window.set(BASE + i * M, 0.1, 7.3)
    stats = window.stats()
    assert stats is not None
    assert stats[0] == WindowStats(1440, 0.1, 0.0, 0.1, 0.1, 0.0, 0.0)
    assert stats[1] == WindowStats(1440, 7.3, 0.0, 7.3, 7.3, 0.0, None)


def test_prices_near_1e5_with_tiny_variance_are_exact() -> None:
    """Prices 100000 + i*1e-6 (and jitter in the 1e-9s) give the exactly rounded std."""
    rng = random.Random(11)
    window = MinuteWindow(1440)
    reference = Reference(1440)
    for i in range(2000):
        price = 100000.0 + (i % 500) * 1e-6 + rng.randint(-1000, 1000) * 1e-12
        window.set(BASE + i * M, price, 0.0)
        reference.set(BASE + i * M, price, 0.0)
    check(window, reference)
    stats = window.stats()
    assert stats is not None
    assert 1e-4 < stats[0].std < 2e-4


def test_window_edges_follow_the_clock() -> None:
    """A minute at clock - span leaves; one at clock - span + 1 minute stays."""
    window = MinuteWindow(3)
    window.set(BASE, 1.0, 0.0)
    window.set(BASE + M, 3.0, 0.0)
    assert window.advance(BASE + 3 * M) == 1
    assert len(window) == 1 and window.newest == BASE + M
    assert window.set(BASE, 9.0, 0.0) is False
    assert window.refused == 1
    assert window.set(BASE + 2 * M, 5.0, 0.0) is True
    stats = window.stats()
    assert stats is not None
    assert (stats[0].count, stats[0].mean, stats[0].std) == (2, 4.0, 1.0)


def test_jump_past_the_window_clears_it() -> None:
    """Advancing by a whole window or more empties it, and it fills again from scratch."""
    window = MinuteWindow(1440)
    for i in range(1440):
        window.set(BASE + i * M, 1.0 + i, 2.0)
    assert window.advance(BASE + 3000 * M) == 1440
    assert window.stats() is None and len(window) == 0 and window.newest is None
    window.set(BASE + 3000 * M, 5.0, 0.0)
    assert window.stats() == (
        WindowStats(1, 5.0, 0.0, 5.0, 5.0, 0.0, 0.0),
        WindowStats(1, 0.0, 0.0, 0.0, 0.0, 0.0, None),
    )


def test_late_minute_splits_the_bridged_return() -> None:
    """A late minute in a gap replaces the return that bridged the gap by two returns."""
    window = MinuteWindow(10)
    window.set(BASE, 100.0, 0.0)
    window.set(BASE + 4 * M, 400.0, 0.0)
    stats = window.stats()
    assert stats is not None and stats[0].logret == 0.0  # one return: no spread
    window.set(BASE + 2 * M, 200.0, 0.0)
    stats = window.stats()
    assert stats is not None
    assert stats[0].logret == 0.0  # ln 2 twice
    window.set(BASE + 2 * M, 100.0, 0.0)
    stats = window.stats()
    assert stats is not None
    assert stats[0].logret == exact_stats([0.0, math.log(4.0)])[1]


def test_min_and_max_follow_eviction_and_replacement() -> None:
    """The extreme leaving (evicted or replaced) gives way to the next one."""
    window = MinuteWindow(100)
    for i in range(100):
        window.set(BASE + i * M, 50.0 + (i % 10), 0.0)
    window.set(BASE + 37 * M, 1000.0, 0.0)
    window.set(BASE + 63 * M, 0.5, 0.0)
    stats = window.stats()
    assert stats is not None and (stats[0].min, stats[0].max) == (0.5, 1000.0)
    window.set(BASE + 37 * M, 55.0, 0.0)
    stats = window.stats()
    assert stats is not None and (stats[0].min, stats[0].max) == (0.5, 59.0)
    window.advance(BASE + 163 * M)
    stats = window.stats()
    assert stats is not None and (stats[0].min, stats[0].max) == (50.0, 59.0)


def test_single_minute_window() -> None:
    """A one-minute window holds only the newest minute."""
    window = MinuteWindow(1)
    window.set(BASE, 2.0, 1.0)
    window.set(BASE + M, 3.0, 1.0)
    assert len(window) == 1
    assert window.set(BASE, 2.0, 1.0) is False


@pytest.mark.parametrize(
    ("minute", "close", "volume"),
    [
        (BASE + 1, 1.0, 0.0),
        (-M, 1.0, 0.0),
        (BASE, 0.0, 0.0),
        (BASE, -1.0, 0.0),
        (BASE, math.nan, 0.0),
        (BASE, math.inf, 0.0),
        (BASE, 1.0, math.nan),
        (BASE, 1.0, -math.inf),
    ],
)
def test_bad_bars_raise_and_change_nothing(minute: int, close: float, volume: float) -> None:
    """A minute off the grid, a non-positive or non-finite close, or a non-finite volume raise."""
    window = MinuteWindow(10)
    with pytest.raises(ValueError):
        window.set(minute, close, volume)
    assert window.stats() is None and window.clock == -1


def test_window_minutes_must_be_positive() -> None:
    """A window holds at least one minute."""
    with pytest.raises(ValueError, match="window_minutes"):
        MinuteWindow(0)
