"""The /ws endpoint: the handshake through ASGI, then a connection driven by its socket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Final

from starlette.websockets import WebSocket

from tickstream_gateway import api
from tickstream_gateway.access import TOKEN_EXPIRES_AT, refuse_websocket
from tickstream_gateway.hub import ClientSession, Hub, rank_frame
from tickstream_gateway.protocol import (
    PONG_FRAME,
    Frame,
    Ping,
    ProtocolError,
    Subscribe,
    Subscription,
    error_frame,
    parse_command,
    status_frame,
)
from tickstream_gateway.ranks import read_boards
from tickstream_gateway.state import GatewayState
from tickstream_gateway.telemetry import WEBSOCKET_CLOSED
from tickstream_gateway.token_bucket import TokenBucket, Verdict
from tickstream_gateway.websocket import GatewayWebSocketProtocol, taken_over
from tickstream_shared.consuming import is_transient
from tickstream_shared.errors import echo

log = logging.getLogger("tickstream.gateway.ws")

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOKEN_EXPIRED = 4001  # private-use range: a client tells it from the other closes
# At most this many bytes of frames go to one client per write; more wait for the next loop
# turn, so that a client with a backlog does not hold up every other one's turn.
WRITE_BATCH_BYTES: Final = 64 * 1024
# Bytes of commands waiting behind a subscribe (which waits for storage): past this the client's
# socket is not read until they are done, so a client cannot queue commands without bound.
# Not a handful: while a connection is not read, neither are the pongs to its keepalive pings
# (the gateway closes it after 20 s) nor its pings (its client gives up), and a client that
# subscribes to 100 new markets at once waits up to 3 s for each (FEED_SETTLE_WAIT_S).
MAX_WAITING_BYTES: Final = 64 * 1024
# How long a first subscriber of a market waits for the feed to start reading it (normally a
# few hundred ms: one assignment change and one fetch); past that it is answered anyway.
FEED_SETTLE_WAIT_S = 3.0


async def websocket_endpoint(websocket: WebSocket) -> None:
    state: GatewayState = websocket.state.gateway
    limit = state.settings.gateway.max_connections
    if len(state.hub.sessions) >= limit:
        reason = "too_many_connections"
        full = api.error(503, reason, f"the gateway serves at most {limit}")
        await refuse_websocket(websocket.scope, websocket.receive, websocket.send, full, reason)
        return
    socket = taken_over(websocket.scope.get("extensions") or {})
    if socket is None:
        # One implementation of the connection: it needs the gateway's own protocol, which
        # service.py gives uvicorn. Any other server is refused rather than served otherwise.
        log.error("/ws needs GatewayWebSocketProtocol (tickstream_gateway.websocket) as ws=")
        await websocket.close(CLOSE_INTERNAL_ERROR)
        return
    # Counted before the first await: upgrades arriving together cannot overshoot the limit.
    session = state.hub.connect()
    try:
        await websocket.accept()
    except BaseException:
        state.hub.disconnect(session)
        raise
    expires_at: float | None = websocket.scope.get("state", {}).get(TOKEN_EXPIRES_AT)
    ClientConnection(socket, session, state, expires_at)
    # Returning ends the ASGI task: the connection lives on in its socket's callbacks.


class ClientConnection:
    """One client after the handshake, driven by its socket's callbacks: no task of its own
    but while a subscribe waits for storage.

    - Frames: the outbox's wakeup schedules one write (`_flush`) of every frame queued by
      then (a batch of updates is one write) while the kernel takes them, at most one per
      GATEWAY_MAX_FRAME_AGE_MS: each write carries every must-deliver frame and each
      stream's newest state (the freshness rule, docs/protocol.md).
    - Commands: applied as they arrive, in order; those behind a subscribe wait for it.
    - Ends: the client's close, a slow client's overflow (1013), too many commands (1008), an
      expired token (4001) or an unexpected error (1011); the session is forgotten when the
      socket is gone (`lost`).
    """

    __slots__ = (
        "closing",
        "commands",
        "expiry",
        "flush_due",
        "interval",
        "session",
        "socket",
        "state",
        "waiting",
        "waiting_bytes",
        "worker",
        "written_at",
    )

    def __init__(
        self,
        socket: GatewayWebSocketProtocol,
        session: ClientSession,
        state: GatewayState,
        expires_at: float | None,
    ) -> None:
        self.socket = socket
        self.session = session
        self.state = state
        limits = state.settings.gateway
        self.commands = TokenBucket(
            limits.max_commands_per_s, limits.command_burst, time.monotonic()
        )
        # Commands received while a subscribe runs, with whether the rate limit refused them
        # (made when first needed: an idle connection holds no deque).
        self.waiting: deque[tuple[str | bytes, bool]] | None = None
        self.waiting_bytes = 0
        self.worker: asyncio.Task[None] | None = None
        self.flush_due = False
        # Writes are at least this far apart while frames keep coming (GATEWAY_MAX_FRAME_AGE_MS):
        # between them a stream's newer state replaces the pending one, so a client receives
        # at most one state per stream per interval however fast its markets update, and no
        # frame waits here longer than that.
        self.interval = limits.max_frame_age_ms / 1000
        self.written_at = 0.0  # loop time of the last write
        self.closing = False
        self.expiry: asyncio.TimerHandle | None = None
        if expires_at is not None:  # only with GATEWAY_JWT_SECRET
            self.expiry = socket.loop.call_later(
                max(0.0, expires_at - time.time()), self._token_expired
            )
        session.outbox.wakeup = self._wake
        if not socket.take_over(self):
            self.lost()
        elif len(session.outbox):
            self._wake()

    # Frames to the client.

    def _wake(self) -> None:
        if not self.flush_due:
            self.flush_due = True
            loop = self.socket.loop
            due = self.written_at + self.interval
            if due <= loop.time():
                self.state.writes_due.add(self._flush, loop)
            else:
                loop.call_at(due, self._flush)

    def writable(self) -> None:
        self._wake()

    def _flush(self) -> None:
        self.flush_due = False
        outbox = self.session.outbox
        if self.closing:
            return
        if outbox.overflowed:
            log.warning(
                "closing a slow client: %d frames (%d bytes) queued",
                len(outbox),
                outbox.queued_bytes,
            )
            self.close(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect")
            return
        if not self.socket.can_write():
            return  # the socket calls `writable` once the kernel has taken what it holds
        frames: list[Frame] = []
        size = 0
        now = time.monotonic()
        while size < WRITE_BATCH_BYTES and len(outbox):
            frame = outbox.get_nowait(now)
            frames.append(frame)
            size += frame.size
        if frames:
            self.socket.write_frames(frames)
            self.written_at = self.socket.loop.time()
        if len(outbox) and not self.flush_due:
            # More than one write's worth: the rest in the next turn, not an interval later.
            self.flush_due = True
            self.state.writes_due.add(self._flush, self.socket.loop)

    # Commands from the client.

    def received(self, message: str | bytes) -> None:
        if self.closing:
            return
        # Every frame counts, malformed ones too: refusing costs the gateway little, but a
        # client must not make it parse and answer without bound.
        verdict = self.commands.take(time.monotonic())
        if verdict is Verdict.CLOSE:
            log.warning("closing a client that kept sending past the command rate limit")
            WEBSOCKET_CLOSED.labels(reason="too_many_commands").inc()
            self.close(CLOSE_POLICY_VIOLATION, "too many commands")
            return
        refused = verdict is Verdict.REFUSE
        if self.worker is not None:
            if self.waiting is None:
                self.waiting = deque()
            if refused:
                message = b""  # answered with an error whatever it says: not kept
            self.waiting.append((message, refused))
            self.waiting_bytes += len(message)
            if self.waiting_bytes >= MAX_WAITING_BYTES:
                self.socket.pause_reading()
            return
        try:
            subscribe = self._apply(message, refused)
        except Exception as exc:
            self._failed(exc)
            return
        if subscribe is not None:
            self.worker = self.socket.loop.create_task(self._subscribe_in_order(subscribe))

    def _apply(self, message: str | bytes, refused: bool) -> Subscribe | None:
        """Apply a command that needs no wait; a subscribe is returned, to be awaited."""
        session = self.session
        try:
            if refused:
                limits = self.state.settings.gateway
                raise ProtocolError(
                    "rate_limited",
                    f"more than {limits.max_commands_per_s:g} commands/s"
                    f" (bursts of {limits.command_burst}); this one was ignored, slow down",
                )
            command = parse_command(message)
            if isinstance(command, Ping):
                session.offer(PONG_FRAME)
            elif isinstance(command, Subscribe):
                return command
            else:
                _unsubscribe(session, command.subscription, self.state.hub)
        except ProtocolError as exc:
            session.offer(error_frame(exc.code, exc.message))
        return None

    async def _subscribe_in_order(self, command: Subscribe) -> None:
        """Run a subscribe, then the commands that came meanwhile, until none is left."""
        try:
            next_command: Subscribe | None = command
            while next_command is not None:
                await self._subscribe(next_command)
                next_command = None
                waiting = self.waiting
                while next_command is None and waiting:
                    message, refused = waiting.popleft()
                    self.waiting_bytes -= len(message)
                    next_command = self._apply(message, refused)
                if self.waiting_bytes < MAX_WAITING_BYTES:
                    self.socket.resume_reading()
        except Exception as exc:
            self._failed(exc)
        finally:
            self.worker = None

    async def _subscribe(self, command: Subscribe) -> None:
        try:
            await _subscribe(self.session, command, self.state)
        except ProtocolError as exc:
            self.session.offer(error_frame(exc.code, exc.message))
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("subscribe failed, storage unavailable: %r", exc)
            self.session.offer(
                error_frame("unavailable", "storage is unavailable right now; subscribe again")
            )

    # The end.

    def _failed(self, exc: BaseException) -> None:
        log.error("closing a client after an unexpected error: %r", exc)
        self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _token_expired(self) -> None:
        self.expiry = None
        WEBSOCKET_CLOSED.labels(reason="token_expired").inc()
        self.close(CLOSE_TOKEN_EXPIRED, "token expired")

    def close(self, code: int, reason: str) -> None:
        """Close with `code`; frames still queued are not sent. Idempotent."""
        if not self.closing:
            self.closing = True
            self.socket.close(code, reason)

    def lost(self) -> None:
        """The socket is gone: forget the client. Idempotent."""
        self.closing = True
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.worker is not None:
            self.worker.cancel()
        self.session.outbox.wakeup = None
        self.state.hub.disconnect(self.session)


async def _subscribe(session: ClientSession, command: Subscribe, state: GatewayState) -> None:
    sub = command.subscription
    hub = state.hub
    limit = state.settings.gateway.max_subscriptions
    if not _holds(session, sub) and _subscription_count(session) >= limit:
        raise ProtocolError(
            "too_many_subscriptions", f"a connection holds at most {limit}; unsubscribe first"
        )
    if sub.market is not None:
        # A market subscribed again restarts: its old live updates stop before `subscribed`.
        hub.drop_market(session, sub.market.id)
    session.offer(status_frame("subscribed", sub))
    if sub.channel == "alerts":
        session.alerts = True
    elif sub.kind is not None and sub.measure is not None:
        # One rank subscription per kind: subscribing again with another `by` switches it.
        session.ranks[sub.kind] = sub
        key = (sub.kind, sub.measure)
        if key not in hub.latest_ranks:  # only before the poller's first round
            try:
                fetched = (await read_boards(state.redis, {}))[key]
            except BaseException:
                session.ranks.pop(sub.kind, None)
                raise
            # A push during the query was newer and already sent; never send an older one.
            hub.latest_ranks.setdefault(key, fetched)
        session.offer(rank_frame(session, sub, hub.latest_ranks[key]))
    elif sub.market is not None:
        await _subscribe_market(session, sub.market.id, command.since, state)


async def _subscribe_market(
    session: ClientSession, market_id: str, since: int | None, state: GatewayState
) -> None:
    hub = state.hub
    # The feed reads only watched markets: it starts on this one (if nobody else watches it)
    # before storage is read, so that the history reaches where live updates begin.
    hub.want_market(session, market_id)
    try:
        await hub.interest.wait_settled(market_id, FEED_SETTLE_WAIT_S)
        await state.history.load(market_id)
    except BaseException:
        hub.drop_market(session, market_id)
        raise
    reply = state.history.reply(market_id, since)
    if reply is None:
        hub.drop_market(session, market_id, linger=False)
        session.offer(
            error_frame("unknown_market", f"no bars for market {echo(market_id)}; see /api/metrics")
        )
        return
    # No await from the reply to going live: every later update is newer than the history.
    for frame in reply.frames:
        session.offer(frame)
    state.hub.watch_market(session, market_id, reply.after_seq)
    # The client's ranks frames now hold this market among its own: send them at once
    # rather than at the next change of each ranking.
    state.hub.resend_ranks(session)


def _holds(session: ClientSession, sub: Subscription) -> bool:
    """Whether subscribing to `sub` again replaces a subscription rather than adding one."""
    if sub.channel == "alerts":
        return session.alerts
    if sub.kind is not None:
        return sub.kind in session.ranks
    return sub.market is not None and sub.market.id in session.markets


def _subscription_count(session: ClientSession) -> int:
    return len(session.markets) + len(session.ranks) + int(session.alerts)


def _unsubscribe(session: ClientSession, sub: Subscription, hub: Hub) -> None:
    if sub.channel == "alerts":
        session.alerts = False
    elif sub.kind is not None:
        session.ranks.pop(sub.kind, None)
    elif sub.market is not None:
        hub.drop_market(session, sub.market.id)
    session.offer(status_frame("unsubscribed", sub))
