"""What every sans-I/O exchange protocol (Binance, Coinbase, Kraken) turns frames into."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Protocol

import msgspec

from tickstream_shared.errors import BadMessage
from tickstream_shared.naming import Market

# No frame of any channel we subscribe to comes near this; anything larger is refused unread.
MAX_FRAME_BYTES: Final = 1 << 20
# A REST body (24h of candles, a full listing of some thousand symbols) stays far below this.
MAX_REST_BYTES: Final = 16 << 20
# The bounds `decode_tick` enforces on prices and volumes, checked by every protocol where the
# offending frame is still at hand.
MAX_PRICE: Final = 1e12
MAX_VOLUME: Final = 1e18
# A base or quote name usable in market ids (after lower-casing the exchange's).
NAME_RE: Final = re.compile(r"[a-z0-9]+")
# Exchanges that write numbers as text write plain decimals; refusing every other spelling keeps
# float() from accepting "nan", "inf", "1e400", "-1" or "1_0".
DecimalText = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,40}(?:\.[0-9]{1,40})?\Z")]


class BadFrame(BadMessage):
    """An exchange frame or REST body that is not what the documented format says.

    Counted and skipped by the feed; the connection and the other markets go on.
    """


def frame_bytes(frame: str | bytes) -> bytes:
    """A received frame as UTF-8 bytes, at most MAX_FRAME_BYTES of them; raises BadFrame.

    Every protocol's `parse` starts here, so the size bound is in bytes whatever the frame
    type, and text that cannot be UTF-8 (a lone surrogate) is a BadFrame, not a crash.
    """
    if isinstance(frame, str):
        if len(frame) > MAX_FRAME_BYTES:  # more characters means more bytes: skip encoding
            raise BadFrame(f"frame of {len(frame)} characters exceeds {MAX_FRAME_BYTES} bytes")
        try:
            frame = frame.encode()
        except UnicodeEncodeError as exc:
            raise BadFrame(f"not JSON: text is not UTF-8 ({exc.reason})") from None
    if len(frame) > MAX_FRAME_BYTES:
        raise BadFrame(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES} bytes", frame[:64])
    return frame


@dataclass(frozen=True, slots=True)
class CandleUpdate:
    """An exchange's own one-minute candle as it stands at `exchange_ts` (kline / ohlc)."""

    market: Market
    minute: int  # open time, ms, a multiple of 60000
    open: float
    high: float
    low: float
    close: float
    volume: float  # base units traded in the minute so far
    trades: int | None
    closed: bool  # the exchange says the candle is final (Binance `k.x`); False when unknown
    exchange_ts: int  # event time of this update, ms


@dataclass(frozen=True, slots=True)
class Trade:
    """One trade (Coinbase `match`): the watcher aggregates these into minute bars."""

    market: Market
    trade_id: int  # increases by one per market: a jump is a gap
    price: float
    size: float  # base units
    exchange_ts: int  # ms


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The connection is alive (an exchange heartbeat, pong or subscription ack)."""

    market: Market | None = None
    last_trade_id: int | None = None  # Coinbase heartbeats carry it: a gap check without trades


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The exchange asks the client to reconnect now (Binance `serverShutdown`, maintenance)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The exchange refused a subscription for one symbol (unknown or delisted)."""

    symbol: str
    reason: str


FeedEvent = CandleUpdate | Trade | Heartbeat | Reconnect | Rejected


class ExchangeProtocol(Protocol):
    """The documented wire format of one exchange, without I/O (see exchange-formats.md).

    Every parse function is pure and raises only BadFrame on input it cannot use.
    """

    name: str  # the exchange part of market ids: "binance", "coinbase", "kraken"

    def ws_url(self, base_url: str, symbols: Sequence[str]) -> str:
        """The WebSocket URL to connect to for these exchange symbols."""
        ...

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str]:
        """Text frames to send after connecting (within the exchange's rate limits)."""
        ...

    def parse(self, frame: str | bytes) -> list[FeedEvent]:
        """The events in one received text frame; [] for frames that carry nothing we use."""
        ...

    def listing_path(self) -> str:
        """REST path (with query) of the exchange's symbol listing."""
        ...

    def parse_listing(self, body: bytes) -> Mapping[Market, str]:
        """Every market the listing says is trading, with its exchange symbol."""
        ...

    def candles_path(self, symbol: str, start_ms: int, end_ms: int) -> str:
        """REST path (with query) of the closed one-minute candles from start to end."""
        ...

    def parse_candles(self, market: Market, body: bytes) -> list[CandleUpdate]:
        """The candles in a REST answer, oldest first, each marked closed with `exchange_ts`
        = its end (minute + 60000); the caller drops a minute that is still forming."""
        ...
