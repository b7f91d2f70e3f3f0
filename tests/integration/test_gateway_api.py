"""The gateway on real Redis, PostgreSQL and broker: HTTP views, ranks, history, live bars."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import deadline, unique_exchange
from tickstream_gateway.rankboard import RankBoard
from tickstream_gateway.ranks import hmget_many, read_boards
from tickstream_gateway.service import run
from tickstream_shared import db
from tickstream_shared.feed_status import FEEDS_KEY, STALE_AFTER_MS, FeedStatus
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import (
    MEASURES_BY_KIND,
    METRIC_KINDS,
    METRICS_KEY,
    Market,
    MetricKind,
    RankMeasure,
    rank_key,
    stats_key,
)
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import (
    DatabaseSettings,
    GatewaySettings,
    KafkaSettings,
    RedisSettings,
    ServiceSettings,
)
from tickstream_stats import store as stats_store
from tickstream_stats.book import MetricBook

# A Redis database of its own, flushed at the start: rank totals are then exact.
REDIS_DB = 11
MINUTE = 1_680_000_000_000
HISTORY_MINUTES = 30
BARS = 40  # more minutes than the history holds
# Clients in this process, which also runs the gateway; bench/bench_subscribe.py measures 1,000
# from other processes.
CONCURRENT_SUBSCRIBERS = 500


@dataclass
class Gateway:
    base: str
    redis: redis.Redis
    settings: ServiceSettings


@pytest.fixture(scope="module")
async def gateway(infra: LocalInfra) -> AsyncIterator[Gateway]:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{infra.redis_port}/{REDIS_DB}"
    settings = ServiceSettings(
        kafka=KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers),
        redis=RedisSettings(url=redis_url),
        database=DatabaseSettings(url=infra.database_url),
        gateway=GatewaySettings(port=port, history_minutes=HISTORY_MINUTES, rank_interval_ms=100),
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    stop = asyncio.Event()
    serving = asyncio.create_task(run(settings, stop))
    base = f"127.0.0.1:{port}"
    try:
        async with asyncio.timeout(deadline(60)):
            while (await http_json(base, "/healthz"))[0] != 200:
                assert not serving.done(), "gateway stopped"
                await asyncio.sleep(0.1)
        yield Gateway(base, client, settings)
    finally:
        stop.set()
        await serving
        await client.aclose()


async def http_json(base: str, path: str) -> tuple[int, Any]:
    def fetch() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://{base}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return 0, None

    return await asyncio.to_thread(fetch)


async def http_fresh(base: str, path: str, ready: Callable[[Any], bool]) -> tuple[int, Any]:
    """GET `path` until `ready(body)`: a cached answer can be one refresh behind a write."""
    async with asyncio.timeout(deadline(10)):
        while True:
            status, body = await http_json(base, path)
            if status == 200 and ready(body):
                return status, body
            await asyncio.sleep(0.05)


async def http_get(
    base: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and raw body of a GET, 304 included."""

    def fetch() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://{base}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, _lower(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, _lower(exc.headers), exc.read()

    return await asyncio.to_thread(fetch)


async def http_changed(base: str, path: str, etag: str) -> tuple[int, dict[str, str], bytes]:
    """Revalidate `path` against `etag` until it is no longer 304: the changed answer."""
    async with asyncio.timeout(deadline(5)):
        while True:
            answer = await http_get(base, path, {"If-None-Match": etag})
            if answer[0] != 304:
                return answer
            await asyncio.sleep(0.02)


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def bar(market: Market, index: int, close: float, *, seq: int | None = None) -> Tick:
    minute = MINUTE + index * MINUTE_MS
    return Tick(
        market=market.id,
        minute=minute,
        seq=index if seq is None else seq,
        exchange_ts=minute + 30_000,
        received_ts=minute + 30_000,
        open=close,
        high=close,
        low=close,
        close=close,
        volume=float(index),
        closed=seq is None,
    )


async def write_stats(
    client: redis.Redis, market: Market, std: float, cv: float, logret: float, stale: bool
) -> None:
    """Redis as stats writes it (the agreed contract): hashes, the metrics set, rank sets."""
    newest = MINUTE + (BARS - 1) * MINUTE_MS
    measures: dict[MetricKind, dict[RankMeasure, float]] = {
        "price": {"std": std, "cv": cv, "logret": logret},
        "volume": {"std": std / 10, "cv": cv / 10},
    }
    for kind, values in measures.items():
        metric = market.metric_id(kind)
        fields = {
            "count": "40",
            "mean": repr(100.0),
            "min": repr(90.0),
            "max": repr(110.0),
            "last": repr(101.0),
            "minute": str(newest),
            "last_ts": str(newest + 30_000),
            "stale": "1" if stale else "0",
            "clock": str(newest),
            **{measure: repr(value) for measure, value in values.items()},
        }
        await client.hset(stats_key(metric), mapping=fields)
        await client.sadd(METRICS_KEY, metric)
        if not stale:
            for measure, value in values.items():
                await client.zadd(rank_key(kind, measure), {metric: value})


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(deadline(10)):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def test_ranks_listing_and_detail_under_every_measure(gateway: Gateway) -> None:
    """Ranks follow the measure asked for; stale metrics are listed but never ranked."""
    exchange = unique_exchange()
    calm, wild, gone = (Market(exchange, base, "usd") for base in ("calm", "wild", "gone"))
    await write_stats(gateway.redis, calm, std=9.0, cv=0.01, logret=0.002, stale=False)
    await write_stats(gateway.redis, wild, std=1.0, cv=0.05, logret=0.001, stale=False)
    await write_stats(gateway.redis, gone, std=50.0, cv=0.5, logret=0.5, stale=True)
    pool = await db.create_pool(gateway.settings.database)
    try:
        await db.store_bars(pool, [bar(calm, i, 100.0 + i) for i in range(BARS)])
    finally:
        await pool.close()

    expected = {
        "std": [calm, wild],
        "cv": [wild, calm],
        "logret": [calm, wild],
    }
    for measure, order in expected.items():
        status, body = await http_fresh(
            gateway.base, f"/api/ranks?kind=price&by={measure}", lambda b: b["total"] == 2
        )
        assert (body["kind"], body["by"], body["total"]) == ("price", measure, 2)
        assert [e["metric"] for e in body["ranks"]] == [m.metric_id("price") for m in order]
        assert [e["label"] for e in body["ranks"]] == ["1/2", "2/2"]
    status, body = await http_json(gateway.base, "/api/ranks?kind=price&by=cv")
    assert body["ranks"][0] == {
        "metric": wild.metric_id("price"),
        "position": 1,
        "total": 2,
        "label": "1/2",
        "value": 0.05,
        "std": 1.0,
        "cv": 0.05,
        "logret": 0.001,
        "mean": 100.0,
        "count": 40,
    }
    status, body = await http_fresh(
        gateway.base, "/api/ranks?kind=volume", lambda b: b["total"] == 2
    )
    assert body["by"] == "cv" and "logret" not in body["ranks"][0]
    status, body = await http_json(gateway.base, "/api/ranks?kind=price")
    assert body["by"] == "logret"
    assert [e["metric"] for e in body["ranks"]] == [m.metric_id("price") for m in (calm, wild)]
    status, body = await http_json(gateway.base, "/api/ranks?kind=volume&by=logret")
    assert (status, body["error"]) == (400, "bad_measure")

    status, listing = await http_fresh(
        gateway.base, "/api/metrics", lambda b: len(b["metrics"]) == 6
    )
    listed = {m["id"]: m for m in listing["metrics"]}
    assert sorted(listed) == sorted(
        m.metric_id(k) for m in (calm, wild, gone) for k in ("price", "volume")
    )
    stale = listed[gone.metric_id("price")]
    assert stale["stale"] is True and stale["position"] is None and stale["rank"] is None
    assert stale["ranks"] == {
        measure: {"position": None, "total": 2, "rank": None} for measure in expected
    }
    assert listed[wild.metric_id("price")]["ranks"]["cv"] == {
        "position": 1,
        "total": 2,
        "rank": "1/2",
    }
    assert set(listed[wild.metric_id("volume")]["ranks"]) == {"std", "cv"}

    status, detail = await http_json(gateway.base, f"/api/metrics/{calm.metric_id('price')}")
    assert status == 200
    assert detail["stale"] is False
    assert (detail["position"], detail["total"], detail["rank"]) == (1, 2, "1/2")
    assert detail["ranks"] == {
        "std": {"position": 1, "total": 2, "rank": "1/2"},
        "cv": {"position": 2, "total": 2, "rank": "2/2"},
        "logret": {"position": 1, "total": 2, "rank": "1/2"},
    }
    assert (detail["window_minutes"], detail["logret"], detail["clock"]) == (
        1440,
        0.002,
        MINUTE + (BARS - 1) * MINUTE_MS,
    )
    first = BARS - 1 - HISTORY_MINUTES
    assert detail["values"] == [[MINUTE + i * MINUTE_MS, 100.0 + i] for i in range(first, BARS)]
    since = MINUTE + (BARS - 3) * MINUTE_MS
    status, detail = await http_json(
        gateway.base, f"/api/metrics/{calm.metric_id('volume')}?since={since}"
    )
    assert detail["values"] == [
        [MINUTE + i * MINUTE_MS, float(i)] for i in (BARS - 3, BARS - 2, BARS - 1)
    ]
    status, detail = await http_json(gateway.base, f"/api/metrics/{gone.metric_id('price')}")
    assert detail["stale"] is True and detail["values"] == []
    assert all(r["position"] is None for r in detail["ranks"].values())
    status, body = await http_json(gateway.base, f"/api/metrics/{calm.metric_id('price')}?since=1")
    assert (status, body["error"]) == (400, "bad_since")


async def test_history_since_then_live_bars(gateway: Gateway) -> None:
    """History holds at most minutes + 1 bars from `since`; live bars continue past its seq."""
    market = Market(unique_exchange(), "btc", "usdt")
    kafka = gateway.settings.kafka
    await ensure_topics(kafka, [market.topic])
    pool = await db.create_pool(gateway.settings.database)
    try:
        await db.store_bars(pool, [bar(market, i, 100.0 + math.sin(i)) for i in range(BARS)])
    finally:
        await pool.close()
    newest = MINUTE + (BARS - 1) * MINUTE_MS
    async with connect(f"ws://{gateway.base}/ws") as ws:
        subscribe: dict[str, Any] = {"op": "subscribe", "channel": "market", "market": market.id}
        await ws.send(json.dumps(subscribe))
        assert (await recv_json(ws))["type"] == "subscribed"
        history = await recv_json(ws)
        assert (history["type"], history["since"]) == ("history", None)
        assert [p["seq"] for p in history["bars"]] == list(range(BARS - 1 - HISTORY_MINUTES, BARS))

        await ws.send(json.dumps({**subscribe, "since": newest - MINUTE_MS}))
        assert (await recv_json(ws))["type"] == "subscribed"
        history = await recv_json(ws)
        assert history["since"] == newest - MINUTE_MS
        assert [p["minute"] for p in history["bars"]] == [newest - MINUTE_MS, newest]
        assert history["bars"][-1] == {
            "minute": newest,
            "seq": BARS - 1,
            "exchange_ts": newest + 30_000,
            "open": 100.0 + math.sin(BARS - 1),
            "high": 100.0 + math.sin(BARS - 1),
            "low": 100.0 + math.sin(BARS - 1),
            "close": 100.0 + math.sin(BARS - 1),
            "volume": float(BARS - 1),
            "quote_volume": None,  # stored without one: unknown, sent as null
            "trades": None,
            "closed": True,
        }

        # Nothing at or after `since`: an empty history, not an unknown market.
        await ws.send(json.dumps({**subscribe, "since": newest + MINUTE_MS}))
        assert (await recv_json(ws))["type"] == "subscribed"
        history = await recv_json(ws)
        assert history["bars"] == []
        await ws.send(json.dumps({**subscribe, "since": newest}))
        assert (await recv_json(ws))["type"] == "subscribed"
        assert [p["seq"] for p in (await recv_json(ws))["bars"]] == [BARS - 1]

        # Updates of a forming minute arrive as bar frames with growing seq (the feed may
        # need a metadata refresh to find the new topic, so produce until one arrives).
        producer = make_producer(kafka, client_id="test-gateway")
        await producer.start()
        try:
            seq = BARS
            bars: list[dict[str, Any]] = []
            async with asyncio.timeout(deadline(30)):
                while len(bars) < 3:
                    update = bar(market, BARS, 200.0, seq=seq)
                    await producer.send_and_wait(
                        market.topic, update.encode(), key=market.id.encode()
                    )
                    seq += 1
                    try:
                        async with asyncio.timeout(0.2):
                            frame = json.loads(await ws.recv())
                    except TimeoutError:
                        continue
                    bars.append(frame)
        finally:
            await producer.stop()
    assert {f["type"] for f in bars} == {"bar"}
    seqs = [f["seq"] for f in bars]
    assert seqs == sorted(set(seqs)) and seqs[0] >= BARS
    assert {(f["market"], f["minute"], f["closed"]) for f in bars} == {
        (market.id, newest + MINUTE_MS, False)
    }


async def test_unknown_market_and_rank_subscription(gateway: Gateway) -> None:
    """An unknown market gets `unknown_market`; a ranks subscription can switch its measure."""
    async with connect(f"ws://{gateway.base}/ws") as ws:
        unknown = Market(unique_exchange(), "nope", "usd").id
        await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": unknown}))
        assert (await recv_json(ws))["type"] == "subscribed"
        assert (await recv_json(ws))["code"] == "unknown_market"
        await ws.send(json.dumps({"op": "subscribe", "channel": "ranks", "kind": "price"}))
        assert await recv_json(ws) == {
            "type": "subscribed",
            "channel": "ranks",
            "kind": "price",
            "by": "logret",
            "offset": 0,
            "limit": 20,
        }
        assert (await recv_json(ws))["by"] == "logret"
        await ws.send(
            json.dumps({"op": "subscribe", "channel": "ranks", "kind": "price", "by": "std"})
        )
        assert (await recv_json(ws))["by"] == "std"  # the subscribed frame
        snapshot = await recv_json(ws)
        assert (snapshot["type"], snapshot["kind"], snapshot["by"]) == ("ranks", "price", "std")
        await ws.send(json.dumps({"op": "unsubscribe", "channel": "ranks", "kind": "price"}))
        assert await recv_json(ws) == {"type": "unsubscribed", "channel": "ranks", "kind": "price"}


async def test_metrics_show_each_markets_feed(gateway: Gateway) -> None:
    """Reports are served aged, summed per origin, also by /api/feeds; /readyz ignores them."""
    exchange = unique_exchange()
    fresh, old, bare, garbled, quiet, down, replayed = (
        Market(exchange, base, "usd")
        for base in ("fresh", "old", "bare", "garbled", "quiet", "down", "replayed")
    )
    with_stats = (fresh, old, bare, garbled)
    now_ms = time.time_ns() // 1_000_000
    reports = {
        fresh.id.encode(): FeedStatus("live", exchange, "live", now_ms, now_ms - 500).encode(),
        old.id.encode(): FeedStatus(
            "replay", "replay", "live", now_ms - STALE_AFTER_MS - 5_000
        ).encode(),
        quiet.id.encode(): FeedStatus("live", exchange, "reconnecting", now_ms).encode(),
        down.id.encode(): FeedStatus(
            "live", exchange, "unreachable", now_ms, now_ms - 600_000
        ).encode(),
        replayed.id.encode(): FeedStatus("replay", "replay", "live", now_ms, now_ms - 200).encode(),
        garbled.id.encode(): b"{not a report",
        f"{exchange}:no id".encode(): FeedStatus("live", exchange, "live", now_ms).encode(),
        f"{exchange}:\xff-usd".encode("latin-1"): b"\xff\xfe not UTF-8",
    }
    try:
        for market in with_stats:
            await write_stats(gateway.redis, market, std=1.0, cv=0.1, logret=0.1, stale=True)
        await gateway.redis.hset(FEEDS_KEY, mapping=reports)

        status, body = await http_fresh(
            gateway.base,
            "/api/feeds",
            lambda b: any(m.startswith(f"{exchange}:") for m in b["feeds"]),
        )
        feeds = {m: f for m, f in body["feeds"].items() if m.startswith(f"{exchange}:")}
        assert feeds == {
            fresh.id: {
                "source": "live",
                "origin": exchange,
                "state": "live",
                "reported_ms": now_ms,
                "last_data_ms": now_ms - 500,
            },
            old.id: {
                "source": "replay",
                "origin": "replay",
                "state": "stale",
                "reported_ms": now_ms - STALE_AFTER_MS - 5_000,
                "last_data_ms": None,
            },
            quiet.id: {
                "source": "live",
                "origin": exchange,
                "state": "reconnecting",
                "reported_ms": now_ms,
                "last_data_ms": None,
            },
            down.id: {
                "source": "live",
                "origin": exchange,
                "state": "unreachable",
                "reported_ms": now_ms,
                "last_data_ms": now_ms - 600_000,
            },
            replayed.id: {
                "source": "replay",
                "origin": "replay",
                "state": "live",
                "reported_ms": now_ms,
                "last_data_ms": now_ms - 200,
            },
        }
        assert body["origins"][exchange] == {
            "source": "live",
            "state": "unreachable",
            "markets": {"unreachable": 1, "reconnecting": 1, "live": 1},
            "last_data_ms": now_ms - 500,
        }
        assert body["origins"]["replay"] == {
            "source": "replay",
            "state": "stale",
            "markets": {"stale": 1, "live": 1},
            "last_data_ms": now_ms - 200,
        }
        # /api/metrics holds the same origins, and the feeds of the markets it lists only.
        # Cached apart from /api/feeds (each at most 1 s old): wait for the one with our feeds.
        status, listed = await http_fresh(
            gateway.base, f"/api/metrics?exchange={exchange}", lambda b: exchange in b["origins"]
        )
        assert listed["origins"] == body["origins"]
        assert listed["feeds"] == {m.id: body["feeds"][m.id] for m in (fresh, old)}
        body = listed
        status, ready = await http_json(gateway.base, "/readyz")
        assert (status, set(ready)) == (200, {"status", "broker", "redis", "database", "feed"})
        shown = {
            m["id"]: m["feed"] for m in body["metrics"] if m["market"].startswith(f"{exchange}:")
        }
        assert shown == {
            market.metric_id(kind): state
            for market, state in ((fresh, "live"), (old, "stale"), (bare, None), (garbled, None))
            for kind in ("price", "volume")
        }

        status, detail = await http_json(gateway.base, f"/api/metrics/{fresh.metric_id('price')}")
        assert (status, detail["feed"]) == (200, "live")
        status, detail = await http_json(
            gateway.base, f"/api/metrics/{garbled.metric_id('volume')}"
        )
        assert (status, detail["feed"]) == (200, None)
    finally:
        # Other tests list every metric of this database: leave none of ours behind.
        metric_ids = [m.metric_id(k) for m in with_stats for k in ("price", "volume")]
        await gateway.redis.delete(*(stats_key(m) for m in metric_ids))
        await gateway.redis.srem(METRICS_KEY, *metric_ids)
        await gateway.redis.hdel(FEEDS_KEY, *reports)


def history_reads(base: str) -> float:
    """The gateway's tickstream_gateway_history_reads_total, from /metrics."""
    with urllib.request.urlopen(f"http://{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tickstream_gateway_history_reads_total":
                return float(sample.value)
    raise AssertionError("tickstream_gateway_history_reads_total not exported")


async def test_concurrent_subscribers_get_history_from_memory(gateway: Gateway) -> None:
    """Hundreds of clients subscribing at once all get the same history, none reading storage."""
    market = Market(unique_exchange(), "btc", "usdt")
    kafka = gateway.settings.kafka
    await ensure_topics(kafka, [market.topic])
    pool = await db.create_pool(gateway.settings.database)
    subscribe = json.dumps({"op": "subscribe", "channel": "market", "market": market.id})
    producer = make_producer(kafka, client_id="test-gateway")
    await producer.start()
    try:
        await db.store_bars(pool, [bar(market, i, 100.0 + i) for i in range(BARS)])
        # The feed must deliver the market once, with storage holding that update (as stats
        # would), for its history to be kept in memory: produce until a bar frame arrives.
        seq = BARS
        async with connect(f"ws://{gateway.base}/ws") as first:
            await first.send(subscribe)
            async with asyncio.timeout(deadline(30)):
                while True:
                    update = bar(market, BARS, 200.0, seq=seq)
                    await db.store_bars(pool, [update])
                    await producer.send_and_wait(
                        market.topic, update.encode(), key=market.id.encode()
                    )
                    seq += 1
                    try:
                        async with asyncio.timeout(0.2):
                            while (frame := json.loads(await first.recv()))["type"] != "bar":
                                pass
                        break
                    except TimeoutError:
                        continue
                # That frame may be of an earlier update than the last one sent: wait for the
                # last one too, so that every subscriber below sees the same history.
                while frame.get("seq") != seq - 1:
                    frame = json.loads(await first.recv())
            await first.send(subscribe)  # storage now has the feed's first update: loaded
            while json.loads(await first.recv())["type"] != "history":
                pass
    finally:
        await producer.stop()
        await pool.close()
    reads = await asyncio.to_thread(history_reads, gateway.base)

    async def subscriber() -> dict[str, Any]:
        async with connect(f"ws://{gateway.base}/ws") as ws:
            await ws.send(subscribe)
            while True:
                frame = await recv_json(ws)
                if frame["type"] == "history":
                    return frame

    started = time.monotonic()
    async with asyncio.timeout(deadline(120)):
        histories = await asyncio.gather(*(subscriber() for _ in range(CONCURRENT_SUBSCRIBERS)))
    elapsed = time.monotonic() - started
    assert await asyncio.to_thread(history_reads, gateway.base) == reads
    assert all(h == histories[0] for h in histories)
    points = histories[0]["bars"]
    assert len(points) == HISTORY_MINUTES + 1
    assert (points[-1]["minute"], points[-1]["seq"]) == (MINUTE + BARS * MINUTE_MS, seq - 1)
    print(f"{CONCURRENT_SUBSCRIBERS} subscribers had their history within {elapsed:.2f} s")


async def test_since_before_the_history_window_gets_a_gap_frame(gateway: Gateway) -> None:
    """A `since` older than the window is answered with `gap`, then the whole window."""
    market = Market(unique_exchange(), "eth", "usdt")
    pool = await db.create_pool(gateway.settings.database)
    try:
        await db.store_bars(pool, [bar(market, i, 100.0 + i) for i in range(BARS)])
    finally:
        await pool.close()
    window_start = MINUTE + (BARS - 1 - HISTORY_MINUTES) * MINUTE_MS
    async with connect(f"ws://{gateway.base}/ws") as ws:
        subscribe = {"op": "subscribe", "channel": "market", "market": market.id}
        await ws.send(json.dumps({**subscribe, "since": MINUTE}))
        assert (await recv_json(ws))["type"] == "subscribed"
        assert await recv_json(ws) == {
            "type": "gap",
            "market": market.id,
            "since": MINUTE,
            "until": window_start,
        }
        history = await recv_json(ws)
        assert (history["type"], history["since"]) == ("history", MINUTE)
        assert [p["minute"] for p in history["bars"]] == [
            window_start + i * MINUTE_MS for i in range(HISTORY_MINUTES + 1)
        ]
        await ws.send(json.dumps({**subscribe, "since": window_start}))
        assert (await recv_json(ws))["type"] == "subscribed"
        assert (await recv_json(ws))["type"] == "history"


async def forget_stats(client: redis.Redis, markets: list[Market]) -> None:
    """Remove what write_stats wrote, so other tests' totals stay exact."""
    metric_ids = [m.metric_id(kind) for m in markets for kind in ("price", "volume")]
    await client.delete(*(stats_key(m) for m in metric_ids))
    await client.srem(METRICS_KEY, *metric_ids)
    for kind, measures in (("price", ("std", "cv", "logret")), ("volume", ("std", "cv"))):
        for measure in measures:
            await client.zrem(rank_key(kind, measure), *metric_ids)  # type: ignore[arg-type]


async def test_ranks_come_with_an_etag_and_follow_a_change(gateway: Gateway) -> None:
    """An unchanged snapshot keeps its ETag and answers 304; a change shows with a new ETag."""
    exchange = unique_exchange()
    calm, wild = Market(exchange, "calm", "usd"), Market(exchange, "wild", "usd")
    path = "/api/ranks?kind=volume&by=cv"
    interval_s = gateway.settings.gateway.rank_interval_ms / 1000

    def ours(body: Any) -> list[str]:
        return [e["metric"] for e in body["ranks"] if e["metric"].startswith(f"{exchange}:")]

    try:
        await write_stats(gateway.redis, calm, std=1.0, cv=0.3, logret=0.1, stale=False)
        await http_fresh(gateway.base, path, lambda b: ours(b) == [calm.metric_id("volume")])
        status, headers, body = await http_get(gateway.base, path)
        assert (status, headers["cache-control"]) == (200, "no-cache")
        etag = headers["etag"]
        for _ in range(3):  # the poller reads it again every interval: same bytes, same tag
            await asyncio.sleep(interval_s)
            again, same, same_body = await http_get(gateway.base, path)
            assert (again, same["etag"], same_body) == (status, etag, body)
        for tag in (etag, f"W/{etag}", f'"other", {etag}'):
            status, revalidated, empty = await http_get(gateway.base, path, {"If-None-Match": tag})
            assert (status, revalidated["etag"], empty) == (304, etag, b"")
            assert "content-length" not in revalidated or revalidated["content-length"] == "0"

        await write_stats(gateway.redis, wild, std=1.0, cv=0.9, logret=0.1, stale=False)
        written = time.monotonic()
        answer = await http_changed(gateway.base, path, etag)
        waited = time.monotonic() - written
        status, headers, body = answer
        assert status == 200 and headers["etag"] != etag
        assert ours(json.loads(body)) == [wild.metric_id("volume"), calm.metric_id("volume")]
        assert waited < deadline(2 * interval_s + 1.0)  # at most two poll intervals old
        assert (await http_get(gateway.base, path, {"If-None-Match": headers["etag"]}))[0] == 304
        assert (await http_get(gateway.base, path, {"If-None-Match": etag}))[0] == 200
    finally:
        await forget_stats(gateway.redis, [calm, wild])


async def test_metrics_listing_comes_with_an_etag_and_follows_a_change(gateway: Gateway) -> None:
    """The listing keeps its ETag across refreshes while unchanged and shows a write within ~1 s."""
    exchange = unique_exchange()
    first, second = Market(exchange, "first", "usd"), Market(exchange, "second", "usd")

    def ours(body: Any) -> list[str]:
        return [m["id"] for m in body["metrics"] if m["market"].startswith(f"{exchange}:")]

    try:
        await write_stats(gateway.redis, first, std=1.0, cv=0.3, logret=0.1, stale=False)
        await http_fresh(gateway.base, "/api/metrics", lambda b: len(ours(b)) == 2)
        status, headers, body = await http_get(gateway.base, "/api/metrics")
        assert (status, headers["cache-control"]) == (200, "no-cache")
        etag = headers["etag"]
        await asyncio.sleep(1.2)  # past the listing's 1 s: read from Redis again, same bytes
        again, same, same_body = await http_get(gateway.base, "/api/metrics")
        assert (again, same["etag"], same_body) == (status, etag, body)
        status, revalidated, empty = await http_get(
            gateway.base, "/api/metrics", {"If-None-Match": etag}
        )
        assert (status, revalidated["etag"], empty) == (304, etag, b"")

        await write_stats(gateway.redis, second, std=2.0, cv=0.1, logret=0.2, stale=False)
        written = time.monotonic()
        answer = await http_changed(gateway.base, "/api/metrics", etag)
        waited = time.monotonic() - written
        status, headers, body = answer
        assert status == 200 and headers["etag"] != etag
        assert ours(json.loads(body)) == sorted(
            m.metric_id(k) for m in (first, second) for k in ("price", "volume")
        )
        assert waited < deadline(2.0)  # the listing is at most 1 s old
    finally:
        await forget_stats(gateway.redis, [first, second])


async def test_ranks_and_metrics_are_paged_and_filtered(gateway: Gateway) -> None:
    """Positions count the markets compared (exchange, quote); q, limit and offset only cut."""
    exchange, other = unique_exchange(), unique_exchange()
    calm, wild, coin = (
        Market(exchange, b, q) for b, q in (("a", "usdt"), ("b", "usdt"), ("c", "btc"))
    )
    elsewhere = Market(other, "a", "usdt")
    markets = [calm, wild, coin, elsewhere]
    try:
        for market, logret in ((calm, 0.001), (wild, 0.003), (coin, 0.002), (elsewhere, 0.009)):
            await write_stats(gateway.redis, market, std=1.0, cv=0.1, logret=logret, stale=False)

        def labels(body: Any) -> list[tuple[str, str]]:
            return [(e["metric"], e["label"]) for e in body["ranks"]]

        path = f"/api/ranks?kind=price&exchange={exchange.upper()}"
        status, body = await http_fresh(gateway.base, path, lambda b: b["total"] == 3)
        assert labels(body) == [
            (wild.metric_id("price"), "1/3"),
            (coin.metric_id("price"), "2/3"),
            (calm.metric_id("price"), "3/3"),
        ]
        assert (body["by"], body["matching"], body["offset"], body["limit"]) == (
            "logret",
            3,
            0,
            100,
        )
        status, body = await http_json(gateway.base, f"{path}&quote=usdt")
        assert labels(body) == [(wild.metric_id("price"), "1/2"), (calm.metric_id("price"), "2/2")]
        status, body = await http_json(gateway.base, f"{path}&q=C-BTC")
        assert labels(body) == [(coin.metric_id("price"), "2/3")]
        assert (body["total"], body["matching"]) == (3, 1)
        status, body = await http_json(gateway.base, f"{path}&limit=1&offset=1")
        assert labels(body) == [(coin.metric_id("price"), "2/3")]
        assert (body["total"], body["matching"], body["offset"], body["limit"]) == (3, 3, 1, 1)
        status, body = await http_json(gateway.base, f"{path}&offset=3")
        assert (status, body["ranks"], body["matching"]) == (200, [], 3)

        status, body = await http_fresh(
            gateway.base,
            f"/api/metrics?exchange={exchange}&quote=usdt&limit=3",
            lambda b: b["matching"] == 4,
        )
        assert [m["id"] for m in body["metrics"]] == [
            calm.metric_id("price"),
            calm.metric_id("volume"),
            wild.metric_id("price"),
        ]
        assert (body["offset"], body["limit"]) == (0, 3)
        assert body["metrics"][2]["ranks"]["logret"] == {"position": 1, "total": 2, "rank": "1/2"}
        status, body = await http_json(gateway.base, f"/api/metrics?q={other}:")
        assert [m["id"] for m in body["metrics"]] == [
            elsewhere.metric_id("price"),
            elsewhere.metric_id("volume"),
        ]
        assert body["metrics"][0]["ranks"]["logret"]["total"] >= 4  # among every market
    finally:
        await forget_stats(gateway.redis, markets)


@pytest.mark.parametrize("route", ["/api/ranks?kind=price&", "/api/metrics?"])
@pytest.mark.parametrize(
    ("query", "code", "message"),
    [
        ("limit=0", "bad_limit", "limit must be between 1 and 1000, not 0"),
        ("limit=1001", "bad_limit", "limit must be between 1 and 1000, not 1001"),
        ("limit=ten", "bad_limit", "limit 'ten' is not an integer in 1..1000"),
        ("offset=-1", "bad_offset", "offset '-1' is not an integer in 0..100000"),
        ("offset=100001", "bad_offset", "offset must be between 0 and 100000, not 100001"),
        (
            "offset=" + "9" * 5000,
            "bad_offset",
            f"offset {'9' * 64!r}… is not an integer in 0..100000",
        ),
        ("exchange=", "bad_exchange", "exchange '' must be 1 to 32 of a-z and 0-9"),
        ("quote=us%24t", "bad_quote", "quote 'us$t' must be 1 to 32 of a-z and 0-9"),
        ("q=btc%2F", "bad_query", "q 'btc/' must be 1 to 64 of a-z, 0-9, ':' and '-'"),
        ("q=" + "a" * 65, "bad_query", f"q {'a' * 64!r}… must be 1 to 64 of a-z, 0-9, ':' and '-'"),
    ],
)
async def test_bad_pages_and_filters_are_refused(
    gateway: Gateway, route: str, query: str, code: str, message: str
) -> None:
    """A bad limit, offset, exchange, quote or q is a 400 naming the parameter and its range."""
    status, body = await http_json(gateway.base, route + query)
    assert (status, body) == (400, {"error": code, "message": message})


async def test_large_answers_are_gzipped_for_clients_that_accept_it(gateway: Gateway) -> None:
    """A ranks page over 1 KB comes gzipped with its own ETag and Vary, and revalidates to 304;
    without Accept-Encoding the same content comes as it is."""
    exchange = unique_exchange()
    markets = [Market(exchange, f"c{i}", "usdt") for i in range(12)]
    path = f"/api/ranks?kind=price&exchange={exchange}"
    try:
        for i, market in enumerate(markets):
            await write_stats(gateway.redis, market, std=1.0, cv=0.1, logret=i / 100, stale=False)
        await http_fresh(gateway.base, path, lambda b: b["total"] == len(markets))
        status, plain_headers, plain = await http_get(gateway.base, path)
        assert status == 200 and len(plain) > 1024 and "content-encoding" not in plain_headers
        status, headers, body = await http_get(gateway.base, path, {"Accept-Encoding": "gzip"})
        assert (status, headers["content-encoding"], headers["vary"]) == (
            200,
            "gzip",
            "Accept-Encoding",
        )
        assert gzip.decompress(body) == plain and len(body) < len(plain) / 3
        assert headers["etag"] == f'{plain_headers["etag"][:-1]}-gzip"'
        status, revalidated, empty = await http_get(
            gateway.base, path, {"Accept-Encoding": "gzip", "If-None-Match": headers["etag"]}
        )
        assert (status, revalidated["etag"], empty) == (304, headers["etag"], b"")
    finally:
        await forget_stats(gateway.redis, markets)


async def test_rank_boards_read_hashes_only_for_metrics_whose_values_moved(
    gateway: Gateway,
) -> None:
    """A poll takes every measure from the rank sets and reads mean/count only for metrics
    whose values changed (or all, when asked); an unchanged ranking keeps its board."""
    exchange = unique_exchange()
    calm, wild = Market(exchange, "calm", "usd"), Market(exchange, "wild", "usd")
    client = gateway.redis

    def ours(board: RankBoard) -> list[tuple[str, float, int]]:
        return [(e.metric, e.mean, e.count) for e in board.entries if e.market.exchange == exchange]

    try:
        await write_stats(client, calm, std=1.0, cv=0.1, logret=0.2, stale=False)
        await write_stats(client, wild, std=2.0, cv=0.3, logret=0.1, stale=False)
        first = await read_boards(client, {})
        price = first["price", "logret"]
        assert ours(price) == [
            (calm.metric_id("price"), 100.0, 40),
            (wild.metric_id("price"), 100.0, 40),
        ]
        assert [e.measures for e in price.entries if e.market.exchange == exchange] == [
            (("std", 1.0), ("cv", 0.1), ("logret", 0.2)),
            (("std", 2.0), ("cv", 0.3), ("logret", 0.1)),
        ]
        # A hash rewritten with the same values: not read again, the boards are the same.
        await client.hset(stats_key(calm.metric_id("price")), mapping={"mean": "7.0", "count": "9"})
        again = await read_boards(client, first, reread_all=False)
        assert all(again[key] is first[key] for key in first)
        # Every FULL_READ_EVERY polls the poller reads all: the new mean and count show.
        full = await read_boards(client, again, reread_all=True)
        assert ours(full["price", "logret"])[0] == (calm.metric_id("price"), 7.0, 9)
        assert full["volume", "cv"] is first["volume", "cv"]
        # A value that moved is read with its hash at once.
        await client.hset(stats_key(wild.metric_id("price")), mapping={"mean": "5.0"})
        await client.zadd(rank_key("price", "std"), {wild.metric_id("price"): 2.5})
        moved = await read_boards(client, full, reread_all=False)
        assert ours(moved["price", "std"]) == [
            (wild.metric_id("price"), 5.0, 40),
            (calm.metric_id("price"), 7.0, 9),
        ]
        # In a rank set but stale by its hash, or missing from one set of its kind: not ranked.
        await client.hset(stats_key(calm.metric_id("price")), mapping={"stale": "1"})
        await client.zrem(rank_key("volume", "cv"), wild.metric_id("volume"))
        odd = await read_boards(client, moved, reread_all=True)
        assert [m for m, _, _ in ours(odd["price", "cv"])] == [wild.metric_id("price")]
        assert [m for m, _, _ in ours(odd["volume", "std"])] == [calm.metric_id("volume")]
    finally:
        await forget_stats(client, [calm, wild])


async def test_a_ranks_subscription_gets_its_page_and_its_own_market(gateway: Gateway) -> None:
    """A ranks frame holds `limit` entries and, in `own`, the client's subscribed market ranked
    below them; a bad limit is refused with an error and subscribes nothing."""
    exchange = unique_exchange()
    markets = [Market(exchange, f"c{i}", "usd") for i in range(5)]
    mine = markets[-1]
    pool = await db.create_pool(gateway.settings.database)
    try:
        await db.store_bars(pool, [bar(mine, i, 100.0) for i in range(3)])
        for i, market in enumerate(markets):
            await write_stats(
                gateway.redis, market, std=1.0, cv=0.1, logret=1 - i / 10, stale=False
            )
        path = f"/api/ranks?kind=price&exchange={exchange}"
        await http_fresh(gateway.base, path, lambda b: b["total"] == len(markets))
        async with connect(f"ws://{gateway.base}/ws") as ws:
            bad = {"op": "subscribe", "channel": "ranks", "kind": "price", "limit": 500}
            await ws.send(json.dumps(bad))
            assert await recv_json(ws) == {
                "type": "error",
                "code": "bad_limit",
                "message": "limit must be between 1 and 100, not 500",
            }
            ranks = {**bad, "limit": 2, "exchange": exchange}
            await ws.send(json.dumps(ranks))
            assert (await recv_json(ws))["type"] == "subscribed"
            assert "own" not in await recv_json(ws)
            # Subscribing to a market sends the ranks again at once, now with it (the
            # ranking does not change meanwhile: nothing else would send a frame).
            await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": mine.id}))
            frames = [await recv_json(ws) for _ in range(3)]
            assert [f["type"] for f in frames] == ["subscribed", "history", "ranks"]
            frame = frames[2]
        assert [(e["metric"], e["label"]) for e in frame["ranks"]] == [
            (markets[0].metric_id("price"), "1/5"),
            (markets[1].metric_id("price"), "2/5"),
        ]
        assert [(e["metric"], e["label"]) for e in frame["own"]] == [
            (mine.metric_id("price"), "5/5")
        ]
        assert (frame["total"], frame["matching"], frame["limit"]) == (5, 5, 2)
    finally:
        await pool.close()
        await forget_stats(gateway.redis, markets)


async def test_dashboard_files_are_gzipped_for_clients_that_accept_it(gateway: Gateway) -> None:
    """/static/app.js comes gzipped on request, whole otherwise; a missing file is still 404."""
    status, headers, plain = await http_get(gateway.base, "/static/app.js")
    assert status == 200 and "content-encoding" not in headers
    status, headers, body = await http_get(
        gateway.base, "/static/app.js", {"Accept-Encoding": "gzip"}
    )
    assert (status, headers["content-encoding"], headers["vary"]) == (
        200,
        "gzip",
        "Accept-Encoding",
    )
    assert gzip.decompress(body) == plain and len(body) < len(plain) / 2
    status, body = await http_json(gateway.base, "/static/nope.js")
    assert (status, body["error"]) == (404, "not_found")


async def test_hmget_many_reads_every_key_in_order_across_script_calls(gateway: Gateway) -> None:
    """2,500 keys (three script calls): each key's fields in order, None where absent."""
    prefix = f"test:{unique_exchange()}:"
    keys = [f"{prefix}{i}" for i in range(2500)]
    try:
        async with gateway.redis.pipeline(transaction=False) as pipe:
            for i, key in enumerate(keys):
                if i % 7:  # every 7th key is missing altogether
                    pipe.hset(key, mapping={"a": str(i)} | ({"b": "x"} if i % 2 else {}))
            await pipe.execute()
        values = await hmget_many(gateway.redis, keys, ("a", "b"))
        assert values == [
            [None, None] if i % 7 == 0 else [str(i), "x" if i % 2 else None] for i in range(2500)
        ]
        assert await hmget_many(gateway.redis, [], ("a",)) == []
    finally:
        await gateway.redis.delete(*keys)


async def test_turnover_is_ranked_listed_and_has_a_history_of_known_minutes(
    gateway: Gateway,
) -> None:
    """Turnover, written by the stats book and store, appears in ranks and listings like
    volume; a market without quote volume has none; its history leaves unknown minutes out."""
    exchange = unique_exchange()
    btc, doge, lone = (Market(exchange, base, "usdt") for base in ("btc", "doge", "lone"))
    # Few BTC at a high price against many DOGE at a low one: DOGE leads by base volume, BTC
    # by value traded. Every fifth BTC minute comes without its quote volume.
    book = MetricBook(window_minutes=1440)
    btc_bars = [
        msgspec.structs.replace(
            bar(btc, i, 30_000.0),
            volume=1.0 + i % 3,
            quote_volume=None if i % 5 == 0 else 30_000.0 * (1 + i % 3),
        )
        for i in range(BARS)
    ]
    doge_bars = [
        msgspec.structs.replace(
            bar(doge, i, 0.1), volume=1e5 + 1e3 * (i % 3), quote_volume=1e4 + 1e2 * (i % 3)
        )
        for i in range(BARS)
    ]
    lone_bars = [bar(lone, i, 5.0) for i in range(BARS)]
    updates = book.apply([*btc_bars, *doge_bars, *lone_bars])
    turnover = {u.metric_id: u for u in updates if u.kind == "turnover"}
    assert sorted(turnover) == sorted(m.metric_id("turnover") for m in (btc, doge))
    pool = await db.create_pool(gateway.settings.database)
    try:
        await db.store_bars(pool, btc_bars)
        await stats_store.write_stats(gateway.redis, updates)
        btc_turnover = turnover[btc.metric_id("turnover")].stats
        assert btc_turnover is not None
        for measure, order in (("std", [btc, doge]), ("cv", [btc, doge])):
            status, body = await http_fresh(
                gateway.base,
                f"/api/ranks?kind=turnover&by={measure}",
                lambda b: any(e["metric"].startswith(f"{exchange}:") for e in b["ranks"]),
            )
            ours = [e for e in body["ranks"] if e["metric"].startswith(f"{exchange}:")]
            assert [e["metric"] for e in ours] == [m.metric_id("turnover") for m in order]
            assert ours[0]["value"] == getattr(btc_turnover, measure)
            assert "logret" not in ours[0]
        status, body = await http_fresh(
            gateway.base,
            "/api/ranks?kind=volume&by=std",
            lambda b: any(e["metric"].startswith(f"{exchange}:") for e in b["ranks"]),
        )
        ours_volume = [e["metric"] for e in body["ranks"] if e["metric"].startswith(f"{exchange}:")]
        assert ours_volume[0] == doge.metric_id("volume")
        status, body = await http_json(gateway.base, "/api/ranks?kind=turnover&by=logret")
        assert (status, body["error"]) == (400, "bad_measure")

        status, listing = await http_fresh(
            gateway.base,
            "/api/metrics",
            lambda b: any(m["market"] == btc.id for m in b["metrics"]),
        )
        listed = {m["id"]: m for m in listing["metrics"] if m["market"].startswith(f"{exchange}:")}
        assert sorted(listed) == sorted(
            [m.metric_id(k) for m in (btc, doge, lone) for k in ("price", "volume")]
            + [btc.metric_id("turnover"), doge.metric_id("turnover")]
        )
        entry = listed[btc.metric_id("turnover")]
        assert (entry["kind"], entry["count"], set(entry["ranks"])) == (
            "turnover",
            32,
            {"std", "cv"},
        )
        assert "logret" not in entry

        status, detail = await http_json(gateway.base, f"/api/metrics/{btc.metric_id('turnover')}")
        assert status == 200
        first = BARS - 1 - HISTORY_MINUTES
        assert detail["values"] == [
            [MINUTE + i * MINUTE_MS, 30_000.0 * (1 + i % 3)]
            for i in range(first, BARS)
            if i % 5 != 0
        ]
    finally:
        await pool.close()
        metric_ids = [m.metric_id(k) for m in (btc, doge, lone) for k in METRIC_KINDS]
        await gateway.redis.delete(*(stats_key(m) for m in metric_ids))
        await gateway.redis.srem(METRICS_KEY, *metric_ids)
        for kind, measures in MEASURES_BY_KIND.items():
            for measure in measures:
                await gateway.redis.zrem(rank_key(kind, measure), *metric_ids)  # type: ignore[arg-type]
