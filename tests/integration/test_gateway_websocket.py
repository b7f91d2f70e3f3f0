"""The WebSocket below ASGI (websocket.py, ws.ClientConnection) over real sockets: no task per
idle connection, one write per client per batch, commands in order, compression.

The gateway runs in this process (uvicorn, the real app, the local broker, Redis and
PostgreSQL); updates go straight into its hub.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import deadline, unique_exchange
from tests.integration.test_gateway_limits import Gateway, serving, wait_until
from tests.unit.gateway_ticks import update
from tickstream_gateway import ws as ws_module
from tickstream_gateway.protocol import Frame
from tickstream_gateway.websocket import GatewayWebSocketProtocol
from tickstream_shared.local_infra import LocalInfra, free_port
from tickstream_shared.settings import GatewaySettings


@pytest.fixture(scope="module")
async def gateway(infra: LocalInfra) -> AsyncIterator[Gateway]:
    settings = GatewaySettings(port=free_port())
    async with serving(infra, settings) as running:
        yield running


@pytest.fixture(scope="module")
async def compressing(infra: LocalInfra) -> AsyncIterator[Gateway]:
    settings = GatewaySettings(port=free_port(), ws_compression=True)
    async with serving(infra, settings) as running:
        yield running


async def subscribe(ws: ClientConnection, market: str) -> list[dict[str, Any]]:
    """Subscribe to `market`; the frames up to and including its history."""
    await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
    frames = []
    async with asyncio.timeout(deadline(10)):
        while not frames or frames[-1]["type"] not in ("history", "error"):
            frames.append(json.loads(await ws.recv()))
    return frames


async def test_idle_connections_hold_no_task_and_are_forgotten_when_closed(
    gateway: Gateway,
) -> None:
    """Connections, subscribed or not, hold no asyncio task once their subscribes are done;
    closing them frees their sessions."""
    market = f"{unique_exchange()}:btc-usd"
    gateway.hub.publish_tick(update(1, market=market))
    sessions_before = len(gateway.hub.sessions)
    await asyncio.sleep(0.2)
    tasks_before = len(asyncio.all_tasks())
    clients = [await connect(f"ws://{gateway.base}/ws") for _ in range(30)]
    try:
        for ws in clients[:10]:
            assert (await subscribe(ws, market))[-1]["type"] == "history"
        await asyncio.sleep(0.2)
        assert len(gateway.hub.sessions) == sessions_before + 30
        # This process holds both ends: the clients' own tasks (the `websockets` client runs
        # one per connection, for keepalive) are counted too, the gateway's must not be.
        client_tasks = sum(1 for ws in clients if ws.keepalive_task is not None)
        assert len(asyncio.all_tasks()) - tasks_before <= client_tasks + 2
    finally:
        for ws in clients:
            await ws.close()
    await wait_until(lambda: len(gateway.hub.sessions) == sessions_before)


async def test_a_batch_goes_to_a_client_in_one_write_with_each_bars_newest_state(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Updates published in one step (a consumer batch) reach each client in one write: every
    closed bar, in order, and of the forming bar only its newest update."""
    market = f"{unique_exchange()}:eth-usd"
    gateway.hub.publish_tick(update(1, market=market))
    writes: list[list[Frame]] = []
    original = GatewayWebSocketProtocol.write_frames

    def recorded(self: GatewayWebSocketProtocol, frames: Sequence[Frame]) -> None:
        writes.append(list(frames))
        original(self, frames)

    async with connect(f"ws://{gateway.base}/ws") as ws:
        await subscribe(ws, market)
        await asyncio.sleep(0.1)
        monkeypatch.setattr(GatewayWebSocketProtocol, "write_frames", recorded)
        # Minutes 0-2 close; minute 3 forms, three updates of it in the same batch.
        batch = [update(2 + i, i, market=market, closed=True) for i in range(3)]
        batch += [update(5 + i, 3, market=market) for i in range(3)]
        for tick in batch:
            gateway.hub.publish_tick(tick)
        got = []
        async with asyncio.timeout(deadline(10)):
            while len(got) < 4:
                got.append(json.loads(await ws.recv())["seq"])
    assert got == [2, 3, 4, 7]
    assert [[json.loads(f.body)["seq"] for f in frames] for frames in writes] == [[2, 3, 4, 7]]


async def test_a_fast_market_reaches_a_client_at_most_once_per_interval(gateway: Gateway) -> None:
    """A bar updated far faster than GATEWAY_MAX_FRAME_AGE_MS reaches a client at most once
    per that interval (plus one), each frame the newest update at its write, ending with the
    newest one; every closed bar arrives."""
    market = f"{unique_exchange()}:dot-usd"
    gateway.hub.publish_tick(update(1, market=market))
    interval = GatewaySettings().max_frame_age_ms / 1000
    async with connect(f"ws://{gateway.base}/ws") as ws:
        await subscribe(ws, market)
        seq = 1
        started = time.monotonic()
        for minute in range(3):
            for _ in range(20):  # 200 updates a minute, 10 at a time every 5 ms
                for _ in range(10):
                    seq += 1
                    gateway.hub.publish_tick(update(seq, minute, market=market))
                await asyncio.sleep(0.005)
            seq += 1
            gateway.hub.publish_tick(update(seq, minute, market=market, closed=True))
        took = time.monotonic() - started
        frames = []
        async with asyncio.timeout(deadline(10)):
            while not frames or frames[-1]["seq"] != seq:
                frames.append(json.loads(await ws.recv()))
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs)), "in order, none twice"
    assert [f["minute"] for f in frames if f["closed"]] == [
        update(1, m).minute for m in range(3)
    ], "every closed bar"
    forming = [f for f in frames if not f["closed"]]
    assert 3 <= len(forming) <= took / interval + 3, (len(forming), took)


async def test_commands_behind_a_subscribe_are_answered_in_order(gateway: Gateway) -> None:
    """A subscribe waits for storage; the commands sent right after it wait for it, and every
    answer comes in the order of the commands."""
    first = f"{unique_exchange()}:sol-usd"
    second = f"{unique_exchange()}:ada-usd"
    for market in (first, second):
        gateway.hub.publish_tick(update(1, market=market))
    commands = [
        {"op": "subscribe", "channel": "market", "market": first},
        {"op": "ping"},
        {"op": "subscribe", "channel": "market", "market": second},
        {"op": "unsubscribe", "channel": "market", "market": first},
        {"op": "ping"},
        {"op": "nonsense"},
    ]
    async with connect(f"ws://{gateway.base}/ws") as ws:
        for command in commands:
            await ws.send(json.dumps(command))
        answers = []
        async with asyncio.timeout(deadline(10)):
            while len(answers) < 8:
                frame = json.loads(await ws.recv())
                answers.append((frame["type"], frame.get("market")))
    assert answers == [
        ("subscribed", first),
        ("history", first),
        ("pong", None),
        ("subscribed", second),
        ("history", second),
        ("unsubscribed", first),
        ("pong", None),
        ("error", None),
    ]


async def test_a_compressing_connection_gets_the_same_frames(compressing: Gateway) -> None:
    """With GATEWAY_WS_COMPRESSION a client offering permessage-deflate gets each frame
    compressed for it, the same messages as any other client."""
    market = f"{unique_exchange()}:xrp-usd"
    compressing.hub.publish_tick(update(1, market=market))
    async with (
        connect(f"ws://{compressing.base}/ws", compression="deflate") as zipped,
        connect(f"ws://{compressing.base}/ws", compression=None) as plain,
    ):
        assert "permessage-deflate" in (
            zipped.response.headers.get("Sec-WebSocket-Extensions") or ""
        )
        assert await subscribe(zipped, market) == await subscribe(plain, market)
        for seq in (2, 3):  # closed bars: each is delivered
            compressing.hub.publish_tick(update(seq, seq, market=market, closed=True))
        async with asyncio.timeout(deadline(10)):
            got = [[await ws.recv() for _ in range(2)] for ws in (zipped, plain)]
    assert got[0] == got[1]
    assert [json.loads(text)["seq"] for text in got[0]] == [2, 3]


async def test_pings_pass_while_many_subscribes_wait(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that subscribes to many markets at once, each waiting for storage, is still
    read: its ping is answered at once, not after the subscribes (a connection not read for
    20 s is closed by either side's keepalive)."""
    real_subscribe = ws_module._subscribe

    async def slow_subscribe(*args: Any) -> None:
        await asyncio.sleep(0.1)
        await real_subscribe(*args)

    monkeypatch.setattr(ws_module, "_subscribe", slow_subscribe)
    # More than a few: the connection once stopped reading at 16 waiting commands.
    markets = [f"{unique_exchange()}:btc-usd" for _ in range(20)]
    for market in markets:
        gateway.hub.publish_tick(update(1, market=market))
    async with connect(f"ws://{gateway.base}/ws") as ws:
        for market in markets:
            await ws.send(json.dumps({"op": "subscribe", "channel": "market", "market": market}))
        started = time.monotonic()
        await asyncio.sleep(0.3)  # the gateway has read them all: the ping comes after
        pong = await ws.ping()
        async with asyncio.timeout(deadline(3)):
            await pong
        assert time.monotonic() - started < 2.3, "the ping waited for the subscribes"
        answers = []
        async with asyncio.timeout(deadline(60)):  # each about 1 s: history waits for storage
            while len(answers) < len(markets):
                frame = json.loads(await ws.recv())
                if frame["type"] in ("history", "error"):
                    answers.append(frame["type"])
        assert time.monotonic() - started >= 0.1 * len(markets), "the subscribes did wait"
