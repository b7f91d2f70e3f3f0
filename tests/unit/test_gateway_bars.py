"""The gateway's recent-bars store and history merge: one bar per minute, bounded by minutes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tickstream_gateway.bars import RECENT_MINUTES, RECENT_SECONDS, RecentBars, merge_history
from tickstream_shared.schemas import MINUTE_MS, Tick

MINUTE = 1_680_000_000_000
BTC = "binance:btc-usdt"
ETH = "binance:eth-usdt"


def update(seq: int, minute_index: int, *, market: str = BTC, volume: float = 1.0) -> Tick:
    minute = MINUTE + minute_index * MINUTE_MS
    return Tick(
        market=market,
        minute=minute,
        seq=seq,
        exchange_ts=minute + seq % MINUTE_MS,
        received_ts=minute + seq % MINUTE_MS,
        open=10.0,
        high=12.0,
        low=9.0,
        close=11.0,
        volume=volume,
    )


def test_forming_bar_is_replaced_in_place() -> None:
    """Updates of one minute replace each other: one bar per minute, the largest seq."""
    recent = RecentBars()
    for seq in range(20):
        assert recent.add(update(seq, 0, volume=float(seq)), now=0.0)
    assert recent.of(BTC) == [update(19, 0, volume=19.0)]


def test_older_update_never_replaces_a_newer_one() -> None:
    """An update with a smaller or equal seq than the held one is ignored."""
    recent = RecentBars()
    recent.add(update(5, 0, volume=5.0), now=0.0)
    assert not recent.add(update(4, 0, volume=4.0), now=0.0)
    assert not recent.add(update(5, 0, volume=99.0), now=0.0)
    assert recent.of(BTC) == [update(5, 0, volume=5.0)]


def test_live_feed_keeps_the_last_minutes_per_market() -> None:
    """At real-time pace only the newest RECENT_MINUTES + 1 minutes are kept, whatever the rate."""
    recent = RecentBars()
    seq = 0
    for minute_index in range(30):
        for second in range(20):  # 20 updates per minute, arriving in real time
            seq += 1
            recent.add(update(seq, minute_index), now=minute_index * 60.0 + second * 3)
    recent.add(update(1, 3, market=ETH), now=30 * 60.0)
    kept = recent.of(BTC)
    assert [b.minute for b in kept] == [
        MINUTE + i * MINUTE_MS for i in range(29 - RECENT_MINUTES, 30)
    ]
    assert [b.seq for b in kept] == [20 * (i + 1) for i in range(29 - RECENT_MINUTES, 30)]
    assert recent.of(ETH) == [update(1, 3, market=ETH)]
    # A late update for a minute already out of the bound is not kept.
    assert not recent.add(update(10_000, 29 - RECENT_MINUTES - 1), now=30 * 60.0)
    assert sorted(recent.markets) == [BTC, ETH]


def test_fast_replay_keeps_what_arrived_in_the_last_seconds() -> None:
    """Minutes updated within RECENT_SECONDS stay though many event minutes passed since."""
    recent = RecentBars(max_bars=100)
    for i in range(50):  # 50 event minutes within one wall-clock second
        recent.add(update(i, i), now=1000.0 + i / 50)
    assert len(recent.of(BTC)) == 50
    # Once they are older than RECENT_SECONDS, only the minute bound keeps bars.
    recent.add(update(50, 50), now=1000.0 + RECENT_SECONDS + 1)
    assert [b.seq for b in recent.of(BTC)] == list(range(50 - RECENT_MINUTES, 51))


def test_store_never_holds_more_than_max_bars() -> None:
    """However fast minutes arrive, a market holds at most `max_bars` minutes, the newest."""
    recent = RecentBars(max_bars=1441)
    for i in range(5000):
        recent.add(update(i, i), now=0.0)
    kept = recent.of(BTC)
    assert len(kept) == 1441
    assert (kept[0].seq, kept[-1].seq) == (5000 - 1441, 4999)


def test_merge_prefers_the_larger_seq_per_minute() -> None:
    """Stored and live bars of the same minute merge to the one with the larger seq."""
    stored = [update(1, 0), update(2, 1), update(3, 2)]
    live = [update(5, 2), update(6, 3)]
    assert merge_history(stored, live, minutes=1440) == [*stored[:2], *live]
    assert merge_history([update(9, 0)], [update(8, 0)], minutes=1440) == [update(9, 0)]


def test_merge_is_bounded_to_minutes_plus_one() -> None:
    """History ends at the newest minute and reaches back `minutes` minutes: minutes + 1 bars."""
    stored = [update(i, i) for i in range(1500)]
    merged = merge_history(stored, [update(2000, 1500)], minutes=1440)
    assert len(merged) == 1441
    assert merged[0].minute == MINUTE + 60 * MINUTE_MS
    assert merged[-1] == update(2000, 1500)


def test_merge_since_keeps_minutes_at_or_after_it() -> None:
    """`since` drops older minutes; it need not be a minute boundary."""
    stored = [update(i, i) for i in range(10)]
    assert [b.seq for b in merge_history(stored, [], 1440, since=MINUTE + 7 * MINUTE_MS)] == [
        7,
        8,
        9,
    ]
    assert [b.seq for b in merge_history(stored, [], 1440, since=MINUTE + 7 * MINUTE_MS + 1)] == [
        8,
        9,
    ]
    assert merge_history(stored, [], 1440, since=MINUTE + 10 * MINUTE_MS) == []
    assert merge_history([], [], 1440) == []


@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10_000)), max_size=200),
    st.integers(1, 30),
)
def test_store_matches_a_reference(updates: list[tuple[int, int]], bound: int) -> None:
    """In any order, the minutes within the bound hold exactly the largest seq each received."""
    recent = RecentBars(minutes=bound, seconds=0.0, max_bars=10_000)
    reference: dict[int, int] = {}
    newest: int | None = None
    for minute_index, seq in updates:
        recent.add(update(seq, minute_index), now=0.0)
        if newest is not None and minute_index < newest - bound:
            continue  # out of the bound when it arrived: refused
        newest = minute_index if newest is None else max(newest, minute_index)
        reference[minute_index] = max(seq, reference.get(minute_index, -1))
    got = [((b.minute - MINUTE) // MINUTE_MS, b.seq) for b in recent.of(BTC)]
    if newest is None:
        assert got == []
        return
    within = [(m, seq) for m, seq in got if m >= newest - bound]
    assert within == sorted((m, s) for m, s in reference.items() if m >= newest - bound)
    # Anything else held is an expired minute not yet at the front of the queue.
    assert all(m < newest - bound for m, _ in got if (m, _) not in within)


def test_a_loaded_market_keeps_its_whole_history_window_and_no_more() -> None:
    """After a load the market keeps max_bars minutes up to its newest, whatever arrives."""
    recent = RecentBars(max_bars=31)
    recent.add(update(100, 100), now=0.0)
    recent.load(BTC, [update(i, i) for i in range(70, 100)], now=0.0)
    assert [b.seq for b in recent.of(BTC)] == list(range(70, 101))
    seq = 100
    for minute_index in range(101, 200):  # an hour later in wall time: nothing ages out
        for _ in range(10):
            seq += 1
            recent.add(update(seq, minute_index), now=3600.0 + minute_index)
    held = recent.of(BTC)
    assert len(held) == 31 and recent.bars_held() == 31
    assert [b.minute for b in held] == [MINUTE + i * MINUTE_MS for i in range(169, 200)]
    assert held[-1].seq == seq


def test_a_market_is_loaded_only_once_storage_has_the_feeds_first_update() -> None:
    """Storage older than the feed's first update may miss what came before it: not loaded."""
    recent = RecentBars(max_bars=31)
    recent.load(BTC, [update(i, i) for i in range(10)], now=0.0)
    assert not recent.is_loaded(BTC)  # the feed has not delivered this market yet
    recent.add(update(10, 10), now=0.0)
    recent.load(BTC, [update(i, i) for i in range(10)], now=0.0)
    assert not recent.is_loaded(BTC)  # stats has not stored seq 10 yet
    recent.load(BTC, [update(i, i) for i in range(11)], now=0.0)
    assert recent.is_loaded(BTC)
    recent.feed_started()
    assert not recent.is_loaded(BTC)
    assert [b.seq for b in recent.of(BTC)] == list(range(11))


def test_loading_a_market_without_bars_keeps_nothing() -> None:
    """A made-up market loads nothing and leaves no entry behind."""
    recent = RecentBars()
    recent.load("binance:made-up", [], now=0.0)
    assert list(recent.markets) == [] and recent.newest_bar("binance:made-up") is None
    assert recent.version("binance:made-up") == -1


def test_window_and_versions_of_a_loaded_market() -> None:
    """The window ends at the newest minute; `settled` moves unless only the newest bar does."""
    recent = RecentBars(max_bars=11)
    recent.load(BTC, [update(i, i) for i in range(30)], now=0.0)
    assert recent.window_start(BTC) == MINUTE + 19 * MINUTE_MS
    assert [b.seq for b in recent.bars_from(BTC, MINUTE + 27 * MINUTE_MS)] == [27, 28, 29]
    assert [b.seq for b in recent.bars_from(BTC, 0, before=MINUTE + 21 * MINUTE_MS)] == [19, 20]
    version, settled = recent.version(BTC), recent.settled_version(BTC)
    recent.add(update(30, 29), now=0.0)  # the forming bar changes
    assert recent.version(BTC) > version and recent.settled_version(BTC) == settled
    assert recent.newest_bar(BTC) == update(30, 29)
    recent.add(update(31, 28), now=0.0)  # a late update of an older minute
    assert recent.settled_version(BTC) > settled
    settled = recent.settled_version(BTC)
    recent.add(update(32, 30), now=0.0)  # a new minute: the window moves
    assert recent.settled_version(BTC) > settled
    assert recent.window_start(BTC) == MINUTE + 20 * MINUTE_MS
    assert recent.window_start("binance:made-up") is None
