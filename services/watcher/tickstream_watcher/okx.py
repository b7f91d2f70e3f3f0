"""OKX v5 spot without I/O: `candle1m` on the business WebSocket and public REST as feed events."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Final, Literal, TypeVar
from urllib.parse import urlencode

import msgspec

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS
from tickstream_watcher.exchange import (
    MAX_REST_BYTES,
    NAME_RE,
    BadFrame,
    CandlePage,
    CandleUpdate,
    DecimalText,
    ExchangeSpec,
    FeedEvent,
    FeedLimits,
    Heartbeat,
    RecentPages,
    Reconnect,
    Rejected,
    candle_page,
    check_candle,
    frame_bytes,
    recent_from,
)

if TYPE_CHECKING:
    from tickstream_watcher.exchange import ExchangeProtocol

EXCHANGE: Final = "okx"
CHANNEL: Final = "candle1m"
# history-candles answers at most 100 rows, candles 300: each page is as long as the endpoint
# that serves its start allows (ExchangeSpec.recent_pages), so every page is whole.
MAX_CANDLES_PER_REQUEST: Final = 100
MAX_RECENT_CANDLES_PER_REQUEST: Final = 300
# /market/candles holds only the latest 1,440 rows (24 h, the forming minute included); a range
# reaching further back goes to /market/history-candles. The margin covers a clock that differs
# from OKX's and a backend whose cache is a few minutes behind.
RECENT_ROWS: Final = 1440
_RECENT_MARGIN_ROWS: Final = 5
RECENT_MINUTES: Final = RECENT_ROWS - _RECENT_MARGIN_ROWS
_CANDLES: Final = "/api/v5/market/candles"
_HISTORY_CANDLES: Final = "/api/v5/market/history-candles"
# One subscribe's args: the current docs allow 64 KB, older ones 4096 bytes; keeping to the
# older bound satisfies both (about 90 markets a frame).
MAX_SUBSCRIBE_BYTES: Final = 4096
# OKX publishes no number for the channels one connection may carry, only the close codes that
# enforce it (4008/4009). Our choice: 200 candle channels, so ~3 subscribe frames a connection
# (of 480 an hour) and the usual USD/USDT listing needs 2 connections (of 3 new ones a second).
MARKETS_PER_CONNECTION: Final = 200
# OKX drops a connection with nothing received for 30 s (close 4004); a text `ping` after 20 s
# of silence must be answered by a text `pong`, else the connection is dead.
KEEPALIVE_S: Final = 20.0
# Codes of a refusal to pace: 50011 rate limit (also sent with HTTP 200), 50013 system busy.
THROTTLE_CODES: Final = frozenset({"50011", "50013"})
_INST_ID_RE: Final = re.compile(r"[A-Z0-9]{1,30}-[A-Z0-9]{1,30}")
# OKX names the refused instrument only inside its 60018 text ("...,instId:X doesn't exist").
_NAMED_INST_RE: Final = re.compile(r"instId:([A-Za-z0-9]{1,30}-[A-Za-z0-9]{1,30})")

_MsText = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,16}\Z")]
# [ts, o, h, l, c, vol, volCcy, volCcyQuote, confirm]: SPOT vol is base units, both volCcy
# fields are quote units; confirm "1" = the candle is closed.
_Row = tuple[
    _MsText,
    DecimalText,
    DecimalText,
    DecimalText,
    DecimalText,
    DecimalText,
    DecimalText,
    DecimalText,
    Literal["0", "1"],
]
_T = TypeVar("_T")


class _Arg(msgspec.Struct, frozen=True, gc=False):
    channel: str = ""
    inst_id: str = msgspec.field(default="", name="instId")


class _Frame(msgspec.Struct, frozen=True, gc=False):
    """A push (`arg` and `data`) or an event (`subscribe`, `error`, `notice`, ...)."""

    event: str | None = None
    code: str | int | None = None
    msg: str = ""
    arg: _Arg | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")  # decoded only for the channel we use


class _Envelope(msgspec.Struct, frozen=True, gc=False):
    """Every REST answer: `code` "0" and `data`, or another code and its `msg`."""

    code: str | int
    msg: str = ""
    data: msgspec.Raw = msgspec.Raw(b"[]")


class _Code(msgspec.Struct, frozen=True, gc=False):
    code: str | int | None = None


class _Instrument(msgspec.Struct, frozen=True, gc=False):
    inst_id: str = msgspec.field(name="instId")
    inst_type: str = msgspec.field(default="", name="instType")
    base: str = msgspec.field(default="", name="baseCcy")
    quote: str = msgspec.field(default="", name="quoteCcy")
    state: str = ""


_frame_decoder: Final = msgspec.json.Decoder(_Frame)
_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)
_code_decoder: Final = msgspec.json.Decoder(_Code)
_rows_decoder: Final = msgspec.json.Decoder(list[_Row])
_raw_rows_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_row_decoder: Final = msgspec.json.Decoder(_Row)
_listing_decoder: Final = msgspec.json.Decoder(list[_Instrument])
_encoder: Final = msgspec.json.Encoder()


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class OkxProtocol:
    """OKX v5 spot (`wss://ws.okx.com:8443/ws/v5/business`, `https://www.okx.com`).

    Built from the instIds it may receive (`BTC-USDT` → okx:btc-usdt): a candle of any other is
    a BadFrame. Every method but `candles_path` is pure; that one reads `clock_ms` to choose
    between the latest-24-h and the history endpoint. Safe to share between feeds.
    """

    name = EXCHANGE

    def __init__(
        self, symbols: Mapping[str, Market], clock_ms: Callable[[], int] = _wall_clock_ms
    ) -> None:
        """Raises ValueError for an instId that is not `BASE-QUOTE` upper-case letters/digits."""
        bad = [symbol for symbol in symbols if not _INST_ID_RE.fullmatch(symbol)]
        if bad:
            raise ValueError(f"not OKX spot instIds: {bad[:5]}")
        self._markets: dict[str, Market] = dict(symbols)
        self._clock_ms = clock_ms

    @classmethod
    def from_listing(cls, listing: Mapping[Market, str]) -> OkxProtocol:
        """The protocol for every market of a `parse_listing` result."""
        return cls({symbol: market for market, symbol in listing.items()})

    def ws_url(self, base_url: str, symbols: Sequence[str]) -> str:
        """`base_url` itself (the business endpoint): channels are named in subscribe frames."""
        return base_url

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str]:
        """`candle1m` of every symbol, as few frames as keep each within MAX_SUBSCRIBE_BYTES."""
        frames: list[str] = []
        args: list[str] = []
        size = 0
        for symbol in symbols:
            arg = _encoder.encode({"channel": CHANNEL, "instId": symbol}).decode()
            # 40 bytes cover the frame's head and its id
            if args and size + len(arg) + 1 + 40 > MAX_SUBSCRIBE_BYTES:
                frames.append(_subscribe(len(frames) + 1, args))
                args, size = [], 0
            args.append(arg)
            size += len(arg) + 1
        if args:
            frames.append(_subscribe(len(frames) + 1, args))
        return frames

    def parse(self, frame: str | bytes) -> list[FeedEvent]:
        """A CandleUpdate per `candle1m` row; a Heartbeat per `pong` or subscribe answer; a
        Reconnect per `notice` 64008; a Rejected and a Reconnect per 60018 naming an instId;
        [] for other channels and events. Raises only BadFrame, also for other errors (with
        OKX's code and message: 60012 a request we got wrong, 64001/64002 the wrong URL)."""
        if frame == "pong" or frame == b"pong":  # text, not JSON: checked before decoding
            return [Heartbeat()]
        data = frame_bytes(frame)
        try:
            message = _decode(_frame_decoder, data)
            if message.event is not None:
                return _event(message)
            if message.arg is None:
                raise BadFrame("frame has neither event nor arg")
            if message.arg.channel != CHANNEL:
                return []  # tickers, trades, books, ...: nothing we subscribe to
            return self._candles(message.arg.inst_id, message.data)
        except BadFrame as exc:
            exc.raw = data[:200]
            raise

    def _candles(self, inst_id: str, data: msgspec.Raw) -> list[FeedEvent]:
        market = self._markets.get(inst_id)
        if market is None:
            raise BadFrame(f"candle of unknown instId {inst_id[:40]!r}")
        out: list[FeedEvent] = []
        for row in _decode(_rows_decoder, data):
            out.append(_candle(market, row))
        return out

    def listing_path(self) -> str:
        return "/api/v5/public/instruments?instType=SPOT"

    def parse_listing(self, body: bytes) -> dict[Market, str]:
        """Every SPOT instrument in state `live`, by market; raises BadFrame.

        The market comes from `baseCcy`/`quoteCcy`, never from splitting the instId; entries
        whose currencies are not `[a-z0-9]+` once lower-cased, or whose instId is not
        `BASE-QUOTE` (it goes into URLs and frames), are skipped; `preopen`, `suspend` and
        `test` instruments are not trading.
        """
        listing: dict[Market, str] = {}
        for entry in _decode(_listing_decoder, _rest(body)):
            base, quote = entry.base.lower(), entry.quote.lower()
            if (
                entry.inst_type == "SPOT"
                and entry.state == "live"
                and NAME_RE.fullmatch(base)
                and NAME_RE.fullmatch(quote)
                and _INST_ID_RE.fullmatch(entry.inst_id)
            ):
                listing[Market(EXCHANGE, base, quote)] = entry.inst_id
        return listing

    def candles_path(self, symbol: str, start_ms: int, end_ms: int) -> str:
        """The one-minute candles opening from start to end (ms, both inclusive), a page as
        SPEC plans them (callers page). `after` is exclusive (older than), `before` exclusive
        (newer than). A page starting within the latest RECENT_MINUTES by `clock_ms` asks
        candles (up to 300 rows), an older one history-candles (up to 100). A page longer
        than history-candles serves was planned within the horizon a moment ago (a minute may
        have begun since): candles, which still holds it thanks to the margin, so the page is
        never cut to 100 rows."""
        recent = start_ms >= recent_from(self._clock_ms(), RECENT_MINUTES)
        if end_ms - start_ms >= MAX_CANDLES_PER_REQUEST * MINUTE_MS:
            recent = True
        query = urlencode(
            {
                "instId": symbol,
                "bar": "1m",
                "after": end_ms + 1,
                "before": start_ms - 1,
                "limit": MAX_RECENT_CANDLES_PER_REQUEST if recent else MAX_CANDLES_PER_REQUEST,
            }
        )
        return f"{_CANDLES if recent else _HISTORY_CANDLES}?{query}"

    def parse_candles(self, market: Market, body: bytes) -> CandlePage:
        """Rows `[ts, o, h, l, c, vol, volCcy, volCcyQuote, confirm]`, newest first, as closed
        candles oldest first; a row with confirm "0" (the minute still forming) is left out.
        Raises BadFrame for an error answer (`code` not "0", with OKX's message) or one whose
        `data` is not a list; an invalid or misordered row is skipped and named in
        `bad_rows`, the others are kept."""
        rows = _decode(_raw_rows_decoder, _rest(body))
        return candle_page(_closed_rows(market, rows))


def rest_throttled(body: bytes) -> bool:
    """True for a REST answer whose code asks to slow down (50011, 50013), whatever its HTTP
    status: the paced client waits and asks again, as for a 429. Never raises."""
    try:
        code = _code_decoder.decode(body).code
    except (msgspec.DecodeError, RecursionError):
        return False
    return str(code) in THROTTLE_CODES


def _subscribe(request_id: int, args: list[str]) -> str:
    return f'{{"id":"{request_id}","op":"subscribe","args":[{",".join(args)}]}}'


def _event(message: _Frame) -> list[FeedEvent]:
    code = "" if message.code is None else str(message.code)
    text = message.msg[:200]
    match message.event:
        case "subscribe" | "unsubscribe":
            return [Heartbeat()]
        case "notice" if code == "64008":
            return [Reconnect(f"okx notice 64008: {text}")]
        case "error" if code == "60018":
            named = _NAMED_INST_RE.search(message.msg)
            if named is None:
                raise BadFrame(f"okx error 60018 naming no instId: {text}")
            # Whether OKX still subscribes the other args of the refused frame is not
            # documented: reconnecting without the refused instId is right either way.
            return [Rejected(named[1], text), Reconnect(f"subscribe refused for {named[1]}")]
        case "error" if code in ("64001", "64002"):
            raise BadFrame(f"okx error {code}: channel not served on this URL (OKX_WS_URL): {text}")
        case "error":
            raise BadFrame(f"okx error {code}: {text}")
    return []  # other notices, connection counts, login answers: nothing for us


def _candle(market: Market, row: _Row) -> CandleUpdate:
    """The candle of one row, checked, with its quote volume (volCcyQuote: SPOT turnover).

    A push carries no event time: a forming candle is known as of its open, no later (parse
    has no clock), a confirmed one as of its end.
    """
    ts, open_, high, low, close, volume, _volume_ccy, volume_quote, confirm = row
    minute = int(ts)
    closed = confirm == "1"
    candle = CandleUpdate(
        market,
        minute,
        float(open_),
        float(high),
        float(low),
        float(close),
        float(volume),
        None,  # OKX candles carry no trade count
        closed,
        minute + MINUTE_MS if closed else minute,
        float(volume_quote),  # range-checked by check_candle, as every exchange's
    )
    return check_candle(candle)


def _closed_rows(market: Market, rows: list[msgspec.Raw]) -> Iterator[Callable[[], CandleUpdate]]:
    """Each row, oldest first, as a call giving its candle; a forming row is left out, a row
    that is not a candle row raises when called (candle_page counts it)."""
    for raw in reversed(rows):
        try:
            row = _decode(_row_decoder, raw)
        except BadFrame as exc:
            yield functools.partial(_raise, exc)
            continue
        if row[8] == "1":
            yield functools.partial(_candle, market, row)


def _raise(exc: BadFrame) -> CandleUpdate:
    raise exc


def _decode(decoder: msgspec.json.Decoder[_T], data: bytes | msgspec.Raw) -> _T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadFrame(f"invalid: {str(exc)[:200]}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadFrame(f"not JSON: {str(exc)[:100]}") from None


def _rest(body: bytes) -> msgspec.Raw:
    """The `data` of an answer with code "0"; BadFrame with OKX's code and message otherwise."""
    if len(body) > MAX_REST_BYTES:
        raise BadFrame(f"body of {len(body)} bytes exceeds {MAX_REST_BYTES}", body[:64])
    try:
        answer = _decode(_envelope_decoder, body)
    except BadFrame as exc:
        exc.raw = body[:64]
        raise
    if str(answer.code) != "0":
        raise BadFrame(f"okx error {answer.code}: {answer.msg[:200]}", body[:64])
    return answer.data


if TYPE_CHECKING:
    # mypy checks here that the class keeps to the protocol every feed is written against.
    _conforms: ExchangeProtocol = OkxProtocol({})


# Candles pushed at most once a second per instrument; a text ping after 20 s of silence, a
# pong expected within 10 s more; 3 new connections a second per IP (1 s between one feed's
# attempts). REST limits are per endpoint (per IP): candles 40 requests per 2 s, paced on its
# own at one every 0.05 s; history-candles and instruments 20 per 2 s, one every 0.1 s each,
# each on its own too.
# A day of a market: 5 candles pages of 300 and one history-candles page (the oldest minutes).
SPEC: Final = ExchangeSpec(
    EXCHANGE,
    FeedLimits(1.0, 60.0, silence_s=30.0, keepalive_s=KEEPALIVE_S, keepalive_frame="ping"),
    page_minutes=MAX_CANDLES_PER_REQUEST,
    rest_interval_s=0.1,
    markets_per_connection=MARKETS_PER_CONNECTION,
    from_listing=OkxProtocol.from_listing,
    rest_throttled=rest_throttled,
    recent_pages=RecentPages(RECENT_MINUTES, MAX_RECENT_CANDLES_PER_REQUEST),
    rest_paces={_CANDLES: 0.05, _HISTORY_CANDLES: 0.1},  # instruments: rest_interval_s
)
