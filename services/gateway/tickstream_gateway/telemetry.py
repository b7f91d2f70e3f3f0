"""The gateway's own Prometheus metrics: WebSocket clients and HTTP requests."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tickstream_gateway.history import MarketHistory, ReadCount
from tickstream_gateway.hub import Hub
from tickstream_shared.observability import READINGS, Family, Reading
from tickstream_shared.redaction import redact
from tickstream_shared.settings import GatewaySettings

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
    "States not sent to a client because a newer one of the same bar or ranking was pending.",
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


@dataclass(frozen=True, slots=True)
class AccessLog:
    """Which requests get a line in the access log: GATEWAY_ACCESS_LOG and its slow bound."""

    mode: str  # "off", "errors" or "all"
    slow_s: float  # with "errors": answers slower than this are logged too (0: none)

    @classmethod
    def of(cls, settings: GatewaySettings) -> AccessLog:
        return cls(settings.access_log, settings.access_log_slow_ms / 1000)

    def wants(self, status: int, seconds: float) -> bool:
        """Whether an answer with `status` that took `seconds` is logged."""
        if self.mode == "all":
            return True
        if self.mode == "off":
            return False
        return status >= 500 or (self.slow_s > 0 and seconds > self.slow_s)


ACCESS_LOG: Final = logging.getLogger("tickstream.gateway.access")
# What each kind of connection's first answer is, as an HTTP status.
_ANSWERS: Final = {"websocket.accept": 101, "websocket.close": 403}


class ObserveRequests:
    """ASGI middleware: counts HTTP requests in HTTP_REQUESTS once answered (or failed), and
    writes the access log lines `access_log` wants, of HTTP requests and WebSocket upgrades.

    The line's target is the raw path and query as the client sent it, its token redacted
    (and every line is redacted again when written, tickstream_shared.logs).
    """

    def __init__(self, app: ASGIApp, access_log: AccessLog) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        status = 500  # unless the app starts an answer
        started = time.perf_counter()
        answered: float | None = None
        # Read before the app runs: AccessControl takes the token out of the scope's query.
        target = redact(_target(scope))

        async def send_observed(message: Message) -> None:
            nonlocal status, answered
            if answered is None:
                if message["type"] in ("http.response.start", "websocket.http.response.start"):
                    status, answered = message["status"], time.perf_counter()
                elif message["type"] in _ANSWERS:
                    status, answered = _ANSWERS[message["type"]], time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            if kind == "http":
                # The router stores the matched route in the scope it was given (this one).
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                _requests_counter(route, status).inc()
            # A WebSocket's time is its handshake's, not its life's.
            seconds = (answered or time.perf_counter()) - started
            if self.access_log.wants(status, seconds):
                _log_access(scope, target, status, seconds)


def _target(scope: Scope) -> str:
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    target = raw_path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target


def _log_access(scope: Scope, target: str, status: int, seconds: float) -> None:
    method = scope.get("method", "GET") if scope["type"] == "http" else "WebSocket"
    client = scope.get("client")
    address = f"{client[0]}:{client[1]}" if client else "-"
    level = logging.WARNING if status >= 500 else logging.INFO
    ACCESS_LOG.log(
        level,
        "%s %s %d %.1fms %s",
        method,
        target,
        status,
        seconds * 1000,
        address,
        extra={
            "method": method,
            "target": target,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "client": address,
        },
    )


@functools.cache
def _requests_counter(route: str, status: int) -> Any:
    # The labelled child, looked up once per (route, status): `labels()` validates and joins
    # its arguments each call, a few % of a cached `/api/ranks` answer. Bounded: routes are
    # templates and statuses a few codes, so the cache holds what HTTP_REQUESTS holds.
    return HTTP_REQUESTS.labels(route=route, status=str(status))
