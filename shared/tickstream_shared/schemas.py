"""Message schemas on Kafka and their single decode entry point."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from tickstream_shared.errors import BadIdentifier, BadMessage
from tickstream_shared.naming import Market, MetricKind, parse_kind


@dataclass(frozen=True, slots=True)
class Tick:
    """One observation of a market: last price and volume traded in the minute up to it."""

    exchange: str
    base: str
    quote: str
    seq: int  # per-market sequence number given by the watcher, strictly increasing
    exchange_ts: int  # event time, ms since the epoch, from the exchange
    received_ts: int  # ms since the epoch when the watcher received it
    price: float
    volume: float

    @property
    def market(self) -> Market:
        return Market(self.exchange, self.base, self.quote)

    def value(self, kind: MetricKind) -> float:
        return self.price if kind == "price" else self.volume

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Alert:
    """A value above factor x its own trailing mean, raised once per tick and metric."""

    alert_id: str
    metric: str
    kind: str
    exchange_ts: int
    seq: int
    value: float
    mean: float
    factor: float
    ratio: float
    window_seconds: int
    samples: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def alert_id(metric_id: str, exchange_ts: int, seq: int) -> str:
    """The id that makes one tick raise at most one alert per metric."""
    return f"{metric_id}@{exchange_ts}#{seq}"


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    if name not in obj:
        raise BadMessage(f"missing field {name!r}")
    value = obj[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadMessage(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def decode_tick(raw: bytes) -> Tick:
    """Decode and validate one tick; raises BadMessage saying what is wrong."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"not JSON: {exc}", raw) from exc
    if not isinstance(obj, dict):
        raise BadMessage("tick must be a JSON object", raw)
    tick = Tick(
        exchange=_field(obj, "exchange", str),
        base=_field(obj, "base", str),
        quote=_field(obj, "quote", str),
        seq=_field(obj, "seq", int),
        exchange_ts=_field(obj, "exchange_ts", int),
        received_ts=_field(obj, "received_ts", int),
        price=_field(obj, "price", float),
        volume=_field(obj, "volume", float),
    )
    try:
        canonical = Market.parse(tick.market.id)
    except BadIdentifier as exc:
        raise BadMessage(str(exc), raw) from exc
    if canonical != tick.market:
        raise BadMessage(f"market id {tick.market.id!r} must be lower case", raw)
    if not (math.isfinite(tick.price) and math.isfinite(tick.volume)):
        raise BadMessage("price and volume must be finite", raw)
    if tick.price <= 0 or tick.volume < 0:
        raise BadMessage("price must be > 0 and volume >= 0", raw)
    return tick


def decode_alert(raw: bytes) -> Alert:
    """Decode one alert message; raises BadMessage."""
    try:
        obj = json.loads(raw)
        parse_kind(obj["kind"])
        return Alert(**obj)
    except (ValueError, TypeError, KeyError, BadIdentifier) as exc:
        raise BadMessage(f"bad alert: {exc}", raw) from exc
