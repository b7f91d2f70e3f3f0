"""What one verify turn's `LiveBars.reconcile_due` costs with N markets, in steady state.

Pure CPU, no I/O. N Binance-like markets with an hour of closed minutes, every one reconciled;
then W minutes of live time in turns of one second (the watcher's verify loop asks once per
turn per exchange): each market gets a forming update every 2 s and a closing kline at each
minute's end, and whatever `reconcile_due` returns is reconciled at once (REST answering
instantly), so the due list stays small, as in a healthy watcher. Only the reconcile_due
calls are timed. Run against the code before the schedule by putting its tree first:

    .venv/bin/python bench/bench_reconcile_due.py [--markets 1000] [--minutes 10]
    git archive <commit> services/watcher | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/services/watcher .venv/bin/python bench/bench_reconcile_due.py
"""

from __future__ import annotations

import argparse
import time

import tickstream_watcher.live_bars
from tickstream_shared.naming import Market
from tickstream_watcher.exchange import CandleUpdate
from tickstream_watcher.live_bars import LiveBars
from tickstream_watcher.trust import TrustRules

M = 60_000
BASE = 28_333_334 * M
WARM_MINUTES = 60


def kline(market: Market, minute: int, at: int, *, closed: bool) -> CandleUpdate:
    return CandleUpdate(market, minute, 100.0, 101.0, 99.0, 100.5, 3.0, 9, closed, at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markets", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=10, help="live minutes timed")
    args = parser.parse_args()
    markets = [Market("binance", f"m{i}", "usdt") for i in range(args.markets)]
    rules = TrustRules()
    bars = LiveBars(rules=rules)
    for index in range(WARM_MINUTES):
        minute = BASE + index * M
        for market in markets:
            bars.candle(kline(market, minute, minute + M - 1, closed=True), (minute + M) * 1000)
    start = BASE + WARM_MINUTES * M
    for market, first, last in bars.reconcile_due(start + 10 * M):
        bars.reconcile(market, [], first, last, start * 1000)
    calls = due = 0
    spent = 0.0
    for second in range(args.minutes * 60):
        now = start + second * 1000
        minute = now - now % M
        for i, market in enumerate(markets):
            if (second + i) % 2 == 0:  # 0.5 updates/s per market, spread over the turns
                bars.candle(kline(market, minute, now, closed=False), now * 1000)
            if second % 60 == 59:
                bars.candle(kline(market, minute, minute + M - 1, closed=True), now * 1000)
        began = time.perf_counter()
        entries = bars.reconcile_due(now)
        spent += time.perf_counter() - began
        calls += 1
        due += len(entries)
        for market, first, last in entries:
            bars.reconcile(market, [], first, last, now * 1000)
    print(
        f"{tickstream_watcher.live_bars.__file__}\n"
        f"{args.markets:,} markets, {calls:,} turns: reconcile_due {spent / calls * 1e6:,.0f} us"
        f" per turn, {due:,} markets due in all ({due / calls:.1f} per turn)"
    )


if __name__ == "__main__":
    main()
