"""Gateway lifecycle: serve the Starlette app with uvicorn until stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn

from tickstream_gateway.app import create_app
from tickstream_gateway.protocol import MAX_FRAME_BYTES
from tickstream_shared.settings import ServiceSettings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to the service's stop event (tickstream_shared.lifecycle), which
        # then asks uvicorn to shut down in its own order.
        yield


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Serve until `stop`; then uvicorn stops accepting, closes connections, runs lifespan exit."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.gateway.host,
        port=settings.gateway.port,
        log_level=settings.log.level.lower(),
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
