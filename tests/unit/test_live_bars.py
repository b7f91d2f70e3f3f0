"""LiveBars: minute bars from exchange candles and trades, conflated, each closed exactly once."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick, decode_tick
from tickstream_watcher.exchange import CandleUpdate, Trade
from tickstream_watcher.live_bars import REPAIR_DELAY_MS, REPAIR_GIVE_UP_MS, LiveBars
from tickstream_watcher.trust import TrustRules

M = 60_000
BASE = 28_333_334 * M  # 2023-11-14, a whole minute
BTC = Market("coinbase", "btc", "usd")
ETH = Market("binance", "eth", "usdt")


def us(ms: int) -> int:
    return ms * 1000


def valid(ticks: list[Tick]) -> list[Tick]:
    """Every tick the builder publishes passes the consumers' single decode entry point."""
    for tick in ticks:
        assert decode_tick(tick.encode(), now_ms=tick.received_ts) == tick
    return ticks


def candle(
    minute: int, close: float, volume: float, ts: int, *, closed: bool = False
) -> CandleUpdate:
    return CandleUpdate(
        ETH, minute, 10.0, max(10.0, close), min(10.0, close), close, volume, 3, closed, ts
    )


def test_trades_aggregate_into_a_bar_closed_when_the_next_minute_starts() -> None:
    """OHLC, volume and count follow the trades; a trade of the next minute closes the bar."""
    bars = LiveBars(min_interval_ms=0)
    out = []
    for i, (price, size) in enumerate([(100.0, 1.0), (103.0, 0.5), (99.0, 2.0), (101.0, 0.25)]):
        ts = BASE + 1_000 + i * 10_000
        out += valid(bars.trade(Trade(BTC, 7 + i, price, size, ts), us(ts + 5)))
    assert [t.closed for t in out] == [False] * 4
    last = out[-1]
    assert (last.open, last.high, last.low, last.close, last.volume, last.trades) == (
        100.0,
        103.0,
        99.0,
        101.0,
        3.75,
        4,
    )
    closing = valid(bars.trade(Trade(BTC, 11, 102.0, 1.0, BASE + M + 500), us(BASE + M + 600)))
    assert [(t.minute, t.closed) for t in closing] == [(BASE + M, False)]
    assert bars.closed_through(BTC) == BASE
    # The first minute seen lacks the trades before the connection: it waits for REST, and
    # with no candle in time it closes from the trades seen.
    due = BASE + M + REPAIR_DELAY_MS
    assert bars.repairs_due(due - 1) == {} and bars.repairs_due(due) == {BTC: (BASE, BASE)}
    assert bars.repair(BTC, [], us(due)) == []
    (closed,) = valid(bars.repair(BTC, [], us(BASE + M + REPAIR_GIVE_UP_MS)))
    assert (closed.minute, closed.closed, closed.volume) == (BASE, True, 3.75)
    assert closed.exchange_ts == BASE + 31_000 and bars.total().unrepaired == 1
    assert bars.repairs_due(BASE + 9 * M) == {}


def test_updates_are_conflated_to_one_per_interval_and_flushed() -> None:
    """Trades 10 ms apart publish one update per 250 ms; flush sends the newest pending state."""
    bars = LiveBars(min_interval_ms=250)
    published = []
    for i in range(100):  # one second of trades
        ts = BASE + 1_000 + i * 10
        published += bars.trade(Trade(BTC, i, 100.0 + i, 1.0, ts), us(ts))
    assert [t.received_ts - BASE for t in published] == [1_000, 1_250, 1_500, 1_750]
    assert bars.flush(us(BASE + 1_990)) == []  # the interval since 1,750 has not passed
    (pending,) = valid(bars.flush(us(BASE + 2_000)))
    assert (pending.close, pending.volume, pending.trades) == (199.0, 100.0, 100)
    assert bars.flush(us(BASE + 5_000)) == []  # nothing changed since


def test_candles_replace_the_bar_and_the_exchange_close_is_final() -> None:
    """Candle updates replace the bar; after the closed update, that minute is never sent again."""
    bars = LiveBars(min_interval_ms=0)
    first = valid(bars.candle(candle(BASE, 11.0, 5.0, BASE + 2_000), us(BASE + 2_010)))
    assert [(t.close, t.volume, t.closed) for t in first] == [(11.0, 5.0, False)]
    final = valid(bars.candle(candle(BASE, 12.0, 7.0, BASE + 59_999, closed=True), us(BASE + M)))
    assert [(t.close, t.volume, t.closed) for t in final] == [(12.0, 7.0, True)]
    assert bars.candle(candle(BASE, 13.0, 8.0, BASE + M + 1), us(BASE + M + 2)) == []
    assert bars.total().late == 1
    assert bars.close_due(us(BASE + 10 * M)) == []  # nothing forming: no bar is made up


def test_a_silent_minute_is_closed_by_the_timer_after_the_grace() -> None:
    """Kraken sends no final flag: the bar closes `close_grace_ms` after its minute, not before."""
    bars = LiveBars(min_interval_ms=0, close_grace_ms=5_000)
    bars.candle(candle(BASE, 11.0, 5.0, BASE + 30_000), us(BASE + 30_001))
    assert bars.close_due(us(BASE + M + 4_999)) == []
    (closed,) = valid(bars.close_due(us(BASE + M + 5_000)))
    assert (closed.minute, closed.closed, closed.close) == (BASE, True, 11.0)
    assert bars.close_due(us(BASE + 3 * M)) == []


def test_a_snapshot_candle_of_a_past_minute_is_stamped_at_its_end() -> None:
    """A candle received after its minute ended carries the minute's end as event time."""
    bars = LiveBars(min_interval_ms=0)
    (tick,) = valid(bars.candle(candle(BASE, 11.0, 5.0, BASE + 10 * M), us(BASE + 10 * M)))
    assert tick.exchange_ts == BASE + M


def rest_candles(count: int) -> list[CandleUpdate]:
    return [
        CandleUpdate(
            ETH, BASE + i * M, 10.0, 12.0, 9.0, 11.0, float(i), None, True, BASE + (i + 1) * M
        )
        for i in range(count)
    ]


def test_backfill_fills_the_gap_between_two_connections() -> None:
    """After a reconnect, REST fills the minutes after the last closed one and before the first
    minute the new connection delivered; nothing twice."""
    bars = LiveBars(min_interval_ms=0)
    bars.connected([ETH])
    bars.candle(candle(BASE, 11.0, 5.0, BASE + 1_000, closed=True), us(BASE + M))
    bars.connected([ETH])  # the connection dropped; a new one starts
    bars.candle(candle(BASE + 5 * M, 11.0, 5.0, BASE + 5 * M + 1_000), us(BASE + 5 * M + 1_000))
    filled = valid(bars.backfill(ETH, rest_candles(7), us(BASE + 5 * M + 2_000)))
    assert [(t.minute - BASE) // M for t in filled] == [1, 2, 3, 4]
    assert all(t.closed and t.exchange_ts == t.minute + M for t in filled)
    assert bars.backfill(ETH, rest_candles(7), us(BASE + 5 * M + 3_000)) == []  # idempotent
    assert bars.backfilled_through(ETH) == BASE + 4 * M


def test_backfill_still_fills_the_gap_when_the_stream_closed_later_minutes_first() -> None:
    """Live minutes closed before the REST answer came do not hide the older gap behind them."""
    bars = LiveBars(min_interval_ms=0)
    bars.connected([ETH])
    for minute in (3, 4, 5):  # Kraken: each new minute closes the one before
        bars.candle(candle(BASE + minute * M, 11.0, 5.0, BASE + minute * M + 1), us(BASE + 6 * M))
    assert bars.closed_through(ETH) == BASE + 4 * M
    filled = valid(bars.backfill(ETH, rest_candles(7), us(BASE + 6 * M)))
    assert [(t.minute - BASE) // M for t in filled] == [0, 1, 2]
    # A late live update of a backfilled minute is not published again.
    assert bars.candle(candle(BASE + M, 13.0, 8.0, BASE + M + 5), us(BASE + 6 * M)) == []


def test_a_reconnect_during_a_backfill_leaves_the_rest_of_its_gap_to_be_filled() -> None:
    """A backfill answering after the next reconnect still fills its gap, and only that."""
    bars = LiveBars(min_interval_ms=0)
    bars.connected([ETH])  # the first connection: its backfill (minutes 0-9) has not answered
    for minute in (10, 11):
        bars.candle(candle(BASE + minute * M, 11.0, 5.0, BASE + minute * M + 1), us(BASE + 12 * M))
    bars.connected([ETH])  # dropped while minute 11 was forming; the new one starts at 13
    bars.candle(candle(BASE + 13 * M, 11.0, 5.0, BASE + 13 * M + 1), us(BASE + 13 * M + 1))
    assert bars.closed_through(ETH) == BASE + 11 * M  # 11 closed by the stream, once
    late = valid(bars.backfill(ETH, rest_candles(14), us(BASE + 13 * M + 2)))
    assert [(t.minute - BASE) // M for t in late] == [*range(10), 12]
    assert bars.backfill(ETH, rest_candles(14), us(BASE + 13 * M + 3)) == []  # nothing twice


def test_a_bar_forming_at_a_drop_closes_once_whenever_the_backfill_answers() -> None:
    """The minute a dropped connection was forming is the stream's: closed once, and the
    minutes after it are backfilled, before or after the new connection's first update."""
    for backfill_first in (True, False):
        bars = LiveBars(min_interval_ms=0)
        bars.connected([ETH])
        bars.candle(candle(BASE + 5 * M, 11.0, 5.0, BASE + 5 * M + 1), us(BASE + 5 * M + 1))
        bars.connected([ETH])  # dropped in minute 5; back in minute 8
        now = us(BASE + 8 * M + 2_000)
        published: list[Tick] = []
        first_update = candle(BASE + 8 * M, 11.0, 5.0, BASE + 8 * M + 1)
        if backfill_first:
            published += bars.backfill(ETH, rest_candles(9), now)
            published += bars.candle(first_update, now)
        else:
            published += bars.candle(first_update, now)
            published += bars.backfill(ETH, rest_candles(9), now)
        closed = sorted((t.minute - BASE) // M for t in valid(published) if t.closed)
        assert closed == [0, 1, 2, 3, 4, 5, 6, 7], backfill_first


def test_after_a_completed_backfill_the_next_one_starts_after_the_streamed_minutes() -> None:
    """Once a backfill fetched everything before a connection's first minute, a reconnect
    leaves the next backfill only what came after that connection's last minute; until the
    connection delivered a minute, nothing without a candle counts as done."""
    bars = LiveBars(min_interval_ms=0)
    bars.connected([ETH])
    bars.backfill(ETH, rest_candles(6), us(BASE + 10 * M))  # minutes 0-5: REST had no more
    bars.backfilled(ETH, BASE + 9 * M)  # nothing streamed yet: 6-9 may just be missing
    assert bars.backfilled_through(ETH) == BASE + 5 * M
    for minute in (10, 11, 12):
        bars.candle(candle(BASE + minute * M, 11.0, 5.0, BASE + minute * M + 1), us(BASE + 12 * M))
    bars.backfilled(ETH, BASE + 11 * M)  # stops before the connection's first minute
    assert bars.backfilled_through(ETH) == BASE + 9 * M
    bars.connected([ETH])
    assert bars.backfilled_through(ETH) == BASE + 12 * M


def test_backfill_at_start_stops_before_the_minute_still_forming_at_the_exchange() -> None:
    """With no live bar yet, the backfill takes every closed minute and not the current one."""
    bars = LiveBars()
    rest = [
        CandleUpdate(ETH, BASE + i * M, 10.0, 12.0, 9.0, 11.0, 1.0, None, True, BASE + (i + 1) * M)
        for i in range(3)
    ]
    filled = bars.backfill(ETH, rest, us(BASE + 2 * M + 30_000))
    assert [(t.minute - BASE) // M for t in filled] == [0, 1]


def test_duplicate_and_missing_trade_ids_are_counted() -> None:
    """A repeated trade id is skipped; a jump in trade ids is counted as a gap."""
    bars = LiveBars(min_interval_ms=0)
    bars.trade(Trade(BTC, 10, 100.0, 1.0, BASE + 1_000), us(BASE + 1_000))
    assert bars.trade(Trade(BTC, 10, 100.0, 1.0, BASE + 1_000), us(BASE + 1_001)) == []
    bars.trade(Trade(BTC, 14, 100.0, 1.0, BASE + 2_000), us(BASE + 2_000))
    assert (bars.total().duplicate_trades, bars.total().trade_gaps) == (1, 3)


def test_an_update_stamped_far_ahead_of_its_receipt_is_refused() -> None:
    """An exchange clock more than five minutes ahead of the watcher's is bad input."""
    bars = LiveBars()
    assert bars.trade(Trade(BTC, 1, 100.0, 1.0, BASE + 10 * M), us(BASE)) == []
    assert bars.candle(candle(BASE + 10 * M, 11.0, 1.0, BASE + 10 * M), us(BASE)) == []
    assert bars.total().ahead == 2


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=-20_000, max_value=40_000),  # trade time step (ms), may go back
            st.sampled_from([100.0, 100.5, 99.25, 101.0, 0.001]),
            st.sampled_from([0.5, 1.0, 2.25, 1e-8]),
        ),
        min_size=1,
        max_size=150,
    ),
    interval=st.sampled_from([0, 250, 5_000]),
)
def test_closed_bars_equal_an_independent_aggregation_of_the_accepted_trades(
    steps: list[tuple[int, float, float]], interval: int
) -> None:
    """Each minute closes once, with exactly the trades of that minute that were not late."""
    bars = LiveBars(min_interval_ms=interval, rules=TrustRules(price_factor=0, volume_factor=0))
    ts = BASE
    published: list[Tick] = []
    accepted: dict[int, list[tuple[float, float]]] = {}
    newest_minute = -1
    for trade_id, (step, price, size) in enumerate(steps):
        ts = max(BASE, ts + step)
        minute = ts - ts % M
        if minute >= newest_minute:  # the reference: a trade of an older minute is late
            accepted.setdefault(minute, []).append((price, size))
            newest_minute = minute
        published += bars.trade(Trade(BTC, trade_id, price, size, ts), us(ts + 3))
    published += bars.close_due(us(ts + 10 * M))
    # The first minute seen waits for its REST candle; with none, it closes from its trades.
    published += bars.repair(BTC, [], us(ts + 10 * M + REPAIR_GIVE_UP_MS))
    valid(published)
    closed = sorted((t for t in published if t.closed), key=lambda t: t.minute)
    assert [t.minute for t in closed] == sorted(accepted)
    for tick in closed:
        trades = accepted[tick.minute]
        volume = quote_volume = 0.0
        for price, size in trades:
            volume += size
            quote_volume += price * size
        prices = [p for p, _ in trades]
        assert (tick.open, tick.high, tick.low, tick.close) == (
            prices[0],
            max(prices),
            min(prices),
            prices[-1],
        )
        assert (tick.volume, tick.trades) == (volume, len(trades))
        assert tick.quote_volume == quote_volume
    seqs = [t.seq for t in published]
    assert seqs == sorted(set(seqs))
    # Nothing of a minute is published after it closed.
    closed_at = {t.minute: i for i, t in enumerate(published) if t.closed}
    assert all(i <= closed_at[t.minute] for i, t in enumerate(published))


def test_trade_bars_carry_the_sum_of_price_times_size_and_rest_without_it_corrects_nothing() -> (
    None
):
    """Coinbase: quote volume is the sum of price x size; REST candles lack it, so a REST-made
    minute has it unknown, and a REST candle that differs only by lacking it corrects nothing."""
    bars = LiveBars(min_interval_ms=0)
    trades = [(BASE + 1_000, 100.5, 0.25), (BASE + M + 1_000, 101.0, 2.0)]
    trades += [(BASE + M + 2_000, 100.25, 0.5), (BASE + 2 * M + 1_000, 100.0, 1.0)]
    published = []
    for trade_id, (ts, price, size) in enumerate(trades, start=1):
        published += valid(bars.trade(Trade(BTC, trade_id, price, size, ts), us(ts + 5)))
    assert [t.quote_volume for t in published] == [25.125, 202.0, 252.125, 252.125, 100.0]
    (closed,) = [t for t in published if t.closed]
    assert (closed.minute, closed.volume, closed.quote_volume) == (BASE + M, 2.5, 252.125)
    # The first minute seen closes from its REST candle: no quote volume there, so unknown.
    first = CandleUpdate(BTC, BASE, 100.5, 100.5, 100.5, 100.5, 0.75, None, True, 0)
    (repaired,) = valid(bars.repair(BTC, [first], us(BASE + M + REPAIR_DELAY_MS)))
    assert (repaired.minute, repaired.volume, repaired.quote_volume) == (BASE, 0.75, None)
    same = CandleUpdate(BTC, BASE + M, 101.0, 101.0, 100.25, 100.25, 2.5, None, True, 0)
    assert bars.reconcile(BTC, [same], BASE + M, BASE + M, us(BASE + 5 * M)) == []
    assert bars.total().corrected == 0
    differs = CandleUpdate(BTC, BASE + M, 101.0, 101.0, 100.25, 100.5, 2.5, None, True, 0)
    (fixed,) = valid(bars.reconcile(BTC, [differs], BASE + M, BASE + M, us(BASE + 6 * M)))
    assert (fixed.close, fixed.quote_volume, bars.total().corrected) == (100.5, None, 1)


def test_candle_quote_volume_passes_through_and_a_final_word_differing_in_it_corrects() -> None:
    """Binance: the kline's quote volume is published as is; a closed kline whose quote volume
    differs from what was published (both known) is a correction like any other field."""
    bars = LiveBars(min_interval_ms=0)
    forming = dataclasses.replace(candle(BASE, 11.0, 5.0, BASE + 50_000), quote_volume=52.5)
    (tick,) = valid(bars.candle(forming, us(BASE + 50_000)))
    assert tick.quote_volume == 52.5
    bars.candle(candle(BASE + M, 11.0, 0.1, BASE + M + 5), us(BASE + M + 6))
    final = dataclasses.replace(forming, exchange_ts=BASE + M - 1, closed=True, quote_volume=53.0)
    (fixed,) = valid(bars.candle(final, us(BASE + M + 300)))
    assert (fixed.closed, fixed.volume, fixed.quote_volume) == (True, 5.0, 53.0)
    assert bars.total().corrected == 1


def test_a_trade_sum_beyond_the_bound_makes_the_quote_volume_unknown() -> None:
    """A minute whose price x size sum passes 1e18 publishes its quote volume as unknown."""
    bars = LiveBars(min_interval_ms=0, rules=TrustRules(price_factor=0, volume_factor=0))
    out = valid(bars.trade(Trade(BTC, 1, 1e12, 6e5, BASE + 1_000), us(BASE + 1_005)))
    out += valid(bars.trade(Trade(BTC, 2, 1e12, 6e5, BASE + 2_000), us(BASE + 2_005)))
    assert [t.quote_volume for t in out] == [6e17, None]


def test_resume_continues_a_previous_publisher_without_closing_its_minutes_again() -> None:
    """Backfill starts after the checkpoint, skips the republished minute; seqs stay above."""
    bars = LiveBars(min_interval_ms=0)
    bars.resume(ETH, BASE + 2 * M, 5_000_000, BASE + 4 * M)
    bars.connected([ETH])
    now = us(BASE + 10 * M)
    rest = [candle(BASE + i * M, 11.0, 1.0, BASE + (i + 1) * M, closed=True) for i in range(8)]
    out = valid(bars.backfill(ETH, rest, now))
    assert [t.minute for t in out] == [BASE + i * M for i in (3, 5, 6, 7)]
    assert all(t.seq > 5_000_000 for t in out)
    # Before any backfill, the stream's copy of the republished minute is refused too.
    fresh = LiveBars(min_interval_ms=0)
    fresh.resume(ETH, BASE + 2 * M, 5_000_000, BASE + 4 * M)
    assert fresh.candle(candle(BASE + 4 * M, 12.0, 1.0, BASE + 5 * M, closed=True), now) == []
    assert fresh.total().late == 1
    (streamed,) = fresh.candle(candle(BASE + 3 * M, 12.0, 1.0, BASE + 4 * M, closed=True), now)
    assert streamed.minute == BASE + 3 * M and streamed.seq > 5_000_000


def test_a_trade_id_gap_closes_the_minutes_it_spans_from_the_rest_candles() -> None:
    """Missed trades: those minutes close once, from the exchange's candles, not the trades."""
    bars = LiveBars(min_interval_ms=0)
    out = bars.trade(Trade(BTC, 1, 100.0, 1.0, BASE - M + 1), us(BASE - M + 2))
    out += bars.trade(Trade(BTC, 2, 100.0, 1.0, BASE + 1_000), us(BASE + 1_001))  # no gap
    out += bars.trade(Trade(BTC, 5, 104.0, 1.0, BASE + M + 1_000), us(BASE + M + 1_001))
    out += bars.trade(Trade(BTC, 6, 105.0, 1.0, BASE + 2 * M + 1), us(BASE + 2 * M + 2))
    assert bars.total().trade_gaps == 2
    assert [t.minute for t in out if t.closed] == []  # BASE - M: first seen; BASE, BASE + M: gap
    now = BASE + 2 * M + REPAIR_DELAY_MS
    assert bars.repairs_due(now) == {BTC: (BASE - M, BASE + M)}
    rest = [
        candle(BASE + i * M, 101.0 + i, 9.0, BASE + (i + 1) * M, closed=True) for i in (-1, 0, 1)
    ]
    repaired = valid(bars.repair(BTC, rest, us(now)))
    assert [(t.minute, t.close, t.volume, t.closed) for t in repaired] == [
        (BASE - M, 100.0, 9.0, True),
        (BASE, 101.0, 9.0, True),
        (BASE + M, 102.0, 9.0, True),
    ]
    assert bars.total().repaired == 3 and bars.repairs_due(now + M) == {}
    # Late trades of repaired minutes are refused; the minute after closes from its trades.
    assert bars.trade(Trade(BTC, 7, 1.0, 1.0, BASE + M + 5), us(now)) == []
    (closed,) = [
        t
        for t in bars.trade(Trade(BTC, 8, 106.0, 1.0, BASE + 3 * M), us(BASE + 3 * M + 1))
        if t.closed
    ]
    assert (closed.minute, closed.close) == (BASE + 2 * M, 105.0)


def history(bars: LiveBars, minutes: int, *, close: float = 10.0, volume: float = 5.0) -> None:
    """Closed minutes 0 .. minutes-1 of ETH, as the stream's final klines."""
    for i in range(minutes):
        update = CandleUpdate(
            ETH, BASE + i * M, close, close, close, close, volume, 3, True, BASE + (i + 1) * M - 1
        )
        bars.candle(update, us(BASE + (i + 1) * M))


def test_a_final_candle_after_the_next_minute_started_corrects_the_published_close() -> None:
    """Binance's k.x of a minute arriving after the next minute's first update is stored."""
    bars = LiveBars(min_interval_ms=0)
    bars.candle(candle(BASE, 11.0, 5.0, BASE + 50_000), us(BASE + 50_000))
    (early,) = [
        t
        for t in bars.candle(candle(BASE + M, 11.0, 0.1, BASE + M + 5), us(BASE + M + 6))
        if t.closed
    ]
    assert (early.minute, early.volume) == (BASE, 5.0)
    (final,) = valid(
        bars.candle(candle(BASE, 12.0, 5.2, BASE + M - 1, closed=True), us(BASE + M + 300))
    )
    assert (final.minute, final.closed, final.close, final.volume) == (BASE, True, 12.0, 5.2)
    assert final.seq > early.seq and bars.total().corrected == 1
    # The same final word again, or an older forming update, changes nothing.
    assert bars.candle(candle(BASE, 12.0, 5.2, BASE + M - 1, closed=True), us(BASE + M + 400)) == []
    assert bars.candle(candle(BASE, 13.0, 9.0, BASE + 40_000), us(BASE + M + 500)) == []
    assert (bars.total().corrected, bars.total().late) == (1, 1)


def test_without_a_final_flag_a_newer_update_of_a_closed_minute_corrects_it() -> None:
    """Kraken: the next interval closes a minute; a later update of it is the exchange's word."""
    bars = LiveBars(min_interval_ms=0)
    bars.candle(candle(BASE, 11.0, 5.0, BASE + 50_000), us(BASE + 50_000))
    bars.candle(candle(BASE + M, 11.0, 1.0, BASE + M + 5), us(BASE + M + 6))
    (fixed,) = valid(bars.candle(candle(BASE, 11.5, 6.0, BASE + 59_000), us(BASE + M + 20)))
    assert (fixed.minute, fixed.closed, fixed.volume) == (BASE, True, 6.0)
    assert bars.candle(candle(BASE, 11.0, 5.5, BASE + 55_000), us(BASE + M + 30)) == []
    assert (bars.total().corrected, bars.total().late) == (1, 1)


def test_a_frame_dated_ahead_is_refused_and_stamps_never_pass_the_receive_clock() -> None:
    """Minutes ahead: refused, counted, no minute closed; a second ahead: clamped to receipt."""
    bars = LiveBars(min_interval_ms=0)
    bars.candle(candle(BASE, 11.0, 5.0, BASE + 1_000), us(BASE + 1_000))
    ahead = candle(BASE + 4 * M, 11.0, 0.2, BASE + 4 * M + 1)
    assert bars.candle(ahead, us(BASE + 2_000)) == []
    assert bars.total().ahead == 1 and bars.closed_through(ETH) is None
    (tick,) = bars.candle(candle(BASE, 11.0, 6.0, BASE + 4_000), us(BASE + 3_000))
    assert (tick.exchange_ts, tick.closed, tick.volume) == (BASE + 3_000, False, 6.0)


def test_an_implausible_forming_value_is_never_published_and_its_minute_closes_from_rest() -> None:
    """A forming price 1e6 x the market's, corrected a second later: the bad one never goes
    out, the good one does, and the minute's close waits for REST's candle."""
    bars = LiveBars(min_interval_ms=0)
    history(bars, 10)
    minute = BASE + 10 * M
    bad = CandleUpdate(ETH, minute, 10.0, 1e7, 10.0, 1e7, 5.0, 3, False, minute + 1_000)
    assert bars.candle(bad, us(minute + 1_000)) == []
    (good,) = bars.candle(candle(minute, 10.5, 5.0, minute + 2_000), us(minute + 2_000))
    assert (good.close, good.closed) == (10.5, False)
    assert bars.candle(candle(minute, 10.6, 6.0, minute + M - 1, closed=True), us(minute + M)) == []
    assert bars.repairs_due(minute + M + REPAIR_DELAY_MS) == {ETH: (minute, minute)}
    rest = CandleUpdate(ETH, minute, 10.0, 10.7, 10.0, 10.6, 6.0, 4, True, minute + M)
    (final,) = valid(bars.repair(ETH, [rest], us(minute + M + REPAIR_DELAY_MS)))
    assert (final.minute, final.closed, final.high, final.trades) == (minute, True, 10.7, 4)
    assert (bars.total().implausible, bars.total().repaired) == (1, 1)


def test_an_implausible_closed_value_without_rest_confirmation_is_dropped() -> None:
    """A closed kline with a volume 1e12 x the market's: never published without REST."""
    bars = LiveBars(min_interval_ms=0)
    history(bars, 10)
    minute = BASE + 10 * M
    bad = CandleUpdate(ETH, minute, 10.0, 10.0, 10.0, 10.0, 5e12, 3, True, minute + M - 1)
    assert bars.candle(bad, us(minute + M)) == []
    assert bars.repair(ETH, [], us(minute + M + REPAIR_GIVE_UP_MS)) == []
    assert (bars.total().implausible, bars.total().implausible_dropped) == (1, 1)
    assert bars.repairs_due(minute + 10 * M) == {}


def test_trade_gap_minutes_without_a_delivered_trade_are_published_from_rest() -> None:
    """Coinbase: a trade-id gap spanning minutes with no trade seen closes them from REST."""
    bars = LiveBars(min_interval_ms=0)
    bars.trade(Trade(BTC, 1, 100.0, 1.0, BASE + 1_000), us(BASE + 1_000))
    bars.trade(Trade(BTC, 2, 100.0, 1.0, BASE + 2_000), us(BASE + 2_000))
    bars.trade(Trade(BTC, 9, 101.0, 1.0, BASE + 3 * M + 1), us(BASE + 3 * M + 2))
    now = BASE + 3 * M + REPAIR_DELAY_MS
    assert bars.repairs_due(now) == {BTC: (BASE, BASE + 2 * M)}
    rest = [
        CandleUpdate(BTC, BASE + i * M, 100.0, 100.0, 100.0, 100.0, 2.0 + i, None, True, 0)
        for i in range(3)
    ]
    published = valid(bars.repair(BTC, rest, us(now)))
    assert [(t.minute, t.volume) for t in published] == [
        (BASE, 2.0),
        (BASE + M, 3.0),
        (BASE + 2 * M, 4.0),
    ]
    assert bars.repairs_due(now + 10 * M) == {}


def test_reconciliation_corrects_fills_and_is_idempotent() -> None:
    """A stored minute that differs from REST is corrected, a missing one filled, once."""
    rules = TrustRules(reconcile_after_ms=120_000, reconcile_settle_ms=30_000)
    bars = LiveBars(min_interval_ms=0, rules=rules)
    history(bars, 4)
    due = BASE + M + 120_000  # the oldest minute ended 120 s ago; REST settled up to BASE + M
    assert bars.reconcile_due(due - 1) == []
    assert bars.reconcile_due(due) == [(ETH, BASE, BASE + M)]
    now = BASE + 5 * M + 30_000
    assert bars.reconcile_due(now) == [(ETH, BASE, BASE + 3 * M)]
    rest = [
        CandleUpdate(ETH, BASE + i * M, 10.0, 10.0, 10.0, 10.0, v, 3, True, 0)
        for i, v in ((0, 5.0), (1, 5.5), (3, 5.0))
    ]
    out = valid(bars.reconcile(ETH, rest, BASE, BASE + 3 * M, us(now)))
    assert [(t.minute, t.volume, t.closed) for t in out] == [(BASE + M, 5.5, True)]
    counters = bars.total()
    assert (counters.reconciled, counters.corrected, counters.unconfirmed) == (3, 1, 1)
    assert bars.reconcile_due(now + 10 * M) == []  # nothing closed since
    assert bars.reconcile(ETH, rest, BASE, BASE + 3 * M, us(now)) == []


def test_a_suspected_market_is_reconciled_at_once_and_its_forming_minute_closes_from_rest() -> None:
    """After the watchdog's suspicion the forming minute waits for REST and the minutes since
    are due for reconciliation without waiting for the usual delay."""
    rules = TrustRules(reconcile_after_ms=600_000, reconcile_settle_ms=0)
    bars = LiveBars(min_interval_ms=0, rules=rules)
    history(bars, 3)
    bars.candle(candle(BASE + 3 * M, 10.0, 0.6, BASE + 3 * M + 5), us(BASE + 3 * M + 5))
    bars.suspect(ETH, BASE + 2 * M + 30_000)
    assert bars.close_due(us(BASE + 4 * M + 5_000)) == []
    assert bars.reconcile_due(BASE + 4 * M + 5_000) == [(ETH, BASE, BASE + 3 * M)]
    rest = CandleUpdate(ETH, BASE + 3 * M, 10.0, 10.0, 10.0, 10.0, 1.6, 9, True, 0)
    (fixed,) = bars.repair(ETH, [rest], us(BASE + 4 * M + REPAIR_DELAY_MS))
    assert (fixed.minute, fixed.volume, fixed.closed) == (BASE + 3 * M, 1.6, True)


def test_every_implausible_trade_is_counted_and_its_minute_closes_from_rest() -> None:
    """Two wild trades in one minute: both counted, nothing published until REST decides."""
    bars = LiveBars(min_interval_ms=0)
    for i in range(6):  # closed minutes 0-5 at 100
        bars.trade(Trade(BTC, i + 1, 100.0, 1.0, BASE + i * M + 1), us(BASE + i * M + 2))
    bars.repair(BTC, [], us(BASE + 10 * M + REPAIR_GIVE_UP_MS))  # the first minute, given up
    minute = BASE + 6 * M
    out = bars.trade(Trade(BTC, 7, 100.0, 1.0, minute + 1), us(minute + 2))
    out += bars.trade(Trade(BTC, 8, 1e6, 1.0, minute + 3), us(minute + 4))
    out += bars.trade(Trade(BTC, 9, 100.0, 1.0, minute + 5), us(minute + 6))
    out += bars.trade(Trade(BTC, 10, 2e6, 1.0, minute + 7), us(minute + 8))
    assert bars.total().implausible == 2
    assert all(t.high < 1e6 for t in out)
    assert bars.close_due(us(minute + M + 5_000)) == []
    assert bars.repairs_due(minute + M + REPAIR_DELAY_MS) == {BTC: (minute, minute)}


def test_a_market_whose_rest_requests_fail_waits_its_turn_and_still_gives_up_in_time() -> None:
    """After a failure a market is not due for REST for a while (doubling); its held minutes
    are still handed over at the give-up time; a success resets the wait."""
    rules = TrustRules(reconcile_after_ms=1_000, reconcile_settle_ms=0)
    bars = LiveBars(min_interval_ms=0, rules=rules)
    history(bars, 3)
    now = BASE + 5 * M
    assert [due[0] for due in bars.reconcile_due(now)] == [ETH]
    bars.rest_failed(ETH, now)
    assert bars.reconcile_due(now + 4_999) == [] and bars.reconcile_due(now + 5_000) != []
    bars.rest_failed(ETH, now + 5_000)
    assert bars.reconcile_due(now + 14_999) == [] and bars.reconcile_due(now + 15_000) != []
    bars.rest_answered(ETH)
    assert bars.reconcile_due(now + 5_001) != []
    bars.reconcile(ETH, [], BASE, BASE + 2 * M, us(now + 15_000))
    bars.candle(candle(BASE + 5 * M, 10.0, 5.0, BASE + 5 * M + 1), us(BASE + 5 * M + 1))
    bars.suspect(ETH, BASE + 5 * M)
    bars.close_due(us(BASE + 6 * M + 5_000))
    held = BASE + 6 * M + REPAIR_DELAY_MS
    bars.rest_failed(ETH, held)
    assert bars.repairs_due(held + 1) == {}  # waiting after the failure
    assert bars.repairs_due(BASE + 6 * M + REPAIR_GIVE_UP_MS) == {ETH: (BASE + 5 * M, BASE + 5 * M)}


def test_a_reconciliation_page_with_bad_rows_leaves_its_range_due_again() -> None:
    """The minutes of a page REST answered with bad rows are compared again on a later turn,
    and a differing one is then corrected."""
    rules = TrustRules(reconcile_after_ms=1_000, reconcile_settle_ms=0)
    bars = LiveBars(min_interval_ms=0, rules=rules)
    history(bars, 3)
    now = BASE + 5 * M
    good = [
        CandleUpdate(ETH, BASE + i * M, 10.0, 10.0, 10.0, 10.0, 5.0, 3, True, 0) for i in (0, 2)
    ]
    assert bars.reconcile(ETH, good, BASE, BASE + 2 * M, us(now), complete=False) == []
    assert bars.reconcile_due(now) == [(ETH, BASE, BASE + 2 * M)]  # due again at once
    fixed = CandleUpdate(ETH, BASE + M, 10.0, 10.0, 10.0, 10.0, 6.0, 3, True, 0)
    (tick,) = bars.reconcile(ETH, [*good, fixed], BASE, BASE + 2 * M, us(now + 1))
    assert (tick.minute, tick.volume) == (BASE + M, 6.0)
    assert bars.reconcile_due(now + 2) == []
