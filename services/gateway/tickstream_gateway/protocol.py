"""The WebSocket protocol, sans I/O: parse client frames into commands, build server frames."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from tickstream_shared.errors import BadIdentifier, echo
from tickstream_shared.naming import (
    DEFAULT_MEASURE,
    Market,
    MetricKind,
    RankMeasure,
    parse_kind,
    parse_measure,
)
from tickstream_shared.schemas import MAX_ID_CHARS, MAX_TS_MS, MIN_TS_MS, Alert, Tick

Channel = Literal["market", "ranks", "alerts"]
# A client frame's limits: its UTF-8 size (a command is ~100 bytes), and how deeply its JSON
# nests (a command nests once; json.loads recurses per level, so a few KB of brackets would
# otherwise end in RecursionError instead of an answer).
MAX_FRAME_BYTES: Final = 4096
MAX_JSON_DEPTH: Final = 16
_DIGITS: Final = re.compile(r"[0-9]{1,30}")


class ProtocolError(Exception):
    """A client request we cannot act on; `code` and message go back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a client asked for: one market's bars, one kind's ranks by a measure, or alerts.

    `measure` is None only in an unsubscribe, where `by` does not matter: a client holds at
    most one rank subscription per kind.
    """

    channel: Channel
    market: Market | None = None
    kind: MetricKind | None = None
    measure: RankMeasure | None = None

    def describe(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"channel": self.channel}
        if self.market is not None:
            frame["market"] = self.market.id
        if self.kind is not None:
            frame["kind"] = self.kind
        if self.measure is not None:
            frame["by"] = self.measure
        return frame


@dataclass(frozen=True, slots=True)
class Subscribe:
    subscription: Subscription
    since: int | None = None  # market channel: only bars with minute >= since in the history


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Command = Subscribe | Unsubscribe | Ping


def parse_command(frame: str | bytes) -> Command:
    """Parse one client frame (text, or bytes of a binary frame); raises ProtocolError.

    The error's code and message say exactly what is wrong, echoing at most
    MAX_ECHO_CHARS characters of the client's input.
    """
    if isinstance(frame, bytes):
        raise ProtocolError("bad_request", "frames must be text (JSON), not binary")
    if over_frame_limit(frame):
        raise ProtocolError("frame_too_large", f"frames are limited to {MAX_FRAME_BYTES} bytes")
    if nesting_exceeds(frame, MAX_JSON_DEPTH):
        raise ProtocolError("bad_json", f"frame nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(frame)
    except ValueError as exc:
        raise ProtocolError("bad_json", f"frame is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object with an 'op' field")
    op = obj.get("op")
    if op == "ping":
        return Ping()
    if op not in ("subscribe", "unsubscribe"):
        raise ProtocolError("bad_request", "'op' must be one of: subscribe, unsubscribe, ping")
    subscribing = op == "subscribe"
    subscription = _parse_subscription(obj, subscribing)
    if not subscribing:
        return Unsubscribe(subscription)
    since = parse_since(obj.get("since")) if subscription.channel == "market" else None
    return Subscribe(subscription, since)


def over_frame_limit(text: str) -> bool:
    """Whether `text` is more than MAX_FRAME_BYTES in UTF-8, the size the client sent."""
    if len(text) > MAX_FRAME_BYTES:
        return True  # at least one byte per character
    if len(text) * 4 <= MAX_FRAME_BYTES:
        return False  # at most four
    return len(text.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES


def nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON `text` opens more than `limit` arrays or objects inside each other.

    Brackets inside strings do not count. Malformed JSON is left to the parser: this only
    decides whether parsing is safe.
    """
    if text.count("[") + text.count("{") <= limit:
        return False  # every real command: no need to look closer
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _parse_subscription(obj: dict[str, Any], subscribing: bool) -> Subscription:
    channel = obj.get("channel")
    if channel == "alerts":
        return Subscription("alerts")
    if channel == "market":
        market = obj.get("market")
        if not isinstance(market, str):
            raise ProtocolError("bad_request", "channel 'market' needs 'market': '<ex>:<b>-<q>'")
        if len(market) > MAX_ID_CHARS:  # no tick can name it: such a market cannot exist
            raise ProtocolError("bad_market", f"market ids are at most {MAX_ID_CHARS} characters")
        try:
            return Subscription("market", market=Market.parse(market))
        except BadIdentifier as exc:
            raise ProtocolError("bad_market", str(exc)) from exc
    if channel == "ranks":
        raw_kind = obj.get("kind")
        try:
            kind = parse_kind(raw_kind if isinstance(raw_kind, str) else "")
        except BadIdentifier as exc:
            raise ProtocolError("bad_kind", f"channel 'ranks' needs 'kind': {exc}") from exc
        if not subscribing:
            return Subscription("ranks", kind=kind)
        return Subscription("ranks", kind=kind, measure=parse_by(kind, obj.get("by")))
    raise ProtocolError("bad_request", "'channel' must be one of: market, ranks, alerts")


def parse_by(kind: MetricKind, value: object) -> RankMeasure:
    """The rank measure asked for (default std); raises ProtocolError `bad_measure`.

    Shared by the WebSocket subscription and `GET /api/ranks?by=`.
    """
    if value is None:
        return DEFAULT_MEASURE
    try:
        return parse_measure(kind, value if isinstance(value, str) else repr(value))
    except BadIdentifier as exc:
        raise ProtocolError("bad_measure", str(exc)) from exc


def parse_since(value: object) -> int | None:
    """A `since` minute (ms): an integer within the plausible event times, or None if absent.

    Accepts an int (WebSocket) or a string of digits (HTTP query); raises ProtocolError
    `bad_since` for anything else. It need not be a multiple of 60000: bars with minute >= it
    are sent.
    """
    if value is None:
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("bad_since", f"since {echo(str(value))} is not an integer (ms)")
    if not MIN_TS_MS <= value <= MAX_TS_MS:
        raise ProtocolError(
            "bad_since", f"since {value} is outside {MIN_TS_MS}..{MAX_TS_MS} (ms since the epoch)"
        )
    return value


# ---------------------------------------------------------------- server frames

# One encoder for every frame and HTTP body; NaN or infinity would encode as null.
_encoder: Final = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    """JSON bytes of a frame or response body (msgspec Structs, dicts, lists, numbers)."""
    return _encoder.encode(obj)


class BarPoint(msgspec.Struct, frozen=True, gc=False):
    """One minute of history: the newest update of the market's bar for that minute."""

    minute: int
    seq: int
    exchange_ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int | None
    closed: bool


class BarFrame(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="bar"):
    """A live update of a market's bar, as sent to every subscriber (encoded once)."""

    market: str
    minute: int
    seq: int
    exchange_ts: int
    received_ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int | None
    closed: bool


class HistoryFrame(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="history"):
    market: str
    since: int | None
    bars: list[BarPoint]


def bar_point(tick: Tick) -> BarPoint:
    return BarPoint(
        tick.minute,
        tick.seq,
        tick.exchange_ts,
        tick.open,
        tick.high,
        tick.low,
        tick.close,
        tick.volume,
        tick.trades,
        tick.closed,
    )


def bar_frame(tick: Tick) -> str:
    frame = BarFrame(
        tick.market,
        tick.minute,
        tick.seq,
        tick.exchange_ts,
        tick.received_ts,
        tick.open,
        tick.high,
        tick.low,
        tick.close,
        tick.volume,
        tick.trades,
        tick.closed,
    )
    return _encoder.encode(frame).decode()


def history_frame(market_id: str, bars: Sequence[Tick], since: int | None) -> str:
    """The history frame: at most GATEWAY_HISTORY_MINUTES + 1 bars, oldest first."""
    return _encoder.encode(HistoryFrame(market_id, since, [bar_point(t) for t in bars])).decode()


def ranks_frame(snapshot: dict[str, Any]) -> str:
    return _encoder.encode({"type": "ranks", **snapshot}).decode()


def alert_frame(alert: Alert) -> str:
    return _encoder.encode({"type": "alert", "alert": alert}).decode()


def error_frame(code: str, message: str) -> str:
    return _encoder.encode({"type": "error", "code": code, "message": message}).decode()


def status_frame(kind: Literal["subscribed", "unsubscribed"], sub: Subscription) -> str:
    return _encoder.encode({"type": kind, **sub.describe()}).decode()


PONG_FRAME: Final = _encoder.encode({"type": "pong"}).decode()
