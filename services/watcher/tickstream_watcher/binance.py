"""Binance spot without I/O: combined `kline_1m` streams and public REST as feed events."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Final, TypeVar
from urllib.parse import quote

import msgspec

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MAX_TS_MS, MIN_TS_MS, MINUTE_MS
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
    Reconnect,
    candle_page,
    check_candle,
    frame_bytes,
)

if TYPE_CHECKING:
    from tickstream_watcher.exchange import ExchangeProtocol

EXCHANGE: Final = "binance"
# Binance refuses a connection asking for more streams: the caller splits markets over several.
MAX_STREAMS: Final = 1024
# Binance answers a klines request with at most this many rows (minutes): callers page.
MAX_CANDLES_PER_REQUEST: Final = 1000
# Binance's symbols: they go into stream names and URLs as they are.
_SYMBOL_RE: Final = re.compile(r"[A-Z0-9]+")

_Count = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
_T = TypeVar("_T")


class _Kline(msgspec.Struct, frozen=True, gc=False):
    """`k` of a kline event: the candle as it stands at the event time."""

    start: int = msgspec.field(name="t")
    end: int = msgspec.field(name="T")
    symbol: str = msgspec.field(name="s")
    interval: str = msgspec.field(name="i")
    open: DecimalText = msgspec.field(name="o")
    high: DecimalText = msgspec.field(name="h")
    low: DecimalText = msgspec.field(name="l")
    close: DecimalText = msgspec.field(name="c")
    volume: DecimalText = msgspec.field(name="v")  # base units
    trades: _Count = msgspec.field(name="n")
    closed: bool = msgspec.field(name="x")
    # Quote volume; Binance always sends it, a kline without it is taken as unknown.
    quote_volume: DecimalText | None = msgspec.field(default=None, name="q")


class _Event(msgspec.Struct, frozen=True, gc=False):
    """A stream event: only `kline` and `serverShutdown` are read, other types are ignored."""

    type: str | None = msgspec.field(default=None, name="e")
    time: int | None = msgspec.field(default=None, name="E")
    symbol: str | None = msgspec.field(default=None, name="s")
    kline: _Kline | None = msgspec.field(default=None, name="k")


class _Error(msgspec.Struct, frozen=True, gc=False):
    """What Binance answers a refused request with."""

    code: int
    msg: str = ""


class _Frame(_Event, frozen=True, gc=False):
    """A combined-stream wrapper, a bare event, or an answer to a request (it has `id`)."""

    stream: str | None = None
    # Array streams (`!miniTicker@arr`) carry nothing we use.
    data: _Event | list[msgspec.Raw] | None = None
    id: int | str | msgspec.UnsetType | None = msgspec.UNSET
    code: int | None = None
    msg: str = ""
    # What the stream server really sends (`{"error":{..},"id":2}`); the docs show the flat one.
    error: _Error | None = None


class _Row(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A `/api/v3/klines` row; the taker volumes after `trades` are not used."""

    start: int
    open: DecimalText
    high: DecimalText
    low: DecimalText
    close: DecimalText
    volume: DecimalText
    end: int
    quote_volume: DecimalText
    trades: _Count


class _Symbol(msgspec.Struct, frozen=True, gc=False):
    symbol: str
    status: str
    base: str = msgspec.field(name="baseAsset")
    quote: str = msgspec.field(name="quoteAsset")


class _ExchangeInfo(msgspec.Struct, frozen=True, gc=False):
    symbols: list[_Symbol]


_frame_decoder: Final = msgspec.json.Decoder(_Frame)
_row_decoder: Final = msgspec.json.Decoder(_Row)
_candles_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_listing_decoder: Final = msgspec.json.Decoder(_ExchangeInfo)
_error_decoder: Final = msgspec.json.Decoder(_Error)


class BinanceProtocol:
    """Binance spot (`wss://stream.binance.com:9443`, `https://api.binance.com`).

    Built from the upper-case symbols it may receive (`from_listing` builds that map from a
    `parse_listing` result, which works on any instance): a kline of any other symbol is a
    BadFrame. Every method is pure and safe to call from any number of feeds at once.
    """

    name = EXCHANGE

    def __init__(self, symbols: Mapping[str, Market]) -> None:
        """Raises ValueError for a symbol that is not upper-case letters and digits."""
        bad = [symbol for symbol in symbols if not _SYMBOL_RE.fullmatch(symbol)]
        if bad:
            raise ValueError(f"not Binance symbols: {bad[:5]}")
        self._markets: dict[str, Market] = dict(symbols)

    @classmethod
    def from_listing(cls, listing: Mapping[Market, str]) -> BinanceProtocol:
        """The protocol for every market of a `parse_listing` result."""
        return cls({symbol: market for market, symbol in listing.items()})

    def ws_url(self, base_url: str, symbols: Sequence[str]) -> str:
        """The combined stream of `<symbol>@kline_1m` for 1 to MAX_STREAMS (1024) known symbols;
        raises ValueError for more (the caller splits them over connections), none or unknown."""
        if not 0 < len(symbols) <= MAX_STREAMS:
            raise ValueError(f"{len(symbols)} streams: one connection takes 1 to {MAX_STREAMS}")
        unknown = [symbol for symbol in symbols if symbol not in self._markets]
        if unknown:
            raise ValueError(f"symbols this protocol was not built for: {unknown[:5]}")
        streams = "/".join(f"{symbol.lower()}@kline_1m" for symbol in symbols)
        return f"{base_url.rstrip('/')}/stream?streams={streams}"

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str]:
        """[]: the streams are named in the URL, so nothing counts against 5 messages/s."""
        return []

    def parse(self, frame: str | bytes) -> list[FeedEvent]:
        """A CandleUpdate per kline, a Reconnect per `serverShutdown`, a Heartbeat per answer to
        a request; [] for other events (aggTrade, depthUpdate, bookTicker, tickers, ...).

        Raises only BadFrame, also for an error answer (with Binance's message).
        """
        frame = frame_bytes(frame)
        try:
            message = _frame_decoder.decode(frame)
        except msgspec.ValidationError as exc:
            raise BadFrame(f"invalid: {exc}", frame[:64]) from None
        except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
            raise BadFrame(f"not JSON: {str(exc)[:100]}", frame[:64]) from None
        if message.code is not None:
            raise BadFrame(_refusal(_Error(message.code, message.msg)), frame[:64])
        if message.error is not None:
            raise BadFrame(_refusal(message.error), frame[:64])
        event: _Event | list[msgspec.Raw] | None = message
        if message.stream is not None or message.data is not None:
            event = message.data
        elif message.id is not msgspec.UNSET:
            return [Heartbeat()]
        if event is None:
            raise BadFrame("stream frame without data", frame[:64])
        if isinstance(event, list) or event.type not in ("kline", "serverShutdown"):
            return []
        if event.type == "serverShutdown":
            return [Reconnect("serverShutdown")]
        try:
            return [self._candle_update(event)]
        except ValueError as exc:
            raise BadFrame(str(exc), frame[:64]) from None

    def listing_path(self) -> str:
        return "/api/v3/exchangeInfo"

    def parse_listing(self, body: bytes) -> dict[Market, str]:
        """Every symbol with status TRADING, by market; raises BadFrame.

        Symbols whose assets are not `[a-z0-9]+` once lower-cased, or which are not `[A-Z0-9]+`
        themselves (they go into URLs), are skipped. The market comes from `baseAsset` and
        `quoteAsset`, never from splitting the symbol.
        """
        info = _decode_rest(_listing_decoder, body)
        listing: dict[Market, str] = {}
        for entry in info.symbols:
            base, quote_ = entry.base.lower(), entry.quote.lower()
            if (
                entry.status == "TRADING"
                and NAME_RE.fullmatch(base)
                and NAME_RE.fullmatch(quote_)
                and _SYMBOL_RE.fullmatch(entry.symbol)
            ):
                listing[Market(EXCHANGE, base, quote_)] = entry.symbol
        return listing

    def candles_path(self, symbol: str, start_ms: int, end_ms: int) -> str:
        """Closed one-minute candles opening from start to end (both ms, inclusive).

        One request returns at most MAX_CANDLES_PER_REQUEST (1000) minutes, the oldest first,
        so a caller needing more pages: the next startTime is the last row's minute + 60000.
        """
        return (
            f"/api/v3/klines?symbol={quote(symbol, safe='')}&interval=1m"
            f"&startTime={start_ms}&endTime={end_ms}&limit={MAX_CANDLES_PER_REQUEST}"
        )

    def parse_candles(self, market: Market, body: bytes) -> CandlePage:
        """Rows `[openTime, open, high, low, close, volume, closeTime, quoteVolume, trades, ...]`
        as closed candles, oldest first. Raises BadFrame for an error body (with Binance's
        message) or one that is not a list; an invalid or misordered row is skipped and named
        in `bad_rows` with its index, the others are kept.
        """
        rows = _decode_rest(_candles_decoder, body)

        def parse(raw: msgspec.Raw) -> CandleUpdate:
            row = _row_decoder.decode(raw)
            return _candle(market, row, closed=True, ts=row.start + MINUTE_MS)

        return candle_page(functools.partial(parse, raw) for raw in rows)

    def _candle_update(self, event: _Event) -> CandleUpdate:
        kline, symbol, ts = event.kline, event.symbol, event.time
        if kline is None or symbol is None or ts is None:
            raise ValueError("kline event without `s`, `E` or `k`")
        market = self._markets.get(symbol)
        if market is None:
            raise ValueError(f"unknown symbol {symbol[:40]!r}")
        if kline.symbol != symbol:
            raise ValueError(f"kline of {kline.symbol[:40]!r} in an event of {symbol}")
        if kline.interval != "1m":
            raise ValueError(f"kline interval {kline.interval[:8]!r} is not 1m")
        # A candle's updates all come after it opened: an earlier stamp is a wrong clock.
        if not (MIN_TS_MS <= ts <= MAX_TS_MS and ts >= kline.start):
            raise ValueError(f"event time {ts} is outside 2010..2100 or before its minute")
        return _candle(market, kline, closed=kline.closed, ts=ts)


def _decode_rest(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    if len(body) > MAX_REST_BYTES:
        raise BadFrame(f"body of {len(body)} bytes exceeds {MAX_REST_BYTES}", body[:64])
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        problem = f"invalid: {str(exc)[:200]}"
    # Binance answers a refused request with an error object instead: report its message.
    with contextlib.suppress(msgspec.DecodeError, RecursionError):
        problem = _refusal(_error_decoder.decode(body))
    raise BadFrame(problem, body[:64])


def _refusal(error: _Error) -> str:
    return f"binance error {error.code}: {error.msg[:200]}"


def _candle(market: Market, k: _Kline | _Row, *, closed: bool, ts: int) -> CandleUpdate:
    if k.start % MINUTE_MS or not MIN_TS_MS <= k.start <= MAX_TS_MS - MINUTE_MS:
        raise ValueError(f"open time {k.start} is not a plausible minute start")
    if k.end != k.start + MINUTE_MS - 1:
        raise ValueError(f"close time {k.end} does not end the minute {k.start}")
    open_, high, low, close = float(k.open), float(k.high), float(k.low), float(k.close)
    quote_volume = None if k.quote_volume is None else float(k.quote_volume)
    candle = CandleUpdate(
        market, k.start, open_, high, low, close, float(k.volume), k.trades, closed, ts,
        quote_volume,
    )  # fmt: skip
    return check_candle(candle)


if TYPE_CHECKING:
    # mypy checks here that the class keeps to the protocol every feed is written against.
    _conforms: ExchangeProtocol = BinanceProtocol({})


# Klines come every 1-2 s per symbol while the stream is healthy; the server pings every 20 s;
# a connection lives at most 24 h; 300 connection attempts per 5 minutes; REST: weight 2 per
# klines call out of 6,000 a minute.
SPEC: Final = ExchangeSpec(
    EXCHANGE,
    FeedLimits(1.0, 60.0, silence_s=30.0, max_connection_s=23.5 * 3600),
    page_minutes=MAX_CANDLES_PER_REQUEST,
    rest_interval_s=0.1,
    markets_per_connection=MAX_STREAMS,
    from_listing=BinanceProtocol.from_listing,
)
