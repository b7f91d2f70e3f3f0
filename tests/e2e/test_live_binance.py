"""The live source against a local Binance (REST and WebSocket in Binance's formats), end to end.

The real watcher process resolves its markets from the fake exchangeInfo, backfills closed
minutes from the fake klines, streams kline frames, survives a bad frame and a dropped
connection, and publishes to the real broker; the test reads the topic back.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import make_data_dir
from tests.e2e.exchange_fakes import read_topic, rest_server
from tests.e2e.harness import Services
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import Tick

pytestmark = pytest.mark.e2e

M = 60_000
BACKFILL = 30  # minutes the watcher asks for
GAP = 7  # the 7th minute before now has no candle: no bar may be made up for it
TOPIC = "ticks.binance.nkn-usdt"


def price(minute: int) -> str:
    return f"{0.35 + (minute // M) % 97 / 10_000:.8f}"


@dataclass
class FakeBinance:
    """REST (exchangeInfo, klines) and the combined kline stream, scripted per connection."""

    now_minute: int
    klines_served: dict[int, list[str]] = field(default_factory=dict)  # minute -> row
    sent_klines: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0

    def rows(self, start: int, end: int) -> list[list[Any]]:
        rows = []
        for minute in range(start, end + 1, M):
            if minute == self.now_minute - GAP * M or minute >= self.now_minute:
                continue  # a minute without trades, and the minute still forming
            if minute < self.now_minute - 60 * M:
                continue
            p = price(minute)
            row = [minute, p, p, p, p, "12.5", minute + 59_999, "4.4", 3, "1", "0.3", "0"]
            self.klines_served[minute] = row
            rows.append(row)
        return rows

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/exchangeInfo":
            listed = [("NKNUSDT", "TRADING", "NKN"), ("OLDUSDT", "BREAK", "OLD")]
            symbols = [
                {"symbol": symbol, "status": status, "baseAsset": base, "quoteAsset": "USDT"}
                for symbol, status, base in listed
            ]
            return 200, {"symbols": symbols}
        if path == "/api/v3/klines" and query.get("symbol") == "NKNUSDT":
            return 200, self.rows(int(query["startTime"]), int(query["endTime"]))
        return 400, {"code": -1121, "msg": "Invalid symbol."}

    def kline(self, closed: bool, volume: str) -> str:
        now = time.time_ns() // 1_000_000
        minute = now - now % M
        p = price(minute)
        data = {
            "e": "kline",
            "E": now,
            "s": "NKNUSDT",
            "k": {
                "t": minute,
                "T": minute + 59_999,
                "s": "NKNUSDT",
                "i": "1m",
                "f": 1,
                "L": 2,
                "o": p,
                "c": p,
                "h": p,
                "l": p,
                "v": volume,
                "n": 2,
                "x": closed,
                "q": "1.0",
                "V": "0.5",
                "Q": "0.2",
                "B": "0",
            },
        }
        self.sent_klines.append(data)
        return json.dumps({"stream": "nknusdt@kline_1m", "data": data})

    async def ws(self, connection: ServerConnection) -> None:
        self.connections += 1
        assert connection.request is not None
        assert connection.request.path == "/stream?streams=nknusdt@kline_1m"
        if self.connections == 1:
            await connection.send(self.kline(False, "1.0"))
            await connection.send('{"stream":"nknusdt@kline_1m","data":{"e":"kline"')  # malformed
            await connection.send(self.kline(False, "2.0"))
            await asyncio.sleep(0.5)
            return  # the exchange drops the connection
        await connection.send(self.kline(False, "3.0"))
        await connection.send(self.kline(True, "4.0"))
        await connection.wait_closed()


async def test_live_binance_backfills_streams_and_recovers(infra: LocalInfra) -> None:
    """Backfilled and live bars arrive once each, closed once, equal to what the exchange sent."""
    now = time.time_ns() // 1_000_000
    exchange = FakeBinance(now_minute=now - now % M)
    data_dir = make_data_dir("tickstream-live-logs-")
    async with (
        rest_server(exchange.route) as rest_url,
        serve(exchange.ws, "127.0.0.1", 0) as ws_server,
    ):
        ws_port = ws_server.sockets[0].getsockname()[1]
        env = {
            **os.environ,
            **infra.environment(),
            "WATCHER_SOURCE": "live",
            "WATCHER_MARKETS": "binance:nkn-usdt,binance:old-usdt,binance:zzz-usdt",
            "WATCHER_BACKFILL_MINUTES": str(BACKFILL),
            "BINANCE_WS_URL": f"ws://127.0.0.1:{ws_port}",
            "BINANCE_REST_URL": rest_url,
        }
        services = Services(env, data_dir)
        services.start("watcher")
        try:

            def done(ticks: list[Tick]) -> bool:
                closed_live = [t for t in ticks if t.closed and t.volume == 4.0]
                return bool(closed_live) and sum(t.closed for t in ticks) >= BACKFILL - 1

            ticks = await read_topic(infra.kafka_bootstrap_servers, TOPIC, done, within=60)
            services.assert_running()
        finally:
            codes = services.stop_all()
            log = services.tail("watcher")
            shutil.rmtree(data_dir, ignore_errors=True)
    assert codes == {"watcher": 0}, log
    assert exchange.connections == 2
    closed = [t for t in ticks if t.closed]
    minutes = [t.minute for t in closed]
    assert len(minutes) == len(set(minutes)), "a minute closed twice"
    # Backfill: every served closed minute of the last BACKFILL, the gap minute not made up.
    wanted = {m for m in exchange.klines_served if m >= exchange.now_minute - BACKFILL * M}
    backfilled = {t.minute: t for t in closed if t.minute in wanted}
    assert set(backfilled) == wanted and exchange.now_minute - GAP * M not in minutes
    for minute, tick in backfilled.items():
        row = exchange.klines_served[minute]
        assert (tick.open, tick.close, tick.volume, tick.trades) == (
            float(row[1]),
            float(row[4]),
            12.5,
            3,
        )
        assert tick.exchange_ts == minute + M
    # Live: the last kline of its minute, closed by the exchange's own flag.
    final = exchange.sent_klines[-1]
    (live,) = [t for t in closed if t.minute == final["k"]["t"]]
    assert (live.volume, live.close, live.exchange_ts) == (4.0, float(final["k"]["c"]), final["E"])
    seqs = [t.seq for t in ticks]
    assert seqs == sorted(set(seqs)), "seq must grow per market"
    assert "skipping bad frame" in log and "binance:zzz-usdt is not listed" in log
    assert "binance:old-usdt is not listed" in log
