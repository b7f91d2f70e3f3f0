"""What the trust rules cost the live bar builder: updates per second with the rules on and off.

Pure CPU, no I/O: N markets of Binance-like kline updates (two a second per market, each
minute closed by its final kline, a late final every tenth minute), through LiveBars with the
default TrustRules (plausibility, the clock check, the last hour kept for corrections) and
with the checks off (factors 0, reconciliation off) side by side; then one reconciliation pass
over every market's last hour. Run:

    .venv/bin/python bench/bench_live_bars.py [--markets 1000] [--minutes 30]
"""

from __future__ import annotations

import argparse
import time

from tickstream_shared.naming import Market
from tickstream_watcher.exchange import CandleUpdate
from tickstream_watcher.live_bars import LiveBars
from tickstream_watcher.trust import TrustRules

M = 60_000
BASE = 28_333_334 * M


def run(markets: list[Market], minutes: int, rules: TrustRules) -> tuple[float, int, LiveBars]:
    """(seconds, updates) of feeding every market two updates a second for `minutes`."""
    bars = LiveBars(rules=rules)
    updates = 0
    started = time.perf_counter()
    for minute_index in range(minutes):
        minute = BASE + minute_index * M
        for half_second in range(120):
            at = minute + half_second * 500
            for i, market in enumerate(markets):
                price = 100.0 + i + (half_second % 7) / 100
                volume = 1.0 + half_second / 10
                closed = half_second == 119 and minute_index % 10 != 5
                update = CandleUpdate(
                    market, minute, 100.0 + i, price + 1, 99.0 + i, price, volume, 9, closed, at
                )
                bars.candle(update, (at + 5) * 1000)
                updates += 1
            if half_second == 0 and minute_index % 10 == 6:
                # The previous minute's final kline after this minute's first update.
                previous = minute - M
                for i, market in enumerate(markets):
                    final = CandleUpdate(
                        market,
                        previous,
                        100.0 + i,
                        102.0 + i,
                        99.0 + i,
                        101.0 + i,
                        13.0,
                        9,
                        True,
                        previous + M - 1,
                    )
                    bars.candle(final, (at + 600) * 1000)
                    updates += 1
            if half_second % 2 == 0:
                bars.flush((at + 5) * 1000)
    return time.perf_counter() - started, updates, bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markets", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=30)
    args = parser.parse_args()
    markets = [Market("binance", f"m{i}", "usdt") for i in range(args.markets)]
    off = TrustRules(price_factor=0, volume_factor=0, reconcile_after_ms=0)
    for name, rules in (("checks off", off), ("trust rules", TrustRules())):
        seconds, updates, bars = run(markets, args.minutes, rules)
        total = bars.total()
        print(
            f"{name:12s} {updates:>10,d} updates in {seconds:6.2f} s: "
            f"{updates / seconds:>10,.0f} updates/s, {seconds / updates * 1e6:5.2f} us each; "
            f"corrected {total.corrected}, implausible {total.implausible}"
        )
    now = BASE + (args.minutes + 10) * M
    due = bars.reconcile_due(now)
    started = time.perf_counter()
    compared = 0
    for market, first, last in due:
        candles = [
            CandleUpdate(market, m, 1.0, 2.0, 0.5, 1.5, 3.0, None, True, m + M)
            for m in range(first, last + M, M)
        ]
        compared += last // M - first // M + 1
        bars.reconcile(market, candles, first, last, now * 1000)
    seconds = time.perf_counter() - started
    print(
        f"reconcile    {len(due):>10,d} markets due, {compared:,d} minutes compared in "
        f"{seconds:6.3f} s ({seconds / max(len(due), 1) * 1e6:,.0f} us per market)"
    )


if __name__ == "__main__":
    main()
