"""The WebSocket protocol, sans I/O: parse client frames into commands, build server frames."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from tickstream_shared.errors import BadIdentifier
from tickstream_shared.naming import Market, MetricKind, parse_kind
from tickstream_shared.schemas import Alert, Tick

Channel = Literal["market", "ranks", "alerts"]
MAX_FRAME_BYTES = 4096


class ProtocolError(Exception):
    """A client frame we cannot act on; `code` and message go back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a client asked for: one market's ticks, one kind's ranks, or all alerts."""

    channel: Channel
    market: Market | None = None
    kind: MetricKind | None = None

    def describe(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"channel": self.channel}
        if self.market is not None:
            frame["market"] = self.market.id
        if self.kind is not None:
            frame["kind"] = self.kind
        return frame


@dataclass(frozen=True, slots=True)
class Subscribe:
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Command = Subscribe | Unsubscribe | Ping


def parse_command(frame: str | bytes) -> Command:
    """Parse one client frame; raises ProtocolError saying exactly what is wrong."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("frame_too_large", f"frames are limited to {MAX_FRAME_BYTES} bytes")
    try:
        obj = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"frame is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object with an 'op' field")
    op = obj.get("op")
    if op == "ping":
        return Ping()
    if op not in ("subscribe", "unsubscribe"):
        raise ProtocolError("bad_request", "'op' must be one of: subscribe, unsubscribe, ping")
    subscription = _parse_subscription(obj)
    return Subscribe(subscription) if op == "subscribe" else Unsubscribe(subscription)


def _parse_subscription(obj: dict[str, Any]) -> Subscription:
    channel = obj.get("channel")
    if channel == "alerts":
        return Subscription("alerts")
    if channel == "market":
        market = obj.get("market")
        if not isinstance(market, str):
            raise ProtocolError("bad_request", "channel 'market' needs 'market': '<ex>:<b>-<q>'")
        try:
            return Subscription("market", market=Market.parse(market))
        except BadIdentifier as exc:
            raise ProtocolError("bad_market", str(exc)) from exc
    if channel == "ranks":
        kind = obj.get("kind")
        try:
            return Subscription("ranks", kind=parse_kind(kind if isinstance(kind, str) else ""))
        except BadIdentifier as exc:
            raise ProtocolError("bad_kind", f"channel 'ranks' needs 'kind': {exc}") from exc
    raise ProtocolError("bad_request", "'channel' must be one of: market, ranks, alerts")


def tick_point(tick: Tick) -> dict[str, Any]:
    return {"ts": tick.exchange_ts, "seq": tick.seq, "price": tick.price, "volume": tick.volume}


def tick_frame(tick: Tick) -> dict[str, Any]:
    return {"type": "tick", "market": tick.market.id, **tick_point(tick)}


def history_frame(market: Market, ticks: list[Tick]) -> dict[str, Any]:
    return {"type": "history", "market": market.id, "ticks": [tick_point(t) for t in ticks]}


def alert_frame(alert: Alert) -> dict[str, Any]:
    return {"type": "alert", "alert": alert.as_json()}


def error_frame(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}
