"""The hub without sockets: seq filtering, encoding once, conflation, ranks, slow clients."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from tests.unit.gateway_ticks import BTC, MINUTE, alert, update
from tickstream_gateway.hub import ClientSession, Hub, newest_per_bar
from tickstream_gateway.outbox import SLOT_BYTES
from tickstream_gateway.protocol import Subscription, bar_frame
from tickstream_gateway.rankboard import RankBoard, RankEntry
from tickstream_gateway.selection import Selection
from tickstream_shared.naming import MEASURES_BY_KIND, MetricKind, RankMeasure, market_of
from tickstream_shared.schemas import MINUTE_MS

ETH = "binance:eth-usdt"
MIB = 1024 * 1024


def sent(session: ClientSession) -> list[dict[str, Any]]:
    frames = []
    while len(session.outbox):
        frames.append(json.loads(session.outbox.get_nowait().text))
    return frames


def board(kind: MetricKind, measure: RankMeasure, markets: list[str], count: int = 1) -> RankBoard:
    """`markets`' metrics of `kind` ranked in that order, each with `count` minutes."""
    measures = tuple((m, 1.0) for m in MEASURES_BY_KIND[kind])
    return RankBoard(
        kind,
        measure,
        tuple(RankEntry(f"{m}:{kind}", market_of(m), measures, 1.0, count) for m in markets),
    )


def ranks_sub(kind: MetricKind, measure: RankMeasure, **selection: Any) -> Subscription:
    return Subscription("ranks", kind=kind, measure=measure, selection=Selection(**selection))


def watching(hub: Hub, *markets: str) -> ClientSession:
    session = hub.connect()
    for market_id in markets:
        hub.watch_market(session, market_id, after_seq=-1)
    return session


async def test_live_updates_continue_history_without_gap_or_overlap() -> None:
    """After history, only updates with seq above the newest history seq are sent, in order."""
    hub = Hub(client_queue_bytes=MIB)
    session = hub.connect()
    for seq in (1, 2, 3):
        hub.publish_tick(update(seq, closed=seq == 3))
    hub.watch_market(session, BTC, after_seq=3)
    hub.publish_tick(update(2))  # the feed lagging behind stored history: not resent
    hub.publish_tick(update(4, 1, closed=True))
    hub.publish_tick(update(4, 1, closed=True))  # a duplicate delivery: not resent
    hub.publish_tick(update(5, 2, closed=True))
    assert [(f["type"], f["seq"], f["minute"]) for f in sent(session)] == [
        ("bar", 4, MINUTE + MINUTE_MS),
        ("bar", 5, MINUTE + 2 * MINUTE_MS),
    ]


async def test_one_encoding_is_shared_by_every_client() -> None:
    """An update is encoded once: the same Frame and text reach every subscriber."""
    hub = Hub(client_queue_bytes=MIB)
    clients = [watching(hub, BTC) for _ in range(50)]
    hub.publish_tick(update(1))
    hub.publish_alert(alert(1))
    for client in clients:
        client.alerts = True
    hub.publish_alert(alert(2))
    frames = [(c.outbox.get_nowait(), c.outbox.get_nowait()) for c in clients]
    assert all(bar is frames[0][0] and a is frames[0][1] for bar, a in frames)
    bar = json.loads(frames[0][0].text)
    assert (bar["seq"], bar["received_ts"]) == (1, MINUTE + 1500)
    assert json.loads(frames[0][1].text)["alert"]["seq"] == 2


async def test_alert_status_changes_reach_alert_subscribers_in_order() -> None:
    """A provisional alert and then its retraction (same alert_id) both reach every client
    subscribed to alerts, with their status, even one that has not read yet; others get none."""
    hub = Hub(client_queue_bytes=MIB)
    subscribed, other = hub.connect(), watching(hub, BTC)
    subscribed.alerts = True
    raised = alert(1)
    hub.publish_alert(raised)
    hub.publish_alert(
        msgspec.structs.replace(
            raised, status="retracted", status_seq=9, status_ts=MINUTE + 61_000, final_value=2.0
        )
    )
    assert [
        (f["alert"]["alert_id"], f["alert"]["status"], f["alert"]["status_seq"])
        for f in sent(subscribed)
    ] == [(raised.alert_id, "provisional", 1), (raised.alert_id, "retracted", 9)]
    assert sent(other) == []


async def test_a_client_that_stops_reading_resumes_with_the_newest_state() -> None:
    """A client that reads nothing for 10,000 updates is not closed and then gets the newest."""
    hub = Hub(client_queue_bytes=MIB)
    slow, reading = watching(hub, BTC, ETH), watching(hub, BTC)
    slow.ranks["price"] = ranks_sub("price", "std")
    for seq in range(1, 10_001):
        hub.publish_tick(update(seq, market=BTC))
        hub.publish_tick(update(seq, market=ETH))
        if seq % 100 == 0:
            hub.publish_ranks(board("price", "std", [BTC], count=seq))
        reading.outbox.get_nowait()
    assert not slow.outbox.overflowed
    shown = [
        (f["type"], f.get("market"), f.get("seq"), f["ranks"][0]["count"] if "ranks" in f else None)
        for f in sent(slow)
    ]
    assert shown == [
        ("bar", BTC, 10_000, None),
        ("bar", ETH, 10_000, None),
        ("ranks", None, None, 10_000),
    ]
    assert hub.counters.conflated_frames == 2 * 9_999 + 99


async def test_closed_bars_and_alerts_reach_a_slow_client_in_order() -> None:
    """While a client lags, each minute's closing update and every alert are kept, in order."""
    hub = Hub(client_queue_bytes=MIB)
    session = watching(hub, BTC)
    session.alerts = True
    seq = 0
    for minute_index in range(30):
        for _ in range(20):
            seq += 1
            hub.publish_tick(update(seq, minute_index))
        seq += 1
        hub.publish_tick(update(seq, minute_index, closed=True))
        hub.publish_alert(alert(minute_index))
    got = [
        (f["type"], f["seq"], f["closed"]) if f["type"] == "bar" else (f["type"], f["alert"]["seq"])
        for f in sent(session)
    ]
    assert got == [item for i in range(30) for item in (("bar", 21 * (i + 1), True), ("alert", i))]


async def test_slow_client_is_closed_when_what_it_must_receive_exceeds_the_bound() -> None:
    """Closed bars past the byte bound overflow the client; the close is counted once."""
    closed_size = bar_frame(update(10, 10, closed=True)).size + SLOT_BYTES
    hub = Hub(client_queue_bytes=5 * closed_size)
    session = watching(hub, BTC)
    for seq in range(10, 15):
        hub.publish_tick(update(seq, seq, closed=True))
    assert not session.outbox.overflowed
    hub.publish_tick(update(15, 15, closed=True))
    assert session.outbox.overflowed
    assert len(session.outbox) == 5
    hub.disconnect(session)
    hub.disconnect(session)
    assert hub.counters.slow_clients_closed == 1


async def test_recent_bars_follow_every_update() -> None:
    """Every published update reaches the memory store, subscribed or not, one bar per minute."""
    hub = Hub(client_queue_bytes=MIB)
    for seq in range(1, 6):
        hub.publish_tick(update(seq))
    assert hub.recent.of(BTC) == [update(5)]


async def test_unsubscribed_markets_receive_nothing() -> None:
    """After drop_market a client gets no more updates of that market."""
    hub = Hub(client_queue_bytes=MIB)
    session = watching(hub, BTC)
    hub.drop_market(session, BTC)
    hub.publish_tick(update(1))
    assert len(session.outbox) == 0


async def test_ranks_go_to_the_measure_subscribed() -> None:
    """Rank frames reach clients subscribed to that kind with that measure only, and clients
    asking the same page share one frame."""
    hub = Hub(client_queue_bytes=MIB)
    by_std, by_cv, also_cv, volume_only = hub.connect(), hub.connect(), hub.connect(), hub.connect()
    by_std.ranks["price"] = ranks_sub("price", "std")
    by_cv.ranks["price"] = also_cv.ranks["price"] = ranks_sub("price", "cv")
    volume_only.ranks["volume"] = ranks_sub("volume", "std")
    ranking = board("price", "cv", [BTC])
    hub.publish_ranks(ranking)
    assert len(by_std.outbox) == len(volume_only.outbox) == 0
    frame = by_cv.outbox.get_nowait()
    assert also_cv.outbox.get_nowait() is frame
    assert json.loads(frame.text) == {
        "type": "ranks",
        "kind": "price",
        "by": "cv",
        "total": 1,
        "warming": False,
        "matching": 1,
        "offset": 0,
        "limit": 100,
        "ranks": [
            {
                "metric": f"{BTC}:price",
                "position": 1,
                "total": 1,
                "label": "1/1",
                "value": 1.0,
                "std": 1.0,
                "cv": 1.0,
                "logret": 1.0,
                "mean": 1.0,
                "count": 1,
            }
        ],
    }
    assert hub.latest_ranks == {("price", "cv"): ranking}


async def test_a_ranks_frame_holds_the_top_and_the_clients_own_markets() -> None:
    """A frame holds `limit` entries plus the client's subscribed markets ranked below them,
    at their positions; whatever the number of markets, its size depends only on those."""
    hub = Hub(client_queue_bytes=MIB)
    markets = [f"binance:c{i:04d}-usdt" for i in range(1000)]
    watcher = watching(hub, markets[500], markets[1], "kraken:gone-usd")
    top_only = hub.connect()
    for session in (watcher, top_only):
        session.ranks["volume"] = ranks_sub("volume", "cv", limit=3)
    hub.publish_ranks(board("volume", "cv", markets))
    frame = json.loads(watcher.outbox.get_nowait().text)
    assert [(e["metric"], e["label"]) for e in frame["ranks"]] == [
        (f"{m}:volume", f"{i + 1}/1000") for i, m in enumerate(markets[:3])
    ]
    assert [(e["metric"], e["label"]) for e in frame["own"]] == [
        (f"{markets[500]}:volume", "501/1000")
    ]
    assert (frame["total"], frame["matching"], frame["limit"]) == (1000, 1000, 3)
    assert "own" not in json.loads(top_only.outbox.get_nowait().text)


async def test_ranks_rank_among_the_markets_compared() -> None:
    """With a quote, positions count only that quote's markets; a search only cuts the page."""
    hub = Hub(client_queue_bytes=MIB)
    session = hub.connect()
    session.ranks["price"] = ranks_sub("price", "logret", quote="usdt", search="eth")
    markets = ["binance:btc-usdt", "kraken:eth-usd", "binance:doge-usdt", "okx:eth-usdt"]
    hub.publish_ranks(board("price", "logret", markets))
    frame = json.loads(session.outbox.get_nowait().text)
    assert [(e["metric"], e["label"]) for e in frame["ranks"]] == [("okx:eth-usdt:price", "3/3")]
    assert (frame["total"], frame["matching"]) == (3, 1)


async def test_routing_state_is_bounded_by_subscriptions() -> None:
    """Unsubscribing made-up markets keeps no state; the last subscriber leaving frees a market."""
    hub = Hub(client_queue_bytes=MIB)
    session = hub.connect()
    for i in range(1000):
        hub.drop_market(session, f"binance:made{i}-usdt")
    assert hub._by_market == {}
    hub.watch_market(session, BTC, -1)
    other = watching(hub, BTC)
    hub.drop_market(session, BTC)
    assert set(hub._by_market) == {BTC}
    hub.disconnect(other)
    assert hub._by_market == {}


def test_newest_per_bar_keeps_each_bars_newest_update_and_every_closed_bar() -> None:
    """Of a batch, a forming update superseded by a higher seq of its market and minute is
    dropped; the rest keep their order; closed bars are all kept."""
    eth = "binance:eth-usdt"
    batch = [
        update(1, 0),
        update(2, 0, market=eth),
        update(3, 0),
        update(4, 0, closed=True),
        update(5, 1),
        update(6, 0, market=eth),
        update(7, 1),
        update(8, 2),
    ]
    kept = newest_per_bar(batch)
    assert [t.seq for t in kept] == [4, 6, 7, 8]
    assert newest_per_bar(batch[:1]) == batch[:1]
    assert newest_per_bar([update(2, 0), update(1, 0)]) == [update(2, 0)], "by seq, not place"
    distinct = [update(1, 0), update(2, 1), update(3, 0, market=eth)]
    assert newest_per_bar(distinct) is distinct
