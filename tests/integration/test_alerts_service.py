"""Alerts service on real broker and PostgreSQL: warm-up from stored bars and stored alerts,
provisional alerts confirmed or retracted through Kafka, PostgreSQL, the gateway and a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from websockets.asyncio.client import connect

from tests.conftest import deadline, running_infra, unique_exchange
from tests.integration.test_gateway_api import http_json, recv_json
from tickstream_alerts.service import run
from tickstream_gateway.service import run as run_gateway
from tickstream_shared import alert_store, db
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import ALERTS_TOPIC, Market, market_of
from tickstream_shared.observability import (
    ALERTS_CONFIRMED,
    ALERTS_RAISED,
    ALERTS_RETRACTED,
    READINGS,
)
from tickstream_shared.schemas import MINUTE_MS, Alert, Tick, decode_alert
from tickstream_shared.settings import ServiceSettings


@pytest.fixture
def own_infra() -> Iterator[LocalInfra]:
    """A broker and PostgreSQL for this test alone: the `alerts` group reads every tick topic."""
    with running_infra("tickstream-alerts-") as running:
        yield running


def bar(market: Market, seq: int, minute: int, volume: float) -> Tick:
    ts = minute + 59_000
    return Tick(market.id, minute, seq, ts, ts, 100.0, 100.0, 100.0, 100.0, volume, 5, True)


async def test_restart_keeps_the_hour_and_the_cooldown(own_infra: LocalInfra) -> None:
    """Stored bars form the first tick's baseline and a stored alert's cooldown still holds."""
    infra = own_infra
    settings = ServiceSettings.from_env(infra.environment())
    assert settings.alerts.cooldown_seconds == 3600  # the defaults under test
    market = Market(unique_exchange(), "btc", "usdt")
    volume_metric = market.metric_id("volume")
    now_minute = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
    start = now_minute - 3 * 3_600_000

    def at(index: int) -> int:
        return start + index * MINUTE_MS

    pool = await db.create_pool(settings.database)
    try:
        await db.ensure_schema(pool, settings.database)
        # What an earlier run left: minutes 0..89 stored by stats, a volume alert at minute 40,
        # and a stored bar of minute 89 that was updated after the first tick to evaluate.
        stored = [bar(market, i, at(i), 10.0) for i in range(89)]
        stored.append(bar(market, 1000, at(89), 10.0))
        await db.store_bars(pool, stored)
        earlier = Alert(
            alert_id=f"{volume_metric}@{at(40)}",
            metric=volume_metric,
            kind="volume",
            minute=at(40),
            exchange_ts=at(40) + 59_000,
            seq=40,
            value=100.0,
            mean=10.0,
            factor=3.0,
            ratio=10.0,
            window_minutes=60,
            samples=40,
        )
        await alert_store.store_alerts(pool, [earlier])
        await alert_store.mark_published(pool, [earlier])
    finally:
        await pool.close()

    # Minute 90 is 50 minutes after the stored alert (cooldown); minute 100 is 60 after it.
    ticks = [bar(market, 900, at(90), 100.0), bar(market, 901, at(100), 1000.0)]
    await ensure_topics(settings.kafka, [market.topic])
    producer = make_producer(settings.kafka, client_id="test")
    await producer.start()
    try:
        for tick in ticks:
            await producer.send(market.topic, tick.encode(), key=tick.market.encode())
        await producer.flush()
    finally:
        await producer.stop()

    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, stop))
    offsets = AIOKafkaConsumer(bootstrap_servers=infra.kafka_bootstrap_servers, group_id="alerts")
    await offsets.start()
    conn = await asyncpg.connect(infra.database_url)
    try:
        # Committed means evaluated, stored and published: then the table is final.
        async with asyncio.timeout(deadline(60)):
            while await offsets.committed(TopicPartition(market.topic, 0)) != len(ticks):
                assert not service.done(), service
                await asyncio.sleep(0.1)
        rows = await conn.fetch(
            "SELECT alert_id, minute, seq, value, mean, samples, published FROM alerts "
            "WHERE metric LIKE $1 ORDER BY minute",
            f"{market.id}:%",
        )
    finally:
        stop.set()
        await asyncio.wait_for(service, deadline(30))
        await conn.close()
        await offsets.stop()
    # Minute 89 was left out (seq 1000 is newer than the first tick), so minute 100's hour
    # holds minutes 40..88 and 90: mean (49 x 10 + 100) / 50 = 11.8.
    assert [tuple(r) for r in rows] == [
        (earlier.alert_id, at(40), 40, 100.0, 10.0, 40, True),
        (f"{volume_metric}@{at(100)}", at(100), 901, 1000.0, 11.8, 50, True),
    ]


async def commit_as(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    """Commit `offset` for `group` as a consumer that never joins it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


async def test_warm_up_waits_for_what_stats_has_not_stored_yet(
    own_infra: LocalInfra, caplog: pytest.LogCaptureFixture
) -> None:
    """Alerts restarted ahead of a lagging stats waits, then judges the whole hour."""
    infra = own_infra
    settings = ServiceSettings.from_env(infra.environment())
    market = Market(unique_exchange(), "eth", "usdt")
    now_minute = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
    start = now_minute - 3 * 3_600_000

    def volume(i: int) -> float:
        return 100.0 if i == 69 else 40.0 if 60 <= i <= 64 else 10.0

    ticks = [bar(market, i, start + i * MINUTE_MS, volume(i)) for i in range(70)]
    await ensure_topics(settings.kafka, [market.topic])
    producer = make_producer(settings.kafka, client_id="test")
    await producer.start()
    try:
        for tick in ticks:
            await producer.send(market.topic, tick.encode(), key=tick.market.encode())
        await producer.flush()
    finally:
        await producer.stop()
    tp = TopicPartition(market.topic, 0)
    # Before the restart: alerts had consumed minutes 0..64; stats had stored only 0..59.
    pool = await db.create_pool(settings.database)
    try:
        await db.ensure_schema(pool, settings.database)
        await db.store_bars(pool, ticks[:60])
        await commit_as(infra.kafka_bootstrap_servers, "alerts", tp, 65)
        await commit_as(infra.kafka_bootstrap_servers, "stats", tp, 60)

        stop = asyncio.Event()
        service = asyncio.create_task(run(settings, stop))
        offsets = AIOKafkaConsumer(
            bootstrap_servers=infra.kafka_bootstrap_servers, group_id="alerts"
        )
        await offsets.start()
        try:
            async with asyncio.timeout(deadline(30)):  # joined, polled, waiting for stats
                while "waiting for stats to store" not in caplog.text:
                    assert not service.done(), service
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            assert await offsets.committed(tp) == 65
            # stats catches up
            await db.store_bars(pool, ticks[60:])
            await commit_as(infra.kafka_bootstrap_servers, "stats", tp, 70)
            async with asyncio.timeout(deadline(60)):
                while await offsets.committed(tp) != 70:
                    assert not service.done(), service
                    await asyncio.sleep(0.1)
            rows = await pool.fetch(
                "SELECT minute, mean, samples FROM alerts WHERE metric = $1",
                market.metric_id("volume"),
            )
        finally:
            stop.set()
            await asyncio.wait_for(service, deadline(30))
            await offsets.stop()
    finally:
        await pool.close()
    # The hour before minute 69 is minutes 9..68: 51 x 10, 5 x 40 (stored late), 4 x 10.
    assert [tuple(r) for r in rows] == [(start + 69 * MINUTE_MS, 12.5, 60)]


def update(market: Market, seq: int, minute: int, volume: float, *, closed: bool) -> Tick:
    """An update of `minute`'s bar at price 100 (forming unless `closed`)."""
    ts = minute + (59_000 if closed else 30_000)
    return Tick(market.id, minute, seq, ts, ts, 100.0, 100.0, 100.0, 100.0, volume, 5, closed)


async def send(settings: ServiceSettings, *ticks: Tick) -> None:
    producer = make_producer(settings.kafka, client_id="test")
    await producer.start()
    try:
        for tick in ticks:
            topic = market_of(tick.market).topic
            await producer.send(topic, tick.encode(), key=tick.market.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def wait_committed(
    offsets: AIOKafkaConsumer, tp: TopicPartition, offset: int, *tasks: asyncio.Task[None]
) -> None:
    """Until the `alerts` group committed `offset`: its alerts are then stored and published."""
    async with asyncio.timeout(deadline(60)):
        while await offsets.committed(tp) != offset:
            for task in tasks:
                assert not task.done(), task
            await asyncio.sleep(0.05)


async def alert_messages(bootstrap: str, metric: str, count: int) -> list[Alert]:
    """The first `count` messages of `metric` on the `alerts` topic, decoded as readers do."""
    consumer = AIOKafkaConsumer(
        ALERTS_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    found: list[Alert] = []
    try:
        async with asyncio.timeout(deadline(30)):
            while len(found) < count:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    found += [decode_alert(r.value) for r in records if r.key == metric.encode()]
    finally:
        await consumer.stop()
    return found


def counted() -> dict[str, float]:
    values = READINGS.values()
    families = (ALERTS_RAISED, ALERTS_CONFIRMED, ALERTS_RETRACTED)
    return {f.name: values.get((f, ()), 0.0) for f in families}


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def hour_of_bars(market: Market, start: int) -> list[Tick]:
    """Minutes 0..59 as stats stored them: closed, volume 10 (the spike rule's baseline)."""
    return [update(market, i, start + i * MINUTE_MS, 10.0, closed=True) for i in range(60)]


async def test_provisional_alerts_through_kafka_postgresql_and_the_gateway(
    own_infra: LocalInfra,
) -> None:
    """Forming spikes raise provisional alerts; their closed bars (and a correction) confirm or
    retract them in PostgreSQL, on the `alerts` topic, in /api/alerts and over WebSocket."""
    infra = own_infra
    port = free_port()
    settings = ServiceSettings.from_env({**infra.environment(), "GATEWAY_PORT": str(port)})
    market = Market(unique_exchange(), "btc", "usdt")
    metric = market.metric_id("volume")
    now_minute = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
    start = now_minute - 3 * 3_600_000

    def at(index: int) -> int:
        return start + index * MINUTE_MS

    def ident(index: int) -> str:
        return f"{metric}@{at(index)}"

    base = f"127.0.0.1:{port}"
    tp = TopicPartition(market.topic, 0)
    frames: list[dict[str, Any]] = []
    stop = asyncio.Event()
    services: list[asyncio.Task[None]] = []
    pool = await db.create_pool(settings.database)
    offsets = AIOKafkaConsumer(bootstrap_servers=infra.kafka_bootstrap_servers, group_id="alerts")
    try:
        await db.ensure_schema(pool, settings.database)
        await db.store_bars(pool, hour_of_bars(market, start))
        await ensure_topics(settings.kafka, [market.topic, ALERTS_TOPIC])
        await offsets.start()
        before = counted()
        alerts = asyncio.create_task(run(settings, stop))
        gateway = asyncio.create_task(run_gateway(settings, stop))
        services += [alerts, gateway]
        async with asyncio.timeout(deadline(60)):
            while (await http_json(base, "/healthz"))[0] != 200:
                assert not gateway.done(), gateway
                await asyncio.sleep(0.1)
        async with connect(f"ws://{base}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "channel": "alerts"}))
            assert (await recv_json(ws))["type"] == "subscribed"
            # The gateway's feed reads `alerts` from its end: until it has found that end, a
            # message could pass unseen. A probe alert, sent until it arrives, says it has.
            probe = Alert("probe", "probe", "volume", at(0), at(0), 0, 1.0, 1.0, 3.0, 1.0, 60, 1)
            async with asyncio.timeout(deadline(30)):
                while True:
                    await send_alert(settings, probe)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):  # a poll, then the probe again
                            await recv_json(ws)
                            break
            # Each update alone, its effects committed (and pushed) before the next.
            steps: list[tuple[Tick, tuple[str, str, float | None] | None]] = [
                (update(market, 100, at(60), 1e17, closed=False), (ident(60), "provisional", None)),
                (update(market, 101, at(60), 25.0, closed=True), (ident(60), "retracted", 25.0)),
                (update(market, 102, at(61), 1e17, closed=False), (ident(61), "provisional", None)),
                (update(market, 103, at(61), 45.0, closed=True), (ident(61), "confirmed", 45.0)),
                (update(market, 104, at(62), 10.0, closed=False), None),
                (update(market, 105, at(61), 20.0, closed=True), (ident(61), "retracted", 20.0)),
            ]
            for offset, (tick, expected) in enumerate(steps, start=1):
                await send(settings, tick)
                await wait_committed(offsets, tp, offset, alerts, gateway)
                if expected is not None:
                    frame = await recv_json(ws)
                    while frame["alert"]["alert_id"] == "probe":  # one sent before it was seen
                        frame = await recv_json(ws)
                    frames.append(frame)
                    got = frame["alert"]
                    assert (got["alert_id"], got["status"], got["final_value"]) == expected
                    assert got["status_seq"] == tick.seq
        status, body = await http_json(base, "/api/alerts")
        assert status == 200
        listed = [(a["alert_id"], a["status"], a["final_value"]) for a in body["alerts"]]
        status, standing = await http_json(base, "/api/alerts?status=provisional,confirmed")
        assert (status, standing) == (200, {"alerts": []})
        status, bad = await http_json(base, "/api/alerts?status=withdrawn")
        rows = await pool.fetch(
            "SELECT alert_id, status, final_value, value, status_seq, published FROM alerts "
            "ORDER BY minute"
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services), deadline(30))
        await offsets.stop()
        await pool.close()
    # Retracted alerts are listed (newest minute first), marked, not left out.
    assert listed == [(ident(61), "retracted", 20.0), (ident(60), "retracted", 25.0)]
    assert (status, bad["error"]) == (400, "bad_status")
    assert [tuple(r) for r in rows] == [
        (ident(60), "retracted", 25.0, 1e17, 101, True),
        (ident(61), "retracted", 20.0, 45.0, 105, True),
    ]
    messages = await alert_messages(infra.kafka_bootstrap_servers, metric, 5)
    assert [(a.alert_id, a.status, a.version, a.value, a.final_value) for a in messages] == [
        (ident(60), "provisional", 100, 1e17, None),
        (ident(60), "retracted", 101, 1e17, 25.0),
        (ident(61), "provisional", 102, 1e17, None),
        (ident(61), "confirmed", 103, 45.0, 45.0),
        (ident(61), "retracted", 105, 45.0, 20.0),
    ]
    # The WebSocket frames carry the alert messages as they are.
    assert [f["alert"] for f in frames] == [a.as_json() for a in messages]
    assert moved(before, counted()) == {
        ALERTS_RAISED.name: 2,
        ALERTS_CONFIRMED.name: 1,
        ALERTS_RETRACTED.name: 2,
    }


async def send_alert(settings: ServiceSettings, alert: Alert) -> None:
    producer = make_producer(settings.kafka, client_id="test")
    await producer.start()
    try:
        await producer.send_and_wait(ALERTS_TOPIC, alert.encode(), key=alert.metric.encode())
    finally:
        await producer.stop()


async def test_provisional_alert_open_at_a_restart_is_judged_and_published(
    own_infra: LocalInfra,
) -> None:
    """A provisional alert stored before a restart is found by the warm-up and retracted by
    its closed bar; a retraction stored but not published before a crash is published at the
    next start."""
    infra = own_infra
    settings = ServiceSettings.from_env(infra.environment())
    market = Market(unique_exchange(), "eth", "usdt")
    metric = market.metric_id("volume")
    now_minute = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
    start = now_minute - 3 * 3_600_000
    spike = update(market, 100, start + 60 * MINUTE_MS, 1e17, closed=False)
    closing = update(market, 101, start + 60 * MINUTE_MS, 25.0, closed=True)
    tp = TopicPartition(market.topic, 0)
    pool = await db.create_pool(settings.database)
    offsets = AIOKafkaConsumer(bootstrap_servers=infra.kafka_bootstrap_servers, group_id="alerts")
    try:
        await db.ensure_schema(pool, settings.database)
        await db.store_bars(pool, hour_of_bars(market, start))
        await ensure_topics(settings.kafka, [market.topic])
        await offsets.start()

        async def run_until_committed(offset: int) -> None:
            stop = asyncio.Event()
            service = asyncio.create_task(run(settings, stop))
            try:
                await wait_committed(offsets, tp, offset, service)
            finally:
                stop.set()
                await asyncio.wait_for(service, deadline(30))

        await send(settings, spike)
        await run_until_committed(1)
        (row,) = await alert_store.alerts_since(pool, [metric], 0)
        assert (row.status, row.version) == ("provisional", 100)
        # Stopped; stats stores the closing bar and commits it before alerts reads it again.
        await send(settings, closing)
        await db.store_bars(pool, [closing])
        await commit_as(infra.kafka_bootstrap_servers, "stats", tp, 2)
        await run_until_committed(2)
        (row,) = await alert_store.alerts_since(pool, [metric], 0)
        assert (row.status, row.version, row.final_value) == ("retracted", 101, 25.0)
        # As if the last run had crashed between storing the retraction and publishing it.
        await pool.execute("UPDATE alerts SET published = false WHERE alert_id = $1", row.alert_id)
        stop = asyncio.Event()
        service = asyncio.create_task(run(settings, stop))
        try:
            async with asyncio.timeout(deadline(60)):
                while not await pool.fetchval(
                    "SELECT published FROM alerts WHERE alert_id = $1", row.alert_id
                ):
                    assert not service.done(), service
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(service, deadline(30))
    finally:
        await offsets.stop()
        await pool.close()
    messages = await alert_messages(infra.kafka_bootstrap_servers, metric, 3)
    assert [(a.status, a.version, a.final_value) for a in messages] == [
        ("provisional", 100, None),
        ("retracted", 101, 25.0),
        ("retracted", 101, 25.0),  # at least once: the crash left it unmarked
    ]
    assert messages[1] == messages[2]
