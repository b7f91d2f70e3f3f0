"""The live source against a local Kraken (REST and WebSocket v2 in the documented formats).

Kraken names BTC "XBT" and DOGE "XDG" in its listing and REST pairs, and never marks a candle
final: the watcher must map the names both ways, close a bar when a later minute starts, and
backfill the 12 hours Kraken's OHLC offers without the forming row; and it must get through
dropped and silent connections, maintenance, rate limits, bad frames and refused symbols.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

from tests.e2e.exchange_fakes import (
    Bar,
    BarValues,
    Outage,
    Throttle,
    assert_no_gap,
    assert_waited_out,
    closed_once,
    history,
    keep_sending,
    live_watcher,
    read_all,
    read_through_outage,
    read_topic,
    rest_values,
    topic_of,
)
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
    results: dict[str, list[Tick]] = {}
    async with live_watcher(
        infra,
        "kraken",
        exchange.route,
        exchange.ws,
        WATCHER_MARKETS="kraken:btc-usd,kraken:doge-usd",
        WATCHER_BACKFILL_MINUTES="60",
    ):
        for symbol, market in MARKETS.items():

            def done(ticks: list[Tick]) -> bool:
                closed = {t.minute for t in ticks if t.closed}
                return exchange.now_minute - M in closed and len(closed) >= REST_MINUTES + 2

            results[symbol] = await read_topic(
                infra.kafka_bootstrap_servers, topic_of(market), done, 60
            )
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


def rfc3339_ms(ms: int) -> str:
    """`ms` as Kraken writes times (nanoseconds), exactly."""
    whole = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{ms % 1000:03d}000000Z"


OUTAGE_MARKET = "kraken:btc-eur"


@dataclass
class KrakenOutages:
    """Kraken REST and WS v2 playing the `Outage` script for BTC/EUR (XBT/EUR in the listing);
    OLD/USD is listed but refused when subscribed (a pair being delisted)."""

    outage: Outage
    bars: dict[int, Bar]
    sent: dict[int, tuple[dict[str, Any], int]] = field(default_factory=dict)  # minute -> last
    stamps: dict[int, int] = field(default_factory=dict)  # minute -> its frames' timestamp
    subscribed: list[list[str]] = field(default_factory=list)  # symbols, per connection

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/0/public/AssetPairs":
            pairs = {"XXBTZEUR": "XBT/EUR", "OLDUSD": "OLD/USD"}
            listing = {key: {"wsname": name, "status": "online"} for key, name in pairs.items()}
            return 200, {"error": [], "result": listing}
        if path == "/0/public/OHLC" and query.get("pair") == "XBTEUR":
            return 200, self.ohlc(int(query["since"]))
        return 200, {"error": ["EQuery:Unknown asset pair"]}

    def ohlc(self, since_s: int) -> dict[str, Any]:
        """Closed candles after `since`, then the one forming on the fake's clock: Kraken's
        last row, with its volume so far (the watcher must leave it out)."""
        forming = self.outage.rest_before
        minutes = [m for m in sorted(self.bars) if since_s * 1000 < m < forming]
        rows = [self.row(m, self.bars[m]) for m in minutes]
        partial = self.bars[forming]
        rows.append(self.row(forming, Bar(*[partial.open] * 4, partial.volume / 2, 1)))
        return {"error": [], "result": {"XXBTZEUR": rows, "last": forming // 1000}}

    @staticmethod
    def row(minute: int, bar: Bar) -> list[Any]:
        prices = [f"{p:.8f}" for p in (bar.open, bar.high, bar.low, bar.close)]
        return [minute // 1000, *prices, prices[3], f"{bar.volume:.8f}", bar.trades]

    def update(self, minute: int) -> str:
        """The minute's final candle, stamped when first sent (at the latest its last
        millisecond): sent again, it is the same, whichever of them the watcher last took."""
        bar = self.bars[minute]
        entry = {
            "symbol": "BTC/EUR",
            "open": bar.open,
            "high": bar.high,
            "low": bar.low,
            "close": bar.close,
            "trades": bar.trades,
            "volume": bar.volume,
            "vwap": bar.close,
            "interval_begin": rfc3339_ms(minute),
            "interval": 1,
        }
        now = time.time_ns() // 1_000_000
        stamp = self.stamps.setdefault(minute, min(now, minute + M - 1))
        self.sent[minute] = entry, stamp
        frame = {"channel": "ohlc", "type": "update", "timestamp": rfc3339_ms(stamp)}
        return json.dumps({**frame, "data": [entry]})

    async def ws(self, connection: ServerConnection) -> None:
        step = self.outage.connect()  # before the watcher can ask REST anything
        await connection.send(status("online"))
        request = json.loads(await connection.recv())
        symbols = request["params"]["symbol"]
        self.subscribed.append(symbols)
        for symbol in symbols:
            ack: dict[str, Any] = {"method": "subscribe", "req_id": request["req_id"]}
            if symbol == "OLD/USD":
                ack |= {"success": False, "error": f"Currency pair not supported {symbol}"}
            else:
                ack |= {"success": True, "result": {"channel": "ohlc", "symbol": symbol}}
            await connection.send(json.dumps({**ack, "time_in": "x", "time_out": "y"}))
        update = self.update(step.minute)
        await connection.send(update)
        if step.end == "drop":
            bad = json.loads(update)
            bad["data"][0]["interval_begin"] = "yesterday"
            await connection.send(json.dumps(bad))  # malformed: not a time
            await connection.send('{"channel":"ohlc","type":"update","data":[{"symbol"')
            return
        if step.end == "silence":
            await connection.wait_closed()
            return
        if step.end == "reconnect request":
            await connection.send(status("maintenance"))
        await keep_sending(connection, lambda: json.dumps({"channel": "heartbeat"}))

    def expected(self) -> dict[int, BarValues]:
        """Streamed minutes as their last update says, the others as REST's candles."""
        out = {minute: rest_values(minute, bar) for minute, bar in self.bars.items()}
        for minute, (e, stamp) in self.sent.items():
            prices = (e["open"], e["high"], e["low"], e["close"], e["volume"])
            out[minute] = (*prices, e["trades"], min(stamp, minute + M))
        return out


def status(system: str) -> str:
    data = [{"system": system, "api_version": "v2", "connection_id": 1, "version": "2.0.10"}]
    return json.dumps({"channel": "status", "type": "update", "data": data})


async def test_live_kraken_repairs_drops_silence_maintenance_and_rate_limits(
    infra: LocalInfra,
) -> None:
    """Through a dropped, a silent and a maintenance-ended connection, and 429s on listing and
    OHLC, every minute Kraken traded is closed exactly once, with its values; bad frames are
    skipped, and a refused and an unlisted pair do not stop the others."""
    now = time.time_ns() // 1_000_000
    outage = Outage(now - now % M, asks_reconnect=True)
    exchange = KrakenOutages(outage, history(outage.now_minute, 27_000.0))
    rest = Throttle(exchange.route, frozenset({"/0/public/AssetPairs", "/0/public/OHLC"}))
    topic = topic_of(OUTAGE_MARKET)
    async with live_watcher(
        infra,
        "kraken",
        rest,
        exchange.ws,
        WATCHER_MARKETS=f"{OUTAGE_MARKET},kraken:old-usd,kraken:zzz-usd",
        WATCHER_BACKFILL_MINUTES="30",
        WATCHER_FEED_SILENCE_MS="2000",
    ) as watcher:
        await read_through_outage(
            infra.kafka_bootstrap_servers, watcher, outage, exchange.bars, OUTAGE_MARKET, 50
        )
    ticks = await read_all(infra.kafka_bootstrap_servers, topic)
    log = watcher.log_text
    assert outage.connections == len(outage.steps) == 4
    assert_no_gap(closed_once(ticks), exchange.expected(), outage.now_minute)
    assert log.count("kraken feed: skipping bad frame") == 2
    assert log.count("kraken feed: TimeoutError: no frame for 2s") == 1  # the silent one only
    assert "kraken feed: exchange asks to reconnect: Kraken system status: maintenance" in log
    assert "kraken feed: OLD/USD refused, skipped" in log
    assert "kraken:zzz-usd is not listed" in log
    assert exchange.subscribed == [["BTC/EUR", "OLD/USD"]] + [["BTC/EUR"]] * 3
    ohlc = "/0/public/OHLC?pair=XBTEUR&"
    assert_waited_out(log, rest, "/0/public/AssetPairs", ohlc, OUTAGE_MARKET)
