"""End to end: real broker, Redis and PostgreSQL; the four services as processes; real candles."""

from __future__ import annotations

import asyncio
import csv
import gzip
import itertools
import json
import math
import os
import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from tests.conftest import deadline, make_data_dir, require_candles
from tests.e2e.harness import Services, collect, frames, healthy, http_json, wait_for
from tests.e2e.reference import Row, reference_alerts
from tickstream_shared.local_infra import LocalInfra, free_port

pytestmark = pytest.mark.e2e

MARKETS = ("binance:btc-usdt", "binance:eth-usdt", "binance:doge-usdt", "binance:ada-usdt")
GAPPY = "binance:ada-usdt"  # every 7th minute missing: log returns must bridge the gaps
SILENT = "binance:doge-usdt"  # stops 30 minutes early: ages with the clock and goes stale
SILENT_MINUTES = 30
MINUTES = 3 * 1440  # three days of event time per market
REPLAY_SECONDS = 25.0  # wall time the replay is paced to, so a client can join mid-stream
WINDOW_MINUTES = 1440
MINUTE_MS = 60_000
STALE_MS = 300_000
MEASURES = {"price": ("std", "cv", "logret"), "volume": ("std", "cv")}


def write_replay_candles(source: Path, target: Path) -> dict[str, list[Row]]:
    """Candle files for the replay (real candles, with gaps and an early stop), and their rows.

    The rows are read back from the written files independently of the watcher's code: they
    are what the replay must produce (seq = row index in the file).
    """
    expected = {}
    for market in MARKETS:
        pair = market.split(":")[1]
        with gzip.open(source / f"binance_{pair}_1m.csv.gz", "rt", newline="") as handle:
            rows = list(csv.DictReader(handle))[:MINUTES]
        if market == GAPPY:
            rows = [r for i, r in enumerate(rows) if i % 7 != 3]
        if market == SILENT:
            rows = rows[:-SILENT_MINUTES]
        path = target / f"binance_{pair}_1m.csv"
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(
                out, fieldnames=["ts_ms", "open", "high", "low", "close", "volume"]
            )
            writer.writeheader()
            writer.writerows(rows)
        with path.open(newline="") as handle:
            expected[market] = [
                Row(
                    minute=int(r["ts_ms"]),
                    seq=i,
                    open=float(r["open"]),
                    high=float(r["high"]),
                    low=float(r["low"]),
                    close=float(r["close"]),
                    volume=float(r["volume"]),
                )
                for i, r in enumerate(csv.DictReader(handle))
            ]
    return expected


@dataclass(frozen=True)
class Reference:
    """Stats and ranks computed with `statistics` from the expected rows, nothing shared."""

    clock: int
    stats: dict[str, dict[str, float]]  # metric -> count, mean, std, cv, logret, min, max
    stale: set[str]  # market ids

    def order(self, kind: str, measure: str) -> list[str]:
        live = [
            m for m in self.stats if m.endswith(f":{kind}") and m[: m.rindex(":")] not in self.stale
        ]
        return sorted(live, key=lambda metric: (-self.stats[metric][measure], _desc(metric)))


def _desc(metric: str) -> list[int]:
    # Redis orders equal scores by member, descending, in ZREVRANGE.
    return [-ord(c) for c in metric]


def reference_stats(expected: dict[str, list[Row]]) -> Reference:
    clock = max(rows[-1].minute for rows in expected.values())
    stats: dict[str, dict[str, float]] = {}
    stale = set()
    for market, rows in expected.items():
        window = [r for r in rows if clock - WINDOW_MINUTES * MINUTE_MS < r.minute <= clock]
        if clock - rows[-1].minute > STALE_MS:
            stale.add(market)
        for kind in ("price", "volume"):
            values = [r.close if kind == "price" else r.volume for r in window]
            mean = statistics.fmean(values)
            std = statistics.pstdev(values)
            entry = {
                "count": float(len(values)),
                "mean": mean,
                "std": std,
                "cv": std / abs(mean) if mean else 0.0,
                "min": min(values),
                "max": max(values),
            }
            if kind == "price":
                returns = [math.log(b / a) for a, b in itertools.pairwise(values)]
                entry["logret"] = statistics.pstdev(returns) if len(returns) >= 1 else 0.0
            stats[f"{market}:{kind}"] = entry
    return Reference(clock, stats, stale)


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


def bar_fields(point: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("minute", "seq", "open", "high", "low", "close", "volume")
    return tuple(point[k] for k in keys)


def row_fields(row: Row) -> tuple[Any, ...]:
    return (row.minute, row.seq, row.open, row.high, row.low, row.close, row.volume)


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
            await _check_bars_stored_once(conn, expected, services)
            reference = reference_stats(expected)
            await _check_ranks_and_metrics(base, reference, services)
            stored_alerts = await _check_alerts(conn, expected, services)
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


async def _check_bars_stored_once(
    conn: Any, expected: dict[str, list[Row]], services: Services
) -> None:
    total = sum(len(rows) for rows in expected.values())

    async def all_stored() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM bars") == total)

    await wait_for(all_stored, within=120, what=f"{total} stored bars", services=services)
    rows = await conn.fetch(
        "SELECT market, minute, seq, open, high, low, close, volume, closed, exchange_ts FROM bars"
    )
    stored = {
        (
            r["market"],
            r["minute"],
            r["seq"],
            r["open"],
            r["high"],
            r["low"],
            r["close"],
            r["volume"],
        )
        for r in rows
    }
    wanted = {(m, *row_fields(r)) for m, rs in expected.items() for r in rs}
    assert len(rows) == len(stored) == total
    assert stored == wanted
    assert all(r["closed"] and r["exchange_ts"] == r["minute"] + MINUTE_MS for r in rows)


async def _check_ranks_and_metrics(base: str, reference: Reference, services: Services) -> None:
    def settled() -> bool:
        status, body = http_json(base, "/api/metrics")
        if status != 200 or len(body["metrics"]) != 2 * len(MARKETS):
            return False
        return all(m["clock"] == reference.clock for m in body["metrics"])

    await wait_for(settled, within=90, what="every metric at the final clock", services=services)
    for kind, measures in MEASURES.items():
        for measure in measures:
            status, body = http_json(base, f"/api/ranks?kind={kind}&by={measure}")
            assert status == 200
            order = reference.order(kind, measure)
            total = len(order)
            assert [e["metric"] for e in body["ranks"]] == order, (kind, measure)
            assert body["total"] == total and body["by"] == measure
            assert [e["label"] for e in body["ranks"]] == [
                f"{i}/{total}" for i in range(1, total + 1)
            ]
            for entry in body["ranks"]:
                assert entry["value"] == pytest.approx(
                    reference.stats[entry["metric"]][measure], rel=1e-12, abs=1e-300
                )
    status, listing = http_json(base, "/api/metrics")
    listed = {m["id"]: m for m in listing["metrics"]}
    for metric, ref in reference.stats.items():
        row = listed[metric]
        market = metric[: metric.rindex(":")]
        assert row["stale"] is (market in reference.stale), metric
        assert row["count"] == ref["count"], metric
        assert (row["min"], row["max"]) == (ref["min"], ref["max"])
        for field in ("mean", "std", "cv"):
            assert row[field] == pytest.approx(ref[field], rel=1e-12, abs=1e-300), (metric, field)
        status, detail = http_json(base, f"/api/metrics/{metric}")
        assert status == 200 and detail["stale"] is row["stale"]
        assert len(detail["values"]) <= WINDOW_MINUTES + 1
        kind = metric.rsplit(":", 1)[1]
        for measure in MEASURES[kind]:
            position = detail["ranks"][measure]["position"]
            if market in reference.stale:
                assert position is None
            else:
                assert position == reference.order(kind, measure).index(metric) + 1
        if kind == "price":
            assert detail["logret"] == pytest.approx(ref["logret"], rel=1e-12, abs=1e-300)


async def _check_alerts(conn: Any, expected: dict[str, list[Row]], services: Services) -> set[str]:
    reference = reference_alerts(expected)
    assert reference, "the reference found no spike in real data"

    async def alerts_stored() -> set[str]:
        ids = {r["alert_id"] for r in await conn.fetch("SELECT alert_id FROM alerts")}
        return ids if reference <= ids else set()

    stored = await wait_for(
        alerts_stored, within=60, what="alerts in PostgreSQL", services=services
    )
    assert stored == reference
    assert await conn.fetchval("SELECT count(*) FROM alerts WHERE NOT published") == 0
    return set(stored)


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
