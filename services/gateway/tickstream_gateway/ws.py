"""The /ws endpoint: a reader applying client commands and a writer draining the client queue."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.websockets import WebSocket

from tickstream_gateway import api
from tickstream_gateway.access import TOKEN_EXPIRES_AT, refuse_websocket
from tickstream_gateway.hub import ClientSession, Hub, rank_frame
from tickstream_gateway.protocol import (
    PONG_FRAME,
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
from tickstream_shared.consuming import is_transient
from tickstream_shared.errors import echo

log = logging.getLogger("tickstream.gateway.ws")

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOKEN_EXPIRED = 4001  # private-use range: a client tells it from the other closes
_SENDS_PER_TURN = 4
_CLOSE_WAIT_S = 5.0
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
    # Counted before the first await: upgrades arriving together cannot overshoot the limit.
    session = state.hub.connect()
    try:
        await websocket.accept()
    except BaseException:
        state.hub.disconnect(session)
        raise
    reader = asyncio.create_task(_read(websocket, session, state))
    writer = asyncio.create_task(_write(websocket, session))
    overflow = asyncio.create_task(session.overflowed.wait())
    tasks = [reader, writer, overflow]
    expiry = None
    expires_at: float | None = websocket.scope.get("state", {}).get(TOKEN_EXPIRES_AT)
    if expires_at is not None:  # only with GATEWAY_JWT_SECRET: no task per connection else
        expiry = asyncio.create_task(asyncio.sleep(max(0.0, expires_at - time.time())))
        tasks.append(expiry)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if reader in done and not reader.cancelled() and reader.exception() is not None:
            log.error("closing a client after an unexpected error: %r", reader.exception())
            await _close(websocket, CLOSE_INTERNAL_ERROR, "internal error")
        if overflow in done:
            log.warning(
                "closing a slow client: %d frames (%d bytes) queued",
                len(session.outbox),
                session.outbox.queued_bytes,
            )
            await _close(websocket, CLOSE_TRY_AGAIN_LATER, "too slow: reconnect")
        elif expiry in done:
            WEBSOCKET_CLOSED.labels(reason="token_expired").inc()
            await _close(websocket, CLOSE_TOKEN_EXPIRED, "token expired")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        state.hub.disconnect(session)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Send a close frame, waiting at most _CLOSE_WAIT_S for room in the socket's buffer: a
    client that does not read would otherwise keep its connection, and its outbox, for good.
    Past that the connection is dropped without one."""
    try:
        async with asyncio.timeout(_CLOSE_WAIT_S):
            await websocket.close(code, reason)
    except TimeoutError:
        log.warning("no room for close frame %d in %gs: dropped", code, _CLOSE_WAIT_S)
    except Exception as exc:  # the client went away first: nothing left to tell it
        log.debug("close %d not sent: %r", code, exc)


async def _write(websocket: WebSocket, session: ClientSession) -> None:
    # Sending waits while the socket's buffer is full; meanwhile the outbox keeps only fresh
    # states. One frame per take, not a batch: a frame taken waits here through that wait,
    # where it can no longer give way to a newer one (the freshness rule is applied per take).
    sent = 0
    while True:
        frame = await session.outbox.get()
        await websocket.send_text(frame.text)
        sent += 1
        if sent % _SENDS_PER_TURN == 0:
            # A send that finds room does not suspend: without this, each of a thousand
            # clients with a backlog would send all of it in one loop turn, and probes and
            # commands wait for every one of those turns.
            await asyncio.sleep(0)


async def _read(websocket: WebSocket, session: ClientSession, state: GatewayState) -> None:
    limits = state.settings.gateway
    commands = TokenBucket(limits.max_commands_per_s, limits.command_burst, time.monotonic())
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        # Every frame counts, malformed ones too: refusing costs the gateway little, but a
        # client must not make it parse and answer without bound.
        verdict = commands.take(time.monotonic())
        if verdict is Verdict.CLOSE:
            log.warning("closing a client that kept sending past the command rate limit")
            WEBSOCKET_CLOSED.labels(reason="too_many_commands").inc()
            await _close(websocket, CLOSE_POLICY_VIOLATION, "too many commands")
            return
        text = message.get("text")
        try:
            if verdict is Verdict.REFUSE:
                raise ProtocolError(
                    "rate_limited",
                    f"more than {limits.max_commands_per_s:g} commands/s"
                    f" (bursts of {limits.command_burst}); this one was ignored, slow down",
                )
            command = parse_command(message.get("bytes", b"") if text is None else text)
            if isinstance(command, Ping):
                session.offer(PONG_FRAME)
            elif isinstance(command, Subscribe):
                await _subscribe(session, command, state)
            else:
                _unsubscribe(session, command.subscription, state.hub)
        except ProtocolError as exc:
            session.offer(error_frame(exc.code, exc.message))
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("subscribe failed, storage unavailable: %r", exc)
            session.offer(
                error_frame("unavailable", "storage is unavailable right now; subscribe again")
            )


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
