"""A client's outbox: conflation of newest-state frames, order, and the byte bound."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.gateway_ticks import BTC, MINUTE, alert, update
from tickstream_gateway.outbox import SLOT_BYTES, Outbox
from tickstream_gateway.protocol import (
    Frame,
    Subscription,
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
    """With `conflate_after`, updates are replaced only once the oldest pending frame has
    waited that long: updates queued together all go out, a stalled client gets the newest."""
    now = [100.0]
    outbox = Outbox(max_bytes=1024 * 1024, conflate_after=0.05, clock=lambda: now[0])
    for seq in (1, 2, 3):  # one batch: queued at the same instant
        outbox.put(bar_frame(update(seq, market=BTC)))
    assert [f["seq"] for f in drain(outbox)] == [1, 2, 3]
    assert outbox.counters.conflated_frames == 0

    outbox.put(bar_frame(update(4, market=BTC)))
    now[0] += 0.049  # not behind yet: the head has waited 49 ms
    outbox.put(bar_frame(update(5, market=BTC)))
    now[0] += 0.002  # the head (seq 4) has now waited 51 ms: 6 replaces 5, the newest pending
    outbox.put(bar_frame(update(6, market=BTC)))
    assert outbox.counters.conflated_frames == 1
    assert json.loads(outbox.get_nowait().text)["seq"] == 4
    # The client took a frame: its new head (seq 6) has waited no time, so 7 queues behind it.
    outbox.put(bar_frame(update(7, market=BTC)))
    assert [f["seq"] for f in drain(outbox)] == [6, 7]
    assert outbox.counters.conflated_frames == 1


def test_a_burst_is_conflated_once_the_outbox_is_half_full() -> None:
    """Before anything has waited `conflate_after`, updates queue until half the bound; from
    there they replace each other rather than fill the outbox and close the client."""
    outbox = Outbox(max_bytes=1024 * 1024, conflate_after=10.0, clock=lambda: 100.0)
    for seq in range(1, 20_001):  # about 6 MB of frames at once
        assert outbox.put(bar_frame(update(seq, market=BTC)))
    assert not outbox.overflowed
    assert outbox.queued_bytes <= outbox.max_bytes // 2
    frames = drain(outbox)
    assert [f["seq"] for f in frames] == sorted(f["seq"] for f in frames)
    assert frames[-1]["seq"] == 20_000
    assert outbox.counters.conflated_frames == 20_000 - len(frames)


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
    """A late update of an older minute queues after newer ones rather than jump ahead."""
    outbox = Outbox(max_bytes=1024 * 1024)
    outbox.put(bar_frame(update(1, 0)))
    outbox.put(bar_frame(update(2, 1)))  # the next minute starts
    outbox.put(bar_frame(update(3, 0)))  # a late update of the first minute
    outbox.put(bar_frame(update(4, 0)))  # replaces seq 3, the newest pending of the market
    outbox.put(bar_frame(update(5, 0, closed=True)))  # the closing update replaces seq 4 too
    outbox.put(bar_frame(update(6, 0)))  # after a closed bar: queued, never ahead of it
    assert [(f["seq"], f["minute"]) for f in drain(outbox)] == [
        (1, MINUTE),
        (2, MINUTE + MINUTE_MS),
        (5, MINUTE),
        (6, MINUTE),
    ]


def test_a_subscription_reply_seals_what_was_pending() -> None:
    """A rank snapshot queued before `subscribed` is not replaced by one made after it."""
    outbox = Outbox(max_bytes=1024 * 1024)
    outbox.put(ranks("price", "std", 1))
    outbox.put(status_frame("subscribed", Subscription("ranks", kind="price", measure="std")))
    outbox.put(ranks("price", "std", 2))
    outbox.put(ranks("price", "std", 3))
    outbox.put(ranks("price", "cv", 4))  # another measure: not the same value
    assert [(f["type"], f.get("total")) for f in drain(outbox)] == [
        ("ranks", 1),
        ("subscribed", None),
        ("ranks", 3),
        ("ranks", 4),
    ]


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


async def test_get_waits_for_a_frame_and_can_be_cancelled() -> None:
    """`get` returns frames as they come; a cancelled `get` takes nothing."""
    outbox = Outbox(max_bytes=1024 * 1024)
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    getting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    first = alert_frame(alert(1))
    outbox.put(first)
    assert await asyncio.wait_for(getting, 5) is first
    assert len(outbox) == 0


@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(("bar",)), st.sampled_from((BTC, ETH)), st.integers(0, 3)),
            st.tuples(st.sampled_from(("close", "alert", "get")), st.just(BTC), st.just(0)),
        ),
        max_size=120,
    )
)
def test_conflation_matches_its_rules(ops: list[tuple[str, str, int]]) -> None:
    """Whatever arrives: nothing but a superseded forming bar is dropped, order is kept."""
    outbox = Outbox(max_bytes=1024 * 1024)
    sent: list[Frame] = []
    received: list[Frame] = []
    seq = 0
    for op, market_id, minute_index in ops:
        if op == "get":
            if len(outbox):
                received.append(outbox.get_nowait())
            continue
        seq += 1
        if op == "alert":
            frame = alert_frame(alert(seq))
        else:
            frame = bar_frame(update(seq, minute_index, market=market_id, closed=op == "close"))
        sent.append(frame)
        assert outbox.put(frame)
    while len(outbox):
        received.append(outbox.get_nowait())
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
