"""The /ws endpoint: a reader applying client commands and a writer draining the client queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket

from tickstream_gateway.hub import ClientSession, Hub
from tickstream_gateway.protocol import (
    PONG_FRAME,
    Ping,
    ProtocolError,
    Subscribe,
    Subscription,
    error_frame,
    parse_command,
    ranks_frame,
    status_frame,
)
from tickstream_gateway.ranks import rank_snapshot
from tickstream_gateway.state import GatewayState
from tickstream_shared.consuming import is_transient

log = logging.getLogger("tickstream.gateway.ws")

CLOSE_TRY_AGAIN_LATER = 1013


async def websocket_endpoint(websocket: WebSocket) -> None:
    state: GatewayState = websocket.state.gateway
    await websocket.accept()
    session = state.hub.connect()
    reader = asyncio.create_task(_read(websocket, session, state))
    writer = asyncio.create_task(_write(websocket, session))
    overflow = asyncio.create_task(session.overflowed.wait())
    try:
        done, _ = await asyncio.wait(
            {reader, writer, overflow}, return_when=asyncio.FIRST_COMPLETED
        )
        if reader in done and not reader.cancelled() and reader.exception() is not None:
            log.error("closing a client after an unexpected error: %r", reader.exception())
        if overflow in done:
            log.warning(
                "closing a slow client: %d frames (%d bytes) queued",
                len(session.outbox),
                session.outbox.queued_bytes,
            )
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect")
    finally:
        for task in (reader, writer, overflow):
            task.cancel()
        await asyncio.gather(reader, writer, overflow, return_exceptions=True)
        state.hub.disconnect(session)


async def _write(websocket: WebSocket, session: ClientSession) -> None:
    # Sending waits while the socket's buffer is full; meanwhile the outbox conflates.
    while True:
        frame = await session.outbox.get()
        await websocket.send_text(frame.text)


async def _read(websocket: WebSocket, session: ClientSession, state: GatewayState) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        try:
            if text is None:
                raise ProtocolError("bad_request", "frames must be text (JSON), not binary")
            command = parse_command(text)
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
    if sub.market is not None:
        # A market subscribed again restarts: its old live updates stop before `subscribed`.
        hub.drop_market(session, sub.market.id)
    session.offer(status_frame("subscribed", sub))
    if sub.channel == "alerts":
        session.alerts = True
    elif sub.kind is not None and sub.measure is not None:
        # One rank subscription per kind: subscribing again with another `by` switches it.
        session.rank_measures[sub.kind] = sub.measure
        key = (sub.kind, sub.measure)
        if key not in hub.latest_ranks:  # only before the poller's first round
            try:
                fetched = ranks_frame(await rank_snapshot(state.redis, sub.kind, sub.measure))
            except BaseException:
                session.rank_measures.pop(sub.kind, None)
                raise
            # A push during the query was newer and already sent; never send an older one.
            hub.latest_ranks.setdefault(key, fetched)
        session.offer(hub.latest_ranks[key])
    elif sub.market is not None:
        await _subscribe_market(session, sub.market.id, command.since, state)


async def _subscribe_market(
    session: ClientSession, market_id: str, since: int | None, state: GatewayState
) -> None:
    await state.history.load(market_id)
    reply = state.history.reply(market_id, since)
    if reply is None:
        session.offer(
            error_frame("unknown_market", f"no bars for market {market_id!r}; see GET /api/metrics")
        )
        return
    # No await from the reply to going live: every later update is newer than the history.
    for frame in reply.frames:
        session.offer(frame)
    state.hub.watch_market(session, market_id, reply.after_seq)


def _unsubscribe(session: ClientSession, sub: Subscription, hub: Hub) -> None:
    if sub.channel == "alerts":
        session.alerts = False
    elif sub.kind is not None:
        session.rank_measures.pop(sub.kind, None)
    elif sub.market is not None:
        hub.drop_market(session, sub.market.id)
    session.offer(status_frame("unsubscribed", sub))
