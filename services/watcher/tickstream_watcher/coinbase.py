"""Coinbase Exchange without I/O: the `matches` and `heartbeat` feed and public REST as events."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Final, TypeAlias, TypeVar
from urllib.parse import quote

import msgspec

from tickstream_shared.naming import Market
from tickstream_shared.schemas import MAX_TS_MS, MIN_TS_MS, MINUTE_MS
from tickstream_watcher.exchange import (
    MAX_PRICE,
    MAX_REST_BYTES,
    MAX_VOLUME,
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
    Rejected,
    Trade,
    candle_page,
    frame_bytes,
)

if TYPE_CHECKING:
    from tickstream_watcher.exchange import ExchangeProtocol

EXCHANGE: Final = "coinbase"
# Coinbase answers a candles request with at most this many rows (minutes): callers page.
MAX_CANDLES_PER_REQUEST: Final = 300
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_SYMBOL_RE: Final = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+")
# Coinbase names a refused product only inside its error text ("XYZ-USD is not a valid product").
_NAMED_PRODUCT_RE: Final = re.compile(r"\b[A-Z0-9]{1,20}-[A-Z0-9]{1,20}\b")

_TradeId = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_Time = Annotated[datetime, msgspec.Meta(tz=True)]


class _Match(msgspec.Struct, tag_field="type", tag="match", frozen=True, gc=False):
    product_id: str
    trade_id: _TradeId
    price: DecimalText
    size: DecimalText  # base units
    time: _Time


class _LastMatch(_Match, tag="last_match", frozen=True, gc=False):
    """The product's newest trade at subscription time: the `matches` channel sends it first."""


class _Heartbeat(msgspec.Struct, tag_field="type", tag="heartbeat", frozen=True, gc=False):
    product_id: str
    last_trade_id: _TradeId


class _Subscriptions(msgspec.Struct, tag_field="type", tag="subscriptions", frozen=True):
    pass


class _Error(msgspec.Struct, tag_field="type", tag="error", frozen=True):
    message: str = ""
    reason: str = ""


class _Type(msgspec.Struct, frozen=True, gc=False):
    type: str


class _Product(msgspec.Struct, frozen=True, gc=False):
    id: str
    base_currency: str
    quote_currency: str
    status: str
    trading_disabled: bool = False


class _RestError(msgspec.Struct, frozen=True):
    message: str


_Message: TypeAlias = _Match | _LastMatch | _Heartbeat | _Subscriptions | _Error
_USED_TYPES: Final = frozenset({"match", "last_match", "heartbeat", "subscriptions", "error"})
# A candles row: time_s, low, high, open, close, volume.
_Row: TypeAlias = tuple[int, float, float, float, float, float]
_T = TypeVar("_T")

_decoder: Final = msgspec.json.Decoder(_Message)
_type_decoder: Final = msgspec.json.Decoder(_Type)
_listing_decoder: Final = msgspec.json.Decoder(list[_Product])
_candles_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw] | _RestError)
_row_decoder: Final = msgspec.json.Decoder(_Row)
_encoder: Final = msgspec.json.Encoder()


class CoinbaseProtocol:
    """Coinbase Exchange (`wss://ws-feed.exchange.coinbase.com`, `api.exchange.coinbase.com`).

    Built from the product ids it subscribes to: a frame about any other product is a BadFrame.
    Every method is pure and safe to call from any number of feeds at once.
    """

    name = EXCHANGE

    def __init__(self, symbols: Mapping[str, Market]) -> None:
        self._markets: dict[str, Market] = dict(symbols)

    @classmethod
    def from_listing(cls, listing: Mapping[Market, str]) -> CoinbaseProtocol:
        """The protocol for every market of a `parse_listing` result."""
        return cls({symbol: market for market, symbol in listing.items()})

    def ws_url(self, base_url: str, symbols: Sequence[str]) -> str:
        """`base_url` itself: Coinbase takes its products in the subscribe frame, not the URL."""
        return base_url

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str]:
        """One frame subscribing `symbols` to `matches` and `heartbeat`; [] for no symbols.

        Coinbase disconnects a client that has not subscribed within 5 s of connecting, so the
        caller sends it right after the handshake.
        """
        if not symbols:
            return []
        frame = {
            "type": "subscribe",
            "product_ids": list(symbols),
            "channels": ["matches", "heartbeat"],
        }
        return [_encoder.encode(frame).decode()]

    def parse(self, frame: str | bytes) -> list[FeedEvent]:
        """A Trade per `match`; a Heartbeat per `heartbeat`, `subscriptions` or `last_match`
        (with its trade id); a Rejected and a Reconnect per `error` naming a product; [] for
        other types (ticker, l2update, ...).

        Raises only BadFrame.
        """
        frame = frame_bytes(frame)
        try:
            message = _decoder.decode(frame)
        except msgspec.ValidationError as exc:
            if _type_of(frame) in _USED_TYPES:
                raise BadFrame(f"invalid: {exc}", frame[:64]) from None
            return []  # a channel we do not subscribe to: nothing in it for us
        except (msgspec.DecodeError, RecursionError) as exc:
            raise BadFrame(f"not JSON: {str(exc)[:100]}", frame[:64]) from None
        try:
            return self._events(message)
        except ValueError as exc:
            raise BadFrame(str(exc), frame[:64]) from None

    def listing_path(self) -> str:
        return "/products"

    def parse_listing(self, body: bytes) -> dict[Market, str]:
        """Every product with status `online` and trading enabled, by market; raises BadFrame.

        Products whose currencies are not `[a-z0-9]+` once lower-cased, or whose id is not
        `<base>-<quote>` letters and digits (it goes into REST paths), are skipped.
        """
        listing: dict[Market, str] = {}
        for product in _decode_rest(_listing_decoder, body):
            base, quote_ = product.base_currency.lower(), product.quote_currency.lower()
            if (
                product.status == "online"
                and not product.trading_disabled
                and NAME_RE.fullmatch(base)
                and NAME_RE.fullmatch(quote_)
                and _SYMBOL_RE.fullmatch(product.id)
            ):
                listing[Market(EXCHANGE, base, quote_)] = product.id
        return listing

    def candles_path(self, symbol: str, start_ms: int, end_ms: int) -> str:
        """One-minute candles from start to end, sent as ISO 8601 UTC in whole seconds.

        One request returns at most MAX_CANDLES_PER_REQUEST (300) minutes and Coinbase refuses a
        longer span, so the caller pages longer ranges.
        """
        start, end = _iso(start_ms), _iso(end_ms)
        return f"/products/{quote(symbol, safe='')}/candles?granularity=60&start={start}&end={end}"

    def parse_candles(self, market: Market, body: bytes) -> CandlePage:
        """Rows `[time_s, low, high, open, close, volume]`, newest first, as closed candles
        oldest first; minutes without trades are absent. Raises BadFrame for an error body
        (with Coinbase's message) or one that is not a list; an invalid or misordered row is
        skipped and named in `bad_rows`, the others are kept.
        """
        answer = _decode_rest(_candles_decoder, body)
        if isinstance(answer, _RestError):
            raise BadFrame(f"coinbase refused: {answer.message[:200]}", body[:64])
        return candle_page(functools.partial(_candle, market, raw) for raw in reversed(answer))

    def _events(self, message: _Message) -> list[FeedEvent]:
        match message:
            case _LastMatch():
                # The newest trade before the subscription: it belongs to the time the feed was
                # not subscribed, whose minutes a backfill repairs from REST; counted as a trade
                # it would put a one-trade bar in such a minute (after a reconnect: in the gap).
                return [Heartbeat(self._market(message.product_id), message.trade_id)]
            case _Match():
                trade = Trade(
                    self._market(message.product_id),
                    message.trade_id,
                    _quantity("price", message.price, MAX_PRICE),
                    _quantity("size", message.size, MAX_VOLUME),
                    _ms(message.time),
                )
                return [trade]
            case _Heartbeat():
                return [Heartbeat(self._market(message.product_id), message.last_trade_id)]
            case _Subscriptions():
                return [Heartbeat()]
            case _Error():
                # Coinbase ignores a whole subscribe that names a product it refuses: the others
                # get nothing until subscribed again, without it.
                rejection = _rejection(message)
                return [rejection, Reconnect(f"subscribe refused for {rejection.symbol}")]

    def _market(self, product_id: str) -> Market:
        market = self._markets.get(product_id)
        if market is None:
            raise ValueError(f"unknown product {product_id[:40]!r}")
        return market


def _type_of(frame: str | bytes) -> str:
    try:
        return _type_decoder.decode(frame).type
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadFrame(f"invalid: {str(exc)[:100]}", frame[:64]) from None


def _decode_rest(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    if len(body) > MAX_REST_BYTES:
        raise BadFrame(f"body of {len(body)} bytes exceeds {MAX_REST_BYTES}", body[:64])
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadFrame(f"invalid: {str(exc)[:200]}", body[:64]) from None


def _quantity(field: str, text: str, upper: float) -> float:
    value = float(text)
    if not 0 < value <= upper:
        raise ValueError(f"{field} {text} is not in (0, {upper:g}]")
    return value


def _ms(time: datetime) -> int:
    # Integer arithmetic on the timedelta: a float timestamp would round microseconds.
    ms = (time - _EPOCH) // _ONE_MS
    if not MIN_TS_MS <= ms <= MAX_TS_MS:
        raise ValueError(f"time {time.isoformat()} is not between 2010 and 2100")
    return ms


def _iso(ms: int) -> str:
    # "Z", not "+00:00": a "+" in a query string reads as a space.
    return (_EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rejection(error: _Error) -> Rejected:
    text = f"{error.message}: {error.reason}" if error.reason else error.message
    named = _NAMED_PRODUCT_RE.search(error.reason) or _NAMED_PRODUCT_RE.search(error.message)
    if named is None:
        raise ValueError(f"coinbase error naming no product: {text[:200]}")
    return Rejected(named[0], text[:200])


def _candle(market: Market, raw: msgspec.Raw) -> CandleUpdate:
    time_s, low, high, open_, close, volume = _row_decoder.decode(raw)
    minute = time_s * 1000
    return CandleUpdate(
        market, minute, open_, high, low, close, volume, None, True, minute + MINUTE_MS
    )


if TYPE_CHECKING:
    # mypy checks here that the class keeps to the protocol every feed is written against.
    _conforms: ExchangeProtocol = CoinbaseProtocol({})


# Heartbeats once a second per product once subscribed; REST: 8 requests/s per IP.
SPEC: Final = ExchangeSpec(
    EXCHANGE,
    FeedLimits(1.0, 60.0, silence_s=15.0),
    page_minutes=MAX_CANDLES_PER_REQUEST,
    rest_interval_s=0.2,
    markets_per_connection=None,
    from_listing=CoinbaseProtocol.from_listing,
)
