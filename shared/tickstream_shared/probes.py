"""The small HTTP server of watcher, stats and alerts: /metrics, /livez and /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from tickstream_shared import health, observability
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger(__name__)

# A request is one line and a few headers (Prometheus, kubelet, curl): anything longer, or
# slower to arrive, is not a probe and is dropped.
_MAX_REQUEST_BYTES: Final = 8192
_REQUEST_TIMEOUT_S: Final = 5.0
_JSON: Final = "application/json"
_REASONS: Final = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Answer = tuple[int, str, bytes]  # status, content type, body


def _json(status: int, body: object) -> Answer:
    return status, _JSON, json.dumps(body, separators=(",", ":")).encode()


class ProbeServer:
    """Answers GET /metrics, /livez and /readyz for `service`, one request per connection.

    Served by the service's own event loop, so an answer to /livez proves that the loop
    turns; /readyz checks the service's dependencies (health.DEPENDENCIES) at each request.
    """

    def __init__(self, service: str, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        self._routes: dict[str, Callable[[], Awaitable[Answer]]] = {
            "/metrics": self._metrics,
            "/livez": self._livez,
            "/readyz": self._readyz,
        }
        self._connections: set[asyncio.Task[object]] = set()

    async def answer(self, method: str, path: str) -> Answer:
        """The answer to one request; the query string is ignored."""
        route = self._routes.get(path.split("?", 1)[0])
        if route is None:
            return _json(404, {"error": "not_found", "message": f"no such path: {path}"})
        if method != "GET":
            return _json(405, {"error": "method_not_allowed", "message": f"{method} {path}"})
        return await route()

    async def _metrics(self) -> Answer:
        body, content_type = observability.exposition()
        return 200, content_type, body

    async def _livez(self) -> Answer:
        return _json(200, {"status": "ok"})

    async def _readyz(self) -> Answer:
        checks = await health.readiness(self.settings, health.DEPENDENCIES[self.service])
        return _json(*health.health_body(checks))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection: read the request head, answer, close. Never raises."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            try:
                status, content_type, body = await self.answer(method, target)
            except Exception:
                log.exception("cannot answer %s %s", method, target)
                status, content_type, body = _json(500, {"error": "internal_error"})
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, ValueError, EOFError, asyncio.LimitOverrunError):
            pass  # a client that went away or sent no HTTP request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._connections.discard(task)

    async def close_connections(self) -> None:
        """Cancel the requests being answered (a readiness check may take seconds)."""
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)


@contextlib.asynccontextmanager
async def serve_probes(service: str, settings: ServiceSettings) -> AsyncIterator[int | None]:
    """Serve the probes of `service` while the block runs; yields the port, or None.

    Nothing is served when the service's port setting is 0. Raises OSError when the port
    cannot be bound (taken, or not allowed): a port that was asked for is not skipped quietly.
    """
    port = settings.observability.port_of(service)
    if port == 0:
        yield None
        return
    probes = ProbeServer(service, settings)
    host = settings.observability.host
    server = await asyncio.start_server(probes.handle, host, port, limit=_MAX_REQUEST_BYTES)
    log.info("serving /metrics, /livez and /readyz on http://%s:%d", host, port)
    try:
        yield port
    finally:
        server.close()
        await probes.close_connections()
        await server.wait_closed()
