"""Load-generator process for bench_fanout: WebSocket clients that time every bar frame they read.

Each client is the `websockets` sans-I/O `ClientProtocol` on a plain asyncio transport, so the
client side costs a few microseconds per frame (the full asyncio client adds a receive queue
and a future per frame): on a 2-core machine every microsecond spent here is taken from the
server being measured. A client reads as fast as its process gets CPU; it never pauses reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

_BAR = b'{"type":"bar"'
_HISTORY = b'{"type":"history"'
_ERROR = b'{"type":"error"'
_RECEIVED = b'"received_ts":'
# Handshakes (and their subscriptions) in flight at once per process.
_CONNECTING = 32


@dataclass
class ClientPlan:
    """What one load-generator process does: which markets each of its clients subscribes to."""

    url: str  # ws://host:port/path
    subscriptions: list[list[str]]  # per client; an empty list is an idle client
    deflate: bool = False  # offer permessage-deflate (browsers do); off: frames as sent


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

    def snapshot(self) -> Tally:
        """A copy to hand to a queue, whose feeder thread pickles it while we go on counting."""
        return replace(self, latency_ms=Counter(self.latency_ms), closed=Counter(self.closed))


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
            self.ready.set_result(True)

    def _text(self, data: bytes, now_ms: float) -> None:
        if data.startswith(_BAR):
            tally = self.tally
            if tally.start_ms <= now_ms < tally.end_ms:
                at = data.find(_RECEIVED) + len(_RECEIVED)
                tally.frames += 1
                tally.latency_ms[int(now_ms - int(data[at : data.index(b",", at)]))] += 1
        elif data.startswith((_HISTORY, _ERROR)) and self.pending:
            if data.startswith(_ERROR):
                self.tally.sub_errors += 1
            self.pending -= 1
            if not self.pending and not self.ready.done():
                self.ready.set_result(True)

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()


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
) -> None:
    tally = Tally()
    gate = asyncio.Semaphore(_CONNECTING)
    started = time.monotonic()
    deadline = started + connect_timeout
    connecting = [_connect(plan, markets, tally, gate, deadline) for markets in plan.subscriptions]
    clients = [c for c in await asyncio.gather(*connecting) if c is not None]
    tally.ready, tally.failed = len(clients), len(plan.subscriptions) - len(clients)
    tally.connect_s = time.monotonic() - started
    reports.put(("ready", number, tally.snapshot()))
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    tally.start_ms, tally.end_ms = window[0] * 1000, window[1] * 1000
    await asyncio.sleep(max(0.0, window[1] - time.time()) + 0.2)
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
    nice: int = 0,
) -> None:  # pragma: no cover - runs in its own process
    """Connect and subscribe every client, report ready, count frames in `window` once `go`
    is set, report done, close every client. `nice` lowers this process's CPU priority."""
    os.nice(nice)
    asyncio.run(_work(number, plan, window, go, reports, connect_timeout))
