"""What the live-source tests share: a tiny REST server for fake exchanges, the topic reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer

from tests.conftest import deadline
from tickstream_shared.schemas import Tick, decode_tick

# (path, query) -> (HTTP status, JSON body)
Route = Callable[[str, dict[str, str]], tuple[int, Any]]


async def _serve(route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:  # keep-alive: one request after another on the same connection
            head = await reader.readuntil(b"\r\n\r\n")
            target = urlsplit(head.split(b" ", 2)[1].decode())
            status, body = route(target.path, {k: v[0] for k, v in parse_qs(target.query).items()})
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
            )
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


async def read_topic(
    bootstrap: str, topic: str, until: Callable[[list[Tick]], bool], within: float
) -> list[Tick]:
    """Ticks of `topic` from its start until `until(ticks)` holds; TimeoutError after `within`."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
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
