"""The gateway waits for PostgreSQL at start, answers 503 with JSON while it is down, stops fast."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid

import redis.asyncio as redis

from tests.conftest import deadline, running_infra
from tests.integration.test_gateway_api import write_stats
from tests.integration.test_stop_times import (
    STOP_WITHIN_S,
    start_service,
    stop_within,
    wait_for_log,
)
from tickstream_shared.local_infra import free_port
from tickstream_shared.naming import Market


def _get(base: str, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://{base}{path}", timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except OSError:
        return 0, {}, b""


def _seed_metric(redis_url: str, market: Market) -> None:
    async def seed() -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await write_stats(client, market, std=1.0, cv=0.1, logret=0.01, stale=False)
        finally:
            await client.aclose()

    asyncio.run(seed())


def test_the_gateway_waits_out_postgres_and_answers_503_while_it_is_down() -> None:
    """Started with PostgreSQL down it waits (log lines, no traceback), serves once PostgreSQL
    is up, answers 503 JSON with Retry-After on the routes of PostgreSQL, then of Redis, while
    each is down, and exits 0 within 10 s of SIGTERM with both down."""
    with running_infra("tickstream-gw-outage-") as infra:
        infra.stop_server("postgres")
        port = free_port()
        base = f"127.0.0.1:{port}"
        log = infra.data_dir / "gateway.log"
        env = {**infra.environment(), "GATEWAY_PORT": str(port)}
        gateway = start_service("gateway", env, log)
        try:
            text = wait_for_log(gateway, log, "trying again in 2 s", within=30)
            assert text.count("waiting for PostgreSQL: ") == 2, text
            assert "Traceback" not in text
            assert _get(base, "/livez")[0] == 0, "no port open before PostgreSQL answers"

            infra.start_server("postgres")
            end = time.monotonic() + deadline(60)
            while time.monotonic() < end and _get(base, "/healthz")[0] != 200:
                assert gateway.poll() is None, log.read_text()[-3000:]
                time.sleep(0.3)
            assert _get(base, "/healthz")[0] == 200, log.read_text()[-3000:]
            market = Market(f"t{uuid.uuid4().hex[:10]}", "btc", "usd")
            _seed_metric(infra.redis_url, market)
            metric_path = f"/api/metrics/{market.metric_id('price')}"
            assert _get(base, metric_path)[0] == 200
            assert _get(base, "/api/alerts")[0] == 200

            infra.stop_server("postgres")
            for path in (metric_path, "/api/alerts?limit=5"):
                status, headers, body = _get(base, path)
                assert status == 503, (path, body[:2000])
                assert headers["content-type"] == "application/json"
                assert headers["retry-after"] == "5"
                assert json.loads(body) == {
                    "error": "unavailable",
                    "message": "PostgreSQL is unavailable; try again later",
                }
            text = log.read_text()
            assert "Traceback" not in text
            assert text.count("answering 503: PostgreSQL is unavailable") == 1, text

            infra.stop_server("redis")
            for path in ("/api/ranks?kind=price", "/api/metrics", "/api/feeds", metric_path):
                end = time.monotonic() + deadline(10)  # a held answer is served until too old
                while time.monotonic() < end and _get(base, path)[0] == 200:
                    time.sleep(0.2)
                status, headers, body = _get(base, path)
                assert status == 503, (path, body[:2000])
                assert headers["retry-after"] == "5"
                assert json.loads(body) == {
                    "error": "unavailable",
                    "message": "Redis is unavailable; try again later",
                }
            assert "Traceback" not in log.read_text()

            assert stop_within(gateway, STOP_WITHIN_S) == 0
            assert "Traceback" not in log.read_text()
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
