"""LiveBars.reconcile_due from its schedule answers what a scan of every market would."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tickstream_shared.naming import Market
from tickstream_watcher.exchange import CandleUpdate, Trade
from tickstream_watcher.live_bars import LiveBars, due_range
from tickstream_watcher.trust import TrustRules

M = 60_000
BASE = 28_333_334 * M
MARKETS = [
    Market("binance", "eth", "usdt"),
    Market("kraken", "btc", "usd"),
    Market("okx", "sol", "usdt"),
]
TRADED = Market("coinbase", "btc", "usd")


def scan(bars: LiveBars, now_ms: int) -> list[tuple[Market, int, int]]:
    """reconcile_due as it was: every market's state looked at, most overdue first."""
    due = []
    for market, state in bars._markets.items():
        entry = due_range(state, now_ms, bars.rules)
        if entry is not None:
            due.append((market, *entry))
    due.sort(key=lambda item: item[1])
    return due


minutes = st.integers(0, 30)
times = st.integers(0, 40 * M)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("candle"), st.integers(0, 2), minutes, st.booleans(), st.integers(1, 9)),
        st.tuples(st.just("trade"), st.integers(1, 60), minutes),
        st.tuples(st.just("close_due"), times),
        st.tuples(st.just("rest_failed"), st.integers(0, 2), times),
        st.tuples(st.just("rest_answered"), st.integers(0, 2)),
        st.tuples(st.just("reconcile"), st.integers(0, 3), times, st.booleans(), st.booleans()),
        st.tuples(st.just("suspect"), st.integers(0, 3), times),
        st.tuples(st.just("recheck"), st.integers(0, 3), minutes),
        st.tuples(st.just("repair"), st.integers(0, 3), times),
        st.tuples(st.just("due"), times),
        st.tuples(st.just("due_soon"), st.integers(-2_000, 20_000)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(
    operations,
    st.sampled_from([(120_000, 30_000), (1_000, 0), (600_000, 0), (90_000, 45_000)]),
)
def test_reconcile_due_equals_a_scan_of_every_market(
    ops: list[tuple[Any, ...]], delays: tuple[int, int]
) -> None:
    """After any sequence of updates, closes, REST answers and failures, at any time asked."""
    rules = TrustRules(reconcile_after_ms=delays[0], reconcile_settle_ms=delays[1])
    bars = LiveBars(min_interval_ms=0, rules=rules)
    trade_id = 0
    last_at = 0  # the time the last operation used: "due_soon" asks shortly after it
    markets = [*MARKETS, TRADED]
    for op in ops:
        kind = op[0]
        if kind in ("close_due", "rest_failed", "reconcile", "suspect", "repair", "due"):
            last_at = op[-1] if kind == "close_due" or kind == "due" else op[2]
        if kind == "candle":
            _, index, minute, closed, volume = op
            start = BASE + minute * M
            update = CandleUpdate(
                MARKETS[index], start, 10.0, 10.0, 10.0, 10.0, float(volume), 3, closed, start + 1
            )
            bars.candle(update, (start + M) * 1000)
        elif kind == "trade":
            _, step, minute = op
            trade_id += step  # a step over 1 is a trade-id gap: minutes held for REST
            ts = BASE + minute * M + 10
            bars.trade(Trade(TRADED, trade_id, 10.0, 1.0, ts), (ts + 5) * 1000)
        elif kind == "close_due":
            bars.close_due((BASE + op[1]) * 1000)
        elif kind == "rest_failed":
            bars.rest_failed(MARKETS[op[1]], BASE + op[2])
        elif kind == "rest_answered":
            bars.rest_answered(MARKETS[op[1]])
        elif kind == "reconcile":
            _, index, at, agree, complete = op
            now = BASE + at
            for market, first, last in scan(bars, now):
                if market == markets[index]:
                    volume = 5.0 if agree else 7.0
                    candles = [
                        CandleUpdate(market, minute, 10.0, 10.0, 10.0, 10.0, volume, 3, True, 0)
                        for minute in range(first, last + M, 2 * M)
                    ]
                    bars.reconcile(market, candles, first, last, now * 1000, complete=complete)
        elif kind == "suspect":
            bars.suspect(markets[op[1]], BASE + op[2])
        elif kind == "recheck":
            bars.recheck(markets[op[1]], BASE + op[2] * M)
        elif kind == "repair":
            bars.repair(markets[op[1]], [], (BASE + op[2]) * 1000)
        else:
            now = BASE + (op[1] if kind == "due" else last_at + op[1])
            assert bars.reconcile_due(now) == scan(bars, now)
    for at in range(0, 45 * M, 7 * M + 1234):
        assert bars.reconcile_due(BASE + at) == scan(bars, BASE + at)
