"""The live source against a local Kraken (REST and WebSocket v2 in the documented formats).

Kraken names BTC "XBT" and DOGE "XDG" in its listing and REST pairs, and never marks a candle
final: the watcher must map the names both ways, close a bar when a later minute starts, and
backfill the 12 hours Kraken's OHLC offers without the forming row.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
PAIRS = {"BTC/USD": ("XXBTZUSD", "XBT/USD"), "DOGE/USD": ("XDGUSD", "XDG/USD")}
MARKETS = {"BTC/USD": "kraken:btc-usd", "DOGE/USD": "kraken:doge-usd"}
REST_MINUTES = 20  # candles the fake OHLC endpoint has before the live minutes


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def level(symbol: str, minute: int) -> float:
    base = 30_000.0 if symbol == "BTC/USD" else 0.25
    return round(base * (1 + (minute // M) % 13 / 1000), 8)


@dataclass
class FakeKraken:
    now_minute: int
    rest_rows: dict[str, dict[int, list[Any]]] = field(default_factory=dict)  # symbol -> minute
    sent: list[dict[str, Any]] = field(default_factory=list)  # ohlc entries sent live
    subscribe: list[dict[str, Any]] = field(default_factory=list)

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/0/public/AssetPairs":
            result: Any = {
                key: {"altname": key, "wsname": wsname, "status": "online"}
                for key, wsname in PAIRS.values()
            }
            result["ETH2.SETH"] = {
                "altname": "ETH2.SETH",
                "wsname": "ETH2.S/ETH",
                "status": "online",
            }
            return 200, {"error": [], "result": result}
        if path == "/0/public/OHLC":
            return 200, self.ohlc(query["pair"])
        return 200, {"error": ["EGeneral:Unknown method"]}

    def ohlc(self, pair: str) -> dict[str, Any]:
        symbol = {"XBTUSD": "BTC/USD", "XDGUSD": "DOGE/USD"}[pair]
        rows = []
        # REST_MINUTES closed candles ending three minutes ago, then the forming one (now).
        minutes = [self.now_minute - (REST_MINUTES + 2 - i) * M for i in range(REST_MINUTES)]
        for minute in [*minutes, self.now_minute]:
            p = f"{level(symbol, minute):.8f}"
            row = [minute // 1000, p, p, p, p, p, "1.5", 4]
            if minute != self.now_minute:
                self.rest_rows.setdefault(symbol, {})[minute] = row
            rows.append(row)
        return {"error": [], "result": {PAIRS[symbol][0]: rows, "last": self.now_minute // 1000}}

    def update(self, symbol: str, minute: int, volume: float) -> str:
        p = level(symbol, minute)
        entry = {
            "symbol": symbol,
            "open": p,
            "high": p,
            "low": p,
            "close": p,
            "trades": 2,
            "volume": volume,
            "vwap": p,
            "interval_begin": rfc3339(minute),
            "interval": 1,
        }
        self.sent.append(entry)
        now = time.time_ns() // 1_000_000
        return json.dumps(
            {"channel": "ohlc", "type": "update", "timestamp": rfc3339(now), "data": [entry]}
        )

    async def ws(self, connection: ServerConnection) -> None:
        await connection.send(
            json.dumps(
                {
                    "channel": "status",
                    "type": "update",
                    "data": [
                        {
                            "system": "online",
                            "api_version": "v2",
                            "connection_id": 1,
                            "version": "2.0.10",
                        }
                    ],
                }
            )
        )
        request = json.loads(await connection.recv())
        self.subscribe.append(request)
        for symbol in request["params"]["symbol"]:
            ack = {"channel": "ohlc", "symbol": symbol, "interval": 1, "snapshot": True}
            await connection.send(
                json.dumps(
                    {
                        "method": "subscribe",
                        "result": ack,
                        "success": True,
                        "time_in": "x",
                        "time_out": "y",
                    }
                )
            )
        await connection.send(json.dumps({"channel": "heartbeat"}))
        for minute in (self.now_minute - 2 * M, self.now_minute - M, self.now_minute):
            for volume in (1.0, 2.5):
                for symbol in MARKETS:
                    await connection.send(self.update(symbol, minute, volume))
        while True:  # Kraken sends a heartbeat about once a second when nothing else flows
            try:
                await asyncio.wait_for(connection.wait_closed(), timeout=1.0)
                return
            except TimeoutError:
                await connection.send(json.dumps({"channel": "heartbeat"}))


async def test_live_kraken_maps_names_backfills_and_closes_on_the_next_minute(
    infra: LocalInfra,
) -> None:
    """REST backfill and live ohlc bars arrive closed once each, equal to what Kraken sent."""
    now = time.time_ns() // 1_000_000
    exchange = FakeKraken(now_minute=now - now % M)
    data_dir = make_data_dir("tickstream-live-kr-logs-")
    async with (
        rest_server(exchange.route) as rest_url,
        serve(exchange.ws, "127.0.0.1", 0) as ws_server,
    ):
        env = {
            **os.environ,
            **infra.environment(),
            "WATCHER_SOURCE": "live",
            "WATCHER_MARKETS": "kraken:btc-usd,kraken:doge-usd",
            "WATCHER_BACKFILL_MINUTES": "60",
            "KRAKEN_WS_URL": f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}",
            "KRAKEN_REST_URL": rest_url,
        }
        services = Services(env, data_dir)
        services.start("watcher")
        results: dict[str, list[Tick]] = {}
        try:
            for symbol, market in MARKETS.items():

                def done(ticks: list[Tick]) -> bool:
                    closed = {t.minute for t in ticks if t.closed}
                    return exchange.now_minute - M in closed and len(closed) >= REST_MINUTES + 2

                topic = f"ticks.{market.replace(':', '.')}"
                results[symbol] = await read_topic(infra.kafka_bootstrap_servers, topic, done, 60)
            services.assert_running()
        finally:
            codes = services.stop_all()
            log = services.tail("watcher")
            shutil.rmtree(data_dir, ignore_errors=True)
    assert codes == {"watcher": 0}, log
    assert exchange.subscribe[0]["params"] == {
        "channel": "ohlc",
        "symbol": ["BTC/USD", "DOGE/USD"],
        "interval": 1,
        "snapshot": True,
    }
    for symbol, ticks in results.items():
        closed = {t.minute: t for t in ticks if t.closed}
        assert len(closed) == sum(t.closed for t in ticks), "a minute closed twice"
        rest_rows = exchange.rest_rows[symbol]
        for minute, row in rest_rows.items():
            bar = closed[minute]
            assert (bar.close, bar.volume, bar.trades, bar.exchange_ts) == (
                float(row[4]),
                1.5,
                4,
                minute + M,
            )
        live = [exchange.now_minute - 2 * M, exchange.now_minute - M]
        if exchange.now_minute in closed:  # the test ran past the minute's end: closed by timer
            live.append(exchange.now_minute)
        for minute in live:
            entries = [
                e
                for e in exchange.sent
                if e["symbol"] == symbol and e["interval_begin"] == rfc3339(minute)
            ]
            bar = closed[minute]
            assert (bar.close, bar.volume, bar.trades) == (entries[-1]["close"], 2.5, 2)
            if minute < exchange.now_minute:
                assert bar.exchange_ts == minute + M  # sent after its minute: stamped at its end
        assert set(closed) == {*rest_rows, *live}
        seqs = [t.seq for t in ticks]
        assert seqs == sorted(set(seqs))
