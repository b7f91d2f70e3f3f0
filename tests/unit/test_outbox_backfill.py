"""TickOutbox conflates per market and minute in seq order; BackfillQueue runs one backfill per
market at a time and resumes rather than restarts."""

from __future__ import annotations

import asyncio

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_watcher.backfill import BackfillQueue
from tickstream_watcher.outbox import TickOutbox

T0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS
BTC = Market("binance", "btc", "usdt")
ETH = Market("binance", "eth", "usdt")
SOL = Market("binance", "sol", "usdt")


def tick(market: str, minute: int, seq: int, *, closed: bool = False) -> Tick:
    at = T0 + minute * MINUTE_MS
    return Tick(market, at, seq, at + 1, at + 1, 1.0, 1.0, 1.0, 1.0, float(seq), None, closed)


def test_a_newer_tick_of_a_minute_replaces_the_waiting_one_behind_the_markets_others() -> None:
    """Latest wins per (market, minute), and a market's ticks still leave in seq order."""
    outbox = TickOutbox(rest_room=100)
    outbox.put([tick("a", 0, 1), tick("a", 1, 2), tick("b", 0, 1)])
    outbox.put([tick("a", 0, 3, closed=True)])  # a correction of minute 0 after minute 1
    assert len(outbox) == 3
    taken = outbox.take(10)
    assert [(t.market, t.minute - T0, t.seq) for t in taken] == [
        ("a", MINUTE_MS, 2),
        ("b", 0, 1),
        ("a", 0, 3),
    ]
    assert len(outbox) == 0


def test_the_stream_alone_holds_one_tick_per_market_and_minute_however_many_updates() -> None:
    """A thousand updates of two markets' forming minute leave two ticks waiting."""
    outbox = TickOutbox(rest_room=100)
    for seq in range(1000):
        outbox.put([tick("a", 5, seq), tick("b", 5, seq)])
    assert [(t.market, t.seq) for t in outbox.take(10)] == [("a", 999), ("b", 999)]


def test_take_returns_the_oldest_first_and_at_most_the_number_asked() -> None:
    """Chunks are taken oldest first; the rest waits for the next take."""
    outbox = TickOutbox(rest_room=100)
    outbox.put([tick("a", m, m) for m in range(5)])
    assert [t.seq for t in outbox.take(2)] == [0, 1]
    assert [t.seq for t in outbox.take(10)] == [2, 3, 4]


async def test_rest_producers_wait_for_room_and_go_on_once_taken() -> None:
    """`wait_for_room` waits while `rest_room` ticks wait, and returns once some are taken;
    `wait_ready` returns once a tick waits."""
    outbox = TickOutbox(rest_room=3)
    ready = asyncio.ensure_future(outbox.wait_ready())
    await asyncio.sleep(0)
    assert not ready.done()
    outbox.put([tick("a", m, m) for m in range(3)])
    await ready
    room = asyncio.ensure_future(outbox.wait_for_room())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not room.done()
    outbox.put([tick("a", 3, 3)])  # the stream never waits, even when full
    assert len(outbox) == 4
    outbox.take(2)
    await asyncio.wait_for(room, timeout=5)
    assert len(outbox) == 2


def test_a_reconnect_while_a_backfill_runs_queues_one_more_never_a_second_at_once() -> None:
    """Asked for again while running: claimed again only after it finished, once."""
    queue = BackfillQueue("binance")
    queue.want([BTC, ETH])
    assert queue.claim() == BTC
    queue.want([BTC, ETH])  # the connection reconnected: ETH still waits, BTC runs
    queue.want([BTC, ETH])
    assert queue.claim() == ETH
    assert queue.claim() is None  # BTC is not claimed twice at once
    assert queue.pending == 2
    queue.finished(BTC, complete=True)
    assert queue.claim() == BTC  # once more, for the minutes since the reconnect
    assert queue.claim() is None
    queue.finished(BTC, complete=True)
    queue.finished(ETH, complete=False)
    assert (queue.done, queue.pending, queue.total) == (1, 0, 2)
    assert queue.claim() is None


def test_a_finished_market_is_not_backfilled_until_asked_again() -> None:
    """Done markets stay done; a later want (a reconnect) runs it once, still counted once."""
    queue = BackfillQueue("binance")
    queue.want([BTC])
    market = queue.claim()
    assert market == BTC
    queue.finished(BTC, complete=True)
    assert queue.claim() is None
    queue.want([BTC])
    assert queue.claim() == BTC
    queue.finished(BTC, complete=True)
    assert (queue.done, queue.pending) == (1, 0)


def test_a_forgotten_market_leaves_every_state_and_a_running_one_is_not_counted() -> None:
    """Delisted: no longer waiting, not run again, not counted done, not in the total."""
    queue = BackfillQueue("binance")
    queue.want([BTC, ETH, SOL])
    assert queue.claim() == BTC
    queue.want([BTC])
    queue.forget([BTC, ETH])
    assert queue.claim() == SOL
    queue.finished(BTC, complete=True)
    queue.finished(SOL, complete=True)
    assert queue.claim() is None
    assert (queue.done, queue.pending, queue.total) == (1, 0, 1)


def test_progress_says_markets_requests_minutes_and_an_eta_at_the_rate_so_far() -> None:
    """The log line counts done of all and estimates the rest at the rate so far."""
    queue = BackfillQueue("binance")
    queue.want([BTC, ETH, SOL])
    queue.finished(queue.claim() or BTC, complete=True)
    queue.requests, queue.minutes = 2, 1440
    assert queue.progress(10.0) == (
        "binance: backfill 1/3 markets done, 2 pending, 2 requests, 1440 minutes, ETA 20s"
    )
