"""Metrics read from the objects that count, the probe server, and the gateway's request count."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.conftest import unique_exchange
from tests.unit.test_watcher import FakeProducer, bars, flush_acknowledging
from tickstream_gateway.telemetry import AccessLog, ObserveRequests
from tickstream_shared.consuming import ConsumerRuntime
from tickstream_shared.deadletter import DeadLetterSender
from tickstream_shared.errors import ConfigError
from tickstream_shared.feed_status import SEVERITY, FeedStatus
from tickstream_shared.naming import Market
from tickstream_shared.observability import (
    ALERTS_CONFIRMED,
    ALERTS_LEFT_PROVISIONAL,
    ALERTS_RAISED,
    ALERTS_RETRACTED,
    BATCHES,
    COMMITS_REFUSED,
    CONSUMER_LAG,
    READINGS,
    RECORDS_DEAD_LETTERED,
    RECORDS_DECODED,
    RECORDS_SKIPPED_BAD,
    Family,
    Reading,
    Readings,
)
from tickstream_shared.probes import ProbeServer, serve_probes
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import ServiceSettings
from tickstream_watcher.binance import SPEC as BINANCE
from tickstream_watcher.binance import BinanceProtocol
from tickstream_watcher.feed import (
    FEED_BAD_FRAMES,
    FEED_LIVE,
    FEED_RECONNECTS,
    ExchangeFeed,
)
from tickstream_watcher.feed_markets import FEED_MARKETS, FeedMarkets
from tickstream_watcher.publisher import TICKS_PUBLISHED, TickPublisher

SENT: Family = Family("test_sent_total", "Things sent.", "counter", ("kind",))
QUEUED: Family = Family("test_queued", "Things queued.", "gauge")


class Sender:
    """An object that counts, as the services' objects do: counters apart, a gauge on itself."""

    def __init__(self) -> None:
        self.counts = {"sent": 0}
        self.queued = 0

    def track(self, readings: Readings) -> None:
        counts = self.counts
        readings.track(
            self,
            totals=lambda: [(SENT, ("tick",), counts["sent"])],
            current=lambda owner: [(QUEUED, (), owner.queued)],
        )


def test_totals_outlive_their_owner_and_gauges_do_not() -> None:
    """A replaced object's counts stay in the totals; its gauge leaves with it."""
    readings = Readings()
    first = Sender()
    first.track(readings)
    first.counts["sent"], first.queued = 3, 2
    assert readings.values() == {(SENT, ("tick",)): 3, (QUEUED, ()): 2}
    del first
    gc.collect()
    second = Sender()
    second.track(readings)
    second.counts["sent"] = 4
    assert readings.values() == {(SENT, ("tick",)): 7, (QUEUED, ()): 0}
    del second
    gc.collect()
    assert readings.values() == {(SENT, ("tick",)): 7}


def test_an_owner_dying_during_a_scrape_is_counted_once() -> None:
    """An object collected while a scrape reads it is counted in it once, then retired."""
    readings = Readings()
    holder = [Sender()]
    holder[0].counts["sent"] = 5
    counts = holder[0].counts

    def current(owner: Sender) -> list[Reading]:
        holder.clear()  # the scrape's reference is now the last one
        return []

    readings.track(holder[0], totals=lambda: [(SENT, ("tick",), counts["sent"])], current=current)
    assert readings.values() == {(SENT, ("tick",)): 5}
    assert readings.values() == {(SENT, ("tick",)): 5}


def test_readings_are_exposed_in_prometheus_text_format() -> None:
    """Families appear with their help, type, labels and the added-up values."""
    registry = CollectorRegistry()
    readings = Readings()
    registry.register(readings)
    senders = [Sender(), Sender()]
    for sender, sent in zip(senders, (2, 5), strict=True):
        sender.track(readings)
        sender.counts["sent"] = sent
    text = generate_latest(registry).decode()
    assert "# HELP test_sent_total Things sent.\n# TYPE test_sent_total counter\n" in text
    assert 'test_sent_total{kind="tick"} 7.0\n' in text
    assert "# TYPE test_queued gauge\ntest_queued 0.0\n" in text


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class FakeConsumer:
    """getmany hands out the given batches, then sets `stop`; commits and highwaters kept."""

    def __init__(self, batches: list[dict[Any, list[Record]]], stop: asyncio.Event) -> None:
        self.batches = batches
        self.stop = stop
        self.highwaters: dict[Any, int] = {}
        self.committed: dict[Any, int] = {}

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Record]]:
        if self.batches:
            return self.batches.pop(0)
        self.stop.set()
        return {}

    def highwater(self, tp: Any) -> int | None:
        return self.highwaters.get(tp)

    async def commit(self, offsets: dict[Any, int]) -> None:
        self.committed.update(offsets)

    def pause(self, *partitions: Any) -> None:
        pass

    def resume(self, *partitions: Any) -> None:
        pass


class AcknowledgingProducer:
    """A RenewableProducer whose broker acknowledges everything at once."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_all(self, messages: Iterable[Any]) -> None:
        self.sent += messages


class CountingHandler:
    """Raises one alert per tick, confirms one, retracts two and leaves three provisional per
    batch, as the alerts handler counts them."""

    def __init__(self) -> None:
        self.raised = 0
        self.confirmed = 0
        self.retracted = 0
        self.left_provisional = 0

    async def assigned(self, markets: set[Market]) -> None:
        pass

    def revoked(self, markets: set[Market]) -> None:
        pass

    async def handle(self, batch: Any, stop: asyncio.Event) -> bool:
        self.raised += len(batch.ticks)
        self.confirmed += 1
        self.retracted += 2
        self.left_provisional += 3
        return True

    async def idle(self, stop: asyncio.Event) -> bool:
        return True


def good_tick(market: Market, index: int) -> Tick:
    now = time.time_ns() // 1_000_000
    minute = now - now % MINUTE_MS - (10 - index) * MINUTE_MS
    ts = minute + MINUTE_MS
    return Tick(market.id, minute, index + 1, ts, now, 100.0, 101.0, 99.0, 100.5, 5.0, 3, True)


def batch_seconds_count() -> float:
    return REGISTRY.get_sample_value("tickstream_batch_duration_seconds_count") or 0.0


async def test_consumer_runtime_exports_its_counters_lag_and_batch_time() -> None:
    """One batch of two good and one bad record moves each runtime metric by exactly that."""
    market = Market(unique_exchange(), "btc", "usdt")
    tp = TopicPartition(market.topic, 0)
    values = [good_tick(market, 0).encode(), b"not json", good_tick(market, 1).encode()]
    records = [Record(tp.topic, 0, offset, b"k", v) for offset, v in enumerate(values)]
    stop = asyncio.Event()
    consumer = FakeConsumer([{tp: records}], stop)
    consumer.highwaters[tp] = 10
    runtime = ConsumerRuntime(
        consumer,
        CountingHandler(),
        DeadLetterSender(AcknowledgingProducer(), "test"),
        batch_max=100,
        batch_wait_ms=1,
        stop=stop,
    )
    before, seconds_before = READINGS.values(), batch_seconds_count()
    await runtime.listener.on_partitions_assigned([tp])
    await runtime.run()
    after = READINGS.values()
    families = (
        RECORDS_DECODED,
        RECORDS_SKIPPED_BAD,
        RECORDS_DEAD_LETTERED,
        BATCHES,
        COMMITS_REFUSED,
        ALERTS_RAISED,
        ALERTS_CONFIRMED,
        ALERTS_RETRACTED,
        ALERTS_LEFT_PROVISIONAL,
    )
    moved = {f: after[f, ()] - before.get((f, ()), 0.0) for f in families}
    assert moved == {
        RECORDS_DECODED: 2,
        RECORDS_SKIPPED_BAD: 1,
        RECORDS_DEAD_LETTERED: 1,
        BATCHES: 1,
        COMMITS_REFUSED: 0,
        ALERTS_RAISED: 2,
        ALERTS_CONFIRMED: 1,
        ALERTS_RETRACTED: 2,
        ALERTS_LEFT_PROVISIONAL: 3,
    }
    assert after[CONSUMER_LAG, (tp.topic, "0")] == 7  # highwater 10, offsets 0..2 handled
    assert batch_seconds_count() - seconds_before == 1
    await runtime.listener.on_partitions_revoked([tp])
    assert (CONSUMER_LAG, (tp.topic, "0")) not in READINGS.values()


def published_total() -> float:
    return READINGS.values().get((TICKS_PUBLISHED, ()), 0.0)


async def test_ticks_published_count_outlives_each_publisher() -> None:
    """Acknowledged ticks add up across publishers, as across a watcher's leases."""
    gc.collect()
    before = published_total()
    for count in (3, 2):
        producer = FakeProducer(capacity=10)
        async with TickPublisher(producer, max_in_flight=100) as publisher:
            await publisher.publish(bars("binance:btc-usdt", 0, count))
            await flush_acknowledging(producer, publisher)
        del publisher
        gc.collect()
    assert published_total() - before == 5


def test_feed_counters_and_state_are_exported_per_exchange() -> None:
    """A feed's reconnects and bad frames are counters, its live connection a gauge."""
    gc.collect()
    before = READINGS.values()

    async def deliver(events: Any, received_us: int) -> None:
        pass

    protocol = BinanceProtocol.from_listing({})
    feed = ExchangeFeed(protocol, "ws://x", ["BTCUSDT"], BINANCE.limits, deliver)
    feed.counters.reconnects, feed.counters.bad_frames, feed.state = 2, 1, "live"
    after = READINGS.values()
    labels = ("binance",)
    assert after[FEED_RECONNECTS, labels] - before.get((FEED_RECONNECTS, labels), 0) == 2
    assert after[FEED_BAD_FRAMES, labels] - before.get((FEED_BAD_FRAMES, labels), 0) == 1
    assert after[FEED_LIVE, labels] - before.get((FEED_LIVE, labels), 0) == 1


def test_feed_markets_count_the_latest_reports_by_origin_and_state() -> None:
    """Every state of a reported origin is a gauge (0 included); nothing once cleared."""
    gc.collect()
    exchange = unique_exchange()
    now = 1_700_000_000_000

    def ours() -> dict[str, float]:
        return {
            labels[1]: value
            for (family, labels), value in READINGS.values().items()
            if family == FEED_MARKETS and labels[0] == exchange
        }

    markets = FeedMarkets()
    assert ours() == {}
    markets.reported(
        {
            f"{exchange}:a-usd": FeedStatus("live", exchange, "live", now, now - 5),
            f"{exchange}:b-usd": FeedStatus("live", exchange, "unreachable", now),
            f"{exchange}:c-usd": FeedStatus("live", exchange, "unreachable", now),
            f"{exchange}:d-usd": FeedStatus("live", exchange, "live", now),  # no data yet
        },
        now,
    )
    expected = dict.fromkeys(SEVERITY, 0.0) | {"unreachable": 2.0, "live": 1.0, "connecting": 1.0}
    assert ours() == expected
    markets.clear()
    assert ours() == {}


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), headers, body


async def test_probe_server_answers_liveness_and_metrics() -> None:
    """GET /livez and /metrics answer 200; other paths 404, other methods 405; junk is dropped."""
    probes = ProbeServer("stats", ServiceSettings())
    server = await asyncio.start_server(probes.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, headers, body = await request(port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, headers["Content-Type"], json.loads(body)) == (
            200,
            "application/json",
            {"status": "ok"},
        )
        assert headers["Content-Length"] == str(len(body))
        status, headers, body = await request(port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert b"\n# TYPE tickstream_batch_duration_seconds histogram\n" in body
        assert (await request(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await request(port, b"POST /livez HTTP/1.1\r\n\r\n"))[0] == 405
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01\r\n\r\n")  # a TLS hello, say: no request line
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await probes.close_connections()
        await server.wait_closed()


async def test_no_probe_server_without_a_port() -> None:
    """A metrics port of 0 (the default) serves nothing."""
    async with serve_probes("stats", ServiceSettings()) as port:
        assert port is None


def test_metrics_ports_are_per_service_and_bounded() -> None:
    """Each service reads its own port; the gateway has none here; out of range is refused."""
    settings = ServiceSettings.from_env(
        {"WATCHER_METRICS_PORT": "9101", "STATS_METRICS_PORT": "9102"}
    )
    ports = {
        s: settings.observability.port_of(s) for s in ("watcher", "stats", "alerts", "gateway")
    }
    assert ports == {"watcher": 9101, "stats": 9102, "alerts": 0, "gateway": 0}
    with pytest.raises(ConfigError, match="ALERTS_METRICS_PORT"):
        ServiceSettings.from_env({"ALERTS_METRICS_PORT": "65536"})
    with pytest.raises(ConfigError, match="READINESS_TIMEOUT_MS"):
        ServiceSettings.from_env({"READINESS_TIMEOUT_MS": "0"})


async def get(app: Starlette, path: str) -> int:
    """The status of GET `path` from the ASGI app, called directly."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("test", 80),
        "client": ("test", 1),
    }
    statuses = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    [status] = statuses
    return status


async def test_gateway_counts_requests_by_route_template() -> None:
    """Requests are labelled by their route's template, unknown paths as one `unmatched`."""

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.path_params["name"])

    path = f"/{unique_exchange()}/{{name}}"
    app = Starlette(
        routes=[Route(path, item)],
        middleware=[Middleware(ObserveRequests, access_log=AccessLog("off", 0))],
    )

    def count(route: str, status: str) -> float:
        labels = {"route": route, "status": status}
        return REGISTRY.get_sample_value("tickstream_http_requests_total", labels) or 0.0

    found, unmatched = count(path, "200"), count("unmatched", "404")
    for name in ("a", "b"):
        assert await get(app, path.replace("{name}", name)) == 200
    assert await get(app, f"/nothing/{unique_exchange()}") == 404
    assert (count(path, "200") - found, count("unmatched", "404") - unmatched) == (2, 1)
