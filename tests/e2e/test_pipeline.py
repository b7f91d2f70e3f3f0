"""End to end: real broker, Redis and PostgreSQL; the four services as processes; real candles."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import deadline, make_data_dir, require_candles
from tickstream_shared.local_infra import LocalInfra, free_port

pytestmark = pytest.mark.e2e

MARKETS = ("binance:btc-usdt", "binance:eth-usdt", "binance:doge-usdt", "binance:ada-usdt")
MINUTES = 3 * 1440  # three days of event time per market
REPLAY_SECONDS = 25.0  # wall time the replay is paced to, so a client can join mid-stream
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
FACTOR = 3.0
MIN_SAMPLES = 30


@dataclass(frozen=True)
class Row:
    ts: int  # candle close time, the tick's exchange time
    seq: int
    close: float
    volume: float


def load_expected(candles: Path) -> dict[str, list[Row]]:
    """The ticks the replay must produce, read independently of the watcher's code."""
    expected = {}
    for market in MARKETS:
        pair = market.split(":")[1]
        with gzip.open(candles / f"binance_{pair}_1m.csv.gz", "rt") as handle:
            rows = []
            for i, rec in enumerate(csv.DictReader(handle)):
                if i >= MINUTES:
                    break
                rows.append(
                    Row(int(rec["ts_ms"]) + 60_000, i, float(rec["close"]), float(rec["volume"]))
                )
        expected[market] = rows
    return expected


def reference_alerts(expected: dict[str, list[Row]]) -> tuple[set[str], set[str]]:
    """(certain, borderline) alert ids by brute force: value > 3 x mean of the previous hour."""
    certain, borderline = set(), set()
    for market, rows in expected.items():
        for kind in ("price", "volume"):
            values = [(r.ts, r.close if kind == "price" else r.volume, r.seq) for r in rows]
            for i, (ts, value, seq) in enumerate(values):
                previous = [v for t, v, _ in values[max(0, i - 120) : i] if ts - HOUR_MS < t < ts]
                if len(previous) < MIN_SAMPLES:
                    continue
                mean = math.fsum(previous) / len(previous)
                alert_id = f"{market}:{kind}@{ts}#{seq}"
                if abs(value - FACTOR * mean) <= 1e-9 * max(value, 1.0):
                    borderline.add(alert_id)
                elif value > FACTOR * mean:
                    certain.add(alert_id)
    return certain, borderline


class Services:
    """The four services as child processes, with logs kept for failure reports."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, **extra_env: str) -> None:
        with (self.log_dir / f"{name}.log").open("wb") as log:  # the child keeps its own fd
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"tickstream_{name}"],
                env={**self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def assert_running(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited early:\n{self.tail(name)}"

    def tail(self, name: str) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-40:])

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for name in ("watcher", "stats", "alerts", "gateway"):
            process = self.processes.get(name)
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                codes[name] = process.wait(deadline(30))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = -9
        return codes


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[LocalInfra, Services, str]]:
    candles = require_candles()
    data_dir = make_data_dir("tickstream-e2e-")
    port = free_port()
    try:
        with LocalInfra(data_dir) as infra:
            env = {
                **os.environ,
                **infra.environment(),
                "GATEWAY_PORT": str(port),
                "GATEWAY_RANK_INTERVAL_MS": "300",
                "WATCHER_SOURCE": "replay",
                "WATCHER_REPLAY_DIR": str(candles),
                "WATCHER_REPLAY_MARKETS": ",".join(MARKETS),
                "WATCHER_REPLAY_LIMIT_MINUTES": str(MINUTES),
                "WATCHER_REPLAY_SPEED": str(MINUTES * 60 / REPLAY_SECONDS),
                "ALERTS_FACTOR": str(FACTOR),
                "ALERTS_MIN_SAMPLES": str(MIN_SAMPLES),
            }
            services = Services(env, data_dir)
            try:
                yield infra, services, f"127.0.0.1:{port}"
            finally:
                codes = services.stop_all()
                assert all(code == 0 for code in codes.values()), f"exit codes {codes}"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def http_json(base: str, path: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(f"http://{base}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def wait_for(check: Any, *, within: float, what: str, services: Services) -> Any:
    """Poll `check` (sync or async) until it returns a truthy value; fail after the deadline."""
    end = time.monotonic() + deadline(within)
    while time.monotonic() < end:
        services.assert_running()
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def frames(ws: ClientConnection) -> AsyncIterator[dict[str, Any]]:
    async for raw in ws:
        yield json.loads(raw)


async def collect(ws: ClientConnection, sink: list[dict[str, Any]]) -> None:
    async for frame in frames(ws):
        sink.append(frame)


async def test_replay_end_to_end(stack: tuple[LocalInfra, Services, str]) -> None:
    """Candles reach PostgreSQL once; ranks match an independent std; WS and alerts work."""
    infra, services, base = stack
    expected = load_expected(require_candles())
    for name in ("stats", "alerts", "gateway"):
        services.start(name)
    await wait_for(lambda: _healthy(base), within=60, what="gateway /healthz", services=services)

    # Client A listens to alerts and price ranks from before the first tick.
    async with connect(f"ws://{base}/ws") as client_a:
        await client_a.send(json.dumps({"op": "subscribe", "channel": "alerts"}))
        await client_a.send(json.dumps({"op": "subscribe", "channel": "ranks", "kind": "price"}))
        a_frames: list[dict[str, Any]] = []
        a_reader = asyncio.create_task(collect(client_a, a_frames))

        services.start("watcher")
        market = MARKETS[0]
        metric = f"{market}:price"

        def some_history() -> bool:
            status, body = http_json(base, f"/api/metrics/{metric}")
            return status == 200 and body["count"] >= 600

        await wait_for(some_history, within=60, what="history to build up", services=services)

        # Client B joins mid-replay: history first, then live ticks continuing it exactly.
        async with connect(f"ws://{base}/ws") as client_b:
            await client_b.send(
                json.dumps({"op": "subscribe", "channel": "market", "market": market})
            )
            b_frames: list[dict[str, Any]] = []
            stream = frames(client_b)
            async with asyncio.timeout(deadline(30)):
                async for frame in stream:
                    b_frames.append(frame)
                    if sum(f["type"] == "tick" for f in b_frames) >= 50:
                        break
        kinds = [f["type"] for f in b_frames]
        assert kinds[0] == "subscribed"
        assert kinds[1] == "history", kinds[:3]
        assert set(kinds[2:]) == {"tick"}
        history = b_frames[1]["ticks"]
        live = b_frames[2:]
        assert len(history) >= 600
        by_seq = {r.seq: r for r in expected[market]}
        # History is the event-time day ending at its newest tick, in order, without gaps.
        seqs = [t["seq"] for t in history] + [t["seq"] for t in live]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or overlap"
        assert history[-1]["ts"] - history[0]["ts"] < DAY_MS
        for point in history + live:
            row = by_seq[point["seq"]]
            assert (point["ts"], point["price"], point["volume"]) == (row.ts, row.close, row.volume)

        # Every produced tick is stored exactly once.
        total = sum(len(rows) for rows in expected.values())
        conn = await asyncpg.connect(infra.database_url)
        try:

            async def all_stored() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM ticks") == total)

            await wait_for(all_stored, within=120, what=f"{total} stored ticks", services=services)
            rows = await conn.fetch(
                "SELECT market, (extract(epoch from exchange_ts) * 1000)::bigint AS ts, seq, "
                "price, volume FROM ticks"
            )
            stored = {(r["market"], r["ts"], r["seq"], r["price"], r["volume"]) for r in rows}
            wanted = {(m, r.ts, r.seq, r.close, r.volume) for m, rs in expected.items() for r in rs}
            assert len(rows) == len(stored) == total
            assert stored == wanted

            # Ranks: positions 1..N in the order of an independently computed population std.
            final_ts = {m: rs[-1].ts for m, rs in expected.items()}
            reference = {
                f"{m}:price": statistics.pstdev(r.close for r in rs if r.ts > final_ts[m] - DAY_MS)
                for m, rs in expected.items()
            }
            order = sorted(reference, key=lambda k: -reference[k])

            def final_ranks() -> Any:
                status, body = http_json(base, "/api/ranks?kind=price")
                done = status == 200 and body["total"] == len(MARKETS)
                done = done and all(e["count"] == 1440 for e in body["ranks"])
                done = done and all(
                    http_json(base, f"/api/metrics/{e['metric']}")[1]["last_ts"]
                    == final_ts[e["metric"].rsplit(":", 1)[0]]
                    for e in body["ranks"]
                )
                return body if done else None

            ranks = await wait_for(final_ranks, within=60, what="final ranks", services=services)
            assert [e["metric"] for e in ranks["ranks"]] == order
            assert [e["position"] for e in ranks["ranks"]] == list(range(1, len(MARKETS) + 1))
            assert [e["label"] for e in ranks["ranks"]] == [
                f"{i}/{len(MARKETS)}" for i in range(1, len(MARKETS) + 1)
            ]
            for entry in ranks["ranks"]:
                assert entry["std"] == pytest.approx(reference[entry["metric"]], rel=1e-9)
            status, listing = http_json(base, "/api/metrics")
            assert status == 200
            listed = {m["id"]: m for m in listing["metrics"]}
            assert sorted(listed) == sorted(
                f"{m}:{k}" for m in MARKETS for k in ("price", "volume")
            )
            for entry in ranks["ranks"]:
                row = listed[entry["metric"]]
                assert (row["rank"], row["std"], row["count"]) == (
                    entry["label"],
                    entry["std"],
                    entry["count"],
                )

            # Alerts: exactly the spikes a brute-force reference finds, each once, also on the WS.
            certain, borderline = reference_alerts(expected)
            assert certain, "the reference found no spike in real data"

            async def alerts_stored() -> set[str]:
                ids = {r["alert_id"] for r in await conn.fetch("SELECT alert_id FROM alerts")}
                return ids if certain <= ids else set()

            stored_alerts = await wait_for(
                alerts_stored, within=60, what="alerts in PostgreSQL", services=services
            )
            assert certain <= stored_alerts <= certain | borderline
            assert await conn.fetchval("SELECT count(*) FROM alerts WHERE NOT published") == 0
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
        assert any(i.split("@")[0].endswith(":volume") for i in ws_ids)
        rank_frames = [f for f in a_frames if f["type"] == "ranks"]
        assert rank_frames and rank_frames[-1]["ranks"] == ranks["ranks"]


def _healthy(base: str) -> bool:
    try:
        return http_json(base, "/healthz")[0] == 200
    except OSError:
        return False


async def test_bad_input_gets_clear_errors(stack: tuple[LocalInfra, Services, str]) -> None:
    """Bad HTTP parameters and bad WebSocket frames get 4xx JSON / error frames, no crash."""
    _, services, base = stack
    if "gateway" not in services.processes:
        services.start("gateway")
    await wait_for(lambda: _healthy(base), within=60, what="gateway", services=services)
    cases = {
        "/api/ranks": (400, "missing_kind"),
        "/api/ranks?kind=spread": (400, "bad_kind"),
        "/api/metrics/not-a-metric": (400, "bad_metric_id"),
        "/api/metrics/binance:zzz-usdt:price": (404, "unknown_metric"),
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
        "subscribed",
        "unknown_market",
        "pong",
    ]
    services.assert_running()
