"""A local Binance (and OKX) listing many markets, in their formats, counting what they are asked.

Used by the backfill tests (tests/integration/test_live_backfill.py) and bench/bench_backfill.py:
exchangeInfo from a listing the test may change while the watcher runs, klines for the last
48 h of every listed symbol (a day asked for just before a minute ends is still all there;
each request counted per symbol), and a combined kline stream
that sends every subscribed symbol's forming minute twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tests.e2e.soak_fakes import current_minute, now_ms

M = 60_000
DAY_MINUTES = 1440


def symbols(count: int, first: int = 0) -> list[str]:
    """`count` distinct Binance symbols quoted in USDT: C0000USDT, C0001USDT, ..."""
    return [f"C{n:04d}USDT" for n in range(first, first + count)]


def price(symbol: str, minute: int) -> str:
    return f"{1 + int(symbol[1:5]) / 100 + (minute // M) % 89 / 10_000:.8f}"


@dataclass
class ManyBinance:
    """Binance's REST and combined streams for `listed` symbols (changeable while running).

    `klines` counts candle requests per symbol. `flood` rounds of one frame per symbol, ten
    rounds a second, are sent on the first connection before it pings the client three times
    (`answered` is set once all three pongs came). `drop_after` closes the first connection
    once that many candle requests arrived (a reconnect mid-backfill).
    """

    listed: list[str]
    name: str = "binance"
    klines: Counter[str] = field(default_factory=Counter)
    connections: list[list[str]] = field(default_factory=list)  # symbols, per connection
    flood: int = 0  # rounds
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    drop_after: int | None = None

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/exchangeInfo":
            listing = [
                {"symbol": s, "status": "TRADING", "baseAsset": s[:-4], "quoteAsset": "USDT"}
                for s in self.listed
            ]
            return 200, {"symbols": listing}
        symbol = query.get("symbol", "")
        if path == "/api/v3/klines" and symbol in self.listed:
            self.klines[symbol] += 1
            current = current_minute()
            start = max(int(query["startTime"]), current - 2 * DAY_MINUTES * M)
            end = min(int(query["endTime"]), current - M)
            rows = []
            for minute in range(start, end + 1, M)[: int(query.get("limit", "500"))]:
                p = price(symbol, minute)
                rows.append([minute, p, p, p, p, "2.5", minute + M - 1, "1", 3, "0", "0", "0"])
            return 200, rows
        return 400, {"code": -1121, "msg": "Invalid symbol."}

    def kline(self, symbol: str) -> str:
        at = now_ms()
        minute = at - at % M
        p = price(symbol, minute)
        k = {"t": minute, "T": minute + M - 1, "s": symbol, "i": "1m", "o": p, "h": p, "l": p}
        k |= {"c": p, "v": "1.5", "n": 2, "x": False}
        data = {"e": "kline", "E": at, "s": symbol, "k": k}
        return json.dumps({"stream": f"{symbol.lower()}@kline_1m", "data": data})

    async def ws(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        streams = parse_qs(urlsplit(connection.request.path).query)["streams"][0]
        subscribed = [name.split("@")[0].upper() for name in streams.split("/")]
        self.connections.append(subscribed)
        first = len(self.connections) == 1
        with contextlib.suppress(ConnectionClosed):
            if first and self.flood:
                # Every symbol's update ten times a second: a client that did not read would
                # get more than one tick per market every 250 ms to publish.
                for _ in range(self.flood):
                    for symbol in subscribed:
                        await connection.send(self.kline(symbol))
                    await asyncio.sleep(0.1)
                for _ in range(3):  # the client answers while its consumer is stalled
                    await (await connection.ping())
                self.answered.set()
            while True:
                dropping = first and self.drop_after is not None
                if dropping and sum(self.klines.values()) >= (self.drop_after or 0):
                    return  # the exchange drops the connection mid-backfill
                for symbol in subscribed:
                    if symbol in self.listed:
                        await connection.send(self.kline(symbol))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(connection.wait_closed(), timeout=0.5)
                    return


def okx_symbols(count: int, first: int = 0) -> list[str]:
    """`count` distinct OKX spot instIds quoted in USDT: C0000-USDT, C0001-USDT, ..."""
    return [f"C{n:04d}-USDT" for n in range(first, first + count)]


# OKX's documented REST limits (shared/exchange-formats.md): `candles` serves the latest 1,440
# rows (the forming minute included) and at most 300 a request, `history-candles` 100.
OKX_RECENT_ROWS = 1440
OKX_LIMITS = {"candles": 300, "history-candles": 100}


@dataclass
class ManyOkx:
    """OKX v5's REST and business WebSocket for `listed` instIds, in OKX's formats.

    Instruments: every listed instId, SPOT and live. Candles: `candles` only within the latest
    OKX_RECENT_ROWS minutes, `history-candles` for the last 48 h, each refusing a `limit`
    beyond OKX's (code 51000), rows newest first with the forming minute as confirm "0";
    `asked` counts requests per (endpoint, instId). WS: acknowledges every subscribed arg,
    pushes each subscribed instrument's forming minute twice a second, answers a text ping
    with a text pong. A minute's values are the same on REST and WS, so every closed minute
    the watcher publishes must equal `row(inst, minute)`.
    """

    listed: list[str]
    name: str = "okx"
    asked: Counter[tuple[str, str]] = field(default_factory=Counter)
    connections: list[list[str]] = field(default_factory=list)  # instIds, per connection

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v5/public/instruments" and query == {"instType": "SPOT"}:
            listing = [
                {"instId": inst, "instType": "SPOT", "baseCcy": inst.split("-")[0]}
                | {"quoteCcy": "USDT", "state": "live"}
                for inst in self.listed
            ]
            return 200, {"code": "0", "msg": "", "data": listing}
        endpoint = path.removeprefix("/api/v5/market/")
        inst = query.get("instId", "")
        if endpoint not in OKX_LIMITS or inst not in self.listed:
            return 200, {"code": "51001", "msg": "Instrument ID does not exist", "data": []}
        self.asked[endpoint, inst] += 1
        limit = int(query.get("limit", "100"))
        if query.get("bar", "1m") != "1m" or limit > OKX_LIMITS[endpoint]:
            return 200, {"code": "51000", "msg": "Parameter error: limit", "data": []}
        current = current_minute()
        rows_back = OKX_RECENT_ROWS if endpoint == "candles" else 2 * DAY_MINUTES
        oldest = current - (rows_back - 1) * M
        after, before = int(query.get("after", 2**62)), int(query.get("before", 0))
        # `after` and `before` are exclusive: open times before < ts < after, newest first.
        newest = min(after - 1, current)
        newest -= newest % M
        first = max(before + 1 + (-(before + 1)) % M, oldest)
        minutes = range(newest, first - 1, -M)[:limit]
        rows = [self.row(inst, m, "0" if m == current else "1") for m in minutes]
        return 200, {"code": "0", "msg": "", "data": rows}

    @staticmethod
    def row(inst: str, minute: int, confirm: str = "1") -> list[str]:
        p = price(inst, minute)
        return [str(minute), p, p, p, p, "2.5", "1", "1", confirm]

    async def ws(self, connection: ServerConnection) -> None:
        subscribed: list[str] = []
        self.connections.append(subscribed)
        with contextlib.suppress(ConnectionClosed):
            while True:
                try:
                    frame = await asyncio.wait_for(connection.recv(), timeout=0.5)
                except TimeoutError:
                    at = now_ms()
                    for inst in subscribed:
                        if inst in self.listed:
                            row = self.row(inst, at - at % M, "0")
                            arg = {"channel": "candle1m", "instId": inst}
                            await connection.send(json.dumps({"arg": arg, "data": [row]}))
                    continue
                if frame == "ping":
                    await connection.send("pong")
                    continue
                request = json.loads(frame)
                for arg in request.get("args", []):
                    subscribed.append(arg["instId"])
                    ack = {"id": request.get("id"), "event": "subscribe", "arg": arg}
                    await connection.send(json.dumps(ack | {"connId": "a4d3ae55"}))
