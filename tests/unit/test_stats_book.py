"""Unit and property tests of the MetricBook: seq skipping, event-time clock, staleness, warm-up."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_window import reference_stats
from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick
from tickstream_stats.book import MetricBook, MetricUpdate

M = 60_000
BASE = 28_333_334 * M
BTC = Market("binance", "btc", "usdt")
ETH = Market("binance", "eth", "usdt")


def tick(
    market: Market,
    seq: int,
    minute: int,
    close: float = 10.0,
    volume: float = 1.0,
    quote_volume: float | None = None,
) -> Tick:
    ts = minute + 30_000
    return Tick(
        market.id, minute, seq, ts, ts, close, close, close, close, volume,
        quote_volume=quote_volume,
    )  # fmt: skip


def by_id(updates: list[MetricUpdate]) -> dict[str, MetricUpdate]:
    assert len({u.metric_id for u in updates}) == len(updates)
    return {u.metric_id: u for u in updates}


def test_redelivered_and_out_of_order_ticks_are_skipped() -> None:
    """A tick whose seq is not above its market's last applied seq is counted and skipped."""
    book = MetricBook(window_minutes=10)
    updates = book.apply([tick(BTC, 0, BASE, 10.0), tick(BTC, 1, BASE + M, 14.0)])
    assert set(by_id(updates)) == {"binance:btc-usdt:price", "binance:btc-usdt:volume"}
    assert book.apply([tick(BTC, 1, BASE + M, 99.0), tick(BTC, 0, BASE, 99.0)]) == []
    assert book.skipped_stale == 2
    price = by_id(book.apply([tick(BTC, 2, BASE + 2 * M, 12.0)]))["binance:btc-usdt:price"]
    assert price.stats is not None
    assert (price.stats.count, price.stats.mean) == (3, 12.0)
    assert (price.last_value, price.minute, price.last_ts) == (12.0, BASE + 2 * M, BASE + 150_000)


def test_forming_minute_updates_replace_its_value() -> None:
    """Sixty updates of one forming minute count as one minute with the latest values."""
    book = MetricBook(window_minutes=10)
    updates = book.apply([tick(BTC, i, BASE, 10.0 + i, float(i)) for i in range(60)])
    ids = by_id(updates)
    price, volume = ids["binance:btc-usdt:price"], ids["binance:btc-usdt:volume"]
    assert price.stats is not None and volume.stats is not None
    assert (price.stats.count, price.stats.mean, price.last_value) == (1, 69.0, 69.0)
    assert (volume.stats.count, volume.stats.mean, volume.last_value) == (1, 59.0, 59.0)


def test_tick_older_than_the_window_is_skipped() -> None:
    """A tick whose minute left the window is counted in skipped_old and changes nothing."""
    book = MetricBook(window_minutes=5)
    book.apply([tick(BTC, 0, BASE + 10 * M)])
    assert book.apply([tick(BTC, 1, BASE + 5 * M, 99.0)]) == []
    assert book.skipped_old == 1
    assert book.apply([tick(ETH, 0, BASE + 5 * M)]) == []
    assert book.skipped_old == 2


def test_silent_market_ages_on_the_shared_clock_and_goes_stale_then_gone() -> None:
    """Ticks of another market move the clock: a silent window ages, goes stale, empties."""
    book = MetricBook(window_minutes=10, stale_seconds=300)
    book.apply([tick(BTC, i, BASE + i * M, 10.0 + i) for i in range(4)])
    updates = by_id(book.apply([tick(ETH, 0, BASE + 8 * M)]))
    btc = updates["binance:btc-usdt:price"]
    assert btc.stats is not None
    assert (btc.stats.count, btc.clock, btc.stale) == (4, BASE + 8 * M, False)  # 300 s behind
    btc = by_id(book.apply([tick(ETH, 1, BASE + 9 * M)]))["binance:btc-usdt:price"]
    assert btc.stats is not None
    assert (btc.stats.count, btc.clock, btc.stale, btc.minute) == (
        4,
        BASE + 9 * M,
        True,
        BASE + 3 * M,
    )
    assert updates["binance:eth-usdt:price"].stale is False
    updates = by_id(book.apply([tick(ETH, 2, BASE + 11 * M)]))
    btc = updates["binance:btc-usdt:price"]
    assert btc.stats is not None
    assert (btc.stats.count, btc.stats.min, btc.stats.max) == (2, 12.0, 13.0)
    updates = by_id(book.apply([tick(ETH, 3, BASE + 13 * M)]))
    assert updates["binance:btc-usdt:price"].gone
    assert updates["binance:btc-usdt:volume"].gone
    # Gone is said once; the empty market is not reported again.
    assert set(by_id(book.apply([tick(ETH, 4, BASE + 14 * M)]))) == {
        "binance:eth-usdt:price",
        "binance:eth-usdt:volume",
    }


def test_stale_market_returns_when_it_trades_again() -> None:
    """Stale when the clock is more than stale_seconds past its newest minute, live on a new one."""
    book = MetricBook(window_minutes=60, stale_seconds=300)
    book.apply([tick(BTC, 0, BASE)])
    assert not by_id(book.advance_clock(BASE + 5 * M))["binance:btc-usdt:price"].stale
    assert by_id(book.advance_clock(BASE + 6 * M))["binance:btc-usdt:price"].stale
    back = by_id(book.apply([tick(BTC, 1, BASE + 6 * M, 12.0)]))["binance:btc-usdt:price"]
    assert back.stale is False and back.stats is not None and back.stats.count == 2


def test_advance_clock_updates_every_market_and_never_goes_back() -> None:
    """advance_clock reports every market with data at the new clock; an older clock is a no-op."""
    book = MetricBook(window_minutes=10)
    book.apply([tick(BTC, 0, BASE), tick(ETH, 0, BASE + M)])
    updates = book.advance_clock(BASE + 2 * M)
    assert sorted(u.metric_id for u in updates) == [
        "binance:btc-usdt:price",
        "binance:btc-usdt:volume",
        "binance:eth-usdt:price",
        "binance:eth-usdt:volume",
    ]
    assert {u.clock for u in updates} == {BASE + 2 * M}
    assert book.advance_clock(BASE + 2 * M) == []
    assert book.advance_clock(BASE) == []
    assert book.clock == BASE + 2 * M


def test_raised_clock_ages_only_the_markets_that_did_not_tick() -> None:
    """After raise_clock and apply, age() updates just the markets still behind the clock."""
    book = MetricBook(window_minutes=3, stale_seconds=60)
    book.apply([tick(BTC, 0, BASE), tick(ETH, 0, BASE)])
    assert book.raise_clock(BASE + 2 * M) and not book.raise_clock(BASE + M)
    ticked = by_id(book.apply([tick(BTC, 1, BASE + 2 * M, 12.0)]))
    assert set(ticked) == {"binance:btc-usdt:price", "binance:btc-usdt:volume"}
    aged = by_id([u for updates in book.age() for u in updates])
    assert set(aged) == {"binance:eth-usdt:price", "binance:eth-usdt:volume"}
    eth = aged["binance:eth-usdt:price"]
    assert (eth.clock, eth.stale) == (BASE + 2 * M, True)
    assert eth.stats is not None and eth.stats.count == 1
    assert list(book.age()) == []  # every window now ends at the clock
    # Four minutes on, ETH's only minute has left its window (gone); BTC keeps BASE + 2M.
    book.raise_clock(BASE + 4 * M)
    later = by_id([u for updates in book.age() for u in updates])
    assert later["binance:eth-usdt:volume"].gone
    btc = later["binance:btc-usdt:price"].stats
    assert btc is not None and (btc.count, btc.mean) == (1, 12.0)


def test_warm_loads_newest_seq_per_minute_without_double_counting() -> None:
    """Stored bars load once (newest seq per minute), twice alike; re-deliveries are skipped."""
    book = MetricBook(window_minutes=10)
    book.advance_clock(BASE + 4 * M)
    bars = [tick(BTC, 3, BASE, 11.0), tick(BTC, 1, BASE, 99.0), tick(BTC, 7, BASE + 2 * M, 13.0)]
    first = by_id(book.warm(BTC, bars))
    again = by_id(book.warm(BTC, bars))
    assert first == again
    price = first["binance:btc-usdt:price"]
    assert price.stats is not None
    assert (price.stats.count, price.stats.mean, price.last_value) == (2, 12.0, 13.0)
    assert price.clock == BASE + 4 * M
    assert book.apply([tick(BTC, 7, BASE + 2 * M, 50.0)]) == []
    assert book.skipped_stale == 1
    after = by_id(book.apply([tick(BTC, 8, BASE + 2 * M, 15.0)]))["binance:btc-usdt:price"]
    assert after.stats is not None and after.stats.mean == 13.0


def test_warm_of_bars_newer_than_the_clock_raises_it() -> None:
    """A stored bar after the book's clock moves the clock, and other markets age with it."""
    book = MetricBook(window_minutes=3)
    book.apply([tick(ETH, 0, BASE)])
    updates = by_id(book.warm(BTC, [tick(BTC, 0, BASE + 5 * M)]))
    assert book.clock == BASE + 5 * M
    assert updates["binance:eth-usdt:price"].gone
    assert updates["binance:btc-usdt:price"].stats is not None


def test_forget_drops_the_market() -> None:
    """A forgotten market is no longer owned; forgetting twice is harmless."""
    book = MetricBook(window_minutes=10)
    book.apply([tick(BTC, 0, BASE)])
    assert BTC in book and book.markets == [BTC]
    book.forget(BTC)
    book.forget(BTC)
    assert BTC not in book and book.advance_clock(BASE + M) == []


def test_turnover_comes_only_from_ticks_that_say_their_quote_volume() -> None:
    """A market whose ticks carry no quote volume has no turnover metric (not a zero one)."""
    book = MetricBook(window_minutes=10)
    updates = by_id(
        book.apply(
            [
                tick(BTC, 0, BASE, 10.0, 2.0, 20.5),
                tick(BTC, 1, BASE + M, 12.0, 3.0),  # a minute whose quote volume is unknown
                tick(BTC, 2, BASE + 2 * M, 11.0, 1.0, 11.25),
                tick(ETH, 0, BASE + 2 * M, 5.0, 4.0),
            ]
        )
    )
    assert set(updates) == {
        "binance:btc-usdt:price",
        "binance:btc-usdt:volume",
        "binance:btc-usdt:turnover",
        "binance:eth-usdt:price",
        "binance:eth-usdt:volume",
    }
    turnover, volume = updates["binance:btc-usdt:turnover"], updates["binance:btc-usdt:volume"]
    assert turnover.kind == "turnover" and turnover.stats is not None
    assert (turnover.stats.count, turnover.stats.mean) == (2, 15.875)
    assert (turnover.stats.min, turnover.stats.max, turnover.stats.logret) == (11.25, 20.5, None)
    assert (turnover.minute, turnover.last_value) == (BASE + 2 * M, 11.25)
    assert volume.stats is not None and volume.stats.count == 3


def test_a_newer_word_without_quote_volume_makes_its_minute_unknown() -> None:
    """A correction that lacks the quote volume removes the minute's turnover; none left: gone."""
    book = MetricBook(window_minutes=10)
    book.apply([tick(BTC, 0, BASE, quote_volume=5.0), tick(BTC, 1, BASE + M, quote_volume=7.0)])
    turnover = by_id(book.apply([tick(BTC, 2, BASE, 10.0, 1.0)]))["binance:btc-usdt:turnover"]
    assert turnover.stats is not None
    assert (turnover.stats.count, turnover.stats.mean, turnover.minute) == (1, 7.0, BASE + M)
    gone = by_id(book.apply([tick(BTC, 3, BASE + M, 10.0, 1.0)]))["binance:btc-usdt:turnover"]
    assert gone.gone and (gone.minute, gone.last_value) == (BASE + M, 7.0)
    # Gone is said once; a later known quote volume brings the metric back.
    assert "binance:btc-usdt:turnover" not in by_id(book.apply([tick(BTC, 4, BASE + 2 * M)]))
    back = by_id(book.apply([tick(BTC, 5, BASE + 2 * M, quote_volume=9.0)]))
    assert back["binance:btc-usdt:turnover"].stats is not None


def test_turnover_ages_goes_stale_and_warms_like_volume() -> None:
    """Turnover leaves the window with its minutes, is stale by its newest known minute, warms."""
    book = MetricBook(window_minutes=5, stale_seconds=120)
    book.apply([tick(BTC, 0, BASE, quote_volume=4.0), tick(BTC, 1, BASE + M, quote_volume=6.0)])
    updates = by_id(book.apply([tick(BTC, 2, BASE + 4 * M)]))  # newest minute: quote unknown
    turnover = updates["binance:btc-usdt:turnover"]
    assert turnover.stale and not updates["binance:btc-usdt:volume"].stale
    assert turnover.stats is not None and turnover.stats.count == 2
    aged = by_id(book.advance_clock(BASE + 5 * M))["binance:btc-usdt:turnover"]
    assert aged.stats is not None and (aged.stats.count, aged.stats.mean) == (1, 6.0)
    assert by_id(book.advance_clock(BASE + 6 * M))["binance:btc-usdt:turnover"].gone
    bars = [tick(ETH, 3, BASE + 5 * M, quote_volume=8.0), tick(ETH, 1, BASE + 5 * M)]
    warmed = by_id(book.warm(ETH, bars))["binance:eth-usdt:turnover"]
    assert warmed.stats is not None and (warmed.stats.count, warmed.last_value) == (1, 8.0)


_TICKS = st.lists(
    st.tuples(
        st.sampled_from([BTC, ETH]),
        st.integers(min_value=-15, max_value=2),  # minutes after the market's last tick
        st.sampled_from([1.0, 2.5, 100000.0, 100000.000001, 0.3]),
        st.sampled_from([0.0, 1.0, 7.25]),
        st.sampled_from([None, 0.0, 3.5, 12345.678]),  # quote volume (None: unknown)
        st.booleans(),  # True: re-deliver an already used seq
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(steps=_TICKS, batch=st.integers(min_value=1, max_value=10))
def test_book_matches_brute_force_reference(
    steps: list[tuple[Market, int, float, float, float | None, bool]], batch: int
) -> None:
    """Every metric's last reported state equals a brute-force model of the same ticks."""
    window_minutes, stale_ms = 10, 180_000
    book = MetricBook(window_minutes=window_minutes, stale_seconds=stale_ms // 1000)
    seqs = {BTC: 0, ETH: 0}
    last_minute = {BTC: BASE, ETH: BASE}
    ticks = []
    for market, offset, close, volume, quote_volume, redeliver in steps:
        minute = max(last_minute[market] + offset * M, 0)
        if not redeliver:
            seqs[market] += 1
        ticks.append(tick(market, seqs[market], minute, close, volume, quote_volume))
        last_minute[market] = max(last_minute[market], minute)
    reported: dict[str, MetricUpdate] = {}
    for start in range(0, len(ticks), batch):
        reported.update(by_id(book.apply(ticks[start : start + batch])))

    # The model: apply in order, skip seqs not above the last applied, drop too-old minutes.
    clock = -1
    applied: dict[Market, dict[int, tuple[float, float]]] = {BTC: {}, ETH: {}}
    # Turnover: (close, quote volume) of the minutes whose newest applied word says it.
    turnover: dict[Market, dict[int, tuple[float, float]]] = {BTC: {}, ETH: {}}
    last_seq = {BTC: -1, ETH: -1}
    newest: dict[Market, tuple[int, float, float]] = {}
    skipped_stale = skipped_old = 0
    for t in ticks:
        market = Market.parse(t.market)
        if t.seq <= last_seq[market]:
            skipped_stale += 1
            continue
        last_seq[market] = t.seq
        clock = max(clock, t.minute)
        if t.minute <= clock - window_minutes * M:
            skipped_old += 1
            continue
        applied[market][t.minute] = (t.close, t.volume)
        if t.quote_volume is None:
            turnover[market].pop(t.minute, None)
        else:
            turnover[market][t.minute] = (t.close, t.quote_volume)
        if market not in newest or t.minute >= newest[market][0]:
            newest[market] = (t.minute, t.close, t.volume)
    assert (book.clock, book.skipped_stale, book.skipped_old) == (clock, skipped_stale, skipped_old)
    for market, bars in applied.items():
        live = {m: v for m, v in bars.items() if m > clock - window_minutes * M}
        price_id = market.metric_id("price")
        if not live:
            assert price_id not in reported or reported[price_id].gone
            continue
        price, volume = reported[price_id], reported[market.metric_id("volume")]
        assert (price.stats, volume.stats) == reference_stats(live)
        minute, close, vol = newest[market]
        assert (price.minute, price.last_value, volume.last_value) == (minute, close, vol)
        assert price.stale == (clock - minute > stale_ms) == volume.stale
        assert price.clock == clock
        known = {m: v for m, v in turnover[market].items() if m > clock - window_minutes * M}
        turnover_id = market.metric_id("turnover")
        if not known:
            assert turnover_id not in reported or reported[turnover_id].gone
            continue
        value = reported[turnover_id]
        assert value.stats == reference_stats(known)[1]
        newest_known = max(known)
        assert (value.minute, value.last_value) == (newest_known, known[newest_known][1])
        assert value.stale == (clock - newest_known > stale_ms)
        assert value.clock == clock
