"""Slow clients over real sockets: the newest state whether they read slowly or not at all; 1013.

The gateway runs in this process (uvicorn, the real app, the local broker, Redis and
PostgreSQL); updates go straight into its hub, faster than any socket takes them, so a client
that does not read fills the kernel's buffers and then its outbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import deadline, unique_exchange
from tests.integration.test_gateway_limits import Gateway, ping_pong, serving, wait_until
from tests.unit.gateway_ticks import update
from tickstream_gateway.protocol import Frame
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.schemas import MINUTE_MS
from tickstream_shared.settings import GatewaySettings

QUEUE_BYTES = 1024 * 1024  # the smallest bound allowed
# Far more than the socket buffers hold (the gateway caps its send buffer at 64 KiB), so the outbox
# itself has to hold, conflate or refuse what the client does not take.
UPDATES_PER_MINUTE = 20_000
MINUTES = 5
CHUNK = 2_000
# The slow reader: a frame every 5 ms while its market updates 50,000 times a second, with
# socket buffers of 4 KiB each way (Linux doubles them) instead of up to 4 MiB, so that the
# gateway's writer waits for it within a few hundred frames.
SLOW_READ_S = 0.005
SMALL_SOCKET_BUFFER = 4 * 1024
SLOW_MINUTES = 3
SLOW_STEPS = 40
SLOW_STEP_UPDATES = 500


@pytest.fixture(scope="module")
async def gateway(infra: LocalInfra) -> AsyncIterator[Gateway]:
    settings = GatewaySettings(port=free_port(), client_queue_bytes=QUEUE_BYTES)
    async with serving(infra, settings) as running:
        yield running


async def subscribed_client(
    gateway: Gateway, market: str, receive_buffer: int = 64 * 1024
) -> ClientConnection:
    """A client subscribed to `market` (made known by one update), past its history frame.

    `max_queue=1`: the client library stops reading the socket as soon as one message waits,
    so not calling recv() is not reading."""
    gateway.hub.publish_tick(update(1, market=market))
    # A fixed, small receive buffer: Linux would grow it up to tcp_rmem's maximum (32 MiB
    # here) while the client library still reads, and then hold that much before the gateway
    # ever saw a slow client.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    host, port = gateway.base.split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    ws = await connect(f"ws://{gateway.base}/ws", max_queue=1, sock=sock)
    await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
    async with asyncio.timeout(deadline(10)):
        while json.loads(await ws.recv())["type"] != "history":
            pass
    return ws


def shrink_server_send_buffer(ws: ClientConnection) -> None:
    """Give the gateway's end of `ws` a small fixed send buffer (this process holds both
    ends), so that a slow reader makes the gateway's writer wait within a few hundred frames
    rather than after the megabytes Linux would let the buffer grow to."""
    client_end = ws.transport.get_extra_info("socket").getsockname()
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        with sock:
            try:
                peer = sock.getpeername()
            except OSError:
                continue
            if peer == client_end:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER)
                return
    raise AssertionError("the gateway's end of the connection was not found")


async def read_until(ws: ClientConnection, last_seq: int) -> list[dict[str, Any]]:
    frames = []
    async with asyncio.timeout(deadline(60)):
        while True:
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if frame.get("seq") == last_seq:
                return frames


async def test_a_client_that_stops_reading_gets_the_newest_state_and_stays(
    gateway: Gateway,
) -> None:
    """While the client does not read, each minute's forming updates give way to newer ones;
    when it reads again it gets every closed bar, in order, ending with the newest state, and
    it was never closed: what it must receive stayed within the byte bound."""
    market = f"{unique_exchange()}:btc-usd"
    ws = await subscribed_client(gateway, market)
    conflated_before = gateway.hub.counters.conflated_frames
    closed_before = gateway.hub.counters.slow_clients_closed
    seq = 1
    try:
        for minute in range(MINUTES):
            for _ in range(UPDATES_PER_MINUTE // CHUNK):
                for _ in range(CHUNK):
                    seq += 1
                    gateway.hub.publish_tick(update(seq, minute, market=market))
                # Time for the writer to fill the socket and for the client to fall behind.
                await asyncio.sleep(0.01)
            seq += 1
            gateway.hub.publish_tick(update(seq, minute, market=market, closed=True))
        [session] = [s for s in gateway.hub.sessions if market in s.markets]
        assert session.outbox.queued_bytes <= QUEUE_BYTES
        assert not session.outbox.overflowed

        frames = await read_until(ws, seq)
        await ping_pong(ws)
    finally:
        await ws.close()
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs)), "every bar frame newer than the one before"
    closed = [(f["minute"], f["seq"]) for f in frames if f["closed"]]
    assert len(closed) == MINUTES, "every closed bar delivered"
    assert frames[-1]["closed"] and frames[-1]["seq"] == seq, "ends with the newest state"
    assert len(frames) < seq - 1, "updates the client could not take were conflated"
    assert gateway.hub.counters.conflated_frames > conflated_before
    assert gateway.hub.counters.slow_clients_closed == closed_before


async def flood_with_closed_bars(
    gateway: Gateway, market: str, *, socket_full_first: bool = False
) -> Any:
    """Closed bars of `market` (never conflated) until a client's outbox overflows; returns
    that client's session.

    With `socket_full_first`, bars come a thousand at a time until the writer stops taking
    them (its outbox holds the same frames while this sleeps: the socket's buffers are full),
    and only then as fast as they can: the outbox overflows while there is no room in the
    socket."""
    [session] = [s for s in gateway.hub.sessions if market in s.markets]
    seq = 1
    while socket_full_first:
        for _ in range(1000):
            seq += 1
            gateway.hub.publish_tick(update(seq, seq, market=market, closed=True))
        queued = len(session.outbox)
        # A writer with room sends some of these in the loop's next turn, before this wakes.
        await asyncio.sleep(0.05)
        socket_full_first = not queued or len(session.outbox) != queued
    for _ in range(200_000):
        seq += 1
        gateway.hub.publish_tick(update(seq, seq, market=market, closed=True))
        # Checked after every bar: the session may be closed and gone right after.
        if session.outbox.overflowed:
            return session
        if seq % CHUNK == 0:
            await asyncio.sleep(0.01)
    raise AssertionError("the client never overflowed")


async def test_a_client_that_must_receive_more_than_the_bound_is_closed_with_1013(
    gateway: Gateway,
) -> None:
    """Closed bars are never dropped: a client that does not read while more of them come
    than its outbox holds (after the socket buffers) is closed with 1013, which it finds after
    what was sent before when it reads again."""
    market = f"{unique_exchange()}:eth-usd"
    ws = await subscribed_client(gateway, market)
    closed_before = gateway.hub.counters.slow_clients_closed
    try:
        await flood_with_closed_bars(gateway, market)
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(deadline(60)):
                while True:
                    await ws.recv()
    finally:
        await ws.close()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1013, "too slow: reconnect")
    await wait_until(lambda: gateway.hub.counters.slow_clients_closed > closed_before)
    assert gateway.hub.counters.slow_clients_closed == closed_before + 1


async def test_a_client_that_never_reads_again_is_let_go(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """An overflowed client that never reads again is let go, with its session and outbox,
    when it does not answer its close frame: the gateway waits at most 5 s for it."""
    market = f"{unique_exchange()}:sol-usd"
    ws = await subscribed_client(gateway, market)
    closed_before = gateway.hub.counters.slow_clients_closed
    caplog.set_level(logging.WARNING, logger="tickstream.gateway.websocket")
    try:
        session = await flood_with_closed_bars(gateway, market, socket_full_first=True)
        await wait_until(lambda: session not in gateway.hub.sessions)
        assert gateway.hub.counters.slow_clients_closed == closed_before + 1
        assert any("no answer to close frame 1013" in r.getMessage() for r in caplog.records)
    finally:
        ws.transport.abort()  # the gateway is gone from it: no closing handshake to wait for


async def test_a_slow_reader_ends_with_the_newest_state_and_every_closed_bar(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that reads slowly while its market updates fast receives each minute's
    closed bar, in order, bars in seq order, and at the end the newest state; no forming bar
    was taken for it while a newer one was published; what it could not take was conflated
    and it was never closed."""
    market = f"{unique_exchange()}:xrp-usd"
    ws = await subscribed_client(gateway, market, receive_buffer=SMALL_SOCKET_BUFFER)
    shrink_server_send_buffer(ws)
    [session] = [s for s in gateway.hub.sessions if market in s.markets]
    published_at: dict[int, float] = {}
    stale: list[tuple[int, float]] = []
    take = session.outbox.get_nowait

    def take_checked(now: float | None = None) -> Frame:
        """The writer's take, checked against the freshness rule."""
        frame = take(now)
        if frame.latest and frame.stream == market:
            seq = json.loads(frame.text)["seq"]
            if seq != len(published_at) + 1:  # not the newest
                stale.append((seq, time.monotonic() - published_at[seq]))
        return frame

    monkeypatch.setattr(session.outbox, "get_nowait", take_checked)
    conflated_before = gateway.hub.counters.conflated_frames
    closed_before = gateway.hub.counters.slow_clients_closed
    frames: list[dict[str, Any]] = []
    last_seq: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def read_slowly() -> None:
        while True:
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if last_seq.done() and frame.get("seq") == last_seq.result():
                return
            await asyncio.sleep(SLOW_READ_S)

    reader = asyncio.create_task(read_slowly())
    seq = 1
    try:
        for minute in range(SLOW_MINUTES):
            for _ in range(SLOW_STEPS):
                for _ in range(SLOW_STEP_UPDATES):
                    seq += 1
                    published_at[seq] = time.monotonic()
                    gateway.hub.publish_tick(update(seq, minute, market=market))
                await asyncio.sleep(0.01)
            seq += 1
            published_at[seq] = time.monotonic()
            gateway.hub.publish_tick(update(seq, minute, market=market, closed=True))
        last_seq.set_result(seq)
        async with asyncio.timeout(deadline(60)):
            await reader
        await ping_pong(ws)
    finally:
        reader.cancel()
        await ws.close()
    bars = [f for f in frames if f["type"] == "bar"]
    seqs = [f["seq"] for f in bars]
    assert seqs == sorted(set(seqs)), "every bar frame newer than the one before"
    closed = [f["minute"] for f in bars if f["closed"]]
    assert closed == [bars[0]["minute"] + i * MINUTE_MS for i in range(SLOW_MINUTES)]
    assert bars[-1]["closed"] and bars[-1]["seq"] == seq, "ends with the newest state"
    assert stale == []
    assert len(bars) < (seq - 1) // 10, "updates the client could not take were conflated"
    assert gateway.hub.counters.conflated_frames - conflated_before == seq - 1 - len(bars)
    assert gateway.hub.counters.slow_clients_closed == closed_before
