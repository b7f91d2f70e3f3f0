"""Baseline for bench_fanout: a minimal `websockets` broadcast server of the gateway's bar frames.

It consumes the same tick topics as the gateway (no group, from the newest offset), decodes
each tick with the same `decode_batch`, encodes the same bar frame once with the gateway's own
`bar_frame`, and hands it to `websockets.broadcast` for the market's subscribers: the same
bytes, without Starlette, uvicorn, per-client queues or history. Protocol subset: a market
subscribe is answered with `subscribed` and an empty `history` frame; anything else is ignored.
`GET /healthz` answers 200 `ok` without any I/O. Like the gateway's feed, it yields to the loop
every 5 ms while fanning out a batch. It raises its open-file limit to the hard
limit and listens with a backlog of 2048 (uvicorn's, the gateway's) for 10,000 connections.
`--gc tuned` sets the garbage collector as the gateway does (tickstream_gateway.service.tune_gc:
with Python's defaults a full collection over thousands of connections pauses the loop).

Slow clients: `broadcast` has no backpressure (a slow client's write buffer grows), so every
0.25 s a client whose write buffer holds more than `--max-buffer` bytes is closed with 1013, as
the gateway closes a client whose queue is full. Run by bench_fanout:

    python bench/fanout_baseline.py --port 8001   # KAFKA_BOOTSTRAP_SERVERS from the environment
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import time
from collections import defaultdict
from http import HTTPStatus

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from tickstream_gateway.protocol import Subscription as _Subscription
from tickstream_gateway.protocol import bar_frame, status_frame
from tickstream_shared.consuming import DecodeCounters, decode_batch
from tickstream_shared.kafka import make_consumer
from tickstream_shared.naming import TICK_TOPIC_PATTERN, Market
from tickstream_shared.settings import KafkaSettings

_CHECK_S = 0.25
_FANOUT_SLICE_S = 0.005  # the gateway's (tickstream_gateway.feed)
_EMPTY_HISTORY = '{"type":"history","market":"%s","since":null,"bars":[]}'


class Broadcaster:
    """Subscribers per market, and the WebSocket handler that fills them."""

    def __init__(self) -> None:
        self.by_market: dict[str, set[ServerConnection]] = defaultdict(set)
        self.connections: set[ServerConnection] = set()
        self._closing: set[asyncio.Task[None]] = set()  # closes of slow clients in progress

    async def handler(self, connection: ServerConnection) -> None:
        markets: set[str] = set()
        self.connections.add(connection)
        try:
            async for message in connection:
                try:
                    command = json.loads(message)
                    market = Market.parse(command["market"])
                except (ValueError, KeyError, TypeError):
                    continue
                if command.get("op") != "subscribe" or command.get("channel") != "market":
                    continue
                markets.add(market.id)
                self.by_market[market.id].add(connection)
                subscribed = status_frame("subscribed", _Subscription("market", market))
                await connection.send(subscribed.text)
                await connection.send(_EMPTY_HISTORY % market.id)
        finally:
            self.connections.discard(connection)
            for market_id in markets:
                self.by_market[market_id].discard(connection)

    async def close_slow(self, max_buffer: int) -> None:
        while True:
            await asyncio.sleep(_CHECK_S)
            for connection in list(self.connections):
                if connection.transport.get_write_buffer_size() > max_buffer:
                    self.connections.discard(connection)
                    for subscribers in self.by_market.values():
                        subscribers.discard(connection)
                    task = asyncio.create_task(connection.close(1013, "too slow: reconnect"))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)


def _healthz(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None


async def _feed(bootstrap: str, broadcaster: Broadcaster) -> None:
    consumer = make_consumer(
        KafkaSettings(bootstrap_servers=bootstrap),
        group_id=None,
        client_id="bench-baseline",
        offset_reset="latest",
    )
    consumer.subscribe(pattern=TICK_TOPIC_PATTERN)
    await consumer.start()
    counters = DecodeCounters()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            slice_start = time.monotonic()
            for records in batch.values():
                for tick in decode_batch(records, counters):
                    subscribers = broadcaster.by_market.get(tick.market)
                    if subscribers:
                        websockets.broadcast(subscribers, bar_frame(tick).text)
                        # As the gateway's feed: a batch fanned out to many clients would hold
                        # the loop (handshakes, /healthz, pongs) for its whole length.
                        if time.monotonic() - slice_start >= _FANOUT_SLICE_S:
                            await asyncio.sleep(0)
                            slice_start = time.monotonic()
    finally:
        await consumer.stop()


async def main(port: int, max_buffer: int) -> None:
    broadcaster = Broadcaster()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    async with (
        serve(broadcaster.handler, "127.0.0.1", port, process_request=_healthz, backlog=2048),
        asyncio.TaskGroup() as tasks,
    ):
        feed = tasks.create_task(_feed(bootstrap, broadcaster))
        slow = tasks.create_task(broadcaster.close_slow(max_buffer))
        await stop.wait()
        feed.cancel()
        slow.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-buffer", type=int, default=768 * 1024, help="bytes")
    parser.add_argument(
        "--gc", choices=("default", "tuned"), default="default", help="tuned: as the gateway's"
    )
    args = parser.parse_args()
    if args.gc == "tuned":  # the gateway's tune_gc: full collections rare, startup frozen
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 10,000+ sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(args.port, args.max_buffer))
