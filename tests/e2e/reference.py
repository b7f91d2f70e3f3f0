"""Independent references for the end-to-end tests: rows from the CSVs, alerts by brute force."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MINUTE_MS = 60_000


@dataclass(frozen=True)
class Row:
    """One candle as written to the replay files: the bar the watcher must publish."""

    minute: int
    seq: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float | None = None  # the file's quote_volume cell, if it has that column


@dataclass(frozen=True)
class AlertRule:
    """The alert settings the end-to-end stack runs with (the service defaults)."""

    factor: Fraction = Fraction(3)
    window_minutes: int = 60
    min_samples: int = 30
    min_active_minutes: int = 45
    min_zscore: Fraction = Fraction(6)
    cooldown_ms: int = 3_600_000


def reference_alerts(expected: dict[str, list[Row]], rule: AlertRule | None = None) -> set[str]:
    """Alert ids by brute force over closed minutes, in exact rational arithmetic.

    A minute m of a metric alerts when, over the minutes present in [m - window, m): there are
    at least min_samples of them, at least min_active_minutes of them with non-zero volume,
    their mean is positive, the value exceeds factor x mean and exceeds the mean by more than
    min_zscore population standard deviations; and the metric's last alert L (if any) is at
    least the cooldown before m.
    """
    rule = rule or AlertRule()
    alerts: set[str] = set()
    for market, rows in expected.items():
        by_minute = {r.minute: r for r in rows}
        for kind in ("price", "volume"):
            last_alert: int | None = None
            for row in rows:
                start = row.minute - rule.window_minutes * MINUTE_MS
                before = [
                    by_minute[m] for m in range(start, row.minute, MINUTE_MS) if m in by_minute
                ]
                if len(before) < rule.min_samples:
                    continue
                if sum(1 for r in before if r.volume > 0) < rule.min_active_minutes:
                    continue
                values = [Fraction(r.close if kind == "price" else r.volume) for r in before]
                n = len(values)
                mean = sum(values, Fraction(0)) / n
                variance = sum(((v - mean) ** 2 for v in values), Fraction(0)) / n
                value = Fraction(row.close if kind == "price" else row.volume)
                if not (mean > 0 and value > rule.factor * mean):
                    continue
                excess = value - mean
                if rule.min_zscore and not excess**2 > rule.min_zscore**2 * variance:
                    continue
                if last_alert is not None and row.minute - last_alert < rule.cooldown_ms:
                    continue
                alerts.add(f"{market}:{kind}@{row.minute}")
                last_alert = row.minute
    return alerts
