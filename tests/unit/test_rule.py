"""Unit and property tests for the minute spike rule against an exact brute-force reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.spike_reference import RuleParams, Update, judge, rule_spikes
from tickstream_alerts.rule import MinuteSpikeRule, Spike
from tickstream_shared.schemas import MINUTE_MS

T0 = 1_700_000_040_000  # a whole minute
HOUR = 60


def minute(index: int) -> int:
    return T0 + index * MINUTE_MS


def make_rule(params: RuleParams) -> MinuteSpikeRule:
    return MinuteSpikeRule(
        params.factor,
        params.window_minutes,
        params.min_samples,
        params.min_active_minutes,
        params.min_zscore,
    )


def fill(rule: MinuteSpikeRule, closes: list[float], volumes: list[float]) -> None:
    """Minutes 0.. with these values, each judged and expected to raise nothing."""
    for index, (close, volume) in enumerate(zip(closes, volumes, strict=True)):
        assert rule.observe(minute(index), close, volume) == ()


def _near_thresholds(window: list[float], params: RuleParams) -> list[float]:
    """Floats at and next to factor x mean and mean + z x std of `window`, as floats see them."""
    if not window:
        return [1.0]
    mean = math.fsum(window) / len(window)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in window) / len(window))
    near = []
    for threshold in (params.factor * mean, mean + params.min_zscore * std):
        near += [math.nextafter(threshold, 0.0), threshold, math.nextafter(threshold, math.inf)]
    return [max(v, 1e-9) for v in near]


@st.composite
def update_streams(
    draw: st.DrawFn, values: st.SearchStrategy[float], params: RuleParams
) -> list[Update]:
    """Updates of one market: forming repeats, next minutes, gaps, late earlier minutes, and
    values at the float thresholds (where only exact arithmetic gets the verdict right)."""
    window = params.window_minutes
    steps = st.one_of(st.just(0), st.just(1), st.integers(-window - 2, window + 2))
    count = draw(st.integers(1, 150))
    index = 0
    seen: dict[int, tuple[float, float]] = {}
    updates = []
    for seq in range(count):
        index = max(index + draw(steps), -1000)
        at = minute(index)
        before = [seen[m] for m in sorted(seen) if at - window * MINUTE_MS <= m < at]
        if draw(st.integers(0, 3)) == 0:
            close = draw(st.sampled_from(_near_thresholds([c for c, _ in before], params)))
        else:
            close = draw(values)
        if draw(st.integers(0, 3)) == 0:
            volume = draw(st.sampled_from(_near_thresholds([v for _, v in before], params)))
        else:
            volume = draw(st.one_of(st.just(0.0), values))
        seen[at] = (close, volume)
        updates.append(Update(at, seq, close, volume))
    return updates


def check_against_reference(updates: list[Update], params: RuleParams) -> None:
    rule = make_rule(params)
    for update, expected in zip(updates, rule_spikes(updates, params), strict=True):
        spikes = rule.observe(update.minute, update.close, update.volume)
        assert [s.kind for s in spikes] == [e.kind for e in expected]
        for spike, reference in zip(spikes, expected, strict=True):
            assert spike.samples == reference.samples
            # The exact mean, correctly rounded (Fraction's float conversion rounds correctly).
            assert spike.mean == float(reference.exact_mean)
            assert spike.value == (update.close if spike.kind == "price" else update.volume)
            assert spike.ratio == spike.value / spike.mean


_PARAMS = st.builds(
    RuleParams,
    factor=st.sampled_from([1.5, 2.0, 3.0]),
    window_minutes=st.sampled_from([1, 3, 5, 60]),
    min_samples=st.integers(1, 4),
    min_active_minutes=st.integers(0, 3),
    min_zscore=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), params=_PARAMS)
def test_small_integer_values_match_the_exact_reference(
    data: st.DataObject, params: RuleParams
) -> None:
    """With small integers (many exact ties at the threshold) every verdict is the exact one."""
    values = st.integers(1, 8).map(float)
    check_against_reference(data.draw(update_streams(values, params)), params)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), params=_PARAMS)
def test_float_values_match_the_exact_reference(data: st.DataObject, params: RuleParams) -> None:
    """With arbitrary floats every verdict still equals the one in exact fractions."""
    values = st.one_of(
        st.sampled_from([1e-3, 0.1, 0.3, 1.0, 1e5, 1e5 + 0.01]),
        st.floats(min_value=1e-6, max_value=1e9, allow_subnormal=False),
    )
    check_against_reference(data.draw(update_streams(values, params)), params)


def test_forming_minute_is_judged_on_every_update_against_one_baseline() -> None:
    """Each update of the forming minute is judged; the minute itself is not in its mean."""
    rule = MinuteSpikeRule(3.0, HOUR, 3)
    fill(rule, [10.0] * 3, [2.0] * 3)
    assert rule.observe(minute(3), 10.0, 5.0) == ()
    assert rule.observe(minute(3), 10.0, 6.5) == (Spike("volume", 6.5, 2.0, 3.25, 3),)
    assert rule.observe(minute(3), 31.0, 7.0) == (
        Spike("price", 31.0, 10.0, 3.1, 3),
        Spike("volume", 7.0, 2.0, 3.5, 3),
    )
    # Its latest value joins the next minute's window: mean (2 + 2 + 2 + 7) / 4.
    assert rule.observe(minute(4), 10.0, 9.75) == ()
    assert rule.observe(minute(4), 10.0, 9.76) == (Spike("volume", 9.76, 3.25, 9.76 / 3.25, 4),)


def test_exactly_factor_times_mean_is_not_a_spike() -> None:
    """A value of exactly 3x the mean is not a spike; the next float above it is."""
    rule = MinuteSpikeRule(3.0, HOUR, 3)
    fill(rule, [1.0, 2.0, 3.0], [1.0] * 3)
    assert rule.observe(minute(3), 6.0, 1.0) == ()
    above = math.nextafter(6.0, math.inf)
    assert rule.observe(minute(3), above, 1.0) == (Spike("price", above, 2.0, above / 2.0, 3),)


def test_threshold_is_exact_where_floats_would_round_it_away() -> None:
    """18.6 > 3 x 31/5 exactly, although in floats 3 * (31 / 5) == 18.6."""
    assert 3.0 * (math.fsum([1.0, 9.0, 8.0, 9.0, 4.0]) / 5) == 18.6
    rule = MinuteSpikeRule(3.0, HOUR, 5)
    fill(rule, [1.0, 9.0, 8.0, 9.0, 4.0], [1.0] * 5)
    assert rule.observe(minute(5), 18.6, 1.0) == (Spike("price", 18.6, 6.2, 18.6 / 6.2, 5),)


def test_window_holds_the_sixty_minutes_before_and_skips_gaps() -> None:
    """Minute m - 60 counts, m - 61 does not, and absent minutes are not samples."""
    rule = MinuteSpikeRule(3.0, HOUR, 1)
    assert rule.observe(minute(0), 100.0, 1.0) == ()
    assert rule.observe(minute(1), 1.0, 1.0) == ()
    # Minutes 2..60 absent; at 61 the window [1, 60] holds only minute 1.
    assert rule.observe(minute(61), 3.5, 1.0) == (Spike("price", 3.5, 1.0, 3.5, 1),)
    # At 62 the window [2, 61] holds only minute 61.
    assert rule.observe(minute(62), 10.0, 1.0) == ()
    assert rule.observe(minute(62), 10.6, 1.0) == (Spike("price", 10.6, 3.5, 10.6 / 3.5, 1),)


def test_long_gap_empties_the_window() -> None:
    """After more than an hour without bars nothing earlier counts: no samples, no spike."""
    rule = MinuteSpikeRule(3.0, HOUR, 1)
    fill(rule, [1.0] * 10, [1.0] * 10)
    assert rule.observe(minute(200), 1000.0, 1000.0) == ()
    assert rule.observe(minute(201), 3001.0, 1.0) == (Spike("price", 3001.0, 1000.0, 3.001, 1),)


def test_min_samples_counts_present_minutes() -> None:
    """No spike until the window holds min_samples minutes."""
    rule = MinuteSpikeRule(3.0, HOUR, 3)
    fill(rule, [1.0, 1.0], [1.0, 1.0])
    assert rule.observe(minute(2), 50.0, 50.0) == ()
    assert rule.observe(minute(3), 100.0, 1.0) == (
        Spike("price", 100.0, 17.0 + 1 / 3, 100.0 / (52 / 3), 3),
    )


def test_illiquid_guard_needs_active_minutes_for_both_kinds() -> None:
    """With min_active_minutes 3 an hour of two traded minutes raises nothing, price included."""
    guarded = MinuteSpikeRule(3.0, HOUR, 1, min_active_minutes=3)
    fill(guarded, [1.0] * 4, [0.0, 5.0, 0.0, 5.0])
    assert guarded.observe(minute(4), 100.0, 100.0) == ()
    assert guarded.observe(minute(5), 100.0, 1000.0) == (
        Spike("price", 100.0, 20.8, 100.0 / 20.8, 5),
        Spike("volume", 1000.0, 22.0, 1000.0 / 22.0, 5),
    )


def test_non_positive_mean_never_spikes() -> None:
    """A window of zero volume has mean 0, which no value exceeds by a factor."""
    rule = MinuteSpikeRule(3.0, HOUR, 1)
    fill(rule, [1.0] * 5, [0.0] * 5)
    assert rule.observe(minute(5), 1.0, 1e9) == ()


def test_zscore_guard_is_strict_and_exact() -> None:
    """Over [0, 2] (mean 1, std 1) a z of 4 needs value > 5: 5 is not a spike, its successor is."""
    rule = MinuteSpikeRule(3.0, HOUR, 1, min_zscore=4.0)
    fill(rule, [1.0, 1.0], [0.0, 2.0])
    assert rule.observe(minute(2), 1.0, 5.0) == ()
    above = math.nextafter(5.0, math.inf)
    assert rule.observe(minute(2), 1.0, above) == (Spike("volume", above, 1.0, above, 2),)


def test_zscore_guard_lets_a_jump_out_of_a_flat_window_through() -> None:
    """A constant window has std 0, so only the factor decides."""
    rule = MinuteSpikeRule(3.0, HOUR, 1, min_zscore=6.0)
    fill(rule, [2.0] * 4, [1.0] * 4)
    assert rule.observe(minute(4), 6.5, 1.0) == (Spike("price", 6.5, 2.0, 3.25, 4),)


def test_late_update_changes_later_windows_but_is_not_judged() -> None:
    """A late update of an earlier minute raises nothing and is in the baseline from then on."""
    rule = MinuteSpikeRule(3.0, HOUR, 1)
    fill(rule, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert rule.observe(minute(3), 3.5, 1.0) == (Spike("price", 3.5, 1.0, 3.5, 3),)
    assert rule.observe(minute(1), 100.0, 1.0) == ()  # late: not judged
    assert rule.newest_minute == minute(3)
    # The forming minute 3 is now judged against (1 + 100 + 1) / 3 = 34.
    assert rule.observe(minute(3), 101.0, 1.0) == ()
    assert rule.observe(minute(3), 103.0, 1.0) == (Spike("price", 103.0, 34.0, 103.0 / 34.0, 3),)


def test_update_older_than_the_newest_window_is_ignored() -> None:
    """A minute before the newest minute's window cannot matter and changes nothing."""
    rule = MinuteSpikeRule(3.0, 2, 1)
    fill(rule, [1.0, 1.0, 1.0, 1.0], [1.0] * 4)
    assert rule.observe(minute(0), 500.0, 500.0) == ()
    assert rule.observe(minute(3), 3.5, 1.0) == (Spike("price", 3.5, 1.0, 3.5, 2),)


def test_ring_reuses_slots_without_mixing_minutes() -> None:
    """With a 2-minute window the ring has 3 slots; minute 3 reuses minute 0's slot correctly."""
    rule = MinuteSpikeRule(2.0, 2, 1)
    fill(rule, [10.0, 1.0, 1.0], [1.0] * 3)
    assert rule.observe(minute(3), 2.5, 1.0) == (Spike("price", 2.5, 1.0, 2.5, 2),)
    assert rule.observe(minute(5), 5.5, 1.0) == (Spike("price", 5.5, 2.5, 5.5 / 2.5, 1),)


def test_remember_records_without_judging() -> None:
    """Warm-up values raise nothing and form the next minute's baseline."""
    rule = MinuteSpikeRule(3.0, HOUR, 2)
    rule.remember(minute(0), 1.0, 1.0)
    rule.remember(minute(1), 100.0, 1.0)
    assert rule.newest_minute == minute(1)
    assert rule.observe(minute(2), 151.6, 1.0) == (Spike("price", 151.6, 50.5, 151.6 / 50.5, 2),)


@pytest.mark.parametrize(
    ("factor", "window", "min_samples", "min_active", "zscore", "match"),
    [
        (0.0, 60, 1, 0, 0.0, "factor"),
        (math.nan, 60, 1, 0, 0.0, "factor"),
        (3.0, 0, 1, 0, 0.0, "window_minutes"),
        (3.0, 60, 0, 0, 0.0, "min_samples"),
        (3.0, 60, 1, -1, 0.0, "min_active_minutes"),
        (3.0, 60, 1, 0, -1.0, "min_zscore"),
        (3.0, 60, 1, 0, math.inf, "min_zscore"),
    ],
)
def test_invalid_configuration_raises(
    factor: float, window: int, min_samples: int, min_active: int, zscore: float, match: str
) -> None:
    """Factor and window must be positive, the guards non-negative and finite."""
    with pytest.raises(ValueError, match=match):
        MinuteSpikeRule(factor, window, min_samples, min_active, zscore)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), params=_PARAMS, correction=st.integers(0, 4))
def test_judge_matches_the_exact_reference_for_every_held_minute(
    data: st.DataObject, params: RuleParams, correction: int
) -> None:
    """Reaching `correction` minutes back, observe still gives the exact verdicts, and judging a
    minute again gives the exact verdict on its latest value against its window as it is now."""
    updates = data.draw(update_streams(st.integers(1, 8).map(float), params))
    rule = MinuteSpikeRule(
        params.factor,
        params.window_minutes,
        params.min_samples,
        params.min_active_minutes,
        params.min_zscore,
        correction_minutes=correction,
    )
    seen: dict[int, tuple[float, float]] = {}
    for update, expected in zip(updates, rule_spikes(updates, params), strict=True):
        spikes = rule.observe(update.minute, update.close, update.volume)
        assert [(s.kind, s.samples) for s in spikes] == [(e.kind, e.samples) for e in expected]
        seen[update.minute] = (update.close, update.volume)
        newest = max(seen)
        for index in range(-correction - 2, 1):
            at = newest + index * MINUTE_MS
            held = at in seen and index >= -correction
            assert rule.holds(at) == held
            if not held:
                continue
            again = judge(seen, Update(at, update.seq, *seen[at]), params)
            assert [(s.kind, s.samples, s.mean) for s in rule.judge(at)] == [
                (r.kind, r.samples, float(r.exact_mean)) for r in again
            ]
