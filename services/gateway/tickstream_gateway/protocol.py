"""The WebSocket protocol, sans I/O: parse client frames into commands, build server frames."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

# Re-exported: the protocol's parsers raise it, and its callers catch it from here.
from tickstream_gateway.errors import ProtocolError as ProtocolError
from tickstream_gateway.selection import (
    MAX_FRAME_RANKS,
    RANK_FRAME_LIMIT,
    Selection,
    parse_selection,
)
from tickstream_shared.errors import BadIdentifier, echo
from tickstream_shared.naming import (
    DEFAULT_MEASURE_BY_KIND,
    Market,
    MetricKind,
    RankMeasure,
    parse_kind,
    parse_measure,
)
from tickstream_shared.schemas import (
    ALERT_STATUSES,
    MAX_ID_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
    Alert,
    AlertStatus,
    Tick,
)

Channel = Literal["market", "ranks", "alerts"]
# A client frame's limits: its UTF-8 size (a command is ~100 bytes), and how deeply its JSON
# nests (a command nests once; json.loads recurses per level, so a few KB of brackets would
# otherwise end in RecursionError instead of an answer).
MAX_FRAME_BYTES: Final = 4096
MAX_JSON_DEPTH: Final = 16
_DIGITS: Final = re.compile(r"[0-9]{1,30}")


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
    # Ranks: which entries each frame holds (None in an unsubscribe).
    selection: Selection | None = None

    @property
    def stream(self) -> str:
        """The name its server frames share (see Frame): a market id, ranks:<kind>, alerts."""
        if self.market is not None:
            return self.market.id
        if self.kind is not None:
            return rank_stream(self.kind)
        return self.channel

    def describe(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"channel": self.channel}
        if self.market is not None:
            frame["market"] = self.market.id
        if self.kind is not None:
            frame["kind"] = self.kind
        if self.measure is not None:
            frame["by"] = self.measure
        if self.selection is not None:
            sel = self.selection
            named = {"exchange": sel.exchange, "quote": sel.quote, "q": sel.search}
            frame |= {field: value for field, value in named.items() if value is not None}
            frame |= {"offset": sel.offset, "limit": sel.limit}
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
        measure = parse_by(kind, obj.get("by"))
        return Subscription("ranks", kind=kind, measure=measure, selection=_rank_selection(obj))
    raise ProtocolError("bad_request", "'channel' must be one of: market, ranks, alerts")


def _rank_selection(obj: dict[str, Any]) -> Selection:
    """A ranks subscription's `exchange`, `quote`, `q` (strings), `offset` and `limit`
    (integers; limit default RANK_FRAME_LIMIT, at most MAX_FRAME_RANKS), checked like the
    HTTP parameters of the same names."""
    params: dict[str, str] = {}
    for field, code in (("exchange", "bad_exchange"), ("quote", "bad_quote"), ("q", "bad_query")):
        value = obj.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ProtocolError(code, f"{field} must be a string")
        params[field] = value
    for field, code in (("offset", "bad_offset"), ("limit", "bad_limit")):
        value = obj.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(code, f"{field} must be an integer")
        params[field] = str(value)
    return parse_selection(params, RANK_FRAME_LIMIT, MAX_FRAME_RANKS)


def parse_by(kind: MetricKind, value: object) -> RankMeasure:
    """The rank measure asked for (default: the kind's, DEFAULT_MEASURE_BY_KIND); raises
    ProtocolError `bad_measure`.

    Shared by the WebSocket subscription and `GET /api/ranks?by=`.
    """
    if value is None:
        return DEFAULT_MEASURE_BY_KIND[kind]
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


def parse_statuses(value: str | None) -> tuple[AlertStatus, ...] | None:
    """`GET /api/alerts?status=`: comma-separated alert statuses, or None (all) if absent.

    Raises ProtocolError `bad_status` for an empty list or a word that is not a status.
    """
    if value is None:
        return None
    statuses: list[AlertStatus] = []
    for word in value.split(","):
        status = next((s for s in ALERT_STATUSES if s == word), None)
        if status is None:
            raise ProtocolError(
                "bad_status",
                f"status {echo(word)} is not one of: {', '.join(ALERT_STATUSES)} (comma-separated)",
            )
        if status not in statuses:
            statuses.append(status)
    return tuple(statuses)


# ---------------------------------------------------------------- server frames

# One encoder for every frame and HTTP body; NaN or infinity would encode as null.
_encoder: Final = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    """JSON bytes of a frame or response body (msgspec Structs, dicts, lists, numbers)."""
    return _encoder.encode(obj)


@dataclass(frozen=True, slots=True)
class Frame:
    """One server frame, encoded once: the same object is queued for every client it goes to.

    `stream` names the subscription the frame belongs to (`Subscription.stream`), None for
    frames of the connection (pong, errors) and alerts. A `latest` frame is a state (a forming
    bar, keyed by its minute; a rank snapshot, keyed by its measure): a newer frame of its
    stream with the same `key` supersedes it while it is pending. Frames that are not `latest`
    are always delivered. See outbox.py for the queue that applies this (the freshness rule).
    """

    # The whole WebSocket text frame as the server sends it (header, then the JSON; servers
    # do not mask): built once, so a client without compression costs one slice of a write,
    # not a JSON encoding, a frame header and a copy per client (websocket.py).
    wire: bytes
    size: int  # bytes of the JSON message, the header not included
    stream: str | None = None
    key: int | str | None = None
    latest: bool = False

    @property
    def body(self) -> bytes:
        """The JSON message (a copy): for a connection that compresses, and for tests."""
        return self.wire[len(self.wire) - self.size :]

    @property
    def text(self) -> str:
        return self.body.decode()


def _text_frame_header(size: int) -> bytes:
    """RFC 6455 section 5.2: FIN and opcode 1 (text), then the payload length, unmasked."""
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big")
    return bytes((0x81, 127)) + size.to_bytes(8, "big")


def _frame(
    body: bytes, stream: str | None = None, key: int | str | None = None, latest: bool = False
) -> Frame:
    return Frame(_text_frame_header(len(body)) + body, len(body), stream, key, latest)


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
    quote_volume: float | None  # traded value in the quote currency; None (null): unknown
    trades: int | None
    closed: bool


class BarFrame(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="bar"):
    """A live update of a market's bar, as sent to every subscriber (encoded once)."""

    market: str
    minute: int
    seq: int
    exchange_ts: int
    received_ts: int  # the watcher's receive time: clients measure latency from it
    open: float
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float | None  # traded value in the quote currency; None (null): unknown
    trades: int | None
    closed: bool


def point_json(tick: Tick) -> bytes:
    """One history point's JSON; kept per minute by RecentBars, so each is encoded once."""
    return _encoder.encode(
        BarPoint(
            tick.minute,
            tick.seq,
            tick.exchange_ts,
            tick.open,
            tick.high,
            tick.low,
            tick.close,
            tick.volume,
            tick.quote_volume,
            tick.trades,
            tick.closed,
        )
    )


def bar_frame(tick: Tick) -> Frame:
    """A live update; while pending, a forming bar gives way to a newer update of its minute."""
    body = _encoder.encode(
        BarFrame(
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
            tick.quote_volume,
            tick.trades,
            tick.closed,
        )
    )
    return _frame(body, tick.market, tick.minute, latest=not tick.closed)


def history_frame(market_id: str, bars: Sequence[Tick], since: int | None) -> Frame:
    """The history frame: at most GATEWAY_HISTORY_MINUTES + 1 bars, oldest first."""
    return history_frame_of_points(market_id, [point_json(t) for t in bars], since)


def history_frame_of_points(market_id: str, points: Sequence[bytes], since: int | None) -> Frame:
    """The history frame from encoded points: a join, not an encoding of every bar.

    Byte for byte what msgspec writes for {"type", "market", "since", "bars"} in that order.
    """
    head = b'{"type":"history","market":%b,"since":%b,"bars":[' % (
        _encoder.encode(market_id),
        _encoder.encode(since),
    )
    return _frame(b"".join((head, b",".join(points), b"]}")), market_id)


def gap_frame(market_id: str, since: int, until: int) -> Frame:
    """Minutes since <= m < until are not sent: the gateway cannot tell what they held."""
    body = _encoder.encode({"type": "gap", "market": market_id, "since": since, "until": until})
    return _frame(body, market_id)


def ranks_frame(snapshot: dict[str, Any]) -> Frame:
    """A rank snapshot; while pending, it gives way to a newer one of the same kind and measure."""
    body = _encoder.encode({"type": "ranks", **snapshot})
    return _frame(body, rank_stream(snapshot["kind"]), snapshot["by"], latest=True)


def alert_frame(alert: Alert) -> Frame:
    """An alert, or a new status of one (the same `alert_id`, a larger `status_seq`): never
    conflated, so a retraction always reaches a client that got the alert."""
    return _frame(_encoder.encode({"type": "alert", "alert": alert}))


def error_frame(code: str, message: str) -> Frame:
    return _frame(_encoder.encode({"type": "error", "code": code, "message": message}))


def status_frame(kind: Literal["subscribed", "unsubscribed"], sub: Subscription) -> Frame:
    # In the subscription's stream: states queued before it are not replaced by later ones
    # (only skipped once stale with a newer one pending, see Outbox).
    return _frame(_encoder.encode({"type": kind, **sub.describe()}), sub.stream)


def rank_stream(kind: str) -> str:
    """The stream of a kind's rank frames (no market id looks like it: ids have a '-')."""
    return f"ranks:{kind}"


PONG_FRAME: Final = _frame(_encoder.encode({"type": "pong"}))
