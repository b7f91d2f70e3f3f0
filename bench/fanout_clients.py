"""Load-generator process for bench_fanout: WebSocket clients that time every bar frame they read.

Each client is the `websockets` sans-I/O `ClientProtocol` on a plain asyncio transport, so the
client side costs a few microseconds per frame (the full asyncio client adds a receive queue
and a future per frame): on a 2-core machine every microsecond spent here is taken from the
server being measured. A client reads as fast as its process gets CPU; it never pauses reading.

Per bar frame a client keeps, per market, the newest `received_ts` it has (whatever the window)
and, for a closed bar (`"closed":true`, the frame's last field), its minute. At the window's end
T each process compares every reading client's newest `received_ts` with the newest update the
driver had sent of that market by then (the driver's shared array), read at the same moment:
the client's **staleness** (ms; for a client of several markets, its worst market; a client
with nothing of one of its markets is counted apart, as infinitely stale). Frames in the
process's socket buffers that it has not read yet count as not delivered: a load generator
short of CPU makes staleness (like latency) higher.

Closed bars: per market, each minute that closed (minute + 60 s) from `CLOSED_AFTER_READY_S`
after the client's last `history` frame to T must arrive, once, in minute order (the driver
closes every market's bar at each minute's end: markets need an update a minute). Frames of a
subscription arrive in the order they were made, so a closed bar that has not arrived while a
frame of a later minute has (a `received_ts` at or after the minute's end) is **missing**; one
that has not arrived and nothing later either is still on its way: after T the clients stay
connected until each expected closed bar has arrived or been passed, at most `CLOSED_GRACE_S`;
those still unresolved then are reported **late** (not delivered within the grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event
from typing import Any

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

_BAR = b'{"type":"bar"'
_HISTORY = b'{"type":"history"'
_ERROR = b'{"type":"error"'
_RECEIVED = b'"received_ts":'
_MINUTE = b'"minute":'
_CLOSED_END = b'"closed":true}'
_MARKET_AT = len(b'{"type":"bar","market":"')
MINUTE_MS = 60_000
# Closed bars a client must have: minutes that closed this long after it was ready, up to
# the window's end; after it, how long the clients wait for those still on their way.
CLOSED_AFTER_READY_S = 2.0
CLOSED_GRACE_S = 10.0


@dataclass
class ClientPlan:
    """What one load-generator process does: which markets each of its clients subscribes to."""

    url: str  # ws://host:port/path
    subscriptions: list[list[str]]  # per client; an empty list is an idle client
    deflate: bool = False  # offer permessage-deflate (browsers do); off: frames as sent
    markets: list[str] = field(default_factory=list)  # the driver's markets, in `newest` order
    connecting: int = 32  # handshakes (and their subscriptions) in flight at once


@dataclass
class Tally:
    """Everything one process counted. Latency is bucketed by whole milliseconds."""

    ready: int = 0
    failed: int = 0
    sub_errors: int = 0
    connect_s: float = 0.0
    frames: int = 0  # bar frames received inside the window
    latency_ms: Counter[int] = field(default_factory=Counter)
    closed: Counter[int] = field(default_factory=Counter)  # close codes, server-side closes
    start_ms: float = float("inf")
    end_ms: float = float("inf")
    # At the window's end: per reading client, newest update sent - newest it has, in ms
    # (its worst market); clients with nothing of one of their markets are only counted.
    staleness_ms: list[int] = field(default_factory=list)
    stale_nothing: int = 0
    # Closed bars, checked at the report: expected per client (count -> clients), clients
    # missing some (a later frame came first), clients with some not delivered within the
    # grace, clients with one twice or out of minute order, closed bars received, and the
    # largest delay (receive - received_ts) of one, ms.
    closed_expected: Counter[int] = field(default_factory=Counter)
    closed_missing: int = 0
    closed_late: int = 0
    closed_disorder: int = 0
    closed_bars: int = 0
    closed_delay_ms: int = 0

    def snapshot(self) -> Tally:
        """A copy to hand to a queue, whose feeder thread pickles it while we go on counting."""
        return replace(
            self,
            latency_ms=Counter(self.latency_ms),
            closed=Counter(self.closed),
            staleness_ms=list(self.staleness_ms),
            closed_expected=Counter(self.closed_expected),
        )


class _Client(asyncio.Protocol):
    def __init__(self, plan: ClientPlan, markets: list[str], tally: Tally) -> None:
        factories = [ClientPerMessageDeflateFactory()] if plan.deflate else None
        self.ws = ClientProtocol(parse_uri(plan.url), extensions=factories, max_size=2**23)
        self.markets = markets
        self.pending = len(markets)  # subscriptions not answered yet
        self.tally = tally
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.closing = False  # we started the close (end of the phase)
        self.transport: asyncio.Transport | None = None
        self.ready_ms = 0.0  # when the last subscription was answered
        self.newest: dict[str, int] = {}  # market -> newest received_ts it has
        self.closed_minutes: dict[str, list[int]] = {market: [] for market in markets}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now_ms = time.time() * 1000
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    self._text(bytes(event.data), now_ms)
            elif isinstance(event, Response):
                self._handshake(event)
        self._flush()

    def eof_received(self) -> None:
        self.ws.receive_eof()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        elif not self.closing:
            received = self.ws.close_rcvd
            self.tally.closed[1006 if received is None else received.code] += 1
        self.lost.set_result(None)

    def close(self) -> None:
        """Start a clean close (code 1000); `lost` resolves when the server has closed TCP."""
        self.closing = True
        with contextlib.suppress(Exception):
            self.ws.send_close(1000)
            self._flush()

    def _handshake(self, response: Response) -> None:
        if response.status_code != 101:
            self.ready.set_result(False)
            return
        for market in self.markets:
            command = f'{{"op":"subscribe","channel":"market","market":"{market}"}}'
            self.ws.send_text(command.encode())
        if not self.pending:
            self.ready_ms = time.time() * 1000
            self.ready.set_result(True)

    def _text(self, data: bytes, now_ms: float) -> None:
        if data.startswith(_BAR):
            tally = self.tally
            at = data.find(_RECEIVED) + len(_RECEIVED)
            received = int(data[at : data.index(b",", at)])
            if len(self.markets) == 1:
                market = self.markets[0]
            else:
                market = data[_MARKET_AT : data.index(b'"', _MARKET_AT)].decode()
            if received > self.newest.get(market, 0):
                self.newest[market] = received
            if tally.start_ms <= now_ms < tally.end_ms:
                tally.frames += 1
                tally.latency_ms[int(now_ms - received)] += 1
            if data.endswith(_CLOSED_END):
                at = data.index(_MINUTE) + len(_MINUTE)
                self.closed_minutes[market].append(int(data[at : data.index(b",", at)]))
                tally.closed_bars += 1
                tally.closed_delay_ms = max(tally.closed_delay_ms, int(now_ms - received))
        elif data.startswith((_HISTORY, _ERROR)) and self.pending:
            if data.startswith(_ERROR):
                self.tally.sub_errors += 1
            self.pending -= 1
            if not self.pending and not self.ready.done():
                self.ready_ms = now_ms
                self.ready.set_result(True)

    def staleness(self, newest_sent: dict[str, int]) -> int | None:
        """Newest update sent - newest received_ts this client has, worst market (ms); None
        when it has nothing of one of its markets."""
        worst = 0
        for market in self.markets:
            have = self.newest.get(market)
            if have is None:
                return None
            worst = max(worst, newest_sent[market] - have)
        return worst

    def check_closed(self, end_ms: float) -> tuple[int, int, int, bool]:
        """(closed bars expected, missing: a later frame came first, not arrived yet, one
        twice or out of order) over its markets."""
        first = self.ready_ms + CLOSED_AFTER_READY_S * 1000  # closed at or after this...
        lo = -(-int(first - MINUTE_MS) // MINUTE_MS) * MINUTE_MS  # minutes M with
        hi = int(end_ms - MINUTE_MS) // MINUTE_MS * MINUTE_MS  # first <= M + 1 min <= end
        expected = range(lo, hi + 1, MINUTE_MS)
        missing = waiting = 0
        disorder = False
        for market, minutes in self.closed_minutes.items():
            if any(b <= a for a, b in itertools.pairwise(minutes)):
                disorder = True
            got, newest = set(minutes), self.newest.get(market, 0)
            for minute in expected:
                if minute not in got:
                    if newest >= minute + MINUTE_MS:
                        missing += 1
                    else:
                        waiting += 1
        return len(expected) * len(self.markets), missing, waiting, disorder

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()


def _at_window_end(clients: list[_Client], plan: ClientPlan, newest: Any, tally: Tally) -> None:
    sent = {market: int(newest[i]) for i, market in enumerate(plan.markets)}
    for client in clients:
        if client.markets:
            staleness = client.staleness(sent)
            if staleness is None:
                tally.stale_nothing += 1
            else:
                tally.staleness_ms.append(staleness)


async def _check_closed(clients: list[_Client], tally: Tally) -> None:
    """Wait until every client's expected closed bars arrived or were passed (at most
    CLOSED_GRACE_S), then count the clients missing some, with some late, out of order."""
    readers = [client for client in clients if client.markets]
    deadline = time.monotonic() + CLOSED_GRACE_S
    while time.monotonic() < deadline:
        if not any(client.check_closed(tally.end_ms)[2] for client in readers):
            break
        await asyncio.sleep(0.5)
    for client in readers:
        expected, missing, waiting, disorder = client.check_closed(tally.end_ms)
        tally.closed_expected[expected] += 1
        tally.closed_missing += missing > 0
        tally.closed_late += waiting > 0
        tally.closed_disorder += disorder


async def _connect(
    plan: ClientPlan, markets: list[str], tally: Tally, gate: asyncio.Semaphore, deadline: float
) -> _Client | None:
    uri = parse_uri(plan.url)
    loop = asyncio.get_running_loop()
    async with gate:
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                _, client = await loop.create_connection(
                    lambda: _Client(plan, markets, tally), uri.host, uri.port
                )
                if await client.ready:
                    return client
        except (OSError, TimeoutError):
            pass
    return None


async def _work(
    number: int,
    plan: ClientPlan,
    window: SynchronizedArray[float],
    go: Event,
    reports: Queue[tuple[str, int, Tally]],
    connect_timeout: float,
    newest: Any,
) -> None:
    tally = Tally()
    gate = asyncio.Semaphore(plan.connecting)
    started = time.monotonic()
    deadline = started + connect_timeout
    connecting = [_connect(plan, markets, tally, gate, deadline) for markets in plan.subscriptions]
    clients = [c for c in await asyncio.gather(*connecting) if c is not None]
    tally.ready, tally.failed = len(clients), len(plan.subscriptions) - len(clients)
    tally.connect_s = time.monotonic() - started
    reports.put(("ready", number, tally.snapshot()))
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    tally.start_ms, tally.end_ms = window[0] * 1000, window[1] * 1000
    await asyncio.sleep(max(0.0, window[1] - time.time()))
    _at_window_end(clients, plan, newest, tally)
    await asyncio.sleep(0.2)
    await _check_closed(clients, tally)
    reports.put(("done", number, tally.snapshot()))
    for client in clients:
        client.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*(c.lost for c in clients))
    for client in clients:
        if client.transport is not None and not client.lost.done():
            client.transport.abort()


def run_clients(
    number: int,
    plan: ClientPlan,
    window: SynchronizedArray[float],
    go: Event,
    reports: Queue[tuple[str, int, Tally]],
    connect_timeout: float,
    newest: Any,
    nice: int = 0,
) -> None:  # pragma: no cover - runs in its own process
    """Connect and subscribe every client, report ready, count frames in `window` once `go`
    is set, report done, close every client. `newest` is the driver's shared array of the
    newest update sent per market. `nice` lowers this process's CPU priority."""
    os.nice(nice)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # thousands of sockets per process
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_work(number, plan, window, go, reports, connect_timeout, newest))
