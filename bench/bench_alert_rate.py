"""Alerts per market per day on the shared candles, through the real SpikeDetector.

Each candle of the 14 days x 10 pairs in ../shared/data/candles is fed as one closed minute bar
(seq = row number) and the alerts are counted per market and kind, for the default settings,
with the guards off (the old behaviour on minutes), and for every `--config` given. Run:

    .venv/bin/python bench/bench_alert_rate.py [--config cooldown_seconds=900,min_samples=45 ...]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import math
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tickstream_alerts.detector import SpikeDetector
from tickstream_shared.naming import ALERT_KINDS
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import AlertsSettings

CANDLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "candles"
_FILE_RE = re.compile(r"^(?P<exchange>[a-z0-9]+)_(?P<pair>[a-z0-9]+-[a-z0-9]+)_1m\.csv\.gz$")
_DAY_MS = 86_400_000
# A "large move": a minute at least this many times its trailing hour's mean. An alert "points
# at" it when the metric alerted in the COVER_MINUTES minutes up to and including it.
BIG_RATIO = 10.0
COVER_MINUTES = 15
# The rule as it behaved before the guards: every qualifying minute, no liquidity check.
GUARDS_OFF = {"cooldown_seconds": 0, "min_active_minutes": 0, "min_zscore": 0, "min_samples": 30}


def load_bars(folder: Path) -> dict[str, list[Tick]]:
    """Every candle file as closed bars per market id, in file (time) order."""
    bars: dict[str, list[Tick]] = {}
    for path in sorted(folder.iterdir()):
        match = _FILE_RE.match(path.name)
        if match is None:
            continue
        market = f"{match['exchange']}:{match['pair']}"
        with gzip.open(path, "rt", newline="") as handle:
            bars[market] = [
                Tick(
                    market=market,
                    minute=int(row["ts_ms"]),
                    seq=index,
                    exchange_ts=int(row["ts_ms"]) + MINUTE_MS - 1,
                    received_ts=int(row["ts_ms"]) + MINUTE_MS - 1,
                    open=float(row["open"]),
                    high=float(row["high"]),
                    low=float(row["low"]),
                    close=float(row["close"]),
                    volume=float(row["volume"]),
                    closed=True,
                )
                for index, row in enumerate(csv.DictReader(handle))
            ]
    return bars


def parse_config(text: str) -> dict[str, Any]:
    """`name=value,name=value` with AlertsSettings field names."""
    names = {f.name for f in dataclasses.fields(AlertsSettings)}
    overrides: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in names:
            raise SystemExit(f"unknown setting {name!r}; one of {', '.join(sorted(names))}")
        overrides[name] = float(value) if name in {"factor", "min_zscore"} else int(value)
    return overrides


def big_minutes(bars: dict[str, list[Tick]]) -> set[tuple[str, int]]:
    """(metric, minute) whose value is >= BIG_RATIO x the mean of the hour before it.

    The yardstick for "meaningful": how many of these large moves an alert points at. Computed
    directly from the bars (at least 30 of the 60 minutes before present), not by the rule.
    """
    big: set[tuple[str, int]] = set()
    for market, market_bars in bars.items():
        values = {kind: {b.minute: b.value(kind) for b in market_bars} for kind in ALERT_KINDS}
        for kind, by_minute in values.items():
            for minute, value in by_minute.items():
                window = [
                    by_minute[m]
                    for m in range(minute - 60 * MINUTE_MS, minute, MINUTE_MS)
                    if m in by_minute
                ]
                if len(window) < 30:
                    continue
                mean = math.fsum(window) / len(window)
                if mean > 0 and value >= BIG_RATIO * mean:
                    big.add((f"{market}:{kind}", minute))
    return big


def report(
    title: str, settings: AlertsSettings, bars: dict[str, list[Tick]], big: set[tuple[str, int]]
) -> None:
    """Run the detector over every market and print alerts per market per day."""
    started = time.perf_counter()
    rows = []
    raised: set[tuple[str, int]] = set()
    ratios: list[float] = []
    for market, market_bars in bars.items():
        detector = SpikeDetector(settings)
        alerts = detector.observe(market_bars)
        raised.update((alert.metric, alert.minute) for alert in alerts)
        ratios.extend(alert.ratio for alert in alerts)
        kinds = Counter(alert.kind for alert in alerts)
        days = (market_bars[-1].minute - market_bars[0].minute + MINUTE_MS) / _DAY_MS
        rows.append((market, kinds["price"] / days, kinds["volume"] / days))
    elapsed = time.perf_counter() - started
    covered = sum(
        1
        for metric, minute in big
        if any((metric, minute - k * MINUTE_MS) in raised for k in range(COVER_MINUTES + 1))
    )
    print(f"== {title}")
    print(
        f"   factor={settings.factor} window_minutes={settings.window_minutes}"
        f" min_samples={settings.min_samples}\n   min_active_minutes={settings.min_active_minutes}"
        f" min_zscore={settings.min_zscore} cooldown_seconds={settings.cooldown_seconds}"
    )
    print(f"   {'market':<20} {'price/day':>9} {'volume/day':>10} {'total/day':>9}")
    for market, price, volume in rows:
        print(f"   {market:<20} {price:>9.2f} {volume:>10.2f} {price + volume:>9.2f}")
    price_avg = sum(r[1] for r in rows) / len(rows)
    volume_avg = sum(r[2] for r in rows) / len(rows)
    print(
        f"   {'average':<20} {price_avg:>9.2f} {volume_avg:>10.2f} {price_avg + volume_avg:>9.2f}"
        f"   ({elapsed:.1f} s)"
    )
    median = statistics.median(ratios) if ratios else math.nan
    print(f"   median value/mean of the alerts: {median:.2f}")
    print(
        f"   large moves (>= {BIG_RATIO:g}x trailing mean) alerted within {COVER_MINUTES} min"
        f" up to them: {covered} of {len(big)} ({100 * covered / max(len(big), 1):.1f}%)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=VALUE,...",
        help="an extra configuration to measure (AlertsSettings field names); repeatable",
    )
    parser.add_argument("--candles", type=Path, default=CANDLES, help="candle folder")
    args = parser.parse_args()
    if not args.candles.is_dir():
        print(f"candles not found at {args.candles}", file=sys.stderr)
        return 1
    bars = load_bars(args.candles)
    minutes = sum(len(b) for b in bars.values())
    print(f"{len(bars)} markets, {minutes} one-minute bars, each fed as one closed bar")
    big = big_minutes(bars)
    defaults = AlertsSettings()
    report("defaults", defaults, bars, big)
    report("guards off", dataclasses.replace(defaults, **GUARDS_OFF), bars, big)
    for text in args.config:
        report(text, dataclasses.replace(defaults, **parse_config(text)), bars, big)
    return 0


if __name__ == "__main__":
    sys.exit(main())
