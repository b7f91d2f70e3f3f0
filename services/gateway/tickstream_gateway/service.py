"""Gateway lifecycle: serve the Starlette app with uvicorn until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import uvicorn

from tickstream_gateway.app import create_app
from tickstream_gateway.protocol import MAX_FRAME_BYTES
from tickstream_shared import db
from tickstream_shared.settings import ServiceSettings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to the service's stop event (tickstream_shared.lifecycle), which
        # then asks uvicorn to shut down in its own order.
        yield


def tune_gc() -> None:
    """Keep full garbage collections rare: their pause grows with the connections held.

    Process-wide, so called by the process's entry (`python -m tickstream_gateway`), not by
    an embedding program or the tests.

    Measured with 1,000 WebSocket clients (bench/bench_fanout.py, docs/performance.md): with
    Python's default thresholds (700, 10, 10) a full collection ran every 4 s and paused the
    loop for 120-150 ms (240,000 tracked objects, mostly the connections' tasks and
    coroutines), which was the whole p99 latency tail. Objects that live a few ms (frames
    pending in an outbox, waiters) outlived two young collections at 700 allocations each,
    were promoted to the oldest generation and soon counted towards the next full pass. At
    50,000 allocations per young collection they die young; at most that many objects of
    garbage wait for it (a few MB). What exists after startup (modules, settings, the app)
    is frozen: never scanned again.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Serve until `stop`; then uvicorn stops accepting, closes connections, runs lifespan exit.

    Waits for PostgreSQL first (one log line per attempt), as stats and alerts do, so a
    gateway started before its database serves once it answers instead of exiting.
    """
    pool = await db.open_pool(settings.database, stop, max_size=8)
    if pool is None:
        return
    config = uvicorn.Config(
        create_app(settings, pool=pool),
        host=settings.gateway.host,
        port=settings.gateway.port,
        log_level=settings.log.level.lower(),
        # httptools (C) parses and writes HTTP/1.1: with h11 (pure Python) the protocol alone
        # was about a third of the gateway's CPU per /api/ranks request (docs/performance.md).
        http="httptools",
        # One log line per request would cost more than the request itself; requests are
        # counted by route and status in /metrics instead (telemetry.CountRequests).
        access_log=False,
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME_BYTES * 4,
        # Off by default: compression is per connection, so a frame encoded once for every
        # client would be compressed once per client (see docs/performance.md).
        ws_per_message_deflate=settings.gateway.ws_compression,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving
    if server.started is False:
        raise RuntimeError("gateway failed to start (see log above)")
