"""The hub without sockets: seq filtering, held updates, shared encoding, ranks, slow clients."""

from __future__ import annotations

import json
from typing import Any

from tickstream_gateway.hub import ClientSession, Hub
from tickstream_shared.schemas import MINUTE_MS, Tick

MINUTE = 1_680_000_000_000
BTC = "binance:btc-usdt"


def update(seq: int, minute_index: int = 0, *, market: str = BTC) -> Tick:
    minute = MINUTE + minute_index * MINUTE_MS
    return Tick(
        market=market,
        minute=minute,
        seq=seq,
        exchange_ts=minute + 1000,
        received_ts=minute + 1000,
        open=1.0,
        high=2.0,
        low=1.0,
        close=1.5,
        volume=float(seq),
    )


def sent(session: ClientSession) -> list[dict[str, Any]]:
    return [json.loads(session.queue.get_nowait()) for _ in range(session.queue.qsize())]


async def test_live_updates_continue_history_without_gap_or_overlap() -> None:
    """After history, only updates with seq above the newest history seq are sent, in order."""
    hub = Hub(client_queue=10)
    session = hub.connect()
    hub.hold_market(session, BTC)
    for seq in (1, 2, 3):
        hub.publish_tick(update(seq))
    hub.release_market(session, BTC, after_seq=2)
    hub.publish_tick(update(2))  # the feed lagging behind stored history: not resent
    hub.publish_tick(update(4, 1))
    hub.publish_tick(update(4, 1))  # a duplicate delivery: not resent
    frames = sent(session)
    assert [(f["type"], f["seq"], f["minute"]) for f in frames] == [
        ("bar", 3, MINUTE),
        ("bar", 4, MINUTE + MINUTE_MS),
    ]


async def test_held_updates_are_conflated_per_minute() -> None:
    """Updates arriving during the history query keep only the newest per minute."""
    hub = Hub(client_queue=3)
    session = hub.connect()
    hub.hold_market(session, BTC)
    for seq in range(1, 101):  # far more updates than the queue holds
        hub.publish_tick(update(seq, seq // 50))
    assert not session.overflowed.is_set()
    hub.release_market(session, BTC, after_seq=0)
    assert [(f["seq"], f["volume"]) for f in sent(session)] == [
        (49, 49.0),
        (99, 99.0),
        (100, 100.0),
    ]


async def test_one_encoding_is_shared_by_every_client() -> None:
    """A bar update is encoded once and the same string is queued for each subscriber."""
    hub = Hub(client_queue=5)
    first, second = hub.connect(), hub.connect()
    for session in (first, second):
        hub.hold_market(session, BTC)
        hub.release_market(session, BTC, after_seq=-1)
    hub.publish_tick(update(1))
    assert first.queue.get_nowait() is second.queue.get_nowait()


async def test_recent_bars_follow_every_update() -> None:
    """Every published update reaches the recent store, subscribed or not, one bar per minute."""
    hub = Hub(client_queue=5)
    for seq in range(1, 6):
        hub.publish_tick(update(seq))
    assert hub.recent.of(BTC) == [update(5)]


async def test_slow_client_overflows_instead_of_buffering() -> None:
    """A client whose queue is full is flagged for closing; nothing grows without bound."""
    hub = Hub(client_queue=2)
    session = hub.connect()
    hub.hold_market(session, BTC)
    hub.release_market(session, BTC, after_seq=-1)
    for seq in range(3):
        hub.publish_tick(update(seq))
    assert session.queue.qsize() == 2
    assert session.overflowed.is_set()
    hub.disconnect(session)
    assert hub.dropped_slow_clients == 1


async def test_unsubscribed_markets_receive_nothing() -> None:
    """After drop_market a client gets no more updates of that market."""
    hub = Hub(client_queue=5)
    session = hub.connect()
    hub.hold_market(session, BTC)
    hub.release_market(session, BTC, after_seq=-1)
    hub.drop_market(session, BTC)
    hub.publish_tick(update(1))
    assert session.queue.empty()


async def test_ranks_go_to_the_measure_subscribed() -> None:
    """Rank frames reach clients subscribed to that kind with that measure only."""
    hub = Hub(client_queue=5)
    by_std, by_cv, volume_only = hub.connect(), hub.connect(), hub.connect()
    by_std.rank_measures["price"] = "std"
    by_cv.rank_measures["price"] = "cv"
    volume_only.rank_measures["volume"] = "std"
    hub.publish_ranks("price", "cv", '{"type":"ranks","kind":"price","by":"cv"}')
    assert by_std.queue.empty() and volume_only.queue.empty()
    assert by_cv.queue.get_nowait() == '{"type":"ranks","kind":"price","by":"cv"}'
    assert hub.latest_ranks == {("price", "cv"): '{"type":"ranks","kind":"price","by":"cv"}'}


async def test_routing_state_is_bounded_by_subscriptions() -> None:
    """Unsubscribing made-up markets keeps no state; the last subscriber leaving frees a market."""
    hub = Hub(client_queue=10)
    session = hub.connect()
    for i in range(1000):
        hub.drop_market(session, f"binance:made{i}-usdt")
    assert hub._by_market == {}
    hub.hold_market(session, BTC)
    other = hub.connect()
    hub.hold_market(other, BTC)
    hub.drop_market(session, BTC)
    assert set(hub._by_market) == {BTC}
    hub.disconnect(other)
    assert hub._by_market == {}
