"""ExactMoments: count, sum and sum of squares of floats kept exactly, with exact comparisons."""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction


class ExactMoments:
    """Count, sum and sum of squares of floats, kept exactly as integers.

    Every float is a binary fraction num / 2**k, so at a common scale s >= k it is the integer
    num << (s - k). The scale only grows (the sums are shifted up with it) until the set is
    empty again. Add and remove are exact, so no rounding error builds up and nothing is ever
    rebuilt; mean and variance are rounded once, correctly, by int / int division.
    """

    __slots__ = ("count", "s1", "s2", "scale")

    def __init__(self) -> None:
        self.count = 0
        self.s1 = 0  # sum of x * 2**scale
        self.s2 = 0  # sum of x**2 * 2**(2 * scale)
        self.scale = 0

    def add(self, value: float) -> None:
        num, den = value.as_integer_ratio()
        k = den.bit_length() - 1
        if k > self.scale:
            shift = k - self.scale
            self.s1 <<= shift
            self.s2 <<= 2 * shift
            self.scale = k
        x = num << (self.scale - k)
        self.count += 1
        self.s1 += x
        self.s2 += x * x

    def remove(self, value: float) -> None:
        """Remove a value that was added (and not yet removed); anything else corrupts the sums."""
        num, den = value.as_integer_ratio()
        x = num << (self.scale - (den.bit_length() - 1))
        self.count -= 1
        self.s1 -= x
        self.s2 -= x * x
        if self.count == 0:
            self.scale = 0

    def add_many(self, values: Iterable[float]) -> None:
        """Add several values at once: the same sums as `add` one by one, at a fraction of the
        cost (one scale change, two integer sums)."""
        ratios = [value.as_integer_ratio() for value in values]
        if not ratios:
            return
        k = max(den.bit_length() for _, den in ratios) - 1
        if k > self.scale:
            shift = k - self.scale
            self.s1 <<= shift
            self.s2 <<= 2 * shift
            self.scale = k
        top = self.scale + 1
        xs = [num << (top - den.bit_length()) for num, den in ratios]
        self.count += len(xs)
        self.s1 += sum(xs)
        self.s2 += sum([x * x for x in xs])

    def remove_many(self, values: Iterable[float]) -> None:
        """Remove several values that were added; the same as `remove` one by one."""
        top = self.scale + 1
        xs = [num << (top - den.bit_length()) for num, den in map(float.as_integer_ratio, values)]
        self.count -= len(xs)
        self.s1 -= sum(xs)
        self.s2 -= sum([x * x for x in xs])
        if self.count == 0:
            self.scale = 0

    def clear(self) -> None:
        self.count = self.s1 = self.s2 = self.scale = 0

    def mean(self) -> float:
        """The mean, correctly rounded; requires count > 0."""
        return self.s1 / (self.count << self.scale)

    def std(self) -> float:
        """sqrt of the correctly rounded population variance; requires count > 0."""
        n = self.count
        return math.sqrt((n * self.s2 - self.s1 * self.s1) / ((n * n) << (2 * self.scale)))

    def exceeds_factor(self, value: float, factor: Fraction) -> bool:
        """value > factor x mean, decided exactly (no rounding); requires count > 0.

        Cheap: integer products of a few hundred bits, no Fraction arithmetic.
        """
        num, den = value.as_integer_ratio()
        k = den.bit_length() - 1
        # value * count > factor * s1 / 2**scale, both sides times 2**(k + scale) * denominator
        return (num * self.count * factor.denominator) << self.scale > (
            factor.numerator * self.s1
        ) << k

    def exceeds_zscore(self, value: float, zscore: Fraction) -> bool:
        """value - mean > zscore x population std, decided exactly; requires count > 0."""
        num, den = value.as_integer_ratio()
        k = den.bit_length() - 1
        n = self.count
        # (value - mean) * n * 2**(scale + k), an integer.
        excess = ((num * n) << self.scale) - (self.s1 << k)
        if excess <= 0:
            return False
        # variance * n**2 * 2**(2 * scale), an integer >= 0.
        spread = n * self.s2 - self.s1 * self.s1
        return excess * excess * zscore.denominator**2 > (zscore.numerator**2 * spread) << (2 * k)
