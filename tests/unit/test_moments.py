"""ExactMoments: exact sums under add/remove at any scale, and exact threshold comparisons."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_window import exact_stats
from tickstream_shared.moments import ExactMoments

_ANY = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e100, max_value=1e100),
    st.sampled_from([0.0, 1e-300, 5e-324, 2.5, 1e100]),
)
_POSITIVE = st.one_of(
    st.floats(min_value=1e-6, max_value=1e9),
    st.sampled_from([1e-3, 0.1, 0.3, 1.0, 3.0, 1e5, 1e5 + 0.01, 5e-324]),
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False, min_value=-1e100, max_value=1e100),
            st.sampled_from([0.0, 1e-300, 5e-324, 2.5, 1e100]),
        ),
        min_size=1,
        max_size=40,
    ),
    removed=st.integers(min_value=0, max_value=39),
)
def test_exact_moments_match_fractions(values: list[float], removed: int) -> None:
    """Adding and removing values at any scale keeps mean and std exactly rounded."""
    moments = ExactMoments()
    for value in values:
        moments.add(value)
    kept = values[min(removed, len(values) - 1) :]
    for value in values[: len(values) - len(kept)]:
        moments.remove(value)
    assert moments.count == len(kept)
    assert (moments.mean(), moments.std()) == exact_stats(kept)
    for value in kept:
        moments.remove(value)
    assert (moments.count, moments.s1, moments.s2, moments.scale) == (0, 0, 0, 0)


def _moments(values: list[float]) -> ExactMoments:
    moments = ExactMoments()
    for value in values:
        moments.add(value)
    return moments


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_POSITIVE, min_size=1, max_size=20),
    factor=st.sampled_from([1.5, 2.0, 3.0, 0.1, 7.25]),
    pick=st.integers(0, 2),
    other=_POSITIVE,
)
def test_exceeds_factor_is_the_exact_verdict(
    values: list[float], factor: float, pick: int, other: float
) -> None:
    """value > factor x mean is decided as fractions decide it, ties and near-ties included."""
    mean = sum(map(Fraction, values), Fraction(0)) / len(values)
    # Values on, just under and away from the threshold, as floats.
    candidates = [float(Fraction(factor) * mean), float(Fraction(factor) * mean) * (1 - 2**-52)]
    value = candidates[pick] if pick < 2 else other
    expected = Fraction(value) > Fraction(factor) * mean
    assert _moments(values).exceeds_factor(value, Fraction(factor)) is expected


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_POSITIVE, min_size=1, max_size=20),
    zscore=st.sampled_from([0.5, 1.0, 2.0, 6.0]),
    value=_POSITIVE,
)
def test_exceeds_zscore_is_the_exact_verdict(
    values: list[float], zscore: float, value: float
) -> None:
    """value - mean > z x population std is decided as fractions decide it."""
    exact = [Fraction(v) for v in values]
    mean = sum(exact, Fraction(0)) / len(exact)
    variance = sum(((v - mean) ** 2 for v in exact), Fraction(0)) / len(exact)
    excess = Fraction(value) - mean
    expected = excess > 0 and excess**2 > Fraction(zscore) ** 2 * variance
    assert _moments(values).exceeds_zscore(value, Fraction(zscore)) is expected


def test_exceeds_zscore_on_an_exact_tie() -> None:
    """Over [0, 2] (mean 1, std 1) a z of 4 needs a value above 5: 5 itself is not."""
    moments = _moments([0.0, 2.0])
    assert not moments.exceeds_zscore(5.0, Fraction(4))
    assert moments.exceeds_zscore(5.000000000000001, Fraction(4))
