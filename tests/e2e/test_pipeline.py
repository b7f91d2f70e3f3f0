"""End to end: real broker, Redis and PostgreSQL; the four services as processes; real candles."""

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

from tests.conftest import deadline, make_data_dir, require_candles
from tests.e2e.harness import Services, collect, frames, healthy, http_json, wait_for
from tests.e2e.pipeline_checks import (
    MARKETS,
    MINUTE_MS,
    MINUTES,
    REPLAY_SECONDS,
    WINDOW_MINUTES,
    bar_fields,
    check_alerts,
    check_bars_stored_once,
    check_ranks_and_metrics,
    reference_stats,
    row_fields,
    write_replay_candles,
)
from tests.e2e.reference import Row
from tickstream_shared.local_infra import LocalInfra, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[LocalInfra, Services, str, dict[str, list[Row]]]]:
    candles = require_candles()
    data_dir = make_data_dir("tickstream-e2e-")
    replay_dir = data_dir / "candles"
    replay_dir.mkdir()
    expected = write_replay_candles(candles, replay_dir)
    port = free_port()
    try:
        with LocalInfra(data_dir / "infra") as infra:
            env = {
                **os.environ,
                **infra.environment(),
                "GATEWAY_PORT": str(port),
                "GATEWAY_RANK_INTERVAL_MS": "300",
                "WATCHER_SOURCE": "replay",
                "WATCHER_REPLAY_DIR": str(replay_dir),
                "WATCHER_REPLAY_SPEED": str(MINUTES * 60 / REPLAY_SECONDS),
            }
            services = Services(env, data_dir)
            try:
                yield infra, services, f"127.0.0.1:{port}", expected
            finally:
                codes = services.stop_all()
                assert all(code == 0 for code in codes.values()), f"exit codes {codes}"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_replay_end_to_end(
    stack: tuple[LocalInfra, Services, str, dict[str, list[Row]]],
) -> None:
    """Candles become bars stored once; ranks under every measure and alerts match references."""
    infra, services, base, expected = stack
    for name in ("stats", "alerts", "gateway"):
        services.start(name)
    await wait_for(lambda: healthy(base), within=60, what="gateway /healthz", services=services)

    # Client A listens to alerts and to price ranks by log-return volatility from the start.
    async with connect(f"ws://{base}/ws") as client_a:
        await client_a.send(json.dumps({"op": "subscribe", "channel": "alerts"}))
        await client_a.send(
            json.dumps({"op": "subscribe", "channel": "ranks", "kind": "price", "by": "logret"})
        )
        a_frames: list[dict[str, Any]] = []
        a_reader = asyncio.create_task(collect(client_a, a_frames))

        services.start("watcher")
        market = MARKETS[0]
        metric = f"{market}:price"

        def some_history() -> bool:
            status, body = http_json(base, f"/api/metrics/{metric}")
            return status == 200 and body["count"] >= 600

        await wait_for(some_history, within=60, what="history to build up", services=services)

        # Client B joins mid-replay: bar history first, then bar updates continuing it exactly.
        async with connect(f"ws://{base}/ws") as client_b:
            await client_b.send(
                json.dumps({"op": "subscribe", "channel": "market", "market": market})
            )
            b_frames: list[dict[str, Any]] = []
            async with asyncio.timeout(deadline(30)):
                async for frame in frames(client_b):
                    b_frames.append(frame)
                    if sum(f["type"] == "bar" for f in b_frames) >= 50:
                        break
        kinds = [f["type"] for f in b_frames]
        assert kinds[0] == "subscribed"
        assert kinds[1] == "history", kinds[:3]
        assert set(kinds[2:]) == {"bar"}
        history = b_frames[1]["bars"]
        live = b_frames[2:]
        assert 600 <= len(history) <= WINDOW_MINUTES + 1
        by_seq = {r.seq: r for r in expected[market]}
        seqs = [p["seq"] for p in history] + [p["seq"] for p in live]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or overlap"
        assert history[-1]["minute"] - history[0]["minute"] <= WINDOW_MINUTES * MINUTE_MS
        for point in history + live:
            assert bar_fields(point) == row_fields(by_seq[point["seq"]])
            assert point["closed"] is True

        conn = await asyncpg.connect(infra.database_url)
        try:
            await check_bars_stored_once(conn, expected, services)
            reference = reference_stats(expected)
            await check_ranks_and_metrics(base, reference, services)
            stored_alerts = await check_alerts(conn, expected, services)
        finally:
            await conn.close()

        def ws_alerts() -> list[str]:
            ids = [f["alert"]["alert_id"] for f in a_frames if f["type"] == "alert"]
            return ids if set(ids) >= stored_alerts else []

        try:
            ws_ids = await wait_for(ws_alerts, within=30, what="alerts over WS", services=services)
        finally:
            a_reader.cancel()
        assert len(ws_ids) == len(set(ws_ids)) == len(stored_alerts)
        assert {f["alert"]["status"] for f in a_frames if f["type"] == "alert"} == {"confirmed"}
        rank_frames = [f for f in a_frames if f["type"] == "ranks"]
        assert rank_frames and rank_frames[-1]["by"] == "logret"
        assert [e["metric"] for e in rank_frames[-1]["ranks"]] == reference.order("price", "logret")

    # A reconnecting client asks only for what it missed.
    since = reference.clock - 10 * MINUTE_MS
    status, body = http_json(base, f"/api/metrics/{market}:volume?since={since}")
    assert status == 200
    assert [v[0] for v in body["values"]] == [since + i * MINUTE_MS for i in range(11)]
    async with connect(f"ws://{base}/ws") as client_c:
        await client_c.send(
            json.dumps({"op": "subscribe", "channel": "market", "market": market, "since": since})
        )
        async with asyncio.timeout(deadline(10)):
            subscribed, history_frame = (
                json.loads(await client_c.recv()),
                json.loads(await client_c.recv()),
            )
    assert subscribed["type"] == "subscribed" and history_frame["type"] == "history"
    assert [p["minute"] for p in history_frame["bars"]] == [v[0] for v in body["values"]]

    # The watcher's reports reach the gateway: the replay is named a replay, never live data.
    def replay_finished() -> Any:
        status, body = http_json(base, "/api/feeds")
        done = status == 200 and body["origins"].get("replay", {}).get("state") == "finished"
        return body if done else None

    feeds = await wait_for(replay_finished, within=30, what="a finished replay", services=services)
    assert feeds["origins"]["replay"]["source"] == "replay"
    assert feeds["origins"]["replay"]["markets"] == {"finished": len(MARKETS)}
    assert {m: (f["source"], f["origin"], f["state"]) for m, f in feeds["feeds"].items()} == {
        m: ("replay", "replay", "finished") for m in MARKETS
    }


async def test_bad_input_gets_clear_errors(
    stack: tuple[LocalInfra, Services, str, dict[str, list[Row]]],
) -> None:
    """Bad HTTP parameters and bad WebSocket frames get 4xx JSON / error frames, no crash."""
    _, services, base, _ = stack
    if "gateway" not in services.processes:
        services.start("gateway")
    await wait_for(lambda: healthy(base), within=60, what="gateway", services=services)
    cases = {
        "/api/ranks": (400, "missing_kind"),
        "/api/ranks?kind=spread": (400, "bad_kind"),
        "/api/ranks?kind=volume&by=logret": (400, "bad_measure"),
        "/api/ranks?kind=price&by=sharpe": (400, "bad_measure"),
        "/api/metrics/not-a-metric": (400, "bad_metric_id"),
        "/api/metrics/binance:zzz-usdt:price": (404, "unknown_metric"),
        "/api/metrics/binance:btc-usdt:price?since=soon": (400, "bad_since"),
        "/api/metrics/binance:btc-usdt:price?since=99999999999999999999": (400, "bad_since"),
        "/api/alerts?limit=many": (400, "bad_limit"),
        "/api/alerts?limit=0": (400, "bad_limit"),
        "/api/nowhere": (404, "not_found"),
    }
    for path, (status, code) in cases.items():
        got_status, body = http_json(base, path)
        assert (got_status, body["error"]) == (status, code), path
        assert body["message"]
    status, body = http_json(base, "/api/ranks?kind=price", method="POST")
    assert (status, body["error"]) == (405, "method_not_allowed")

    async with connect(f"ws://{base}/ws") as ws:
        await ws.send("{")
        await ws.send(b"\x00binary")
        await ws.send(json.dumps({"op": "subscribe", "channel": "weather"}))
        await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": "zzz"}))
        await ws.send(
            json.dumps({"op": "subscribe", "channel": "ranks", "kind": "volume", "by": "logret"})
        )
        await ws.send(
            json.dumps(
                {"op": "subscribe", "channel": "market", "market": "binance:btc-usdt", "since": "x"}
            )
        )
        await ws.send(
            json.dumps({"op": "subscribe", "channel": "market", "market": "binance:zzz-usdt"})
        )
        await ws.send(json.dumps({"op": "ping"}))
        got = []
        async with asyncio.timeout(deadline(10)):
            while not got or got[-1]["type"] != "pong":
                got.append(json.loads(await ws.recv()))
    codes = [f.get("code", f["type"]) for f in got]
    assert codes == [
        "bad_json",
        "bad_request",
        "bad_request",
        "bad_market",
        "bad_measure",
        "bad_since",
        "subscribed",
        "unknown_market",
        "pong",
    ]
    services.assert_running()
