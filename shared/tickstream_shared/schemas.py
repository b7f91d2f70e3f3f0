"""Message schemas on Kafka (minute-bar ticks, alerts) and their single decode entry points."""

from __future__ import annotations

from typing import Annotated, Final, Literal, overload

import msgspec

from tickstream_shared.errors import BadIdentifier, BadMessage
from tickstream_shared.naming import AlertKind, Market, MetricKind, market_of

MINUTE_MS: Final = 60_000
# Plausible event times: 2010-01-01 (before any crypto exchange traded) to 2100-01-01.
MIN_TS_MS: Final = 1_262_304_000_000
MAX_TS_MS: Final = 4_102_444_800_000
# An update may be stamped at most this far ahead of the watcher's receive time, and a receive
# time at most this far ahead of the reader's clock: one wrong clock must never move the
# event-time clock of every window (a tick dated 2100 would otherwise empty them all).
MAX_CLOCK_AHEAD_MS: Final = 5 * MINUTE_MS
# The last update of a bar may come a little after the bar's end (exchanges close bars late).
MAX_BAR_LATENESS_MS: Final = 2 * MINUTE_MS
# A tick is ~300 bytes; anything far larger is not one of ours and is refused before parsing.
MAX_MESSAGE_BYTES: Final = 4096
# Market and metric ids in messages: no market longer than this can exist anywhere.
MAX_ID_CHARS: Final = 120

_Ts = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)]
_Seq = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_Price = Annotated[float, msgspec.Meta(gt=0.0, le=1e12)]
_Volume = Annotated[float, msgspec.Meta(ge=0.0, le=1e18)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
_Finite = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
_Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]


class Tick(msgspec.Struct, frozen=True, gc=False):
    """One update of a market's current one-minute bar, as the watcher publishes it.

    `open`/`high`/`low`/`close` and `volume` (base units) are the bar so far; `quote_volume` is
    the value traded so far in the quote currency, where the source says it (None: unknown,
    never estimated; messages from before it existed decode as unknown). `closed` is true on
    the bar's last update. `seq` orders a market's updates: a larger `seq` is newer, always.
    """

    market: _Id  # <exchange>:<base>-<quote>
    minute: _Ts  # bar open time, ms since the epoch, a multiple of 60000
    seq: _Seq
    exchange_ts: _Ts  # event time of this update, from the exchange
    received_ts: _Ts  # when the watcher received it
    open: _Price
    high: _Price
    low: _Price
    close: _Price
    volume: _Volume
    trades: _Count | None = None  # trades in the bar so far, when the source knows it
    closed: bool = False
    quote_volume: _Volume | None = None  # quote units traded so far, when the source says it

    @overload
    def value(self, kind: AlertKind) -> float: ...
    @overload
    def value(self, kind: MetricKind) -> float | None: ...
    def value(self, kind: MetricKind) -> float | None:
        """The metric's value in this bar: the close (price), the base volume so far (volume),
        or the quote volume so far (turnover: None when unknown)."""
        if kind == "price":
            return self.close
        if kind == "volume":
            return self.volume
        return self.quote_volume

    def encode(self) -> bytes:
        return _encoder.encode(self)


# An alert raised on a forming minute is `provisional` until a closed bar of its minute judges
# it again: `confirmed` if that bar still crosses, `retracted` if not.
AlertStatus = Literal["provisional", "confirmed", "retracted"]
ALERT_STATUSES: Final[tuple[AlertStatus, ...]] = ("provisional", "confirmed", "retracted")


class Alert(msgspec.Struct, frozen=True, gc=False):
    """A metric's value in one minute above factor x the mean of the minutes before it.

    One alert per metric and minute (`alert_id`); each change of its status is the whole alert
    again, with a larger `status_seq`, so a reader keeps the one with the largest. `value`,
    `mean`, `ratio`, `samples`, `seq` and `exchange_ts` are those of the update whose crossing
    the alert stands on: the raising update while provisional, the closed bar once confirmed;
    a retracted alert keeps those of the last update that crossed. The status fields have
    defaults so that messages from before statuses existed still decode (as never judged).
    """

    alert_id: _Id  # <metric>@<minute>: at most one alert per metric and minute
    metric: _Id
    kind: AlertKind
    minute: _Ts
    exchange_ts: _Ts  # event time of the update that crossed the threshold
    seq: _Seq
    value: _Finite
    mean: _Finite
    factor: _Finite
    ratio: _Finite
    window_minutes: Annotated[int, msgspec.Meta(ge=1, le=100_000)]
    samples: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    status: AlertStatus = "provisional"
    status_seq: _Seq | None = None  # seq of the update that set the status (None: `seq`)
    status_ts: _Ts | None = None  # event time of that update (None: `exchange_ts`)
    final_value: _Finite | None = None  # the closed bar's value that judged it (not provisional)

    @property
    def version(self) -> int:
        """Orders the messages of one alert: the one with the largest is its current state."""
        return self.seq if self.status_seq is None else self.status_seq

    def encode(self) -> bytes:
        return _encoder.encode(self)

    def as_json(self) -> dict[str, object]:
        result: dict[str, object] = msgspec.to_builtins(self)
        return result


def alert_id(metric_id: str, minute: int) -> str:
    """The id that makes one metric raise at most one alert per minute."""
    return f"{metric_id}@{minute}"


_encoder: Final = msgspec.json.Encoder()
_tick_decoder: Final = msgspec.json.Decoder(Tick)
_alert_decoder: Final = msgspec.json.Decoder(Alert)


def _parse(decoder: msgspec.json.Decoder[Tick] | msgspec.json.Decoder[Alert], raw: bytes) -> object:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}", raw[:64])
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise BadMessage(f"invalid: {exc}", raw[:64]) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadMessage(f"not JSON: {str(exc)[:100]}", raw[:64]) from None


def decode_tick(raw: bytes, *, now_ms: int) -> Tick:
    """Decode and validate one tick; raises only BadMessage, saying what is wrong.

    `now_ms` is the reader's wall clock: a receive time more than MAX_CLOCK_AHEAD_MS after it
    is refused, as is an update stamped that far after its receive time.
    """
    tick = _parse(_tick_decoder, raw)
    assert isinstance(tick, Tick)
    try:
        market = market_of(tick.market)
    except BadIdentifier as exc:
        raise BadMessage(str(exc), raw[:64]) from None
    if market.id != tick.market:
        raise BadMessage(f"market id {tick.market!r} must be lower case", raw[:64])
    problem = _bar_problem(tick, now_ms)
    if problem is not None:
        raise BadMessage(f"{tick.market} seq {tick.seq}: {problem}", raw[:64])
    return tick


def _bar_problem(tick: Tick, now_ms: int) -> str | None:
    if tick.minute % MINUTE_MS:
        return f"minute {tick.minute} is not a multiple of {MINUTE_MS}"
    if not tick.minute <= tick.exchange_ts <= tick.minute + MINUTE_MS + MAX_BAR_LATENESS_MS:
        return f"exchange_ts {tick.exchange_ts} is outside its bar {tick.minute}"
    if tick.exchange_ts > tick.received_ts + MAX_CLOCK_AHEAD_MS:
        return f"exchange_ts {tick.exchange_ts} is ahead of received_ts {tick.received_ts}"
    if tick.received_ts > now_ms + MAX_CLOCK_AHEAD_MS:
        return f"received_ts {tick.received_ts} is in the future (now {now_ms})"
    if not (tick.low <= tick.open <= tick.high and tick.low <= tick.close <= tick.high):
        return "open and close must lie within low..high"
    return None


def decode_alert(raw: bytes) -> Alert:
    """Decode and validate one alert message; raises only BadMessage."""
    alert = _parse(_alert_decoder, raw)
    assert isinstance(alert, Alert)
    return alert


def market_of_tick(tick: Tick) -> Market:
    """The tick's market as a `Market` (cached per id, so cheap on hot paths)."""
    return market_of(tick.market)
