"""History from memory: one shared storage read per market, `since`, `gap`, history then live."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit import gateway_ticks as ticks
from tests.unit.gateway_ticks import BTC, MINUTE
from tickstream_gateway.bars import RecentBars
from tickstream_gateway.history import MarketHistory
from tickstream_gateway.hub import ClientSession, Hub
from tickstream_gateway.protocol import Subscribe, Subscription, history_frame
from tickstream_gateway.state import GatewayState
from tickstream_gateway.ws import _subscribe
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import GatewaySettings, ServiceSettings

MINUTES = 30  # history window: 31 bars


def update(seq: int, minute_index: int, *, closed: bool = True) -> Tick:
    return ticks.update(seq, minute_index, closed=closed)


class Storage:
    """Stored bars per market, as db.recent_bars returns them, counting reads."""

    def __init__(self, bars: list[Tick]) -> None:
        self.bars = bars
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def fetch(self, market_id: str) -> list[Tick]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        rows = [t for t in self.bars if t.market == market_id]
        if not rows:
            return []
        newest = max(t.minute for t in rows)
        return [t for t in rows if t.minute >= newest - MINUTES * MINUTE_MS]


def make(stored: list[Tick]) -> tuple[Hub, MarketHistory, Storage]:
    storage = Storage(stored)
    hub = Hub(client_queue_bytes=1024 * 1024, recent=RecentBars(max_bars=MINUTES + 1))
    hub.feed_started()
    return hub, MarketHistory(hub.recent, storage.fetch), storage


def frames(session: ClientSession) -> list[dict[str, Any]]:
    got = []
    while len(session.outbox):
        got.append(json.loads(session.outbox.get_nowait().text))
    return got


async def subscribe(hub: Hub, history: MarketHistory, since: int | None = None) -> ClientSession:
    """The WebSocket subscribe path (ws._subscribe) without a socket."""
    session = hub.connect()
    settings = ServiceSettings(gateway=GatewaySettings(history_minutes=MINUTES))
    state = GatewayState(settings, None, None, hub, history, asyncio.Event())  # type: ignore[arg-type]
    sub = Subscription("market", market=Market.parse(BTC))
    await _subscribe(session, Subscribe(sub, since), state)
    return session


async def test_concurrent_first_subscribes_share_one_read() -> None:
    """A thousand subscribers arriving during the first read all wait for that one read."""
    hub, history, storage = make([update(i, i) for i in range(40)])
    storage.gate = asyncio.Event()
    waiting = [asyncio.create_task(subscribe(hub, history)) for _ in range(1000)]
    await asyncio.sleep(0.01)
    storage.gate.set()
    sessions = await asyncio.gather(*waiting)
    assert storage.reads == history.reads == 1
    replies = [frames(s) for s in sessions]
    assert all(r == replies[0] for r in replies)
    assert [p["seq"] for p in replies[0][1]["bars"]] == list(range(9, 40))


async def test_history_comes_from_memory_once_loaded() -> None:
    """Once storage has what the feed started with, later subscribes do not read it again."""
    hub, history, storage = make([update(i, i) for i in range(40)])
    hub.publish_tick(update(40, 40, closed=False))  # the feed's first update of the market
    storage.bars.append(update(40, 40, closed=False))  # and stats stored it
    await subscribe(hub, history)
    hub.publish_tick(update(41, 40))
    second = frames(await subscribe(hub, history))
    assert storage.reads == 1
    assert [p["seq"] for p in second[1]["bars"]] == [*range(10, 40), 41]


async def test_storage_behind_the_feed_is_read_again() -> None:
    """If stats has not stored the feed's first update yet, the next subscriber reads again."""
    hub, history, storage = make([update(i, i) for i in range(40)])
    hub.publish_tick(update(40, 40))  # not stored yet: storage may miss what came before it
    await subscribe(hub, history)
    storage.bars.append(update(40, 40))
    await subscribe(hub, history)
    await subscribe(hub, history)
    assert storage.reads == 2


async def test_a_feed_restart_makes_the_next_subscribe_read_again() -> None:
    """After the feed restarts, what it missed is only in storage: it is read again."""
    hub, history, storage = make([update(i, i) for i in range(41)])
    hub.publish_tick(update(40, 40))
    await subscribe(hub, history)
    hub.feed_started()
    storage.bars.append(update(41, 41))  # stored while the feed was down
    hub.publish_tick(update(42, 42))
    storage.bars.append(update(42, 42))
    got = frames(await subscribe(hub, history))
    assert storage.reads == 2
    assert [p["seq"] for p in got[1]["bars"]][-3:] == [40, 41, 42]


async def test_since_sends_only_what_the_client_missed() -> None:
    """With `since` in the window the history holds minutes >= since, then live updates."""
    hub, history, _ = make([update(i, i) for i in range(40)])
    session = await subscribe(hub, history, since=MINUTE + 37 * MINUTE_MS)
    hub.publish_tick(update(40, 40, closed=False))
    assert [(f["type"], f.get("since")) for f in frames(session)][:2] == [
        ("subscribed", None),
        ("history", MINUTE + 37 * MINUTE_MS),
    ]
    session = await subscribe(hub, history, since=MINUTE + 37 * MINUTE_MS)
    got = frames(session)
    assert [p["seq"] for p in got[1]["bars"]] == [37, 38, 39, 40]


async def test_since_before_the_window_gets_a_gap_frame() -> None:
    """`since` older than the history window: a `gap` frame says which minutes are not sent."""
    hub, history, _ = make([update(i, i) for i in range(40)])
    got = frames(await subscribe(hub, history, since=MINUTE))
    window_start = MINUTE + 9 * MINUTE_MS
    assert [f["type"] for f in got] == ["subscribed", "gap", "history"]
    assert got[1] == {"type": "gap", "market": BTC, "since": MINUTE, "until": window_start}
    assert got[2]["bars"][0]["minute"] == window_start and len(got[2]["bars"]) == 31
    at_start = frames(await subscribe(hub, history, since=window_start))
    assert [f["type"] for f in at_start] == ["subscribed", "history"]


async def test_updates_during_the_read_follow_the_history_without_gap_or_overlap() -> None:
    """Updates arriving while storage is read are in the history or sent live, once each."""
    hub, history, storage = make([update(i, i) for i in range(40)])
    storage.gate = asyncio.Event()
    subscribing = asyncio.create_task(subscribe(hub, history))
    await asyncio.sleep(0.01)
    for seq in range(40, 45):
        hub.publish_tick(update(seq, 40, closed=seq == 44))
    storage.gate.set()
    session = await subscribing
    for seq in range(45, 48):
        hub.publish_tick(update(seq, 41, closed=False))
    hub.publish_tick(update(44, 40))  # redelivered: not sent again
    got = frames(session)
    assert [f["type"] for f in got] == ["subscribed", "history", "bar"]
    seqs = [p["seq"] for p in got[1]["bars"]] + [got[2]["seq"]]
    assert seqs == [*range(10, 40), 44, 47]  # the forming bar's pending updates conflated


async def test_unknown_market_keeps_no_state() -> None:
    """A market with no bars anywhere gets `unknown_market` and leaves nothing behind."""
    hub, history, _ = make([])
    got = frames(await subscribe(hub, history))
    assert [(f["type"], f.get("code")) for f in got] == [
        ("subscribed", None),
        ("error", "unknown_market"),
    ]
    assert list(hub.recent.markets) == [] and hub._by_market == {}


async def test_a_failed_read_reaches_every_waiter_and_is_retried() -> None:
    """Every subscriber waiting on a failed read gets its error; the next one reads again."""
    _, history, storage = make([update(i, i) for i in range(40)])
    storage.gate, storage.error = asyncio.Event(), OSError("connection refused")
    waiting = [asyncio.create_task(history.load(BTC)) for _ in range(3)]
    await asyncio.sleep(0.01)
    storage.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [type(r) for r in results] == [OSError] * 3
    storage.error = None
    await history.load(BTC)
    assert storage.reads == 2


async def test_a_cancelled_waiter_does_not_cancel_the_read() -> None:
    """A subscriber that disconnects during the read leaves it running for the others."""
    hub, history, storage = make([update(i, i) for i in range(40)])
    storage.gate = asyncio.Event()
    first = asyncio.create_task(history.load(BTC))
    second = asyncio.create_task(history.load(BTC))
    await asyncio.sleep(0.01)
    first.cancel()
    storage.gate.set()
    await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert storage.reads == 1 and len(hub.recent.of(BTC)) == 31
    await history.aclose()


async def test_equal_requests_share_one_encoded_frame() -> None:
    """While a market does not change, subscribers get the same history frame object."""
    hub, history, _ = make([update(i, i) for i in range(40)])
    await history.load(BTC)
    first, second = history.reply(BTC, None), history.reply(BTC, None)
    assert first is not None and second is not None
    assert first.frames[0] is second.frames[0]
    hub.publish_tick(update(40, 39))
    third = history.reply(BTC, None)
    assert third is not None and third.frames[0] is not first.frames[0]
    assert third.after_seq == 40


@given(
    st.lists(st.tuples(st.integers(0, 45), st.booleans()), max_size=80),
    st.one_of(st.none(), st.integers(0, 50)),
)
def test_replies_from_cached_prefixes_equal_a_fresh_encoding(
    updates: list[tuple[int, bool]], since_index: int | None
) -> None:
    """However the bars change, a reply is the window (>= since) encoded from scratch."""
    recent = RecentBars(max_bars=MINUTES + 1)
    history = MarketHistory(recent, Storage([]).fetch)
    recent.load(BTC, [update(i, i) for i in range(40)], now=0.0)
    since = None if since_index is None else MINUTE + since_index * MINUTE_MS
    for seq, (minute_index, closed) in enumerate(updates, start=100):
        recent.add(update(seq, minute_index, closed=closed), now=0.0)
        reply = history.reply(BTC, since)
        assert reply is not None
        window_start = recent.window_start(BTC)
        assert window_start is not None
        first = window_start if since is None else max(since, window_start)
        bars = recent.bars_from(BTC, first)
        assert reply.frames[-1] == history_frame(BTC, bars, since)
        assert reply.after_seq == max((b.seq for b in bars), default=-1)
        assert len(reply.frames) == (2 if since is not None and since < window_start else 1)
