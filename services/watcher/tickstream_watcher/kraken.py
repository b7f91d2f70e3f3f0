"""Kraken WebSocket v2 one-minute `ohlc` candles and public REST (AssetPairs, OHLC), sans I/O."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, Literal, TypeVar
from urllib.parse import urlencode

import msgspec

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MAX_TS_MS, MIN_TS_MS, MINUTE_MS
from tickstream_watcher.exchange import (
    MAX_REST_BYTES,
    NAME_RE,
    BadFrame,
    CandlePage,
    CandleUpdate,
    ExchangeSpec,
    FeedEvent,
    FeedLimits,
    Heartbeat,
    Reconnect,
    Rejected,
    candle_page,
    check_candle,
    frame_bytes,
)

# Our choice, not a Kraken limit (none is documented): Kraken acks each symbol separately, so
# 100 symbols keep a subscribe frame to a few kB and its burst of acks to 100 frames.
SUBSCRIBE_BATCH: Final = 100
# Legacy asset codes: AssetPairs `wsname` and REST pair names use them, WS v2 symbols do not.
_V2_ASSET: Final = {"XBT": "BTC", "XDG": "DOGE"}
_LEGACY_ASSET: Final = {v2: legacy for legacy, v2 in _V2_ASSET.items()}
_NS_PER_MS: Final = 1_000_000
_RFC3339_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z"
)

_T = TypeVar("_T")
_A = TypeVar("_A", bound="_Answer")


class _AckResult(msgspec.Struct, gc=False):
    symbol: str | None = None


class _Frame(msgspec.Struct, gc=False):
    channel: str | None = None  # data frames: ohlc, heartbeat, status, ticker, ...
    method: str | None = None  # answers to our requests: subscribe, pong
    type: str | None = None
    timestamp: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")  # decoded only for the channels we use
    success: bool | None = None
    error: str | None = None
    symbol: str | None = None
    result: _AckResult | None = None


class _Ohlc(msgspec.Struct, gc=False):
    symbol: str
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int
    interval_begin: str
    interval: int
    vwap: float | None = None  # the minute's volume-weighted average price, Kraken's own


class _Status(msgspec.Struct, gc=False):
    system: Literal["online", "maintenance", "cancel_only", "post_only"]


class _Pair(msgspec.Struct, gc=False):
    wsname: str | None = None
    status: str | None = None


class _Answer(msgspec.Struct, gc=False):
    error: list[str] = []  # Kraken REST reports failures here, with HTTP status 200


class _Listing(_Answer, gc=False):
    result: dict[str, _Pair] = {}


# [time s, open, high, low, close, vwap, volume, count]; numbers other than time/count are text.
_Row = tuple[int, str, str, str, str, str, str, int]


class _OhlcAnswer(_Answer, gc=False):
    # One key per pair (Kraken's name) plus "last"; rows are decoded one by one.
    result: dict[str, list[msgspec.Raw] | int] = {}


_frame_decoder: Final = msgspec.json.Decoder(_Frame)
_ohlc_decoder: Final = msgspec.json.Decoder(list[_Ohlc])
_status_decoder: Final = msgspec.json.Decoder(list[_Status])
_listing_decoder: Final = msgspec.json.Decoder(_Listing)
_ohlc_answer_decoder: Final = msgspec.json.Decoder(_OhlcAnswer)
_row_decoder: Final = msgspec.json.Decoder(_Row)
_encoder: Final = msgspec.json.Encoder()


def v2_symbol(name: str) -> str:
    """The WS v2 symbol of a Kraken pair name: `XBT/USD` → `BTC/USD`, `XDG/EUR` → `DOGE/EUR`."""
    return "/".join(_V2_ASSET.get(asset, asset) for asset in name.split("/"))


def rest_pair(symbol: str) -> str:
    """The REST pair name of a WS v2 symbol: `BTC/USD` → `XBTUSD`, `DOGE/USD` → `XDGUSD`."""
    return "".join(_LEGACY_ASSET.get(asset, asset) for asset in symbol.split("/"))


class KrakenProtocol:
    """Kraken's documented formats for the markets of `symbols` (v2 symbol → market).

    A candle of a symbol not in `symbols` is a BadFrame. Stateless after construction: every
    method is pure and safe to call any number of times.
    """

    name = "kraken"

    def __init__(self, symbols: Mapping[str, Market]) -> None:
        self._markets = dict(symbols)

    @classmethod
    def from_listing(cls, listing: Mapping[Market, str]) -> KrakenProtocol:
        """The protocol for every market of a `parse_listing` answer."""
        return cls({symbol: market for market, symbol in listing.items()})

    def ws_url(self, base_url: str, symbols: Sequence[str]) -> str:
        return base_url  # v2 subscribes by frame, never by URL

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str]:
        """`ohlc` interval 1 with a snapshot, SUBSCRIBE_BATCH symbols a frame.

        No `heartbeat` subscription: Kraken sends heartbeats once any channel is subscribed.
        """
        frames: list[str] = []
        for req_id, start in enumerate(range(0, len(symbols), SUBSCRIBE_BATCH), start=1):
            batch = list(symbols[start : start + SUBSCRIBE_BATCH])
            params = {"channel": "ohlc", "symbol": batch, "interval": 1, "snapshot": True}
            request = {"method": "subscribe", "params": params, "req_id": req_id}
            frames.append(_encoder.encode(request).decode())
        return frames

    def parse(self, frame: str | bytes) -> list[FeedEvent]:
        frame = frame_bytes(frame)
        try:
            return self._events(_decode(_frame_decoder, frame))
        except BadFrame as exc:
            exc.raw = frame[:200]
            raise

    def _events(self, frame: _Frame) -> list[FeedEvent]:
        if frame.channel == "ohlc":
            return self._candles(frame)
        if frame.channel == "heartbeat" or frame.method == "pong":
            return [Heartbeat()]
        if frame.channel == "status":
            return [_status_event(_decode(_status_decoder, frame.data))]
        if frame.method == "subscribe":
            return [_ack_event(frame)]
        if frame.channel is None and frame.method is None:
            raise BadFrame("frame has neither channel nor method")
        return []  # ticker, trade, book, ... and answers to requests we never send

    def _candles(self, frame: _Frame) -> list[FeedEvent]:
        if frame.type not in ("snapshot", "update"):
            raise BadFrame(f"ohlc frame type {str(frame.type)[:20]!r}")
        if frame.timestamp is None and frame.type == "update":
            raise BadFrame("ohlc update without timestamp")
        frame_ts = None if frame.timestamp is None else _epoch_ns(frame.timestamp) // _NS_PER_MS
        out: list[FeedEvent] = []
        for entry in _decode(_ohlc_decoder, frame.data):
            market = self._markets.get(entry.symbol)
            if market is None:
                raise BadFrame(f"ohlc of unknown symbol {entry.symbol[:40]!r}")
            if entry.interval != 1:
                raise BadFrame(f"ohlc interval {entry.interval}, not 1")
            begin = _epoch_ns(entry.interval_begin)
            if begin % (MINUTE_MS * _NS_PER_MS):
                raise BadFrame(f"interval_begin {entry.interval_begin!r} is not a whole minute")
            minute = begin // _NS_PER_MS
            # Without a frame time the candle is known to be as of its open, no later: parse has
            # no clock, and minute + 60000 would date a forming candle up to a minute ahead.
            stamp = minute if frame_ts is None else frame_ts
            prices = entry.open, entry.high, entry.low, entry.close, entry.volume
            quote_volume = _quote_volume(entry.vwap, entry.volume)
            candle = CandleUpdate(market, minute, *prices, entry.trades, False, stamp, quote_volume)
            out.append(check_candle(candle))
        return out

    def listing_path(self) -> str:
        return "/0/public/AssetPairs"

    def parse_listing(self, body: bytes) -> Mapping[Market, str]:
        """Online pairs with a `wsname` whose assets are `[a-z0-9]+` lower-cased (first wins)."""
        markets: dict[Market, str] = {}
        for pair in _rest(_listing_decoder, body).result.values():
            if pair.status != "online" or pair.wsname is None:
                continue  # a pair whose status the listing does not give is not known to trade
            symbol = v2_symbol(pair.wsname)
            assets = symbol.lower().split("/")
            if len(assets) == 2 and all(NAME_RE.fullmatch(asset) for asset in assets):
                markets.setdefault(Market(self.name, assets[0], assets[1]), symbol)
        return markets

    def candles_path(self, symbol: str, start_ms: int, end_ms: int) -> str:
        """Kraken has no end parameter and answers with the 720 most recent minutes whatever
        `since` says, so a backfill reaches back 12 h at most. `since` is one second before
        `start_ms`, so the start minute is in whether Kraken reads it inclusive or exclusive."""
        query = urlencode({"pair": rest_pair(symbol), "interval": 1, "since": start_ms // 1000 - 1})
        return f"/0/public/OHLC?{query}"

    def parse_candles(self, market: Market, body: bytes) -> CandlePage:
        """Every row but the last, which Kraken documents as the minute still forming. Raises
        BadFrame for an error answer or one without exactly one pair's rows; an invalid or
        misordered row is skipped and named in `bad_rows`, the others are kept."""
        answer = _rest(_ohlc_answer_decoder, body)
        pairs = [rows for key, rows in answer.result.items() if key != "last"]
        rows = pairs[0] if len(pairs) == 1 else None
        if not isinstance(rows, list):
            raise BadFrame(f"OHLC answer holds {len(pairs)} pairs, not one list of rows")
        return candle_page(functools.partial(_rest_candle, market, raw) for raw in rows[:-1])


def _rest_candle(market: Market, raw: msgspec.Raw) -> CandleUpdate:
    time_s, open_, high, low, close, vwap, volume, count = _decode(_row_decoder, raw)
    minute = time_s * 1000
    prices = float(open_), float(high), float(low), float(close), float(volume)
    quote_volume = _quote_volume(float(vwap), prices[-1])
    return CandleUpdate(market, minute, *prices, count, True, minute + MINUTE_MS, quote_volume)


def _quote_volume(vwap: float | None, volume: float) -> float | None:
    """Kraken sends no quote volume: it is derived from Kraken's own volume-weighted average
    price, vwap x volume (exact up to one float rounding); None without a vwap. A vwap that
    is not a finite non-negative number gives a product `check_candle` refuses."""
    return None if vwap is None else vwap * volume


def _decode(decoder: msgspec.json.Decoder[_T], data: str | bytes | msgspec.Raw) -> _T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadFrame(f"invalid: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadFrame(f"not JSON: {str(exc)[:100]}") from None


def _rest(decoder: msgspec.json.Decoder[_A], body: bytes) -> _A:
    if len(body) > MAX_REST_BYTES:
        raise BadFrame(f"REST body of {len(body)} bytes exceeds {MAX_REST_BYTES}", body[:64])
    answer = _decode(decoder, body)
    if answer.error:
        raise BadFrame(f"Kraken error: {'; '.join(answer.error)[:200]}", body[:200])
    return answer


def _epoch_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time with up to 9 fractional digits."""
    match = _RFC3339_RE.fullmatch(text)
    if match is None:
        raise BadFrame(f"time {text[:40]!r} is not RFC 3339 UTC")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    try:
        seconds = int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())
    except ValueError as exc:
        raise BadFrame(f"time {text!r}: {exc}") from None
    ns = seconds * 1_000_000_000 + int((match[7] or "").ljust(9, "0"))
    if not MIN_TS_MS * _NS_PER_MS <= ns <= MAX_TS_MS * _NS_PER_MS:
        raise BadFrame(f"time {text!r} is not between 2010 and 2100")
    return ns


def _status_event(entries: list[_Status]) -> FeedEvent:
    # Only maintenance ends the data; cancel_only and post_only restrict orders while market
    # data flows on, so reconnecting then would only spend the 150 attempts per 10 minutes.
    if any(entry.system == "maintenance" for entry in entries):
        return Reconnect("Kraken system status: maintenance")
    return Heartbeat()


def _ack_event(frame: _Frame) -> FeedEvent:
    if frame.success is None:
        raise BadFrame("subscribe answer without success")
    if frame.success:
        return Heartbeat()
    reason = (frame.error or "refused without a reason")[:200]
    # The symbol is in `result`, at the top level, or only in the error text
    # ("Currency pair not supported XBT/USD"); "" when the refusal names none.
    symbol = (frame.result.symbol if frame.result else None) or frame.symbol
    if symbol is None:
        words = reason.split()
        symbol = words[-1] if words and "/" in words[-1] else ""
    return Rejected(symbol, reason)


# Heartbeats once a second once subscribed; about 150 connection attempts per 10 minutes and
# 5 s after maintenance; the public REST API allows about one request a second; OHLC answers
# with the 720 most recent minutes.
SPEC: Final = ExchangeSpec(
    "kraken",
    FeedLimits(5.0, 60.0, silence_s=15.0),
    page_minutes=720,
    rest_interval_s=1.0,
    markets_per_connection=None,
    from_listing=KrakenProtocol.from_listing,
)
