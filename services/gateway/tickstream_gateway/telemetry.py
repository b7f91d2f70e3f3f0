"""The gateway's own Prometheus metrics: WebSocket clients and HTTP requests."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tickstream_gateway.hub import Hub
from tickstream_shared.observability import READINGS, Family, Reading

CONNECTIONS: Final = Family(
    "tickstream_gateway_connections", "WebSocket clients connected.", "gauge"
)
SLOW_CLIENTS_CLOSED: Final = Family(
    "tickstream_gateway_slow_clients_closed_total",
    "WebSocket clients closed (1013) because they read too slowly.",
    "counter",
)
# Labelled by route template (`/api/metrics/{metric_id:str}`), never by the raw path, so
# made-up URLs cannot create series without bound: they all count as "unmatched".
HTTP_REQUESTS: Final = Counter(
    "tickstream_http_requests",
    "HTTP requests answered, by route and status code.",
    ["route", "status"],
)


def track_hub(hub: Hub) -> None:
    """Export the hub's clients and slow-client closes while it lives."""
    READINGS.track(hub, current=_hub_readings)


def _hub_readings(hub: Hub) -> list[Reading]:
    return [
        (CONNECTIONS, (), len(hub.sessions)),
        (SLOW_CLIENTS_CLOSED, (), hub.dropped_slow_clients),
    ]


class CountRequests:
    """ASGI middleware counting HTTP requests in HTTP_REQUESTS once answered (or failed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless the app starts a response

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            # The router stores the matched route in the scope it was given (this one).
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            HTTP_REQUESTS.labels(route=route, status=str(status)).inc()
