"""ExchangeFeed against local WebSocket servers speaking the exchanges' formats."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import SHARED_DATA, deadline
from tickstream_shared.naming import Market
from tickstream_watcher.binance import BinanceProtocol
from tickstream_watcher.coinbase import CoinbaseProtocol
from tickstream_watcher.exchange import CandleUpdate, FeedEvent, Heartbeat
from tickstream_watcher.feed import ExchangeFeed, FeedLimits
from tickstream_watcher.kraken import KrakenProtocol
from tickstream_watcher.okx import OkxProtocol

FAST = FeedLimits(min_reconnect_s=0.01, max_reconnect_s=0.05, silence_s=0.5)
SYMBOLS = {"NKNUSDT": Market("binance", "nkn", "usdt"), "LRCBTC": Market("binance", "lrc", "btc")}


def captured_klines() -> list[str]:
    """The real kline frames of the recorded Binance session, as sent."""
    path = SHARED_DATA / "captures" / "BINANCE.ws.1.0"
    if not path.exists():
        pytest.skip(f"capture not found at {path}")
    frames = []
    for line in path.read_text().splitlines()[1:]:
        _, _, frame = line.partition(": ")
        if '"e":"kline"' in frame and json.loads(frame)["data"]["s"] in SYMBOLS:
            frames.append(frame)
    assert frames, "the capture holds kline frames of these symbols"
    return frames


@dataclass
class Exchange:
    """A scripted server: connection i plays scripts[i] (the last one repeats)."""

    scripts: list[list[tuple[str, Any]]]
    paths: list[str] = field(default_factory=list)

    async def handler(self, ws: ServerConnection) -> None:
        index = len(self.paths)
        assert ws.request is not None
        self.paths.append(ws.request.path)
        for action, value in self.scripts[min(index, len(self.scripts) - 1)]:
            if action == "send":
                await ws.send(value)
            elif action == "close":
                return  # the server drops the connection
            elif action == "close code":
                await ws.close(*value)  # (code, reason), as OKX closes with 4004/4008/4009
                return
            elif action == "silence":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.wait_closed(), timeout=value)
        await ws.wait_closed()  # hold the connection open until the client or server ends it


@dataclass
class Received:
    events: list[FeedEvent] = field(default_factory=list)
    connected: int = 0

    async def deliver(self, events: list[FeedEvent], received_us: int) -> None:
        assert received_us > 0
        self.events.extend(events)

    async def on_connected(self) -> None:
        self.connected += 1

    def candles(self) -> list[CandleUpdate]:
        return [e for e in self.events if isinstance(e, CandleUpdate)]


async def wait_until(condition: Any, within: float) -> None:
    async with asyncio.timeout(deadline(within)):
        while not condition():  # noqa: ASYNC110 - the feed's counters have no event
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(
    exchange: Exchange, received: Received, limits: FeedLimits = FAST
) -> AsyncIterator[tuple[ExchangeFeed, asyncio.Event]]:
    async with serve(exchange.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        feed = ExchangeFeed(
            BinanceProtocol(SYMBOLS),
            f"ws://127.0.0.1:{port}",
            sorted(SYMBOLS),
            limits,
            received.deliver,
            received.on_connected,
            rng=random.Random(1),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        try:
            yield feed, stop
        finally:
            stop.set()
            async with asyncio.timeout(deadline(5)):
                await task
            assert feed.state == "stopped"


async def test_real_frames_arrive_and_a_bad_frame_is_skipped() -> None:
    """Captured klines become candle events in order; a malformed frame is counted, not fatal."""
    frames = captured_klines()
    script = [
        ("send", frames[0]),
        ("send", '{"stream":"x","data":{"e":"kline"'),
        *[("send", f) for f in frames[1:]],
    ]
    exchange = Exchange([script])
    received = Received()
    async with running(exchange, received) as (feed, _):
        await wait_until(lambda: len(received.candles()) == len(frames), within=5)
        assert feed.counters.bad_frames == 1 and feed.state == "live"
    expected = [json.loads(f)["data"] for f in frames]
    assert [(c.market, c.minute, c.close, c.exchange_ts) for c in received.candles()] == [
        (SYMBOLS[d["s"]], d["k"]["t"], float(d["k"]["c"]), d["E"]) for d in expected
    ]
    assert exchange.paths[0] == "/stream?streams=lrcbtc@kline_1m/nknusdt@kline_1m"


async def test_dropped_connection_reconnects_and_resumes() -> None:
    """After the server drops the connection, the feed reconnects and receives again."""
    frames = captured_klines()
    exchange = Exchange([[("send", frames[0]), ("close", None)], [("send", frames[1])]])
    received = Received()
    async with running(exchange, received) as (feed, _):
        await wait_until(lambda: len(received.candles()) == 2, within=5)
        assert feed.counters.connects == 2 and received.connected == 2
        # The dropped connection had delivered data: the backoff starts over, no jitter added.
        assert feed.last_delay == FAST.min_reconnect_s


async def test_silent_connection_is_dropped_by_the_watchdog() -> None:
    """A connection that sends nothing for silence_s is replaced by a new one."""
    frames = captured_klines()
    exchange = Exchange([[("silence", 3600)], [("send", frames[0])]])
    received = Received()
    async with running(exchange, received) as (feed, _):
        await wait_until(lambda: len(received.candles()) == 1, within=5)
        assert feed.counters.connects == 2


async def test_server_shutdown_reconnects_at_once() -> None:
    """Binance's serverShutdown event makes the feed reconnect without waiting for silence."""
    frames = captured_klines()
    shutdown = json.dumps({"stream": "x", "data": {"e": "serverShutdown", "E": 1633998512068}})
    exchange = Exchange([[("send", shutdown)], [("send", frames[0])]])
    received = Received()
    patient = FeedLimits(min_reconnect_s=0.01, max_reconnect_s=0.05, silence_s=60.0)
    async with running(exchange, received, patient) as (feed, _):
        await wait_until(lambda: len(received.candles()) == 1, within=2)
        assert feed.counters.connects == 2


async def test_refused_connections_back_off_and_recover() -> None:
    """With nothing listening, attempts back off up to the cap; a returning server is used."""
    frames = captured_klines()
    received = Received()
    async with serve(Exchange([[("send", frames[0])]]).handler, "127.0.0.1", 0) as probe:
        port = probe.sockets[0].getsockname()[1]
    feed = ExchangeFeed(
        BinanceProtocol(SYMBOLS),
        f"ws://127.0.0.1:{port}",
        sorted(SYMBOLS),
        FAST,
        received.deliver,
        rng=random.Random(2),
    )
    delays = [feed._delay(n) for n in range(12)]
    assert all(FAST.min_reconnect_s <= d <= FAST.max_reconnect_s for d in delays)
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop))
    try:
        await wait_until(lambda: feed.counters.reconnects >= 5, within=5)
        assert feed.state == "reconnecting" and feed.counters.connects == 0
        assert feed.last_delay > FAST.min_reconnect_s  # failures keep growing the window
        async with serve(Exchange([[("send", frames[0])]]).handler, "127.0.0.1", port):
            await wait_until(lambda: len(received.candles()) == 1, within=5)
    finally:
        stop.set()
        async with asyncio.timeout(deadline(5)):
            await task


KRAKEN_OHLC = (
    '{"channel":"ohlc","type":"update","timestamp":"2023-10-04T16:26:30.524394914Z","data":'
    '[{"symbol":"BTC/USD","open":1.5,"high":1.6,"low":1.4,"close":1.5,"trades":3,'
    '"volume":2.5,"vwap":1.5,"interval_begin":"2023-10-04T16:26:00.000000000Z","interval":1}]}'
)
OKX_CANDLE = (
    '{"arg":{"channel":"candle1m","instId":"BTC-USDT"},"data":[["1597026360000","8533.02",'
    '"8553.74","8527.17","8548.26","45247","529.5858061","5529.5858061","0"]]}'
)
COINBASE_MATCH = (
    '{"type":"match","trade_id":10,"sequence":50,"time":"2023-10-04T16:26:30.028459Z",'
    '"product_id":"BTC-USD","size":"0.5","price":"400.23","side":"sell"}'
)
MALFORMED = [
    "not json",
    '{"channel":"ohlc","type":"update","data":5}',
    '{"channel":"ohlc","type":"update","timestamp":"2023-02-30T00:00:00Z","data":[]}',
    KRAKEN_OHLC.replace("BTC/USD", "XYZ/USD"),
    KRAKEN_OHLC.replace('"high":1.6', '"high":1e400'),
    '{"type":"match","trade_id":-1,"product_id":"BTC-USD"}',
    COINBASE_MATCH.replace('"0.5"', '"nan"'),
    COINBASE_MATCH.replace("BTC-USD", "XYZ-USD"),
    OKX_CANDLE.replace('"0"]]', '"2"]]'),
    OKX_CANDLE.replace('"8553.74"', '"-8553.74"'),
    OKX_CANDLE.replace("BTC-USDT", "XYZ-USDT"),
    '{"event":"error","code":"60012","msg":"Invalid request"}',
    "[" * 5000 + "]" * 5000,
    "\udcff",
    '{"stream":"x","data":{"e":"kline"',
]


@pytest.mark.parametrize(
    ("protocol", "symbols", "valid"),
    [
        (KrakenProtocol({"BTC/USD": Market("kraken", "btc", "usd")}), ["BTC/USD"], KRAKEN_OHLC),
        (
            CoinbaseProtocol({"BTC-USD": Market("coinbase", "btc", "usd")}),
            ["BTC-USD"],
            COINBASE_MATCH,
        ),
        (BinanceProtocol(SYMBOLS), sorted(SYMBOLS), captured_klines),
        (OkxProtocol({"BTC-USDT": Market("okx", "btc", "usdt")}), ["BTC-USDT"], OKX_CANDLE),
    ],
    ids=["kraken", "coinbase", "binance", "okx"],
)
async def test_malformed_frames_never_close_the_connection(
    protocol: Any, symbols: list[str], valid: Any
) -> None:
    """Every malformed frame is counted and skipped on the same connection; data goes on."""
    frame = valid()[0] if callable(valid) else valid
    frames = [f for f in MALFORMED if f != "\udcff"]
    exchange = Exchange([[("send", f) for f in [*frames, frame]]])
    received = Received()
    async with serve(exchange.handler, "127.0.0.1", 0) as server:
        feed = ExchangeFeed(
            protocol,
            f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}",
            symbols,
            FAST,
            received.deliver,
            received.on_connected,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        try:
            await wait_until(lambda: feed.counters.frames == len(frames) + 1, within=5)
            await wait_until(lambda: any(not isinstance(e, Heartbeat) for e in received.events), 5)
            assert feed.state == "live" and feed.counters.connects == 1
            assert feed.counters.reconnects == 0 and len(exchange.paths) == 1
            # Another exchange's well-formed frame is "nothing for us", not a bad frame.
            assert feed.counters.bad_frames >= 4
        finally:
            stop.set()
            async with asyncio.timeout(deadline(5)):
                await task


async def test_renew_reconnects_and_subscribes_again() -> None:
    """`renew` (a silent market) closes the connection and makes a new one at once."""
    frames = captured_klines()
    exchange = Exchange([[("send", frames[0])]])
    received = Received()
    async with running(exchange, received) as (feed, _):
        await wait_until(lambda: received.connected == 1 and received.candles(), within=5)
        feed.renew()
        await wait_until(lambda: received.connected == 2, within=5)
        assert len(exchange.paths) == 2 and feed.counters.reconnects == 1


OKX_BTC = {"BTC-USDT": Market("okx", "btc", "usdt")}
OKX_ACK = '{"id":"1","event":"subscribe","arg":{"channel":"candle1m","instId":"BTC-USDT"}}'
OKX_NOTICE = (
    '{"event":"notice","code":"64008","msg":"The connection will soon be closed for a service'
    ' upgrade. Please reconnect.","connId":"a4d3ae55"}'
)
# OKX's text ping after 0.2 s of silence; its pong must come within 0.4 s more.
OKX_KEEPALIVE = FeedLimits(
    min_reconnect_s=0.01,
    max_reconnect_s=0.05,
    silence_s=0.6,
    keepalive_s=0.2,
    keepalive_frame="ping",
)


@dataclass
class PingServer:
    """OKX's business endpoint: acks the subscription, then only answers text pings, with a
    text pong while `answers` (else never)."""

    answers: bool
    received: list[list[str]] = field(default_factory=list)  # text frames, per connection

    async def handler(self, ws: ServerConnection) -> None:
        frames: list[str] = []
        self.received.append(frames)
        async for frame in ws:
            assert isinstance(frame, str)
            frames.append(frame)
            if frame.startswith("{"):
                await ws.send(OKX_ACK)
            elif frame == "ping" and self.answers:
                await ws.send("pong")


@contextlib.asynccontextmanager
async def okx_feed(url: str, received: Received, limits: FeedLimits) -> AsyncIterator[ExchangeFeed]:
    feed = ExchangeFeed(
        OkxProtocol(OKX_BTC), url, ["BTC-USDT"], limits, received.deliver, received.on_connected
    )
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop))
    try:
        yield feed
    finally:
        stop.set()
        async with asyncio.timeout(deadline(5)):
            await task


@pytest.mark.parametrize(
    "limits",
    [OKX_KEEPALIVE, dataclasses.replace(OKX_KEEPALIVE, keepalive_s=30.0)],
    ids=["keepalive-first", "silence-bound-below-keepalive"],
)
async def test_okx_keepalive_pings_in_text_and_pongs_keep_the_connection(
    limits: FeedLimits,
) -> None:
    """A quiet OKX connection gets a text `ping` per quiet spell (at the latest at half the
    silence bound, however that is set); each `pong` keeps it open."""
    server = PingServer(answers=True)
    received = Received()
    async with serve(server.handler, "127.0.0.1", 0) as listener:
        url = f"ws://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        async with okx_feed(url, received, limits) as feed:
            await wait_until(lambda: server.received and server.received[0].count("ping") >= 3, 10)
            assert feed.counters.connects == 1 and feed.counters.reconnects == 0
            assert feed.counters.bad_frames == 0 and feed.state == "live"
    subscribe = json.loads(server.received[0][0])
    assert subscribe["args"] == [{"channel": "candle1m", "instId": "BTC-USDT"}]
    assert set(server.received[0][1:]) == {"ping"}
    assert received.events.count(Heartbeat()) == len(received.events) >= 3


async def test_okx_connection_without_pong_is_replaced() -> None:
    """A ping left unanswered ends the connection at the silence bound; a new one subscribes."""
    server = PingServer(answers=False)
    received = Received()
    async with serve(server.handler, "127.0.0.1", 0) as listener:
        url = f"ws://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        async with okx_feed(url, received, OKX_KEEPALIVE) as feed:
            await wait_until(lambda: len(server.received) >= 2 and server.received[1], 10)
            assert feed.counters.connects >= 2 and received.connected >= 2
    assert server.received[0][1:] == ["ping"]  # one ping, then the silence bound


@pytest.mark.parametrize(
    "ending",
    [
        ("send", OKX_NOTICE),
        ("close code", (4004, "No data received in 30s.")),
        ("close code", (4008, "The number of subscribed channels exceeds the limit.")),
        ("close code", (4009, "The number of subscribed channels exceeds the limit.")),
    ],
    ids=["notice-64008", "close-4004", "close-4008", "close-4009"],
)
async def test_okx_notice_and_close_codes_reconnect(ending: tuple[str, Any]) -> None:
    """Notice 64008 reconnects at once (before any silence); OKX's close codes reconnect too."""
    first = [("send", OKX_ACK), ending, ("silence", 3600)]
    exchange = Exchange([first, [("send", OKX_ACK), ("send", OKX_CANDLE)]])
    received = Received()
    patient = FeedLimits(min_reconnect_s=0.01, max_reconnect_s=0.05, silence_s=60.0)
    async with serve(exchange.handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with okx_feed(url, received, patient) as feed:
            await wait_until(lambda: len(received.candles()) == 1, within=5)
            assert feed.counters.connects == 2 and feed.counters.reconnects == 1
    assert received.candles()[0].market == Market("okx", "btc", "usdt")
