"""The gateway's feed reads only watched markets' tick topics, adding and dropping them live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.conftest import deadline, unique_exchange
from tests.unit.gateway_ticks import update
from tickstream_gateway.bars import RecentBars
from tickstream_gateway.feed import run_feed
from tickstream_gateway.history import MarketHistory
from tickstream_gateway.hub import ClientSession, Hub
from tickstream_gateway.interest import MarketInterest
from tickstream_gateway.protocol import Subscribe, Subscription
from tickstream_gateway.service import run
from tickstream_gateway.state import GatewayState
from tickstream_gateway.ws import _subscribe
from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import (
    DatabaseSettings,
    GatewaySettings,
    KafkaSettings,
    RedisSettings,
    ServiceSettings,
)

HISTORY_MINUTES = 30
GRACE_S = 1.0


@dataclass
class Feed:
    hub: Hub
    state: GatewayState
    producer: AIOKafkaProducer


@pytest.fixture
async def feed(infra: LocalInfra) -> AsyncIterator[Feed]:
    settings = ServiceSettings(
        kafka=KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers),
        database=DatabaseSettings(url=infra.database_url),
        gateway=GatewaySettings(history_minutes=HISTORY_MINUTES),
    )
    pool = await db.create_pool(settings.database)
    await db.ensure_schema(pool)
    recent = RecentBars(max_bars=HISTORY_MINUTES + 1)
    hub = Hub(1024 * 1024, recent=recent, interest=MarketInterest(GRACE_S))
    history = MarketHistory(
        recent, lambda market_id: db.recent_bars(pool, market_id, HISTORY_MINUTES), catch_up_s=1.0
    )
    ready = asyncio.Event()
    state = GatewayState(settings, None, pool, hub, history, ready)  # type: ignore[arg-type]
    task = asyncio.create_task(run_feed(settings, hub, ready))
    producer = make_producer(settings.kafka, client_id="test-gateway-feed")
    await producer.start()
    try:
        async with asyncio.timeout(deadline(30)):
            await ready.wait()
        yield Feed(hub, state, producer)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await history.aclose()
        await pool.close()


def bar(market: Market, seq: int, minute_index: int, *, closed: bool = False) -> Tick:
    return update(seq, minute_index, market=market.id, closed=closed)


async def new_market(feed: Feed, stored: int) -> Market:
    """A market with its topic and `stored` closed minutes in PostgreSQL (seq 0 .. stored-1)."""
    market = Market(unique_exchange(), "btc", "usdt")
    await ensure_topics(feed.state.settings.kafka, [market.topic])
    await db.store_bars(feed.state.pool, [bar(market, i, i, closed=True) for i in range(stored)])
    return market


async def listed(feed: Feed, *markets: Market) -> None:
    """Wait until the feed's topic listing names the markets' topics (it lists again within
    KAFKA_METADATA_MAX_AGE_MS while a wanted market has no topic: a made-up one is wanted)."""
    interest = feed.hub.interest
    made_up = f"{unique_exchange()}:none-usd"
    interest.acquire(made_up)
    try:
        await wait_for(lambda: {m.topic for m in markets} <= interest.listed_topics, 10)
    finally:
        interest.release(made_up, 0.0, linger=False)


async def send(feed: Feed, tick: Tick) -> None:
    await feed.producer.send_and_wait(
        Market.parse(tick.market).topic, tick.encode(), key=tick.market.encode()
    )


async def subscribe(feed: Feed, session: ClientSession, market: Market) -> dict[str, Any]:
    """Subscribe the session to `market` as the WebSocket does; returns its history frame."""
    sub = Subscription("market", market=market)
    await _subscribe(session, Subscribe(sub), feed.state)
    frames = [json.loads(session.outbox.get_nowait().text) for _ in range(2)]
    assert frames[0]["type"] == "subscribed"
    assert frames[1]["type"] == "history"
    return frames[1]


async def next_bar(session: ClientSession) -> dict[str, Any]:
    if not len(session.outbox):
        queued = asyncio.Event()  # the feed queues it from its own task
        session.outbox.wakeup = queued.set
        try:
            async with asyncio.timeout(deadline(10)):
                await queued.wait()
        finally:
            session.outbox.wakeup = None
    frame: dict[str, Any] = json.loads(session.outbox.get_nowait().text)
    assert frame["type"] == "bar"
    return frame


async def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Poll `condition` until true (the feed applies changes on its own schedule)."""
    async with asyncio.timeout(deadline(seconds)):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def test_only_watched_markets_are_read_and_added_without_loss(feed: Feed) -> None:
    """B's topic is read only once watched; A's stream goes on in order, nothing lost."""
    a, b = await new_market(feed, 5), await new_market(feed, 5)
    await send(feed, bar(a, 5, 5))  # the newest record when A is added: the feed's first
    await send(feed, bar(b, 5, 5))
    await listed(feed, a, b)
    interest = feed.hub.interest
    assert interest.assigned_topics == frozenset()

    first = feed.hub.connect()
    history = await subscribe(feed, first, a)
    assert interest.assigned_topics == {a.topic}
    # Storage had up to seq 4; the feed's first update (5) is in the history: no gap.
    assert [p["seq"] for p in history["bars"]] == [0, 1, 2, 3, 4, 5]
    await send(feed, bar(a, 6, 6))
    assert (await next_bar(first))["seq"] == 6
    await send(feed, bar(b, 6, 6))  # not read: nobody watches B

    # A's updates flow while B is added: every one arrives, in order, once. Each is of its
    # own minute, so none replaces another in the outbox (a forming bar's updates read in one
    # batch would leave only the newest: see Outbox).
    stop = asyncio.Event()
    seqs: list[int] = []

    async def keep_up() -> None:
        while True:
            seqs.append((await next_bar(first))["seq"])

    async def produce_a() -> int:
        seq = 7
        while not stop.is_set():
            await send(feed, bar(a, seq, seq))
            seq += 1
            await asyncio.sleep(0.005)
        return seq

    producing = asyncio.create_task(produce_a())
    reading = asyncio.create_task(keep_up())
    await asyncio.sleep(0.3)
    second = feed.hub.connect()
    b_history = await subscribe(feed, second, b)
    assert interest.assigned_topics == {a.topic, b.topic}
    assert b_history["bars"][-1]["seq"] == 6
    await asyncio.sleep(0.3)
    stop.set()
    last = await producing
    await send(feed, bar(b, 7, 7))
    assert (await next_bar(second))["seq"] == 7
    await wait_for(lambda: len(seqs) >= last - 7, 10)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    assert seqs == list(range(7, last))
    assert len(first.outbox) == 0

    # B's last subscriber leaves: its topic is dropped after the grace, not before.
    feed.hub.disconnect(second)
    await asyncio.sleep(GRACE_S / 2)
    assert interest.assigned_topics == {a.topic, b.topic}
    await wait_for(lambda: interest.assigned_topics == {a.topic}, GRACE_S + 5)
    assert interest.assigned_partitions == 1
    await send(feed, bar(a, last, last))
    assert (await next_bar(first))["seq"] == last


async def test_a_market_subscribed_again_within_the_grace_keeps_its_partition(
    feed: Feed,
) -> None:
    """Unsubscribing and subscribing again at once (a reload) does not drop the topic."""
    a = await new_market(feed, 3)
    await send(feed, bar(a, 3, 3))
    await db.store_bars(feed.state.pool, [bar(a, 3, 3)])  # as stats would
    await listed(feed, a)
    session = feed.hub.connect()
    await subscribe(feed, session, a)
    reads = feed.state.history.reads
    feed.hub.disconnect(session)
    again = feed.hub.connect()
    history = await subscribe(feed, again, a)
    assert feed.state.history.reads == reads  # still loaded: the feed never stopped
    assert history["bars"][-1]["seq"] == 3
    await asyncio.sleep(GRACE_S * 1.5)
    assert feed.hub.interest.assigned_topics == {a.topic}
    await send(feed, bar(a, 4, 4))
    assert (await next_bar(again))["seq"] == 4


def feed_partitions(base: str) -> float:
    """The gateway's tickstream_gateway_feed_partitions, from /metrics."""
    with urllib.request.urlopen(f"http://{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tickstream_gateway_feed_partitions":
                return float(sample.value)
    raise AssertionError("tickstream_gateway_feed_partitions not exported")


async def test_a_websocket_subscription_adds_its_partition_until_the_grace_ends(
    infra: LocalInfra, feed: Feed
) -> None:
    """Through the real gateway: subscribe, live bars, the gauge counts it; unsubscribe drops."""
    port = free_port()
    settings = ServiceSettings(
        kafka=KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers),
        redis=RedisSettings(url=f"redis://127.0.0.1:{infra.redis_port}/12"),
        database=DatabaseSettings(url=infra.database_url),
        gateway=GatewaySettings(port=port, history_minutes=HISTORY_MINUTES, feed_grace_ms=500),
    )
    market = await new_market(feed, 3)
    await send(feed, bar(market, 3, 3))
    await db.store_bars(feed.state.pool, [bar(market, 3, 3)])
    stop = asyncio.Event()
    serving = asyncio.create_task(run(settings, stop))
    base = f"127.0.0.1:{port}"
    try:
        await poll(lambda: _ready(base), 60)
        assert await asyncio.to_thread(feed_partitions, base) == 0
        subscribe = {"op": "subscribe", "channel": "market", "market": market.id}
        async with connect(f"ws://{base}/ws") as ws:
            await ws.send(json.dumps(subscribe))
            async with asyncio.timeout(deadline(10)):
                frames = [json.loads(await ws.recv()) for _ in range(2)]
            assert [f["type"] for f in frames] == ["subscribed", "history"]
            assert [p["seq"] for p in frames[1]["bars"]] == [0, 1, 2, 3]
            assert await asyncio.to_thread(feed_partitions, base) == 1
            await send(feed, bar(market, 4, 4))
            async with asyncio.timeout(deadline(10)):
                live = json.loads(await ws.recv())
            assert (live["type"], live["seq"]) == ("bar", 4)
            await ws.send(json.dumps({**subscribe, "op": "unsubscribe"}))
            async with asyncio.timeout(deadline(10)):
                assert json.loads(await ws.recv())["type"] == "unsubscribed"
        await poll(lambda: feed_partitions(base) == 0, 10)
    finally:
        stop.set()
        await serving


async def poll(check: Callable[[], bool], seconds: float) -> None:
    """Call the blocking `check` in a thread until true: the gateway runs in this loop."""
    async with asyncio.timeout(deadline(seconds)):
        while True:
            if await asyncio.to_thread(check):
                return
            await asyncio.sleep(0.1)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{base}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def test_a_market_whose_topic_is_not_listed_yet_is_read_from_its_beginning(
    feed: Feed,
) -> None:
    """A subscriber of a topic newer than the feed's listing does not wait for the feed; the
    feed reads that topic from its beginning once listed, so nothing after storage is lost."""
    market = await new_market(feed, 3)
    for seq in (3, 4):  # produced before the subscribe, never stored
        await send(feed, bar(market, seq, seq))
    session = feed.hub.connect()
    history = await subscribe(feed, session, market)
    assert [p["seq"] for p in history["bars"]] == [0, 1, 2]
    assert [(await next_bar(session))["seq"] for _ in range(2)] == [3, 4]
    assert feed.hub.interest.assigned_topics == {market.topic}
