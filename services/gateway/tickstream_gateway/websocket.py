"""The WebSocket connection below ASGI: uvicorn's sans-I/O protocol, handed over after accept.

The upgrade goes through the Starlette app as any request does (origin, token, the connection
cap, the access log: ws.py), and the endpoint accepts it. From then on the gateway's
`ClientConnection` (ws.py) owns the socket through this protocol instead of ASGI messages:

- Writes go straight to the transport, several frames in one write, each frame's bytes built
  once for every client (`Frame.wire`); with ASGI each frame was a message dict, a wait, a
  frame header and a copy, per client.
- Reads arrive as callbacks (`received`), not through a queue and a task; keepalive pings and
  the closing handshake stay uvicorn's.
- The endpoint returns after the hand-over, so an idle connection holds no task and no ASGI
  scope or middleware frames: the protocol, its parser, the session and its outbox.
- The transport buffers nothing the kernel did not take (`set_write_buffer_limits(0)`): a frame
  still in the outbox can give way to a newer state (the freshness rule), one in a buffer
  cannot. The socket's kernel send buffer is capped for the same reason
  (`SEND_BUFFER_BYTES`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Final, Protocol

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from tickstream_gateway.protocol import Frame

log = logging.getLogger("tickstream.gateway.websocket")

# Key of the ASGI scope's "extensions" under which the endpoint finds this protocol.
HANDOVER: Final = "tickstream.websocket"
# The kernel's send buffer of a client socket (Linux doubles it for its bookkeeping). Loopback
# and LAN autotuning grows it to megabytes, which a slow reader fills with minutes-old frames
# the gateway can no longer replace; this much carries a market's updates many times over
# (100 updates/s of ~200 bytes is 20 KB/s) on any round trip below a second.
SEND_BUFFER_BYTES: Final = 64 * 1024
# Longest wait for the client's answer to our close frame before the socket is dropped: a
# client that does not read would otherwise keep its connection, and its outbox, for good.
CLOSE_WAIT_S: Final = 5.0


class _Flag:
    """What uvicorn's protocol uses its `writable` asyncio.Event for, once nothing awaits it:
    set, clear, is_set. An Event holds a deque of waiters (~600 bytes) per connection."""

    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def set(self) -> None:
        self.value = True

    def clear(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


class _NoReceiver:
    """uvicorn's protocol queues ASGI receive events for the app; once the connection is
    taken over none reads them. Stands in for that asyncio.Queue (four deques, ~2.5 KiB per
    connection)."""

    __slots__ = ()

    def put_nowait(self, message: object) -> None:
        pass

    def empty(self) -> bool:
        return True


_NO_RECEIVER: Final = _NoReceiver()


class SocketOwner(Protocol):
    """What the protocol tells the connection that took it over (ws.ClientConnection)."""

    def received(self, message: str | bytes) -> None: ...

    def writable(self) -> None: ...

    def lost(self) -> None: ...


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, which the gateway takes over after the handshake.

    Until `take_over` it is uvicorn's: the ASGI app runs the handshake. After, messages go to
    the owner's `received`, the end of the connection to its `lost`, and the owner writes
    frames with `write_frames` while `can_write`.
    """

    owner: SocketOwner | None = None

    def handle_connect(self, event: object) -> None:
        super().handle_connect(event)  # type: ignore[arg-type]
        if self.handshake_initiated and not self.close_sent:  # 101 ahead: the app runs
            extensions: dict[str, object] = self.scope["extensions"]  # type: ignore[assignment]
            extensions[HANDOVER] = self

    def take_over(self, owner: SocketOwner) -> bool:
        """Hand the accepted connection to `owner`; False if it is already gone.

        Messages that arrived before are given to the owner now, in order.
        """
        if self.disconnected or self.close_sent:
            return False
        self.owner = owner
        self.transport.set_write_buffer_limits(high=0)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            except OSError as exc:  # not a TCP socket (tests over a Unix socket): keep its own
                log.debug("send buffer not set: %r", exc)
        # Nothing of the handshake is needed any more; an idle connection should not hold it.
        self.request = self.response = None  # type: ignore[assignment]
        self.scope = {}  # type: ignore[typeddict-item]
        queued, self.queue = self.queue, _NO_RECEIVER  # type: ignore[assignment]
        self.writable = _Flag(self.writable.is_set())  # type: ignore[assignment]
        while not queued.empty():
            message = queued.get_nowait()
            if message["type"] == "websocket.receive":
                text = message.get("text")
                owner.received((message.get("bytes") or b"") if text is None else text)
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        return True

    # Reading.

    def send_receive_event_to_app(self) -> None:
        owner = self.owner
        if owner is None:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # closing: reads go on only for the peer's close reply
        if self.curr_msg_data_type == "text":
            try:
                message: str | bytes = data.decode()
            except UnicodeDecodeError:
                self.close(1007, "invalid UTF-8")
                return
        else:
            message = data
        owner.received(message)

    def pause_reading(self) -> None:
        """Stop reading the client (its commands wait for a slow one before them)."""
        if not self.read_paused and not self.close_sent:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    # Writing.

    def can_write(self) -> bool:
        """Whether frames written now go out: open, and the kernel took everything before."""
        return self.writable.is_set() and not self.close_sent and not self.disconnected

    def write_frames(self, frames: Sequence[Frame]) -> None:
        """Send `frames` in one write. Frames go as built unless the connection compresses."""
        if self.conn.extensions:  # permessage-deflate: compressed per connection
            for frame in frames:
                self.conn.send_text(frame.body)
            self.transport.write(b"".join(self.conn.data_to_send()))
        elif len(frames) == 1:
            self.transport.write(frames[0].wire)
        else:
            self.transport.write(b"".join([frame.wire for frame in frames]))

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.owner is not None:
            self.owner.writable()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the socket is dropped if the client has not answered
        within CLOSE_WAIT_S (or cannot be written to at all). Idempotent."""
        if self.close_sent or self.disconnected:
            return
        self.close_sent = True
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.resume_reading()
        self.close_timer = self.loop.call_later(CLOSE_WAIT_S, self._close_unanswered, code)

    def _close_unanswered(self, code: int) -> None:
        self.close_timer = None
        log.warning("no answer to close frame %d in %gs (not read?): dropped", code, CLOSE_WAIT_S)
        self.transport.abort()

    # The end.

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.lost()

    async def run_asgi(self) -> None:
        """uvicorn's, except that a connection taken over stays open when the app returns."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.owner is None and self.close_timer is None:
            self.transport.close()


def taken_over(scope_extensions: dict[str, object]) -> GatewayWebSocketProtocol | None:
    """The protocol of an upgrade being served by GatewayWebSocketProtocol, else None."""
    found = scope_extensions.get(HANDOVER)
    return found if isinstance(found, GatewayWebSocketProtocol) else None
