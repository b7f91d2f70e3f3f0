"""The gateway's own Prometheus metrics: WebSocket clients and HTTP requests."""

from __future__ import annotations

import functools
from typing import Any, Final

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tickstream_gateway.history import MarketHistory, ReadCount
from tickstream_gateway.hub import Hub
from tickstream_shared.observability import READINGS, Family, Reading

CONNECTIONS: Final = Family(
    "tickstream_gateway_connections", "WebSocket clients connected.", "gauge"
)
SLOW_CLIENTS_CLOSED: Final = Family(
    "tickstream_gateway_slow_clients_closed_total",
    "WebSocket clients closed (1013): more to receive than GATEWAY_CLIENT_QUEUE_BYTES.",
    "counter",
)
FRAMES_CONFLATED: Final = Family(
    "tickstream_gateway_frames_conflated_total",
    "Frames replaced, before a slow client got them, by a newer one of the same stream.",
    "counter",
)
QUEUED_BYTES: Final = Family(
    "tickstream_gateway_queued_bytes",
    "Bytes of frames queued for all WebSocket clients (as counted against the bound).",
    "gauge",
)
HISTORY_READS: Final = Family(
    "tickstream_gateway_history_reads_total",
    "Reads of a market's history from PostgreSQL (shared by the subscribers waiting for it).",
    "counter",
)
HISTORY_BARS: Final = Family(
    "tickstream_gateway_history_bars",
    "Bars held in memory over all markets (at most markets x (GATEWAY_HISTORY_MINUTES + 1)).",
    "gauge",
)
FEED_PARTITIONS: Final = Family(
    "tickstream_gateway_feed_partitions",
    "Tick topic partitions the gateway's feed reads: those of markets a client watches, or"
    " left less than GATEWAY_FEED_GRACE_MS ago.",
    "gauge",
)
# Labelled by a fixed set of reasons (the error codes and close reasons of docs/protocol.md).
WEBSOCKET_REFUSED: Final = Counter(
    "tickstream_gateway_websocket_refused",
    "WebSocket upgrades refused, by reason: forbidden_origin, unauthorized, too_many_connections.",
    ["reason"],
)
WEBSOCKET_CLOSED: Final = Counter(
    "tickstream_gateway_websocket_closed",
    "WebSocket clients closed by the gateway for a limit, by reason: too_many_commands (1008),"
    " token_expired (4001); slow clients (1013) count in slow_clients_closed.",
    ["reason"],
)
# Labelled by route template (`/api/metrics/{metric_id:str}`), never by the raw path, so
# made-up URLs cannot create series without bound: they all count as "unmatched".
HTTP_REQUESTS: Final = Counter(
    "tickstream_http_requests",
    "HTTP requests answered, by route and status code.",
    ["route", "status"],
)


def track_hub(hub: Hub, history: MarketHistory) -> None:
    """Export the hub's clients, queues and history, and the history reads, while they live."""
    READINGS.track(hub, current=_hub_readings)
    # Totals, not current readings: retired into the process's totals when the history is
    # collected, so the counter never drops (several gateways in one process: the tests).
    READINGS.track(history, totals=functools.partial(_history_readings, history.counted))


def _hub_readings(hub: Hub) -> list[Reading]:
    return [
        (CONNECTIONS, (), len(hub.sessions)),
        (SLOW_CLIENTS_CLOSED, (), hub.counters.slow_clients_closed),
        (FRAMES_CONFLATED, (), hub.counters.conflated_frames),
        (QUEUED_BYTES, (), sum(s.outbox.queued_bytes for s in hub.sessions)),
        (HISTORY_BARS, (), hub.recent.bars_held()),
        (FEED_PARTITIONS, (), hub.interest.assigned_partitions),
    ]


def _history_readings(counted: ReadCount) -> list[Reading]:
    return [(HISTORY_READS, (), counted.reads)]


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
            _requests_counter(route, status).inc()


@functools.cache
def _requests_counter(route: str, status: int) -> Any:
    # The labelled child, looked up once per (route, status): `labels()` validates and joins
    # its arguments each call, a few % of a cached `/api/ranks` answer. Bounded: routes are
    # templates and statuses a few codes, so the cache holds what HTTP_REQUESTS holds.
    return HTTP_REQUESTS.labels(route=route, status=str(status))
