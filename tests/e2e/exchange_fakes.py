"""What the live-source tests share: fake exchanges' REST, outage script and history, the
watcher process running against them, and readers of what it published."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer, TopicPartition
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.conftest import deadline, make_data_dir
from tests.e2e.harness import Services
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import MINUTE_MS, Tick, decode_tick

# (HTTP status, JSON body), or (HTTP status, JSON body, extra headers)
Answer = tuple[int, Any] | tuple[int, Any, dict[str, str]]
# (path, query) -> the answer
Route = Callable[[str, dict[str, str]], Answer]
WsHandler = Callable[[ServerConnection], Awaitable[None]]


async def _serve(route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:  # keep-alive: one request after another on the same connection
            head = await reader.readuntil(b"\r\n\r\n")
            target = urlsplit(head.split(b" ", 2)[1].decode())
            answer = route(target.path, {k: v[0] for k, v in parse_qs(target.query).items()})
            headers = answer[2] if len(answer) == 3 else {}
            data = json.dumps(answer[1]).encode()
            lines = [f"HTTP/1.1 {answer[0]} X", f"Content-Length: {len(data)}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def rest_server(route: Route) -> AsyncIterator[str]:
    """An HTTP/1.1 server on 127.0.0.1 answering GETs with `route`; yields its base URL."""
    server = await asyncio.start_server(lambda r, w: _serve(route, r, w), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@dataclass
class Throttle:
    """A route whose first request of each of `paths` is answered 429 with `Retry-After`, as
    an exchange's rate limit answers; every request is recorded with its arrival time."""

    route: Route
    paths: frozenset[str]
    retry_after_s: int = 1
    requests: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic, path)

    def __call__(self, path: str, query: dict[str, str]) -> Answer:
        first = all(seen != path for _, seen in self.requests)
        self.requests.append((time.monotonic(), path))
        if path in self.paths and first:
            return 429, {"message": "Too many requests"}, {"Retry-After": str(self.retry_after_s)}
        return self.route(path, query)

    def times(self, path: str) -> list[float]:
        """When each request of `path` arrived (time.monotonic)."""
        return [at for at, seen in self.requests if seen == path]


@dataclass(frozen=True)
class Bar:
    """A minute as the exchange traded it: what its REST candle says and its stream ends with."""

    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int


# Minutes of history before the current one the fakes have traded in (the watcher is asked for
# more, so a minute boundary passing during the test changes nothing), and one without trades.
HISTORY_MINUTES = 25
NO_TRADE_MINUTES_AGO = 7


def history(now_minute: int, level: float) -> dict[int, Bar]:
    """One market's traded minutes, from HISTORY_MINUTES ago to `now_minute`, each distinct, with
    no bar NO_TRADE_MINUTES_AGO: no trade then, so no bar may ever be made up for it."""
    bars = {}
    for ago in range(HISTORY_MINUTES, -1, -1):
        if ago == NO_TRADE_MINUTES_AGO:
            continue
        price = round(level * (1 + ago / 1000), 8)
        bars[now_minute - ago * MINUTE_MS] = Bar(
            price,
            round(price * 1.004, 8),
            round(price * 0.997, 8),
            round(price * 1.001, 8),
            round(1.5 + ago / 4, 8),
            ago + 2,
        )
    return bars


StepEnd = Literal["drop", "silence", "reconnect request", "open"]


@dataclass(frozen=True)
class Step:
    """What one connection of the outage script streams and how it ends."""

    number: int  # 1 for the first connection
    minute: int  # the minute it streams (the fake exchange's clock while it lasts)
    end: StepEnd


@dataclass
class Outage:
    """The script of the resilience tests, with the fake exchange's clock moving on per
    connection, so that the stream misses minutes without the test waiting for real minutes.

    Connection 1 streams the minute 3 minutes ago, then a malformed frame, then the exchange
    drops it. Connection 2 streams the last minute, then goes silent (no data, no heartbeat).
    With `asks_reconnect` (Binance, Kraken), connection 3 streams the current minute and asks
    the client to reconnect (serverShutdown, maintenance) while it keeps sending. The last
    connection streams the current minute and keeps sending until closed. The minute in
    between (2 minutes ago) only REST has: REST candles hold the minutes before the one the
    latest connection streams, as a real exchange's hold the minutes before its current one.
    """

    now_minute: int
    asks_reconnect: bool
    connections: int = 0

    def __post_init__(self) -> None:
        steps: list[tuple[int, StepEnd]] = [(3, "drop"), (1, "silence")]
        if self.asks_reconnect:
            steps.append((0, "reconnect request"))
        steps.append((0, "open"))
        self.steps = [
            Step(number, self.now_minute - ago * MINUTE_MS, end)
            for number, (ago, end) in enumerate(steps, start=1)
        ]
        self.rest_before = self.steps[0].minute

    def connect(self) -> Step:
        """The step of a new connection (the last one again if the script has ended)."""
        self.connections += 1
        step = self.steps[min(self.connections, len(self.steps)) - 1]
        self.rest_before = step.minute
        return step

    @property
    def finished(self) -> bool:
        return self.connections >= len(self.steps)

    def streamed_minutes(self) -> set[int]:
        return {step.minute for step in self.steps}


async def keep_sending(connection: ServerConnection, frame: Callable[[], str]) -> None:
    """Send `frame()` twice a second until the connection closes: the exchange stays alive."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await connection.send(frame())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(connection.wait_closed(), timeout=0.5)
                return


@dataclass
class LiveWatcher:
    """The real watcher process with the live source, against one fake exchange."""

    services: Services
    log_path: Path
    log_text: str = ""  # the whole log, once stopped

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def live_watcher(
    infra: LocalInfra, exchange: str, route: Route, ws: WsHandler, **settings: str
) -> AsyncIterator[LiveWatcher]:
    """Run the watcher (WATCHER_SOURCE=live, `settings` added to its environment) against a
    fake `exchange` serving `route` over HTTP and `ws` over WebSocket on local ports.

    On exit the watcher is stopped; it must have kept running and exit with 0, and its whole
    log is left in `log_text` (its end is printed if the test fails, for the report).
    """
    data_dir = make_data_dir(f"tickstream-live-{exchange}-")
    async with rest_server(route) as rest_url, serve(ws, "127.0.0.1", 0) as ws_server:
        prefix = exchange.upper()
        env = {
            **os.environ,
            **infra.environment(),
            "WATCHER_SOURCE": "live",
            f"{prefix}_WS_URL": f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}",
            f"{prefix}_REST_URL": rest_url,
            **settings,
        }
        services = Services(env, data_dir)
        watcher = LiveWatcher(services, data_dir / "watcher.log")
        services.start("watcher")
        try:
            yield watcher
            services.assert_running()
        finally:
            # In a thread: the fake exchange, served by this loop, must answer the watcher's
            # closing handshakes while it stops.
            codes = await asyncio.to_thread(services.stop_all)
            watcher.log_text = watcher.log()
            shutil.rmtree(data_dir, ignore_errors=True)
            if sys.exc_info()[0] is not None:
                print(f"watcher log, end:\n{_last_lines(watcher.log_text)}")
    assert codes == {"watcher": 0}, f"exit codes {codes}\n{_last_lines(watcher.log_text)}"


def assert_waited_out(log: str, rest: Throttle, listing: str, candles: str, market: str) -> None:
    """The watcher waited out both 429s (the listing's, then the first candles request's of
    `market`) and asked again: the listing after Retry-After, and the backfill went on."""
    waiting = f"HTTP 429, waiting {rest.retry_after_s:.1f}s"
    waited = [line for line in log.splitlines() if waiting in line]
    assert len(waited) == 2 and f"{listing}:" in waited[0] and candles in waited[1], waited
    first, retry = rest.times(listing)
    assert retry - first >= rest.retry_after_s
    assert f"backfill of {market} stopped" not in log


def _last_lines(log: str, lines: int = 60) -> str:
    return "\n".join(log.splitlines()[-lines:])


def topic_of(market_id: str) -> str:
    return f"ticks.{market_id.replace(':', '.')}"


async def read_topic(
    bootstrap: str, topic: str, until: Callable[[list[Tick]], bool], within: float
) -> list[Tick]:
    """Ticks of `topic` from its start until `until(ticks)` holds; TimeoutError after `within`."""
    # The watcher may create `topic` after this consumer starts: without a short metadata age
    # a consumer without a group would look for it again only after 5 minutes.
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", metadata_max_age_ms=500
    )
    await consumer.start()
    ticks: list[Tick] = []
    try:
        async with asyncio.timeout(deadline(within)):
            while not until(ticks):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    now_ms = time.time_ns() // 1_000_000
                    ticks += [decode_tick(r.value, now_ms=now_ms) for r in records]
    finally:
        await consumer.stop()
    return ticks


async def read_through_outage(
    bootstrap: str,
    watcher: LiveWatcher,
    outage: Outage,
    minutes: Iterable[int],
    market_id: str,
    within: float,
) -> None:
    """Read `market_id`'s topic until the outage script has run, every connection's backfill
    has answered, and each of `minutes` before the outage's current one is closed."""
    past = {m for m in minutes if m < outage.now_minute}

    def done(ticks: list[Tick]) -> bool:
        backfills = watcher.log().count(f"backfilled {market_id}:")
        closed = {t.minute for t in ticks if t.closed}
        return outage.finished and backfills == outage.connections and past <= closed

    await read_topic(bootstrap, topic_of(market_id), done, within)


async def read_all(bootstrap: str, topic: str, within: float = 10) -> list[Tick]:
    """Every tick of `topic`, from its start to its end as it stands now (after the writer
    stopped, that is all it ever published)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    ticks: list[Tick] = []
    try:
        async with asyncio.timeout(deadline(within)):
            await consumer.topics()  # fetches the metadata naming the topic's partitions
            partitions = consumer.partitions_for_topic(topic) or set()
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            assert assigned, f"no topic {topic}"
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            ends = await consumer.end_offsets(assigned)
            while [tp for tp in assigned if await consumer.position(tp) < ends[tp]]:
                batch = await consumer.getmany(*assigned, timeout_ms=200)
                for records in batch.values():
                    now_ms = time.time_ns() // 1_000_000
                    ticks += [decode_tick(r.value, now_ms=now_ms) for r in records]
    finally:
        await consumer.stop()
    return ticks


def free_port() -> int:
    """A local TCP port free now (for a service's /metrics)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def final_bars(ticks: list[Tick]) -> dict[int, Tick]:
    """What is stored of each minute: its closed tick with the largest seq (a correction
    replaces the bar it corrects)."""
    out: dict[int, Tick] = {}
    for tick in ticks:
        if tick.closed and (tick.minute not in out or tick.seq > out[tick.minute].seq):
            out[tick.minute] = tick
    return out


def closed_once(ticks: list[Tick]) -> dict[int, Tick]:
    """The closed bars by minute; fails if a minute closed twice or seq did not grow."""
    seqs = [t.seq for t in ticks]
    assert seqs == sorted(set(seqs)), "seq must grow per market"
    closed = [t for t in ticks if t.closed]
    by_minute = {t.minute: t for t in closed}
    assert len(by_minute) == len(closed), "a minute closed twice"
    return by_minute


# (open, high, low, close, volume, trades, exchange_ts) of a closed bar
BarValues = tuple[float, float, float, float, float, int | None, int]


def values(tick: Tick) -> BarValues:
    return (
        tick.open,
        tick.high,
        tick.low,
        tick.close,
        tick.volume,
        tick.trades,
        tick.exchange_ts,
    )


def rest_values(minute: int, bar: Bar, *, trades: bool = True) -> BarValues:
    """What a backfilled bar of `bar` carries: stamped at the end of its minute."""
    count = bar.trades if trades else None
    return (bar.open, bar.high, bar.low, bar.close, bar.volume, count, minute + MINUTE_MS)


def assert_no_gap(
    closed: dict[int, Tick],
    expected: dict[int, BarValues],
    current: int,
    *,
    repairable: bool = False,
) -> int:
    """Exactly the expected minutes are closed, with their values; the `current` minute may be
    closed too (the test ran past its end), then with its expected values.

    With `repairable` (bars built from trades), a minute the watcher could not know complete
    may instead be closed from the exchange's candle of the same trades: the same prices and
    volume, no trade count, stamped at the minute's end. Returns how many were.
    """
    minutes = set(closed) - {current}
    assert sorted(minutes) == sorted(set(expected) - {current}), "closed minutes differ"
    repaired = 0
    for minute, tick in closed.items():
        want = expected[minute]
        if repairable and values(tick) == (*want[:5], None, minute + MINUTE_MS):
            repaired += 1
            continue
        assert values(tick) == want, f"minute {minute}"
    return repaired


# OKX: REST limits the fake enforces as OKX documents them (rows per request, 24 h on candles).
OKX_CANDLES_LIMIT = 300
OKX_HISTORY_LIMIT = 100
OKX_RECENT_ROWS = 1440
OKX_NOTICE_64008 = json.dumps(
    {
        "event": "notice",
        "code": "64008",
        "msg": "The connection will soon be closed for a service upgrade. Please reconnect.",
        "connId": "a4d3ae55",
    }
)


def okx_instrument(inst_id: str, state: str = "live", inst_type: str = "SPOT") -> dict[str, str]:
    """An entry of /api/v5/public/instruments as OKX writes it."""
    base, _, quote = inst_id.partition("-")
    return {
        "instType": inst_type,
        "instId": inst_id,
        "baseCcy": base,
        "quoteCcy": quote.split("-")[0],
        "tickSz": "0.1",
        "lotSz": "0.00000001",
        "minSz": "0.00001",
        "listTime": "1606468572000",
        "state": state,
    }


@dataclass
class FakeOkx:
    """OKX v5 playing the `Outage` script for every instrument of `bars`, in OKX's formats.

    REST: the SPOT instruments (those of `bars` live, plus `others`); `candles` (only the
    latest OKX_RECENT_ROWS minutes, limit <= 300) and `history-candles` (limit <= 100), rows
    newest first, closed ones (confirm "1") before the connection's minute and that minute as
    forming (confirm "0", which the watcher must leave out). A path in `rate_limited` is
    answered HTTP 200 with code 50011 the first time. WS (the business endpoint): acks each
    subscribed arg, pushes the step's minute of every instrument as forming and, if it is past,
    confirmed; the first connection then sends malformed frames and closes with 4004, the
    silent one goes silent, the next sends notice 64008; the others push their minute again
    twice a second and answer a text ping with a text pong.
    """

    outage: Outage
    bars: dict[str, dict[int, Bar]]  # instId -> minute -> bar
    others: list[dict[str, str]] = field(default_factory=list)
    rate_limited: frozenset[str] = frozenset()
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    subscribed: list[list[str]] = field(default_factory=list)  # instIds, per connection
    sent: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # last row pushed

    def route(self, path: str, query: dict[str, str]) -> Answer:
        first = all(seen != path for seen, _ in self.requests)
        self.requests.append((path, query))
        if path in self.rate_limited and first:
            return 200, {"code": "50011", "msg": "Rate limit reached.", "data": []}
        if path == "/api/v5/public/instruments" and query == {"instType": "SPOT"}:
            listed = [okx_instrument(inst) for inst in sorted(self.bars)]
            return 200, {"code": "0", "msg": "", "data": [*listed, *self.others]}
        if path in ("/api/v5/market/candles", "/api/v5/market/history-candles"):
            return 200, self.candles(path.endswith("/candles"), query)
        return 404, {"code": "50000", "msg": "Not found", "data": []}

    def candles(self, recent: bool, query: dict[str, str]) -> dict[str, Any]:
        bars = self.bars.get(query.get("instId", ""))
        limit = int(query.get("limit", "100"))
        if bars is None:
            return {"code": "51001", "msg": "Instrument ID does not exist", "data": []}
        if query.get("bar", "1m") != "1m" or limit > (
            OKX_CANDLES_LIMIT if recent else OKX_HISTORY_LIMIT
        ):
            return {"code": "51000", "msg": "Parameter error", "data": []}
        after, before = int(query.get("after", 2**62)), int(query.get("before", 0))
        forming = self.outage.rest_before
        oldest = forming - (OKX_RECENT_ROWS - 1) * MINUTE_MS if recent else 0
        minutes = [m for m in bars if before < m < after and oldest <= m <= forming]
        rows = [self.row(bars[m], m, "1") for m in minutes if m != forming]
        if forming in minutes:  # as it stands so far: the watcher must leave it out
            bar = bars[forming]
            rows.append(self.row(Bar(*[bar.open] * 4, bar.volume / 2, 1), forming, "0"))
        return {"code": "0", "msg": "", "data": sorted(rows, reverse=True)[:limit]}

    @staticmethod
    def row(bar: Bar, minute: int, confirm: str) -> list[str]:
        prices = [f"{p:.8f}" for p in (bar.open, bar.high, bar.low, bar.close, bar.volume)]
        quote = f"{bar.volume * bar.close:.8f}"
        return [str(minute), *prices, quote, quote, confirm]

    def push(self, inst_id: str, minute: int, confirm: str) -> str:
        row = self.row(self.bars[inst_id][minute], minute, confirm)
        self.sent[inst_id, minute] = row
        return json.dumps({"arg": {"channel": "candle1m", "instId": inst_id}, "data": [row]})

    async def ws(self, connection: ServerConnection) -> None:
        step = self.outage.connect()  # before the watcher can ask REST anything
        request = json.loads(await connection.recv())
        assert request["op"] == "subscribe"
        insts = [arg["instId"] for arg in request["args"]]
        self.subscribed.append(insts)
        for arg in request["args"]:
            ack = {"id": request["id"], "event": "subscribe", "arg": arg, "connId": "a4d3ae55"}
            await connection.send(json.dumps(ack))
        frames = [self.push(inst, step.minute, "0") for inst in insts]
        if step.minute < self.outage.now_minute:  # a past minute: OKX has confirmed it
            frames += [self.push(inst, step.minute, "1") for inst in insts]
        for frame in frames:
            await connection.send(frame)
        if step.end == "drop":
            bad = json.loads(frames[0])
            bad["data"][0][8] = "2"  # confirm neither "0" nor "1"
            await connection.send(json.dumps(bad))
            await connection.send('{"arg":{"channel":"candle1m","instId":"BTC-USDT"},"data":[[')
            await connection.close(4004, "No data received in 30s.")
            return
        if step.end == "silence":
            await connection.wait_closed()
            return
        if step.end == "reconnect request":
            await connection.send(OKX_NOTICE_64008)
        latest = frames[-len(insts) :]
        with contextlib.suppress(ConnectionClosed):
            while True:  # the minute goes on being pushed; a text ping gets a text pong
                try:
                    frame = await asyncio.wait_for(connection.recv(), timeout=0.5)
                except TimeoutError:
                    for push in latest:
                        await connection.send(push)
                    continue
                if frame == "ping":
                    await connection.send("pong")

    def expected(self, inst_id: str) -> dict[int, BarValues]:
        """Pushed minutes as their last push says (a confirmed one stamped at its end, a
        forming one at its open), the others as REST's candles (no trade count)."""
        out = {m: rest_values(m, bar, trades=False) for m, bar in self.bars[inst_id].items()}
        for (inst, minute), row in self.sent.items():
            if inst == inst_id:
                o, h, low, c, v = (float(x) for x in row[1:6])
                stamp = minute + MINUTE_MS if row[8] == "1" else minute
                out[minute] = (o, h, low, c, v, None, stamp)
        return out
