"""A local exchange with N spot markets for bench_markets: Binance's documented formats (listing,
klines REST, combined kline WebSocket streams), 30 days of history per market, and each market's
forming candle pushed every `--interval-s` seconds (0.5 updates/s at the default 2 s).

Run as its own process so its CPU is not counted as the stack's:

    .venv/bin/python bench/market_exchange.py --markets 1000 --rest-port 18001 --ws-port 18002

Every value is a pure function of (market, minute), so what the stack stores can be compared
with what this exchange says, and two runs serve the same data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import time
from urllib.parse import parse_qs, urlsplit

# Binance takes up to 1,024 streams in one URL (about 20 KB); websockets refuses request lines
# over 8 KB unless told otherwise, before it is imported.
os.environ.setdefault("WEBSOCKETS_MAX_LINE_LENGTH", "65536")

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

M = 60_000
HISTORY_MINUTES = 30 * 1440
QUOTES = ("usdt", "usdc", "btc")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def market_names(count: int) -> list[tuple[str, str, str]]:
    """(symbol, base, quote) of `count` markets: most quoted in USDT, some in USDC and BTC, so
    the quote filter has something to select."""
    names = []
    for index in range(count):
        quote = QUOTES[0] if index % 10 < 8 else QUOTES[1 + index % 2]
        base = f"x{index:04d}"
        names.append((f"{base}{quote}".upper(), base, quote))
    return names


def _unit(*parts: int) -> float:
    """A deterministic number in [0, 1) from integers (a small multiplicative hash)."""
    h = 0x9E3779B9
    for part in parts:
        h = ((h ^ part) * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
    return h / 2**32


def truth(index: int, minute: int) -> tuple[float, float, float, float, float, int]:
    """(open, high, low, close, base volume, trades) the market traded in `minute`: a random
    walk around its level (levels spread over 1e-4 .. 1e5, as real markets are)."""
    level = 10 ** (-4 + 9 * _unit(index, 1))
    m = minute // M
    drift = math.sin(m / (50 + 200 * _unit(index, 2))) * 0.02
    open_ = level * (1 + drift + 0.002 * (_unit(index, m, 3) - 0.5))
    close = level * (1 + drift + 0.002 * (_unit(index, m + 1, 3) - 0.5))
    high = max(open_, close) * (1 + 0.001 * _unit(index, m, 4))
    low = min(open_, close) * (1 - 0.001 * _unit(index, m, 5))
    volume = (1 + 10 * _unit(index, m, 6)) * 1000 / math.sqrt(level)
    return (_q(open_), _q(high), _q(low), _q(close), _q(volume), 1 + int(20 * _unit(index, m, 7)))


def _q(value: float) -> float:
    return float(f"{value:.8g}")


def _text(value: float) -> str:
    """A number as Binance writes it: plain decimals, never an exponent."""
    return f"{value:.12f}".rstrip("0").rstrip(".") or "0"


def forming(index: int, minute: int, second: float) -> tuple[float, ...]:
    """The candle `second` into its minute: the final state from 55 s on, before it the open,
    the extremes and a share of the volume."""
    o, h, low, c, v, n = truth(index, minute)
    if second >= 55:
        return (o, h, low, c, v, n)
    share = max(second, 1) / 60
    return (o, max(o, c), min(o, c), o, _q(v * share), max(1, int(n * share)))


class Exchange:
    def __init__(self, count: int, interval_s: float) -> None:
        self.names = market_names(count)
        self.index = {symbol: i for i, (symbol, _, _) in enumerate(self.names)}
        self.interval_s = interval_s
        self.requests = 0

    def route(self, path: str, query: dict[str, str]) -> tuple[int, object]:
        self.requests += 1
        if path == "/api/v3/exchangeInfo":
            symbols = [
                {"symbol": s, "status": "TRADING", "baseAsset": b.upper(), "quoteAsset": q.upper()}
                for s, b, q in self.names
            ]
            return 200, {"symbols": symbols}
        index = self.index.get(query.get("symbol", ""))
        if path == "/api/v3/klines" and index is not None:
            now = now_ms()
            current = now - now % M  # one clock read: two may straddle a minute's end
            start = max(int(query["startTime"]), current - HISTORY_MINUTES * M)
            end = min(int(query["endTime"]), current - M)
            limit = min(int(query.get("limit", 500)), 1000)
            rows = []
            for minute in range(start - start % M, end + 1, M):
                if len(rows) == limit:
                    break
                o, h, low, c, v, n = truth(index, minute)
                rows.append(
                    [
                        *(minute, _text(o), _text(h), _text(low), _text(c), _text(v)),
                        minute + M - 1,
                        *(_text(v * c), n, "0", "0", "0"),
                    ]
                )
            return 200, rows
        return 400, {"code": -1121, "msg": "Invalid symbol."}

    def kline(self, symbol: str, minute: int, bar: tuple[float, ...], at: int, final: bool) -> str:
        o, h, low, c, v, n = bar
        k = {"t": minute, "T": minute + M - 1, "s": symbol, "i": "1m", "o": _text(o), "h": _text(h)}
        k |= {"l": _text(low), "c": _text(c), "v": _text(v), "q": _text(v * c), "n": int(n)}
        k["x"] = final
        data = {"e": "kline", "E": at, "s": symbol, "k": k}
        return json.dumps({"stream": f"{symbol.lower()}@kline_1m", "data": data})

    async def ws(self, connection: ServerConnection) -> None:
        """Each market of the connection's streams every `interval_s`, spread evenly over the
        interval; a minute's final candle with the next minute's first update."""
        assert connection.request is not None
        streams = parse_qs(urlsplit(connection.request.path).query)["streams"][0]
        symbols = [name.split("@")[0].upper() for name in streams.split("/")]
        symbols = [s for s in symbols if s in self.index]
        last_minute: dict[str, int] = {}
        slices = 10
        with contextlib.suppress(ConnectionClosed):
            while True:
                for part in range(slices):
                    began = time.monotonic()
                    at = now_ms()
                    minute, second = at - at % M, (at % M) / 1000
                    frames = []
                    for symbol in symbols[part::slices]:
                        index = self.index[symbol]
                        previous = last_minute.get(symbol)
                        if previous is not None and previous < minute:
                            bar = truth(index, previous)
                            frames.append(self.kline(symbol, previous, bar, at, True))
                        last_minute[symbol] = minute
                        bar = forming(index, minute, second)
                        frames.append(self.kline(symbol, minute, bar, at, False))
                    for frame in frames:
                        await connection.send(frame)
                    pause = self.interval_s / slices - (time.monotonic() - began)
                    await asyncio.sleep(max(0.0, pause))


async def _serve_http(
    exchange: Exchange, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = urlsplit(head.split(b" ", 2)[1].decode())
            query = {k: v[0] for k, v in parse_qs(target.query).items()}
            status, body = exchange.route(target.path, query)
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n"
                "Content-Type: application/json\r\n\r\n".encode()
                + data
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(count: int, rest_port: int, ws_port: int, interval_s: float) -> None:
    exchange = Exchange(count, interval_s)
    server = await asyncio.start_server(
        lambda r, w: _serve_http(exchange, r, w), "127.0.0.1", rest_port
    )
    async with server, serve(exchange.ws, "127.0.0.1", ws_port, max_size=2**22):
        print("ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markets", type=int, default=100)
    parser.add_argument("--rest-port", type=int, required=True)
    parser.add_argument("--ws-port", type=int, required=True)
    parser.add_argument("--interval-s", type=float, default=2.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.markets, args.rest_port, args.ws_port, args.interval_s))
