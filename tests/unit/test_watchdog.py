"""MarketWatchdog: a market silent while its connection is busy is found once, then recovers."""

from __future__ import annotations

from tickstream_shared.naming import Market
from tickstream_watcher.watchdog import MarketWatchdog

BUSY = Market("binance", "btc", "usdt")
QUIET = Market("binance", "nkn", "usdt")
S = 1_000


def test_a_market_silent_on_a_busy_connection_is_stale_until_heard_again() -> None:
    """Silent past its bound while another market updates: stale once; heard: live again."""
    dog = MarketWatchdog(min_silence_ms=60 * S, factor=10.0)
    for t in range(0, 30 * S, 2 * S):  # both update every 2 s: usual gap 2 s, bound 60 s
        dog.heard(BUSY, t)
        dog.heard(QUIET, t)
    last = 28 * S
    for t in range(30 * S, 200 * S, 2 * S):
        dog.heard(BUSY, t)
        found = dog.silent([BUSY, QUIET], t)
        if t - last <= 60 * S:
            assert found == [], t
        elif t - last == 62 * S:
            assert found == [QUIET] and dog.stale == {QUIET}
        else:
            assert found == []  # reported once
    assert dog.detected == {"binance": 1}
    dog.heard(QUIET, 200 * S)
    assert dog.stale == set() and dog.silent([BUSY, QUIET], 201 * S) == []


def test_a_connection_silent_as_a_whole_is_not_the_market_watchdogs_business() -> None:
    """When no market of the connection was heard recently, nothing is reported."""
    dog = MarketWatchdog(min_silence_ms=60 * S)
    for t in range(0, 10 * S, S):
        dog.heard(BUSY, t)
        dog.heard(QUIET, t)
    assert dog.silent([BUSY, QUIET], 500 * S) == []


def test_a_thin_market_gets_a_bound_from_its_own_usual_gap() -> None:
    """A market trading every 5 minutes is not stale after 6 minutes; after 50 it is."""
    dog = MarketWatchdog(min_silence_ms=60 * S, max_silence_ms=1_800 * S, factor=10.0)
    for t in range(0, 3_000 * S, 300 * S):
        dog.heard(QUIET, t)
    last = 2_700 * S
    dog.heard(BUSY, last + 360 * S)
    assert dog.silent([BUSY, QUIET], last + 360 * S) == []
    dog.heard(BUSY, last + 3_001 * S)
    assert dog.silent([BUSY, QUIET], last + 3_001 * S) == [QUIET]  # past 10 x 300 s


def test_never_heard_markets_are_timed_from_their_subscription_and_zero_turns_it_off() -> None:
    """`expect` starts the clock of a market never heard; min_silence_ms 0 reports nothing."""
    dog = MarketWatchdog(min_silence_ms=60 * S, max_silence_ms=1_800 * S)
    dog.expect([BUSY, QUIET], 0)
    dog.heard(BUSY, 299 * S)
    assert dog.silent([BUSY, QUIET], 299 * S) == []
    dog.heard(BUSY, 301 * S)
    assert dog.silent([BUSY, QUIET], 301 * S) == [QUIET]  # max_silence_ms / 6 = 300 s
    off = MarketWatchdog(min_silence_ms=0)
    off.expect([BUSY, QUIET], 0)
    off.heard(BUSY, 10_000 * S)
    assert off.silent([BUSY, QUIET], 10_000 * S) == []
