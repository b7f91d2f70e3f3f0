"""/metrics, /livez and /readyz of a real stats process and a real gateway, on real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.conftest import deadline, running_infra, unique_exchange
from tickstream_gateway.service import run as run_gateway
from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.naming import Market
from tickstream_shared.probes import serve_probes
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import (
    DatabaseSettings,
    GatewaySettings,
    KafkaSettings,
    ObservabilitySettings,
    RedisSettings,
    ServiceSettings,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def own_infra() -> Iterator[LocalInfra]:
    """A broker of its own: the stats group reads every tick topic, so counts are exact."""
    with running_infra("tickstream-observability-") as running:
        yield running


async def get(base: str, path: str) -> tuple[int, bytes]:
    """Status and body of GET http://base/path; status 0 while nothing listens."""

    def fetch() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{base}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    return await asyncio.to_thread(fetch)


async def scrape(base: str) -> Samples:
    """Every sample of /metrics, by name and labels."""
    status, body = await get(base, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def wait_until(what: str, within: float, check: Any) -> Any:
    """Await `check()` until it returns a truthy value; fail after the deadline."""
    end = time.monotonic() + deadline(within)
    while time.monotonic() < end:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def bar(market: Market, index: int) -> Tick:
    now = time.time_ns() // 1_000_000
    minute = now - now % MINUTE_MS - (20 - index) * MINUTE_MS
    ts = minute + MINUTE_MS
    return Tick(market.id, minute, index + 1, ts, now, 100.0, 101.0, 99.0, 100.5, 5.0, 3, True)


async def produce(kafka: KafkaSettings, market: Market, values: list[bytes]) -> None:
    producer = make_producer(kafka, client_id="test")
    await producer.start()
    try:
        for raw in values:
            await producer.send(market.topic, raw, key=market.id.encode())
        await producer.flush()
    finally:
        await producer.stop()


def start_stats(infra: LocalInfra, log: Path, *, metrics_port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, **infra.environment(), "STATS_METRICS_PORT": str(metrics_port)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tickstream_stats"], env=env, stdout=out, stderr=out
        )


async def test_stats_process_serves_moving_metrics_and_probes(
    own_infra: LocalInfra, tmp_path: Path
) -> None:
    """`tickstream stats` with STATS_METRICS_PORT: counters follow each batch; it is ready."""
    infra = own_infra
    kafka = KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers)
    market = Market(unique_exchange(), "btc", "usdt")
    await ensure_topics(kafka, [market.topic])
    await produce(kafka, market, [bar(market, 0).encode(), b"not json", bar(market, 1).encode()])
    port = free_port()
    base = f"127.0.0.1:{port}"
    process = start_stats(infra, tmp_path / "stats.log", metrics_port=port)
    try:

        async def handled(decoded: int) -> Samples | None:
            assert process.poll() is None, (tmp_path / "stats.log").read_text()
            if (await get(base, "/livez"))[0] != 200:
                return None
            samples = await scrape(base)
            lag = value(
                samples, "tickstream_consumer_lag_records", topic=market.topic, partition="0"
            )
            done = value(samples, "tickstream_records_decoded_total") == decoded and lag == 0
            # A batch is counted before its commit and timed after it: a scrape in between
            # sees it counted but not yet timed.
            timed = value(samples, "tickstream_batch_duration_seconds_count") == value(
                samples, "tickstream_batches_total"
            )
            return samples if done and timed else None

        samples = await wait_until("the first batch in /metrics", 30, lambda: handled(2))
        batches = value(samples, "tickstream_batches_total")
        assert batches is not None and batches >= 1
        assert value(samples, "tickstream_records_skipped_bad_total") == 1
        assert value(samples, "tickstream_records_dead_lettered_total") == 1
        assert value(samples, "tickstream_commits_refused_total") == 0
        version = metadata.version("tickstream")
        assert value(samples, "tickstream_service_info", service="stats", version=version) == 1
        assert (value(samples, "process_start_time_seconds") or 0) > time.time() - 120
        assert await get(base, "/livez") == (200, b'{"status":"ok"}')
        status, body = await get(base, "/readyz")
        ready = {"status": "ok", "broker": "ok", "redis": "ok", "database": "ok"}
        assert (status, json.loads(body)) == (200, ready)

        await produce(kafka, market, [bar(market, 2).encode()])
        samples = await wait_until("the next batch in /metrics", 30, lambda: handled(3))
        assert (value(samples, "tickstream_batches_total") or 0) > batches
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, deadline(30))
    assert code == 0, (tmp_path / "stats.log").read_text()
    assert (await get(base, "/livez"))[0] == 0  # the server stopped with the service


async def test_readiness_names_the_dependency_that_does_not_answer(infra: LocalInfra) -> None:
    """A broker that never answers makes /readyz 503 within the timeout; the others say ok."""
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = free_port()
        settings = ServiceSettings(
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{silent.getsockname()[1]}"),
            redis=RedisSettings(url=infra.redis_url),
            database=DatabaseSettings(url=infra.database_url),
            observability=ObservabilitySettings(stats_port=port, readiness_timeout_ms=500),
        )
        async with serve_probes("stats", settings) as served:
            assert served == port
            started = time.monotonic()
            status, body = await get(f"127.0.0.1:{port}", "/readyz")
            took = time.monotonic() - started
            assert (await get(f"127.0.0.1:{port}", "/livez"))[0] == 200
    assert (status, json.loads(body)) == (
        503,
        {
            "status": "unhealthy",
            "broker": "error: no answer within 0.5s",
            "redis": "ok",
            "database": "ok",
        },
    )
    assert 0.5 <= took < deadline(3)


async def test_gateway_serves_probes_and_counts_clients(infra: LocalInfra) -> None:
    """The gateway's /readyz and /healthz check the broker too; /metrics counts its clients."""
    port = free_port()
    settings = ServiceSettings(
        kafka=KafkaSettings(bootstrap_servers=infra.kafka_bootstrap_servers),
        redis=RedisSettings(url=f"redis://127.0.0.1:{infra.redis_port}/12"),
        database=DatabaseSettings(url=infra.database_url),
        gateway=GatewaySettings(port=port),
    )
    base = f"127.0.0.1:{port}"
    stop = asyncio.Event()
    serving = asyncio.create_task(run_gateway(settings, stop))
    try:

        async def ready() -> tuple[int, bytes] | None:
            assert not serving.done(), "gateway stopped"
            answer = await get(base, "/readyz")
            return answer if answer[0] == 200 else None

        _, body = await wait_until("gateway /readyz", 60, ready)
        expected = {"status": "ok", "broker": "ok", "redis": "ok", "database": "ok", "feed": "ok"}
        assert json.loads(body) == expected
        status, body = await get(base, "/healthz")
        assert (status, json.loads(body)) == (200, expected)
        assert await get(base, "/livez") == (200, b'{"status":"ok"}')

        async def clients(count: float) -> bool:
            samples = await scrape(base)
            return value(samples, "tickstream_gateway_connections") == count

        samples = await scrape(base)
        before = value(samples, "tickstream_gateway_connections")
        assert before is not None
        livez = value(samples, "tickstream_http_requests_total", route="/livez", status="200")
        assert livez is not None and livez >= 1
        async with connect(f"ws://{base}/ws"):
            await wait_until("one more client", 10, lambda: clients(before + 1))
        await wait_until("the client gone", 10, lambda: clients(before))
    finally:
        stop.set()
        await serving
