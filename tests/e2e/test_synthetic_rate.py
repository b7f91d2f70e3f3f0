"""Synthetic source at 20 updates/s per market: history, API and storage stay bounded by minutes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from tests.conftest import deadline, make_data_dir
from tests.e2e.harness import Services, frames, healthy, http_json, wait_for
from tickstream_shared.local_infra import LocalInfra, free_port

pytestmark = pytest.mark.e2e

MARKETS = ("binance:btc-usdt", "kraken:eth-usd")
BACKFILL_MINUTES = 1500  # more than a day: the bound, not the data, must limit what is sent
UPDATE_INTERVAL_MS = 50  # 20 updates per second per market
MAX_POINTS = 1441  # 1,440 minutes plus the forming one
MINUTE_MS = 60_000


@pytest.fixture(scope="module")
def fast_stack() -> Iterator[tuple[LocalInfra, Services, str]]:
    data_dir = make_data_dir("tickstream-rate-")
    port = free_port()
    try:
        with LocalInfra(data_dir / "infra") as infra:
            env = {
                **os.environ,
                **infra.environment(),
                "GATEWAY_PORT": str(port),
                "WATCHER_SOURCE": "synthetic",
                "WATCHER_MARKETS": ",".join(MARKETS),
                "WATCHER_TICK_INTERVAL_MS": str(UPDATE_INTERVAL_MS),
                "WATCHER_SYNTHETIC_BACKFILL_MINUTES": str(BACKFILL_MINUTES),
            }
            services = Services(env, data_dir)
            try:
                yield infra, services, f"127.0.0.1:{port}"
            finally:
                codes = services.stop_all()
                assert all(code == 0 for code in codes.values()), f"exit codes {codes}"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_history_and_api_bounded_at_20_updates_per_second(
    fast_stack: tuple[LocalInfra, Services, str],
) -> None:
    """At 20 updates/s, history and /api/metrics carry at most 1,441 bars; updates replace."""
    infra, services, base = fast_stack
    for name in ("stats", "gateway", "watcher"):
        services.start(name)
    await wait_for(lambda: healthy(base), within=60, what="gateway", services=services)
    market = MARKETS[0]
    metric = f"{market}:volume"

    def full_window() -> Any:
        status, body = http_json(base, f"/api/metrics/{metric}")
        return body if status == 200 and body["count"] == 1440 else None

    await wait_for(full_window, within=90, what="a full 24h window", services=services)

    async with connect(f"ws://{base}/ws", max_size=2**23) as ws:
        await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
        received: list[dict[str, Any]] = []
        async with asyncio.timeout(deadline(30)):
            async for frame in frames(ws):
                received.append(frame)
                if sum(f["type"] == "bar" for f in received) >= 60:
                    break
    assert [f["type"] for f in received[:2]] == ["subscribed", "history"]
    history = received[1]["bars"]
    assert len(history) == MAX_POINTS
    minutes = [p["minute"] for p in history]
    assert minutes == [minutes[0] + i * MINUTE_MS for i in range(MAX_POINTS)]
    assert all(p["closed"] for p in history[:-1])

    updates = [f for f in received[2:] if f["type"] == "bar"]
    seqs = [u["seq"] for u in updates]
    assert seqs == sorted(set(seqs)) and seqs[0] > history[-1]["seq"]
    # Many updates of the same forming minute: each replaces the last, volume only grows.
    by_minute: dict[int, list[dict[str, Any]]] = {}
    for update in updates:
        by_minute.setdefault(update["minute"], []).append(update)
    busiest = max(by_minute.values(), key=len)
    assert len(busiest) >= 20
    volumes = [u["volume"] for u in busiest]
    assert volumes == sorted(volumes)

    status, body = http_json(base, f"/api/metrics/{metric}")
    assert status == 200 and len(body["values"]) == MAX_POINTS
    assert body["count"] == 1440

    conn = await asyncpg.connect(infra.database_url)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM bars WHERE market = $1", market)
        span = await conn.fetchval(
            "SELECT (max(minute) - min(minute)) / 60000 + 1 FROM bars WHERE market = $1", market
        )
    finally:
        await conn.close()
    # One row per minute, however many updates each minute had.
    assert rows == span
    services.assert_running()
