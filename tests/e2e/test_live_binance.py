"""The live source against a local Binance (REST and WebSocket in Binance's formats), end to end.

The real watcher process resolves its markets from the fake exchangeInfo, backfills closed
minutes from the fake klines, streams kline frames, survives bad frames, dropped and silent
connections, serverShutdown and rate limits, and publishes to the real broker; the test reads
the topic back.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

from tests.conftest import SHARED_DATA
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
    async with live_watcher(
        infra,
        "binance",
        exchange.route,
        exchange.ws,
        WATCHER_MARKETS="binance:nkn-usdt,binance:old-usdt,binance:zzz-usdt",
        WATCHER_BACKFILL_MINUTES=str(BACKFILL),
    ) as watcher:

        def done(ticks: list[Tick]) -> bool:
            closed_live = [t for t in ticks if t.closed and t.volume == 4.0]
            return bool(closed_live) and sum(t.closed for t in ticks) >= BACKFILL - 1

        ticks = await read_topic(infra.kafka_bootstrap_servers, TOPIC, done, within=60)
    log = watcher.log_text
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


OUTAGE_MARKET = "binance:lrc-btc"


@dataclass
class BinanceOutages:
    """Binance REST and the kline stream of LRCBTC playing the `Outage` script."""

    outage: Outage
    bars: dict[int, Bar]
    sent: dict[int, dict[str, Any]] = field(default_factory=dict)  # minute -> last kline sent
    stamps: dict[int, int] = field(default_factory=dict)  # minute -> its event time

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/exchangeInfo":
            lrc = {"symbol": "LRCBTC", "status": "TRADING", "baseAsset": "LRC", "quoteAsset": "BTC"}
            return 200, {"symbols": [lrc]}
        if path == "/api/v3/klines" and query.get("symbol") == "LRCBTC":
            start, end = int(query["startTime"]), int(query["endTime"])
            minutes = [
                m for m in sorted(self.bars) if start <= m <= end and m < self.outage.rest_before
            ][: int(query["limit"])]
            return 200, [self.row(m) for m in minutes]
        return 400, {"code": -1121, "msg": "Invalid symbol."}

    def row(self, minute: int) -> list[Any]:
        bar = self.bars[minute]
        prices = [f"{p:.8f}" for p in (bar.open, bar.high, bar.low, bar.close)]
        volume = f"{bar.volume:.8f}"
        return [minute, *prices, volume, minute + M - 1, "0.1", bar.trades, "0.5", "0.05", "0"]

    def kline(self, minute: int) -> str:
        """The minute's final state, stamped when first sent (at the latest its last
        millisecond): sent again, it is the same, whichever of them the watcher last took."""
        bar = self.bars[minute]
        now = time.time_ns() // 1_000_000
        data = {
            "e": "kline",
            "E": self.stamps.setdefault(minute, min(now, minute + M - 1)),
            "s": "LRCBTC",
            "k": {
                "t": minute,
                "T": minute + M - 1,
                "s": "LRCBTC",
                "i": "1m",
                "f": 100,
                "L": 100 + bar.trades - 1,
                "o": f"{bar.open:.8f}",
                "c": f"{bar.close:.8f}",
                "h": f"{bar.high:.8f}",
                "l": f"{bar.low:.8f}",
                "v": f"{bar.volume:.8f}",
                "n": bar.trades,
                "x": False,
                "q": "0.1",
                "V": "0.5",
                "Q": "0.05",
                "B": "0",
            },
        }
        self.sent[minute] = data
        return json.dumps({"stream": "lrcbtc@kline_1m", "data": data})

    async def ws(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        assert connection.request.path == "/stream?streams=lrcbtc@kline_1m"
        step = self.outage.connect()
        await connection.send(self.kline(step.minute))
        if step.end == "drop":
            await connection.send('{"stream":"lrcbtc@kline_1m","data":{"e":"kline"')  # malformed
            return
        if step.end == "silence":
            await connection.wait_closed()
            return
        if step.end == "reconnect request":
            shutdown = {"e": "serverShutdown", "E": time.time_ns() // 1_000_000}
            await connection.send(json.dumps(shutdown))
        await keep_sending(connection, lambda: self.kline(step.minute))

    def expected(self) -> dict[int, BarValues]:
        """Streamed minutes as their last kline says, the others as REST's candles."""
        out = {minute: rest_values(minute, bar) for minute, bar in self.bars.items()}
        for minute, data in self.sent.items():
            k = data["k"]
            prices = (float(k["o"]), float(k["h"]), float(k["l"]), float(k["c"]), float(k["v"]))
            out[minute] = (*prices, k["n"], min(data["E"], minute + M))
        return out


async def test_live_binance_repairs_drops_silence_shutdown_and_rate_limits(
    infra: LocalInfra,
) -> None:
    """Through a dropped, a silent and a shut-down connection, and 429s on listing and klines,
    every minute Binance traded is closed exactly once, with its values; bad frames skipped."""
    now = time.time_ns() // 1_000_000
    outage = Outage(now - now % M, asks_reconnect=True)
    exchange = BinanceOutages(outage, history(outage.now_minute, 0.0000064))
    rest = Throttle(exchange.route, frozenset({"/api/v3/exchangeInfo", "/api/v3/klines"}))
    topic = topic_of(OUTAGE_MARKET)
    async with live_watcher(
        infra,
        "binance",
        rest,
        exchange.ws,
        WATCHER_MARKETS=f"{OUTAGE_MARKET},binance:zzz-usdt",
        WATCHER_BACKFILL_MINUTES=str(BACKFILL),
        WATCHER_FEED_SILENCE_MS="2000",
    ) as watcher:
        await read_through_outage(
            infra.kafka_bootstrap_servers, watcher, outage, exchange.bars, OUTAGE_MARKET, 45
        )
    ticks = await read_all(infra.kafka_bootstrap_servers, topic)
    log = watcher.log_text
    assert outage.connections == len(outage.steps) == 4
    assert_no_gap(closed_once(ticks), exchange.expected(), outage.now_minute)
    assert log.count("binance feed: skipping bad frame") == 1
    assert log.count("binance feed: TimeoutError: no frame for 2s") == 1  # the silent one only
    assert "binance feed: exchange asks to reconnect: serverShutdown" in log
    assert "binance:zzz-usdt is not listed" in log
    assert_waited_out(
        log, rest, "/api/v3/exchangeInfo", "/api/v3/klines?symbol=LRCBTC&", OUTAGE_MARKET
    )


CAPTURE_MARKETS = {"NKNUSDT": "binance:nkn-usdt", "LRCBTC": "binance:lrc-btc"}


def captured_session() -> list[dict[str, Any]]:
    """The frames of the recorded Binance session (combined streams: depth, kline, ...)."""
    path = SHARED_DATA / "captures" / "BINANCE.ws.1.0"
    if not path.exists():
        pytest.skip(f"capture not found at {path}")
    frames = []
    for line in path.read_text().splitlines()[1:]:
        _, _, frame = line.partition(": ")
        if frame.startswith("{"):
            frames.append(json.loads(frame))
    return frames


def retimed(frame: dict[str, Any], shift: int) -> dict[str, Any]:
    """`frame` with every time moved by `shift` ms (kline open/close times and event time)."""
    data = dict(frame["data"])
    if "E" in data:
        data["E"] += shift
    if "k" in data:
        data["k"] = {**data["k"], "t": data["k"]["t"] + shift, "T": data["k"]["T"] + shift}
    return {**frame, "data": data}


async def test_live_binance_replays_the_recorded_session(infra: LocalInfra) -> None:
    """The recorded combined-stream session, re-timed: klines become bars, the rest is ignored."""
    frames = captured_session()
    klines = [f for f in frames if f["stream"].endswith("@kline_1m")]
    assert klines, "the capture holds kline frames"
    now = time.time_ns() // 1_000_000
    # The captured minute becomes the one before this, so the watcher closes it on its clock.
    shift = (now - now % M - M) - klines[0]["data"]["k"]["t"]
    session = [retimed(f, shift) for f in frames]

    def route(path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/exchangeInfo":
            listed = [("NKNUSDT", "NKN", "USDT"), ("LRCBTC", "LRC", "BTC")]
            symbols = [
                {"symbol": s, "status": "TRADING", "baseAsset": b, "quoteAsset": q}
                for s, b, q in listed
            ]
            return 200, {"symbols": symbols}
        return 200, []  # no candles before the recorded minute

    async def ws(connection: ServerConnection) -> None:
        for frame in session:
            await connection.send(json.dumps(frame))
        await connection.wait_closed()

    async with live_watcher(
        infra,
        "binance",
        route,
        ws,
        WATCHER_MARKETS=",".join(CAPTURE_MARKETS.values()),
        WATCHER_BACKFILL_MINUTES="5",
    ):
        results = {}
        for symbol, market in CAPTURE_MARKETS.items():
            # The topic is shared with the other Binance tests: only this run's ticks count.
            def done(ticks: list[Tick]) -> bool:
                return any(t.closed and t.received_ts >= now for t in ticks)

            ticks = await read_topic(infra.kafka_bootstrap_servers, topic_of(market), done, 30)
            results[symbol] = [t for t in ticks if t.received_ts >= now]
    for symbol, ticks in results.items():
        # The last kline of the symbol's minute, as the exchange sent it, closed once.
        last = [f["data"]["k"] for f in session if f["data"].get("k", {}).get("s") == symbol][-1]
        (closed,) = closed_once(ticks).values()
        assert closed.minute == last["t"]
        assert (closed.open, closed.high, closed.low, closed.close, closed.volume) == tuple(
            float(last[k]) for k in "ohlcv"
        )
        assert closed.trades == last["n"]
