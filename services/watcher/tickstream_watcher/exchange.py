"""What every sans-I/O exchange protocol (Binance, Coinbase, Kraken, OKX) turns frames into."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Final, Protocol

import msgspec

from tickstream_shared.errors import BadMessage
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MAX_TS_MS, MIN_TS_MS, MINUTE_MS

# No frame of any channel we subscribe to comes near this; anything larger is refused unread.
MAX_FRAME_BYTES: Final = 1 << 20
# A REST body (24h of candles, a full listing of some thousand symbols) stays far below this.
MAX_REST_BYTES: Final = 16 << 20
# The bounds `decode_tick` enforces on prices and volumes, checked by every protocol where the
# offending frame is still at hand.
MAX_PRICE: Final = 1e12
MAX_VOLUME: Final = 1e18
# A trade count no exchange comes near in one minute.
MAX_TRADES: Final = 2**40
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
    # Quote units traded in the minute so far, where the exchange says it (Binance `q`; Kraken
    # vwap x volume); None when it does not (Coinbase REST candles): unknown, never estimated.
    quote_volume: float | None = None


def check_candle(candle: CandleUpdate) -> CandleUpdate:
    """The candle if it is a plausible bar; raises BadFrame saying what is wrong.

    The one check of every exchange's candles (stream and REST), written so that NaN fails
    every comparison: a whole minute between 2010 and 2100, prices in (0, MAX_PRICE], volume
    and quote volume (when known) in [0, MAX_VOLUME], open and close within low..high, a trade
    count in [0, MAX_TRADES].
    """
    minute, low, high, volume = candle.minute, candle.low, candle.high, candle.volume
    if minute % MINUTE_MS or not MIN_TS_MS <= minute <= MAX_TS_MS - MINUTE_MS:
        raise BadFrame(f"{candle.market.id}: {minute} is not a plausible minute start")
    if not (low > 0 and high <= MAX_PRICE and 0 <= volume <= MAX_VOLUME):
        raise BadFrame(
            f"{candle.market.id} {minute}: prices not in (0, 1e12] or volume in [0, 1e18]"
        )
    if not (low <= candle.open <= high and low <= candle.close <= high):
        raise BadFrame(f"{candle.market.id} {minute}: open and close must lie within low..high")
    quote_volume = candle.quote_volume
    if quote_volume is not None and not 0 <= quote_volume <= MAX_VOLUME:
        raise BadFrame(f"{candle.market.id} {minute}: quote volume not in [0, 1e18]")
    if not 0 <= (candle.trades or 0) <= MAX_TRADES:
        raise BadFrame(f"{candle.market.id} {minute}: trade count {candle.trades}")
    return candle


@dataclass(frozen=True, slots=True)
class CandlePage:
    """The candles of one REST answer, oldest first, and why each refused row was refused.

    A bad row costs only its own minute: the page keeps the others (the minute is counted and
    repaired later by reconciliation).
    """

    candles: list[CandleUpdate]
    bad_rows: list[str] = field(default_factory=list)


# What parsing one row may raise besides BadFrame: a wrong shape, type or value.
_ROW_ERRORS: Final = (BadFrame, ValueError, TypeError, msgspec.DecodeError, RecursionError)


def candle_page(rows: Iterable[Callable[[], CandleUpdate]]) -> CandlePage:
    """Parse rows given oldest first (each a call returning its candle), checked, in order.

    A row whose call raises, whose candle fails `check_candle`, or which is not after the last
    row kept, is skipped and described in `bad_rows` with its index.
    """
    candles: list[CandleUpdate] = []
    bad: list[str] = []
    for index, parse in enumerate(rows):
        try:
            candle = check_candle(parse())
        except _ROW_ERRORS as exc:
            bad.append(f"row {index}: {str(exc)[:200]}")
            continue
        if candles and candle.minute <= candles[-1].minute:
            bad.append(f"row {index}: not after the row before it")
            continue
        candles.append(candle)
    return CandlePage(candles, bad)


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


@dataclass(frozen=True, slots=True)
class FeedLimits:
    """How one exchange's connections are paced and watched (exchange-formats.md)."""

    # Shortest wait before a reconnect: keeps a flapping connection inside the exchange's
    # connection-rate limit (Kraken: about 150 attempts per 10 minutes and 5 s after
    # maintenance; Binance: 300 per 5 minutes).
    min_reconnect_s: float
    # The exponential backoff (doubling from min_reconnect_s, full jitter) stops growing here:
    # an outage of any length is waited out, and the feed is back within this of its end.
    max_reconnect_s: float
    # No frame at all for this long means the connection is dead even if TCP says otherwise.
    silence_s: float
    # Reconnect ahead of the exchange's own limit on a connection's life (Binance: 24 h).
    max_connection_s: float | None = None
    # For exchanges that want the client to prove it is alive (OKX): after this long without a
    # frame (or half of silence_s, if sooner), send `keepalive_frame` (a text frame); the answer
    # is a frame like any other, and silence_s still ends a connection that stays silent.
    keepalive_s: float | None = None
    keepalive_frame: str = ""


@dataclass(frozen=True, slots=True)
class RecentPages:
    """Larger REST pages an exchange serves for its latest minutes only (OKX: 300 rows from
    `candles`, which holds the latest 1,440; older ranges 100 rows from `history-candles`)."""

    # The latest this many minutes (before the current one, margin for clocks and caches
    # included) are served in the larger pages; older minutes in `ExchangeSpec.page_minutes`.
    horizon_minutes: int
    page_minutes: int


def recent_from(now_ms: int, horizon_minutes: int) -> int:
    """The open time of the oldest minute within the latest `horizon_minutes` at `now_ms`.

    The one computation of the horizon: the page plan and the protocol that chooses an
    endpoint by it (OKX) both call this, so a page and its endpoint agree."""
    return now_ms - now_ms % MINUTE_MS - horizon_minutes * MINUTE_MS


def page_last(
    page_minutes: int, recent: RecentPages | None, first_ms: int, end_ms: int, now_ms: int
) -> int:
    """The open time of the last minute of the REST page that starts at `first_ms`, for a range
    ending before `end_ms` (exclusive), as the exchange pages at `now_ms`.

    A page starting within the recent horizon is `recent.page_minutes` long; an older one is
    `page_minutes` long and ends before the horizon, so no page straddles it and each is whole
    from the one endpoint that serves its start. Pure; `first_ms` < `end_ms`, whole minutes.
    """
    if recent is not None:
        boundary = recent_from(now_ms, recent.horizon_minutes)
        if first_ms >= boundary:
            return min(first_ms + recent.page_minutes * MINUTE_MS, end_ms) - MINUTE_MS
        end_ms = min(end_ms, boundary)
    return min(first_ms + page_minutes * MINUTE_MS, end_ms) - MINUTE_MS


def plan_pages(
    page_minutes: int, recent: RecentPages | None, first_ms: int, end_ms: int, now_ms: int
) -> list[tuple[int, int]]:
    """Every page (first and last minute open times, inclusive) covering `first_ms` up to
    `end_ms` (exclusive) at `now_ms`, oldest first; see `page_last`. Pure."""
    pages = []
    while first_ms < end_ms:
        last = page_last(page_minutes, recent, first_ms, end_ms, now_ms)
        pages.append((first_ms, last))
        first_ms = last + MINUTE_MS
    return pages


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """Everything the live source needs to know of one exchange, in one place: its name, its
    connection limits, its REST paging and pacing, how many markets one connection carries,
    and how its protocol (wire formats, symbol mapping) is built from its listing. Each
    exchange module declares one (`SPEC`); `registry.EXCHANGES` lists them."""

    name: str
    limits: FeedLimits
    # Most one-minute candles one REST request returns (callers page longer ranges).
    page_minutes: int
    # Shortest time between two REST requests, inside the exchange's documented limit (for
    # every endpoint not in `rest_paces`).
    rest_interval_s: float
    # Most markets one connection subscribes (None: all of them on one connection).
    markets_per_connection: int | None
    from_listing: Callable[[Mapping[Market, str]], ExchangeProtocol]
    # For exchanges that refuse with HTTP 200 and a code in the body (OKX 50011): True for a
    # body that means "slow down", waited out and asked again like a 429.
    rest_throttled: Callable[[bytes], bool] | None = None
    # For exchanges that serve their latest minutes in larger pages than older ones (OKX).
    recent_pages: RecentPages | None = None
    # For exchanges whose limits differ per endpoint (OKX): the shortest time between two
    # requests of a path (without its query), paced apart from the others' requests.
    rest_paces: Mapping[str, float] = field(default_factory=dict)

    def pages(self, first_ms: int, end_ms: int, now_ms: int) -> list[tuple[int, int]]:
        """The REST pages covering `first_ms` up to `end_ms` at `now_ms` (see `plan_pages`)."""
        return plan_pages(self.page_minutes, self.recent_pages, first_ms, end_ms, now_ms)

    def page_last(self, first_ms: int, end_ms: int, now_ms: int) -> int:
        """The last minute of the page starting at `first_ms` (see `page_last`)."""
        return page_last(self.page_minutes, self.recent_pages, first_ms, end_ms, now_ms)


class ExchangeProtocol(Protocol):
    """The documented wire format of one exchange, without I/O (see exchange-formats.md).

    Every parse function is pure and raises only BadFrame on input it cannot use.
    """

    name: str  # the exchange part of market ids: "binance", "coinbase", "kraken", "okx"

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

    def parse_candles(self, market: Market, body: bytes) -> CandlePage:
        """The candles in a REST answer, oldest first, each marked closed with `exchange_ts`
        = its end (minute + 60000); the caller drops a minute that is still forming. Raises
        BadFrame for a body that is not a candle answer; a bad row is skipped (`bad_rows`)."""
        ...
