"""Gateway lifecycle: serve the Starlette app with uvicorn until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
from collections.abc import Iterator
from typing import Final

import uvicorn

from tickstream_gateway.app import create_app
from tickstream_gateway.connections import SocketLimits, guarded_protocol
from tickstream_gateway.protocol import MAX_FRAME_BYTES
from tickstream_gateway.websocket import GatewayWebSocketProtocol
from tickstream_shared import db
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.gateway")
# Descriptors the process needs besides its clients: Kafka, Redis, PostgreSQL, files, the loop.
_OWN_FILES: Final = 200


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


def raise_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the new soft one.

    Process-wide, so called by the process's entry, like `tune_gc`. Every client holds a
    descriptor, and the usual soft limit (1,024) is far below GATEWAY_MAX_SOCKETS.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):  # some containers refuse: keep the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _WebSocketHandshakeLines(logging.Filter):
    """Drops uvicorn's line per WebSocket handshake: the access log (GATEWAY_ACCESS_LOG)
    decides which handshakes are logged, as it does for HTTP requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and isinstance(record.msg, str)
            and record.msg.startswith('%s - "WebSocket %s"')
        )


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Serve until `stop`; then uvicorn stops accepting, closes connections, runs lifespan exit.

    Waits for PostgreSQL first (one log line per attempt), as stats and alerts do, so a
    gateway started before its database serves once it answers instead of exiting.
    """
    pool = await db.open_pool(settings.database, stop, max_size=8)
    if pool is None:
        return
    gateway = settings.gateway
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit != resource.RLIM_INFINITY and soft_limit < gateway.max_sockets + _OWN_FILES:
        log.warning(
            "open files are limited to %d: fewer than GATEWAY_MAX_SOCKETS (%d) clients fit",
            soft_limit,
            gateway.max_sockets,
        )
    # uvicorn's lines go to the root logger's handler, in the format of every other line
    # (tickstream_shared.logs): its loggers keep no handler of their own.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    uvicorn_errors = logging.getLogger("uvicorn.error")
    handshakes = _WebSocketHandshakeLines()
    uvicorn_errors.addFilter(handshakes)
    config = uvicorn.Config(
        create_app(settings, pool=pool),
        host=gateway.host,
        port=gateway.port,
        log_config=None,
        log_level=settings.log.level.lower(),
        # httptools (C) parses and writes HTTP/1.1: with h11 (pure Python) the protocol alone
        # was about a third of the gateway's CPU per /api/ranks request (docs/performance.md).
        # Subclassed for a request deadline and a socket cap (connections.py).
        http=guarded_protocol(SocketLimits.of(gateway)),
        # The gateway writes its own access lines, as GATEWAY_ACCESS_LOG says
        # (telemetry.ObserveRequests); requests are counted by route and status in /metrics.
        access_log=False,
        # uvicorn's sans-I/O WebSocket protocol, taken over by the gateway after the handshake
        # (websocket.py): frames are written below ASGI, several per write.
        ws=GatewayWebSocketProtocol,
        ws_max_size=MAX_FRAME_BYTES * 4,
        # Off by default: compression is per connection, so a frame encoded once for every
        # client would be compressed once per client (see docs/performance.md).
        ws_per_message_deflate=gateway.ws_compression,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = _Server(config)
    try:
        serving = asyncio.create_task(server.serve())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
        await serving
    finally:
        uvicorn_errors.removeFilter(handshakes)
    if server.started is False:
        raise RuntimeError("gateway failed to start (see log above)")
