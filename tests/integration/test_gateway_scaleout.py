"""Two gateway processes on one broker, Redis and PostgreSQL: the same ranks, live data on both."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import unique_exchange
from tests.e2e.harness import Services, collect, wait_for
from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import (
    ALERTS_TOPIC,
    METRICS_KEY,
    Market,
    MetricKind,
    RankMeasure,
    rank_key,
    stats_key,
)
from tickstream_shared.schemas import MINUTE_MS, Alert, Tick, alert_id
from tickstream_shared.settings import DatabaseSettings, KafkaSettings

# A Redis database of its own, flushed at the start.
REDIS_DB = 13
MINUTE = 1_680_000_000_000
BARS = 5
RANKINGS: tuple[tuple[MetricKind, RankMeasure], ...] = (
    ("price", "std"),
    ("price", "cv"),
    ("price", "logret"),
    ("volume", "std"),
    ("volume", "cv"),
)


def bar(market: Market, index: int, *, seq: int, closed: bool = True) -> Tick:
    minute = MINUTE + index * MINUTE_MS
    return Tick(
        market=market.id,
        minute=minute,
        seq=seq,
        exchange_ts=minute + 30_000,
        received_ts=minute + 30_000,
        open=100.0 + index,
        high=101.0 + index,
        low=99.0 + index,
        close=100.0 + index,
        volume=float(index),
        closed=closed,
    )


def spike(market: Market, index: int) -> Alert:
    metric = market.metric_id("volume")
    minute = MINUTE + index * MINUTE_MS
    return Alert(
        alert_id=alert_id(metric, minute),
        metric=metric,
        kind="volume",
        minute=minute,
        exchange_ts=minute + 30_000,
        seq=index,
        value=900.0,
        mean=100.0,
        factor=3.0,
        ratio=9.0,
        window_minutes=60,
        samples=59,
    )


async def write_stats(client: redis.Redis, market: Market, spread: float) -> None:
    """A metric pair as stats writes it: hashes, the metrics set and every rank set."""
    newest = MINUTE + (BARS - 1) * MINUTE_MS
    for kind in ("price", "volume"):
        metric = market.metric_id(kind)
        values = {"std": spread, "cv": spread / 100, "logret": spread / 1000}
        await client.hset(
            stats_key(metric),
            mapping={
                "count": str(BARS),
                "mean": "100.0",
                "min": "99.0",
                "max": "104.0",
                "last": "104.0",
                "minute": str(newest),
                "last_ts": str(newest + 30_000),
                "stale": "0",
                "clock": str(newest),
                **{measure: repr(value) for measure, value in values.items()},
            },
        )
        await client.sadd(METRICS_KEY, metric)
        for rank_kind, measure in RANKINGS:
            if rank_kind == kind:
                await client.zadd(rank_key(kind, measure), {metric: values[measure]})


def http_get(base: str, path: str) -> tuple[int, str, Any]:
    """Status, ETag and JSON body of a GET (0 when the gateway does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://{base}{path}", timeout=5) as response:
            return response.status, response.headers.get("ETag", ""), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, "", json.loads(exc.read())
    except OSError:
        return 0, "", None


def _ready(base: str) -> bool:
    return http_get(base, "/readyz")[0] == 200


@pytest.fixture
async def gateways(infra: LocalInfra, tmp_path: Path) -> AsyncIterator[tuple[Services, list[str]]]:
    """Two gateway processes alike but for their port, ready."""
    redis_url = f"redis://127.0.0.1:{infra.redis_port}/{REDIS_DB}"
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    env = {
        **os.environ,
        **infra.environment(),
        "REDIS_URL": redis_url,
        "GATEWAY_RANK_INTERVAL_MS": "100",
    }
    services = Services(env, tmp_path)
    bases = []
    try:
        for instance in ("gateway-a", "gateway-b"):
            port = free_port()
            services.start("gateway", instance=instance, GATEWAY_PORT=str(port))
            bases.append(f"127.0.0.1:{port}")
        for base in bases:
            await wait_for(
                functools.partial(_ready, base),
                within=60,
                what=f"gateway {base} ready",
                services=services,
            )
        yield services, bases
    finally:
        codes = services.stop_all()
        assert codes == {"gateway-a": 0, "gateway-b": 0}, services.tail("gateway-a")


async def test_two_gateways_serve_the_same_ranks_and_forward_live_data(
    infra: LocalInfra, gateways: tuple[Services, list[str]]
) -> None:
    """Each instance serves the same rank snapshots (same ETag) and forwards a live bar and an
    alert, read from the broker on its own, to its own WebSocket client."""
    services, bases = gateways
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    exchange = unique_exchange()
    market, other = Market(exchange, "btc", "usd"), Market(exchange, "eth", "usd")
    await ensure_topics(kafka, [market.topic, ALERTS_TOPIC])
    pool = await db.create_pool(DatabaseSettings(url=infra.database_url))
    try:
        await db.store_bars(pool, [bar(market, i, seq=i) for i in range(BARS)])
    finally:
        await pool.close()
    client = redis.Redis.from_url(f"redis://127.0.0.1:{infra.redis_port}/{REDIS_DB}")
    try:
        await write_stats(client, market, spread=2.0)
        await write_stats(client, other, spread=1.0)
    finally:
        await client.aclose()

    expected = {
        kind: [market.metric_id(kind), other.metric_id(kind)] for kind in ("price", "volume")
    }
    for kind, measure in RANKINGS:
        path = f"/api/ranks?kind={kind}&by={measure}"

        def same_everywhere(path: str = path, kind: MetricKind = kind) -> bool:
            answers = [http_get(base, path) for base in bases]
            return (
                all(
                    (status, [e["metric"] for e in body["ranks"]]) == (200, expected[kind])
                    for status, _, body in answers
                )
                and answers[0][1:] == answers[1][1:]
            )

        await wait_for(same_everywhere, within=10, what=f"{path} alike", services=services)

    frames: list[list[dict[str, Any]]] = [[], []]
    async with (
        connect(f"ws://{bases[0]}/ws") as first,
        connect(f"ws://{bases[1]}/ws") as second,
    ):
        readers = [
            asyncio.create_task(collect(ws, sink))
            for ws, sink in ((first, frames[0]), (second, frames[1]))
        ]
        try:
            for ws in (first, second):
                await subscribe(ws, market)
            await wait_for(
                lambda: all(_history(f) for f in frames),
                within=10,
                what="history on both",
                services=services,
            )
            assert _history(frames[0]) == _history(frames[1]) == list(range(BARS))
            ranks = [[f for f in sink if f["type"] == "ranks"][-1] for sink in frames]
            assert ranks[0] == ranks[1]
            assert [e["metric"] for e in ranks[0]["ranks"]] == expected["price"]

            await _forward_until_both_see(kafka, market, frames, services)
            for sink in frames:
                sink.clear()
            # Both consumers now read both topics: one more of each reaches both clients
            # (a straggler of the warm-up may come too).
            last_bar = bar(market, BARS, seq=10_000, closed=False)
            last_alert = spike(market, 10_000)
            producer = make_producer(kafka, client_id="test-scaleout")
            await producer.start()
            try:
                await producer.send_and_wait(market.topic, last_bar.encode(), market.id.encode())
                await producer.send_and_wait(
                    ALERTS_TOPIC, last_alert.encode(), last_alert.metric.encode()
                )
            finally:
                await producer.stop()

            def delivered(sink: list[dict[str, Any]]) -> bool:
                bars = [f for f in sink if f["type"] == "bar" and f["seq"] == 10_000]
                alerts = [f for f in sink if f["type"] == "alert"]
                return bool(bars) and last_alert.as_json() in [f["alert"] for f in alerts]

            await wait_for(
                lambda: all(delivered(sink) for sink in frames),
                within=10,
                what="the last bar and alert on both",
                services=services,
            )
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def subscribe(ws: ClientConnection, market: Market) -> None:
    for command in (
        {"op": "subscribe", "channel": "market", "market": market.id},
        {"op": "subscribe", "channel": "alerts"},
        {"op": "subscribe", "channel": "ranks", "kind": "price", "by": "std"},
    ):
        await ws.send(json.dumps(command))


def _history(sink: list[dict[str, Any]]) -> list[int] | None:
    for frame in sink:
        if frame["type"] == "history":
            return [point["seq"] for point in frame["bars"]]
    return None


async def _forward_until_both_see(
    kafka: KafkaSettings, market: Market, frames: list[list[dict[str, Any]]], services: Services
) -> None:
    """Produce bar updates and alerts until both clients got one of each.

    Each gateway starts reading at the end of a topic when it first fetches it, so the first
    records after it became ready can precede its position.
    """
    producer = make_producer(kafka, client_id="test-scaleout")
    await producer.start()
    try:
        seq = BARS

        async def both_saw_both() -> bool:
            nonlocal seq
            seq += 1
            update = bar(market, BARS, seq=seq, closed=False)
            alert = spike(market, seq)
            await producer.send_and_wait(market.topic, update.encode(), market.id.encode())
            await producer.send_and_wait(ALERTS_TOPIC, alert.encode(), alert.metric.encode())
            kinds = [{f["type"] for f in sink} for sink in frames]
            return all({"bar", "alert"} <= seen for seen in kinds)

        await wait_for(both_saw_both, within=30, what="live data on both", services=services)
    finally:
        await producer.stop()
