"""A client's outbox: conflation of newest-state frames, order, and the byte bound."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from tests.unit.gateway_ticks import BTC, MINUTE, alert, update
from tickstream_gateway.outbox import MAX_STATE_FRAMES, SLOT_BYTES, Outbox
from tickstream_gateway.protocol import (
    Frame,
    Subscription,
    _frame,
    alert_frame,
    bar_frame,
    ranks_frame,
    status_frame,
)
from tickstream_shared.schemas import MINUTE_MS

ETH = "binance:eth-usdt"


def ranks(kind: str, by: str, total: int) -> Frame:
    return ranks_frame({"kind": kind, "by": by, "total": total, "ranks": []})


def drain(outbox: Outbox) -> list[dict[str, Any]]:
    frames = []
    while len(outbox):
        frames.append(json.loads(outbox.get_nowait().text))
    assert outbox.queued_bytes == 0
    return frames


def test_a_client_that_stops_reading_gets_the_newest_state() -> None:
    """Forming bars and ranks keep only their newest pending frame, in the first one's place."""
    outbox = Outbox(max_bytes=1024 * 1024)
    for seq in range(1, 10_001):
        outbox.put(bar_frame(update(seq, market=BTC)))
        outbox.put(bar_frame(update(seq, market=ETH)))
        outbox.put(ranks("price", "std", seq))
    assert not outbox.overflowed
    assert [(f["type"], f.get("market"), f.get("seq"), f.get("total")) for f in drain(outbox)] == [
        ("bar", BTC, 10_000, None),
        ("bar", ETH, 10_000, None),
        ("ranks", None, None, 10_000),
    ]
    assert outbox.counters.conflated_frames == 3 * 9_999


def test_a_client_that_keeps_up_gets_every_update() -> None:
    """Updates younger than `max_age` all go out, also several queued together; once the
    oldest pending one has waited `max_age`, only the newest of them is sent."""
    now = [100.0]
    outbox = Outbox(max_bytes=1024 * 1024, max_age=0.05, clock=lambda: now[0])
    for seq in (1, 2, 3):  # one batch: queued at the same instant
        outbox.put(bar_frame(update(seq, market=BTC)))
    assert [f["seq"] for f in drain(outbox)] == [1, 2, 3]
    assert outbox.counters.conflated_frames == 0

    outbox.put(bar_frame(update(4, market=BTC)))
    now[0] += 0.049
    outbox.put(bar_frame(update(5, market=BTC)))  # seq 4 has waited 49 ms: both kept
    assert json.loads(outbox.get_nowait().text)["seq"] == 4
    outbox.put(bar_frame(update(6, market=BTC)))
    now[0] += 0.002  # seq 5 has waited 2 ms, 6 none: both still fresh
    assert json.loads(outbox.get_nowait().text)["seq"] == 5
    now[0] += 0.05  # the client stalls: 6 is now 52 ms old when 7 comes
    outbox.put(bar_frame(update(7, market=BTC)))
    assert [f["seq"] for f in drain(outbox)] == [7]
    assert outbox.counters.conflated_frames == 1


def test_the_freshness_bound_is_decided_when_the_frame_is_sent() -> None:
    """Updates that were fresh when queued are skipped at send time once they are older than
    `max_age` and a newer one of their bar is pending; the newest is sent."""
    now = [100.0]
    outbox = Outbox(max_bytes=1024 * 1024, max_age=0.05, clock=lambda: now[0])
    for seq in range(1, 6):
        outbox.put(bar_frame(update(seq, market=BTC)))
        now[0] += 0.001
    now[0] += 0.1  # the writer was busy with its socket
    assert [f["seq"] for f in drain(outbox)] == [5]
    assert outbox.counters.conflated_frames == 4


def test_a_burst_is_held_per_stream_not_per_update() -> None:
    """However many fresh updates of one bar arrive at once, at most MAX_STATE_FRAMES of them
    are held; the newest is always among them and order is kept."""
    outbox = Outbox(max_bytes=1024 * 1024, max_age=10.0, clock=lambda: 100.0)
    for seq in range(1, 20_001):
        assert outbox.put(bar_frame(update(seq, market=BTC)))
        assert len(outbox) <= MAX_STATE_FRAMES
    frames = drain(outbox)
    assert [f["seq"] for f in frames] == sorted(f["seq"] for f in frames)
    assert frames[-1]["seq"] == 20_000
    assert outbox.counters.conflated_frames == 20_000 - len(frames)


def test_memory_is_bounded_by_streams_not_updates() -> None:
    """A client that reads nothing while 3 streams update 100,000 times holds at most
    MAX_STATE_FRAMES per stream, and when it reads gets each stream's newest state."""
    now = [100.0]
    outbox = Outbox(max_bytes=1024 * 1024, max_age=0.05, clock=lambda: now[0])
    for seq in range(1, 100_001):
        outbox.put(bar_frame(update(seq, market=BTC)), now[0])
        outbox.put(bar_frame(update(seq, market=ETH)), now[0])
        outbox.put(ranks("price", "std", seq), now[0])
        assert len(outbox) <= 3 * MAX_STATE_FRAMES
        now[0] += 0.01
    now[0] += 0.05
    assert [(f["type"], f.get("seq"), f.get("total")) for f in drain(outbox)] == [
        ("bar", 100_000, None),
        ("bar", 100_000, None),
        ("ranks", None, 100_000),
    ]


def test_a_client_that_cannot_keep_up_gets_fresh_state_and_everything_it_must() -> None:
    """100 updates/s of two markets with a closed bar each second and an alert, read at 20
    frames/s: every forming bar sent is at most `max_age` old or the newest of its market,
    each market's seq increases, and every closed bar and alert arrives, in order."""
    now = [100.0]
    max_age = 0.05
    outbox = Outbox(max_bytes=1024 * 1024, max_age=max_age, clock=lambda: now[0])
    queued_at: dict[tuple[str, int], float] = {}
    newest: dict[str, int] = {}
    got: list[tuple[dict[str, Any], float]] = []
    seq = 0
    for tick in range(1, 2001):  # 20 s, one step per 10 ms
        minute_index = tick // 100
        for market in (BTC, ETH):
            seq += 1
            closed = tick % 100 == 99
            outbox.put(bar_frame(update(seq, minute_index, market=market, closed=closed)))
            queued_at[market, seq] = now[0]
            newest[market] = seq
        if tick % 100 == 50:
            outbox.put(alert_frame(alert(tick // 100)))
        if tick % 5 == 0 and len(outbox):  # the client takes one frame every 50 ms
            frame = json.loads(outbox.get_nowait().text)
            if frame["type"] == "bar" and not frame["closed"]:
                age = now[0] - queued_at[frame["market"], frame["seq"]]
                assert age < max_age or frame["seq"] == newest[frame["market"]]
            got.append((frame, now[0]))
        now[0] += 0.01
    got += [(f, now[0]) for f in drain(outbox)]
    frames = [f for f, _ in got]
    for market in (BTC, ETH):
        seqs = [f["seq"] for f in frames if f.get("market") == market]
        assert seqs == sorted(seqs)
        assert seqs[-1] == newest[market]
        closed_minutes = [f["minute"] for f in frames if f.get("market") == market and f["closed"]]
        assert closed_minutes == [MINUTE + i * MINUTE_MS for i in range(20)]
    assert [f["alert"]["seq"] for f in frames if f["type"] == "alert"] == list(range(20))
    assert len(frames) < 500  # of 4,000 updates
    assert outbox.counters.conflated_frames == seq - sum(f["type"] == "bar" for f in frames)


def test_closed_bars_and_alerts_are_all_delivered_in_order() -> None:
    """Only forming updates give way; every closed bar and alert arrives, in arrival order."""
    outbox = Outbox(max_bytes=1024 * 1024)
    seq = 0
    for minute_index in range(20):
        for _ in range(50):
            seq += 1
            outbox.put(bar_frame(update(seq, minute_index)))
        seq += 1
        outbox.put(bar_frame(update(seq, minute_index, closed=True)))
        outbox.put(alert_frame(alert(minute_index)))
    got = [
        (f["type"], f["seq"], f["closed"]) if f["type"] == "bar" else (f["type"], f["alert"]["seq"])
        for f in drain(outbox)
    ]
    assert got == [item for i in range(20) for item in (("bar", 51 * (i + 1), True), ("alert", i))]


def test_each_stream_keeps_its_order() -> None:
    """A late update of an older minute queues after newer ones rather than jump ahead; a
    stale update is skipped at send time if a newer frame of its minute waits behind it."""
    outbox = Outbox(max_bytes=1024 * 1024)
    outbox.put(bar_frame(update(1, 0)))
    outbox.put(bar_frame(update(2, 1)))  # the next minute starts
    outbox.put(bar_frame(update(3, 0)))  # a late update of the first minute
    outbox.put(bar_frame(update(4, 0)))  # replaces seq 3, the newest pending of the market
    outbox.put(bar_frame(update(5, 0, closed=True)))  # the closing update replaces seq 4 too
    outbox.put(bar_frame(update(6, 0)))  # after a closed bar: queued, never ahead of it
    # seq 1 is skipped: the closed bar of its minute (seq 5) is pending behind it.
    assert [(f["seq"], f["minute"]) for f in drain(outbox)] == [
        (2, MINUTE + MINUTE_MS),
        (5, MINUTE),
        (6, MINUTE),
    ]
    assert outbox.counters.conflated_frames == 3


@pytest.mark.parametrize("max_age", [0.0, 10.0])
def test_a_subscription_reply_seals_what_was_pending(max_age: float) -> None:
    """A rank snapshot queued before `subscribed` is not replaced by one made after it; it is
    sent while fresh, and skipped once stale, a newer one of its measure waiting behind."""
    outbox = Outbox(max_bytes=1024 * 1024, max_age=max_age, clock=lambda: 100.0)
    outbox.put(ranks("price", "std", 1))
    outbox.put(status_frame("subscribed", Subscription("ranks", kind="price", measure="std")))
    outbox.put(ranks("price", "std", 2))
    outbox.put(ranks("price", "std", 3))
    outbox.put(ranks("price", "cv", 4))  # another measure: not the same value
    fresh = [("ranks", 1), ("subscribed", None), ("ranks", 2), ("ranks", 3), ("ranks", 4)]
    stale = [("subscribed", None), ("ranks", 3), ("ranks", 4)]
    got = [(f["type"], f.get("total")) for f in drain(outbox)]
    assert got == (fresh if max_age else stale)


def test_overflow_only_when_what_must_be_delivered_exceeds_the_bound() -> None:
    """Frames are counted by size plus SLOT_BYTES; one that does not fit overflows the outbox."""
    closed = [bar_frame(update(seq, seq - 1, closed=True)) for seq in (1, 2)]
    newest = bar_frame(update(999, 2))
    bound = sum(f.size + SLOT_BYTES for f in (*closed, newest))
    outbox = Outbox(max_bytes=bound)
    assert all(outbox.put(frame) for frame in closed)
    for seq in range(100, 1000):  # replacing the pending state of the forming bar always fits
        assert outbox.put(bar_frame(update(seq, 2)))
    assert outbox.queued_bytes == bound
    assert not outbox.overflowed
    assert not outbox.put(alert_frame(alert(1)))
    assert outbox.overflowed
    assert not outbox.put(bar_frame(update(2000, 2)))  # refused for good once overflowed
    assert [f["seq"] for f in drain(outbox)] == [1, 2, 999]


def test_fresh_states_give_way_before_a_client_is_closed() -> None:
    """Over the byte bound, pending fresh states are cut to their stream's newest before a
    must-deliver frame is refused: the client is not closed while that makes room."""
    states = [bar_frame(update(seq, market=market)) for seq in range(1, 9) for market in (BTC, ETH)]
    closed = bar_frame(update(100, 5, closed=True))
    newest = [states[-2], states[-1]]
    bound = sum(f.size + SLOT_BYTES for f in (*newest, closed))
    outbox = Outbox(max_bytes=bound, max_age=10.0, clock=lambda: 100.0)  # all of them fresh
    for frame in states:
        assert outbox.put(frame)
    assert outbox.put(closed)
    assert not outbox.overflowed
    assert [(f["market"], f["seq"]) for f in drain(outbox)] == [(BTC, 8), (ETH, 8), (BTC, 100)]
    assert outbox.counters.conflated_frames == len(states) - 2


def test_wakeup_is_called_for_every_frame_queued_and_on_overflow() -> None:
    """The connection is told of each frame it may send, and of the overflow that ends it."""
    calls: list[int] = []
    first = alert_frame(alert(1))
    outbox = Outbox(max_bytes=first.size + SLOT_BYTES)
    outbox.wakeup = lambda: calls.append(len(outbox))
    assert outbox.put(first)
    assert calls == [1]
    assert outbox.get_nowait() is first
    assert outbox.put(first)
    assert not outbox.put(alert_frame(alert(2)))  # no room: overflowed
    assert outbox.overflowed
    assert calls == [1, 1, 1]


def test_a_frame_is_the_websocket_text_frame_websockets_would_send() -> None:
    """`Frame.wire` is what the `websockets` library serializes for the same text, for each
    length encoding (7-bit, 16-bit, 64-bit), and `body`/`size` are the message's."""
    for size in (0, 125, 126, 65535, 65536, 70000):
        body = b'"' + b"x" * max(0, size - 2) + b'"' if size >= 2 else b"1" * size
        frame = _frame(body)
        expected = WsFrame(Opcode.TEXT, body).serialize(mask=False)
        assert frame.wire == expected
        assert frame.body == body and frame.size == len(body)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(("bar",)), st.sampled_from((BTC, ETH)), st.integers(0, 3)),
            st.tuples(st.sampled_from(("close", "alert", "get", "wait")), st.just(BTC), st.just(0)),
        ),
        max_size=120,
    ),
    st.sampled_from((0.0, 0.05)),
)
def test_conflation_matches_its_rules(ops: list[tuple[str, str, int]], max_age: float) -> None:
    """Whatever arrives: nothing but a superseded forming bar is dropped, order is kept, and
    no forming bar is sent `max_age` after it was queued if a newer one of its minute was."""
    now = [100.0]
    outbox = Outbox(max_bytes=1024 * 1024, max_age=max_age, clock=lambda: now[0])
    sent: list[Frame] = []
    queued_at: list[float] = []
    received: list[Frame] = []

    def take() -> None:
        frame = outbox.get_nowait()
        at = queued_at[sent.index(frame)]
        if frame.latest and now[0] - at >= max_age:
            newer = sent[sent.index(frame) + 1 :]
            assert not any(f.stream == frame.stream and f.key == frame.key for f in newer), (
                "a stale state is sent only when it is the newest of its minute"
            )
        received.append(frame)

    seq = 0
    for op, market_id, minute_index in ops:
        if op == "wait":
            now[0] += 0.03
            continue
        if op == "get":
            if len(outbox):
                take()
            continue
        seq += 1
        if op == "alert":
            frame = alert_frame(alert(seq))
        else:
            frame = bar_frame(update(seq, minute_index, market=market_id, closed=op == "close"))
        sent.append(frame)
        queued_at.append(now[0])
        assert outbox.put(frame)
    while len(outbox):
        take()
    # Received frames are a subsequence of the sent ones except for in-place replacements:
    # per stream, in the order sent.
    for stream in (BTC, ETH, None):
        mine = [sent.index(f) for f in received if f.stream == stream]
        assert mine == sorted(mine)
    dropped = [f for f in sent if f not in received]
    for frame in dropped:
        later = sent[sent.index(frame) + 1 :]
        assert frame.latest and any(
            f.stream == frame.stream and f.key == frame.key for f in later
        ), "only a forming bar with a newer update of its minute is dropped"
    for stream in (BTC, ETH):
        mine = [f for f in sent if f.stream == stream]
        if mine:
            assert mine[-1] in received, "the newest state is always delivered"
    must = [f for f in sent if not f.latest]
    assert sorted(must, key=sent.index) == sorted(
        (f for f in received if not f.latest), key=sent.index
    ), "closed bars and alerts are all delivered"
