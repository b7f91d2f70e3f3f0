"""The /ws endpoint: a reader applying client commands and a writer draining the client queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.websockets import WebSocket

from tickstream_gateway.hub import ClientSession, Hub
from tickstream_gateway.protocol import (
    Ping,
    ProtocolError,
    Subscribe,
    Subscription,
    error_frame,
    history_frame,
    parse_command,
)
from tickstream_gateway.ranks import rank_snapshot
from tickstream_gateway.state import GatewayState
from tickstream_shared import db
from tickstream_shared.consuming import is_transient
from tickstream_shared.schemas import Tick

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
            log.warning("closing a slow client: %d frames queued", session.queue.qsize())
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect")
    finally:
        for task in (reader, writer, overflow):
            task.cancel()
        await asyncio.gather(reader, writer, overflow, return_exceptions=True)
        state.hub.disconnect(session)


async def _write(websocket: WebSocket, session: ClientSession) -> None:
    while True:
        frame = await session.queue.get()
        await websocket.send_text(json.dumps(frame, separators=(",", ":")))


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
                session.offer({"type": "pong"})
            elif isinstance(command, Subscribe):
                await _subscribe(session, command.subscription, state)
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


async def _subscribe(session: ClientSession, sub: Subscription, state: GatewayState) -> None:
    hub = state.hub
    session.offer({"type": "subscribed", **sub.describe()})
    if sub.channel == "alerts":
        session.alerts = True
    elif sub.kind is not None:
        session.rank_kinds.add(sub.kind)
        snapshot = hub.latest_ranks.get(sub.kind)
        if snapshot is None:
            snapshot = {"type": "ranks", **await rank_snapshot(state.redis, sub.kind)}
        session.offer(snapshot)
    elif sub.market is not None:
        await _subscribe_market(session, sub, state, hub)


async def _subscribe_market(
    session: ClientSession, sub: Subscription, state: GatewayState, hub: Hub
) -> None:
    market = sub.market
    assert market is not None
    # Hold live ticks first, then read history: nothing can fall between the two.
    hub.hold_market(session, market)
    span_ms = state.settings.gateway.history_seconds * 1000
    try:
        stored = await db.recent_ticks(state.pool, market.id, span_ms)
    except BaseException:
        hub.drop_market(session, market)  # nothing held for a subscription that failed
        raise
    history = _merge(stored, hub.recent_ticks(market), span_ms)
    if not history:
        hub.drop_market(session, market)
        session.offer(
            {
                "type": "error",
                "code": "unknown_market",
                "message": f"no ticks for market {market.id!r}; see GET /api/metrics",
            }
        )
        return
    session.offer(history_frame(market, history))
    last = history[-1]
    hub.release_market(session, market, (last.exchange_ts, last.seq))


def _merge(stored: list[Tick], recent: list[Tick], span_ms: int) -> list[Tick]:
    """Stored history plus ticks seen live but not yet stored, without duplicates."""
    by_key = {(t.exchange_ts, t.seq): t for t in stored}
    for tick in recent:
        by_key.setdefault((tick.exchange_ts, tick.seq), tick)
    if not by_key:
        return []
    ordered = [by_key[k] for k in sorted(by_key)]
    newest = ordered[-1].exchange_ts
    return [t for t in ordered if t.exchange_ts > newest - span_ms]


def _unsubscribe(session: ClientSession, sub: Subscription, hub: Hub) -> None:
    if sub.channel == "alerts":
        session.alerts = False
    elif sub.kind is not None:
        session.rank_kinds.discard(sub.kind)
    elif sub.market is not None:
        hub.drop_market(session, sub.market)
    session.offer({"type": "unsubscribed", **sub.describe()})
