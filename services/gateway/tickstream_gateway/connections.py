"""uvicorn's HTTP protocol with the gateway's socket defences: request deadline, idle close, cap."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Counter
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from tickstream_shared.settings import GatewaySettings

HTTP_CLOSED: Final = Counter(
    "tickstream_gateway_http_closed",
    "HTTP connections closed by the gateway, by reason: request_timeout (no whole request"
    " within GATEWAY_REQUEST_READ_TIMEOUT_S), too_many_sockets (beyond GATEWAY_MAX_SOCKETS).",
    ["reason"],
)
_BUSY_BODY: Final = json.dumps(
    {"error": "too_many_sockets", "message": "the gateway holds all the connections it may"}
).encode()
# Written before the request is read: a client gets an answer, not a reset; then closed.
_BUSY_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\nconnection: close\r\n"
    b"retry-after: 1\r\n\r\n" + _BUSY_BODY
)


@dataclass(frozen=True, slots=True)
class SocketLimits:
    """What a client connection may hold: see the GATEWAY_* settings of the same names."""

    request_read_timeout_s: float
    keep_alive_timeout_s: float
    max_sockets: int

    @classmethod
    def of(cls, settings: GatewaySettings) -> SocketLimits:
        return cls(
            settings.request_read_timeout_s, settings.keep_alive_timeout_s, settings.max_sockets
        )


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes clients slow to send a request and refuses past a cap.

    uvicorn closes a connection idle after an answer (its keep-alive timeout) but has no
    deadline for the request itself with httptools: a client connecting and sending nothing,
    or a header a byte at a time, held its socket forever. Here a connection must send a
    whole request within `request_read_timeout_s` of opening, and then of the first byte of
    each next one (bytes that start no request count too). Once upgraded to a WebSocket the
    connection belongs to the WebSocket protocol, and none of these timers apply to it.
    """

    limits: SocketLimits  # set by `guarded_protocol`

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.timeout_keep_alive = self.limits.keep_alive_timeout_s  # type: ignore[assignment]
        self._reading: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Counted before this one joins: WebSockets are in uvicorn's set too.
        if len(self.connections) >= self.limits.max_sockets:
            HTTP_CLOSED.labels(reason="too_many_sockets").inc()
            self.transport = transport
            transport.write(_BUSY_RESPONSE)
            transport.close()
            return
        super().connection_made(transport)
        self._start_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_reading()
        if self.flow is None:  # refused in connection_made: uvicorn never saw it
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._start_reading()  # between requests: these bytes must make one in time
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._start_reading()  # a pipelined request, while the one before is answered
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._stop_reading()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._stop_reading()
        super().handle_websocket_upgrade()

    def _start_reading(self) -> None:
        # Not restarted while running: trickling bytes must not extend the deadline.
        if self._reading is None:
            self._reading = self.loop.call_later(
                self.limits.request_read_timeout_s, self._request_timed_out
            )

    def _stop_reading(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None

    def _request_timed_out(self) -> None:
        self._reading = None
        if not self.transport.is_closing():
            HTTP_CLOSED.labels(reason="request_timeout").inc()
            self.transport.close()


def guarded_protocol(limits: SocketLimits) -> type[GuardedHttpProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), bound to `limits`."""
    return type("GatewayHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})
