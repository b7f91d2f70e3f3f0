"""Unit tests for the spike rule."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tickstream_alerts.rule import Spike, SpikeRule

_HOUR_MS = 3_600_000


def _brute_force(
    history: list[tuple[int, float]],
    ts_ms: int,
    value: float,
    *,
    factor: float,
    span_ms: int,
    min_samples: int,
) -> tuple[Spike | None, Fraction | None]:
    """The verdict from all earlier observations, filtered explicitly, and the exact mean."""
    previous = [v for t, v in history if ts_ms - span_ms < t <= ts_ms]
    if not previous:
        return None, None
    exact_mean = sum((Fraction(v) for v in previous), Fraction(0)) / len(previous)
    mean = float(exact_mean)
    if len(previous) >= min_samples and mean > 0 and value > factor * mean:
        return Spike(value=value, mean=mean, ratio=value / mean, samples=len(previous)), exact_mean
    return None, exact_mean


_SPANS = st.sampled_from([1, 5, 30, 200])
_FACTORS = st.sampled_from([1.5, 2.0, 3.0])
_INCREMENTS = st.integers(min_value=0, max_value=10)


@settings(max_examples=100, deadline=None)
@given(
    factor=_FACTORS,
    span_ms=_SPANS,
    min_samples=st.integers(min_value=1, max_value=5),
    steps=st.lists(
        st.tuples(_INCREMENTS, st.integers(min_value=-20, max_value=100).map(float)),
        min_size=1,
        max_size=200,
    ),
)
def test_integer_values_match_brute_force_exactly(
    factor: float, span_ms: int, min_samples: int, steps: list[tuple[int, float]]
) -> None:
    """With exactly summable values every verdict equals the brute-force one, Spike for Spike."""
    rule = SpikeRule(factor, span_ms, min_samples)
    history: list[tuple[int, float]] = []
    ts = 0
    for increment, value in steps:
        ts += increment
        expected, _ = _brute_force(
            history, ts, value, factor=factor, span_ms=span_ms, min_samples=min_samples
        )
        assert rule.observe(ts, value) == expected
        history.append((ts, value))
        assert len(rule) == sum(1 for t, _ in history if t > ts - span_ms)


_FLOATS = st.one_of(
    st.sampled_from([0.0, 1.0, 1e-3, 1e9]),
    st.floats(min_value=-1e9, max_value=1e9, allow_subnormal=False),
)


@settings(max_examples=100, deadline=None)
@given(
    factor=_FACTORS,
    span_ms=_SPANS,
    steps=st.lists(st.tuples(_INCREMENTS, _FLOATS), min_size=1, max_size=200),
)
def test_float_values_match_brute_force(
    factor: float, span_ms: int, steps: list[tuple[int, float]]
) -> None:
    """With arbitrary floats the mean is the exact one to 1e-12 and clear verdicts agree."""
    rule = SpikeRule(factor, span_ms, min_samples=1)
    history: list[tuple[int, float]] = []
    ts = 0
    for increment, value in steps:
        ts += increment
        expected, exact_mean = _brute_force(
            history, ts, value, factor=factor, span_ms=span_ms, min_samples=1
        )
        spike = rule.observe(ts, value)
        history.append((ts, value))
        if exact_mean is None:
            assert spike is None
            continue
        threshold = factor * float(exact_mean)
        if math.isclose(value, threshold, rel_tol=1e-9) or abs(float(exact_mean)) < 1e-300:
            # Too close to the threshold (or to a zero mean) for rounding to be irrelevant.
            continue
        assert (spike is None) == (expected is None)
        if spike is not None:
            assert expected is not None
            assert spike.samples == expected.samples
            assert spike.value == value
            assert math.isclose(spike.mean, float(exact_mean), rel_tol=1e-12)


def test_no_alert_below_min_samples() -> None:
    """A huge value is not a spike until the mean is taken over min_samples values."""
    rule = SpikeRule(factor=3.0, span_ms=_HOUR_MS, min_samples=3)
    assert rule.observe(0, 1.0) is None
    assert rule.observe(1, 1.0) is None
    assert rule.observe(2, 10.0) is None
    assert rule.observe(3, 100.0) == Spike(value=100.0, mean=4.0, ratio=25.0, samples=3)


def test_exactly_factor_times_mean_is_not_a_spike() -> None:
    """A value of exactly 3x the mean is not a spike; the next float above it is."""
    at_threshold = SpikeRule(3.0, _HOUR_MS, 3)
    above = SpikeRule(3.0, _HOUR_MS, 3)
    for ts, value in enumerate([1.0, 2.0, 3.0]):
        assert at_threshold.observe(ts, value) is None
        assert above.observe(ts, value) is None
    assert at_threshold.observe(10, 6.0) is None
    just_above = math.nextafter(6.0, math.inf)
    assert above.observe(10, just_above) == Spike(
        value=just_above, mean=2.0, ratio=just_above / 2.0, samples=3
    )


def test_mean_excludes_the_current_value() -> None:
    """The mean is over earlier values only, so 31 after three 10s is a 3.1x spike."""
    rule = SpikeRule(3.0, _HOUR_MS, 3)
    for ts in range(3):
        assert rule.observe(ts, 10.0) is None
    assert rule.observe(3, 31.0) == Spike(value=31.0, mean=10.0, ratio=3.1, samples=3)
    assert len(rule) == 4


def test_values_older_than_the_span_no_longer_count() -> None:
    """Values at ts - span_ms or earlier are out of the mean; at ts - span_ms + 1 they count."""
    kept = SpikeRule(3.0, _HOUR_MS, 3)
    evicted = SpikeRule(3.0, _HOUR_MS, 3)
    for rule in (kept, evicted):
        for _ in range(3):
            assert rule.observe(0, 100.0) is None
        for _ in range(3):
            assert rule.observe(1_800_000, 1.0) is None
    assert kept.observe(_HOUR_MS - 1, 4.0) is None
    assert len(kept) == 7
    assert evicted.observe(_HOUR_MS, 4.0) == Spike(value=4.0, mean=1.0, ratio=4.0, samples=3)
    assert len(evicted) == 4


def test_non_positive_mean_never_spikes() -> None:
    """A mean of zero or below cannot be exceeded by a factor."""
    zero = SpikeRule(3.0, _HOUR_MS, 1)
    negative = SpikeRule(3.0, _HOUR_MS, 1)
    for ts in range(5):
        assert zero.observe(ts, 0.0) is None
        assert negative.observe(ts, -1.0) is None
    assert zero.observe(5, 1e9) is None
    assert negative.observe(5, 1e9) is None


def test_every_value_joins_the_window_spike_or_not() -> None:
    """A spike is added to the window, so it raises the mean the next value is judged by."""
    rule = SpikeRule(2.0, _HOUR_MS, 1)
    assert rule.observe(0, 1.0) is None
    assert rule.observe(1, 5.0) == Spike(value=5.0, mean=1.0, ratio=5.0, samples=1)
    assert rule.observe(2, 5.0) is None
    assert rule.observe(3, 8.5) == Spike(
        value=8.5, mean=11.0 / 3.0, ratio=8.5 / (11.0 / 3.0), samples=3
    )


def test_mean_stays_exact_after_a_huge_value_leaves() -> None:
    """A value far larger than the rest leaves no rounding error behind when it is evicted."""

    def after_huge_value() -> SpikeRule:
        rule = SpikeRule(3.0, 10, 1)
        rule.observe(0, 1e17)
        for ts in range(1, 10):
            rule.observe(ts, 1.0)
        return rule

    # At ts 10 the 1e17 is out and nine 1.0s remain, whose sum 1e17 + 9 - 1e17 would have lost.
    assert after_huge_value().observe(10, 3.0) is None
    just_above = math.nextafter(3.0, math.inf)
    assert after_huge_value().observe(10, just_above) == Spike(
        value=just_above, mean=1.0, ratio=just_above, samples=9
    )


def test_mean_stays_exact_when_re_summed_with_a_huge_value_inside() -> None:
    """The exact re-sum keeps what 1e17 + 1 rounds away, so it is back once 1e17 leaves."""

    def re_summed_around_huge_value() -> SpikeRule:
        rule = SpikeRule(3.0, 10, 1)
        for _ in range(3):
            rule.observe(0, 1.0)
        rule.observe(5, 1e17)
        rule.observe(6, 1.0)
        # Evicting the three values at ts 0 re-sums the window [1e17, 1.0].
        rule.observe(10, 1.0)
        return rule

    assert re_summed_around_huge_value().observe(15, 3.0) is None
    just_above = math.nextafter(3.0, math.inf)
    assert re_summed_around_huge_value().observe(15, just_above) == Spike(
        value=just_above, mean=1.0, ratio=just_above, samples=2
    )


def test_long_gap_empties_the_window() -> None:
    """After a gap longer than the span nothing earlier counts."""
    rule = SpikeRule(3.0, 1000, 1)
    for ts in range(0, 500, 50):
        rule.observe(ts, 1.0)
    assert rule.observe(10_000, 50.0) is None
    assert len(rule) == 1


def test_decreasing_timestamp_raises_and_leaves_rule_unchanged() -> None:
    """observe with an older timestamp raises ValueError and changes nothing."""
    rule = SpikeRule(3.0, _HOUR_MS, 1)
    assert rule.observe(100, 1.0) is None
    assert rule.observe(100, 1.0) is None
    with pytest.raises(ValueError, match="older than the previous"):
        rule.observe(99, 50.0)
    assert len(rule) == 2
    assert rule.observe(100, 3.5) == Spike(value=3.5, mean=1.0, ratio=3.5, samples=2)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_value_raises(value: float) -> None:
    """observe rejects NaN and infinities, which would poison the running sum."""
    rule = SpikeRule(3.0, _HOUR_MS, 1)
    with pytest.raises(ValueError, match="finite"):
        rule.observe(0, value)
    assert len(rule) == 0


@pytest.mark.parametrize(
    ("factor", "span_ms", "min_samples", "match"),
    [
        (0.0, 1000, 1, "factor"),
        (-1.0, 1000, 1, "factor"),
        (math.nan, 1000, 1, "factor"),
        (3.0, 0, 1, "span_ms"),
        (3.0, 1000, 0, "min_samples"),
    ],
)
def test_invalid_configuration_raises(
    factor: float, span_ms: int, min_samples: int, match: str
) -> None:
    """Factor, span and min_samples must be positive."""
    with pytest.raises(ValueError, match=match):
        SpikeRule(factor, span_ms, min_samples)
