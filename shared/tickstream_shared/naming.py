"""Topic names, market and metric ids, Redis keys: built here and nowhere else."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

from tickstream_shared.errors import BadIdentifier, echo

# price: the minute's close; volume: base units traded in the minute; turnover: the minute's
# traded value in the quote currency (what exchanges call quote volume), so that markets of
# one quote currency compare by money traded rather than by how many units a coin is cut into.
MetricKind = Literal["price", "volume", "turnover"]
METRIC_KINDS: Final[tuple[MetricKind, ...]] = get_args(MetricKind)
# The kinds alerts watch: a turnover spike is a volume spike seen through a steadier price, so
# alerting on it too would say the same thing twice.
AlertKind = Literal["price", "volume"]
ALERT_KINDS: Final[tuple[AlertKind, ...]] = get_args(AlertKind)

# What a rank compares: the window's std (in the metric's unit), std / |mean| (unitless), or,
# for price only, the std of the minute-to-minute log returns (unitless volatility).
RankMeasure = Literal["std", "cv", "logret"]
RANK_MEASURES: Final[tuple[RankMeasure, ...]] = get_args(RankMeasure)
MEASURES_BY_KIND: Final[dict[MetricKind, tuple[RankMeasure, ...]]] = {
    "price": ("std", "cv", "logret"),
    "volume": ("std", "cv"),
    "turnover": ("std", "cv"),
}
# The measure a rank uses when none is asked for: the first of these that the kind has.
# Unitless measures come first because they compare markets of any price level or size
# (std ranks a price by its level and a volume by its unit); logret, where a kind has it,
# before cv: it measures moves, not the spread of levels over the window. Derived from
# MEASURES_BY_KIND so that a new kind gets a default without an entry here.
_DEFAULT_MEASURE_PREFERENCE: Final[tuple[RankMeasure, ...]] = ("logret", "cv", "std")
DEFAULT_MEASURE_BY_KIND: Final[dict[MetricKind, RankMeasure]] = {
    kind: next(m for m in _DEFAULT_MEASURE_PREFERENCE if m in measures)
    for kind, measures in MEASURES_BY_KIND.items()
}

TICK_TOPIC_PREFIX: Final = "ticks."
# Regex subscriptions (stats, alerts, gateway) match every per-pair tick topic, now and future.
TICK_TOPIC_PATTERN: Final = r"^ticks\.[a-z0-9]+\.[a-z0-9]+-[a-z0-9]+$"
ALERTS_TOPIC: Final = "alerts"
# Consumer groups of the tick topics. Alerts reads the stats group's committed offsets: they
# say which ticks stats has stored (it commits only after storing).
STATS_GROUP: Final = "stats"
ALERTS_GROUP: Final = "alerts"
# Records a consumer could not use, with where they came from and why (see deadletter.py).
DEADLETTER_TOPIC: Final = "deadletter"
# Topics that share a retention (KafkaSettings.retention).
TopicFamily = Literal["ticks", "alerts", "deadletter"]


def topic_family(topic: str) -> TopicFamily:
    """The retention family of `topic`: any topic but `alerts` and `deadletter` is kept as
    ticks are, so one created by hand or by a test is bounded too."""
    if topic == ALERTS_TOPIC:
        return "alerts"
    if topic == DEADLETTER_TOPIC:
        return "deadletter"
    return "ticks"


_PART = r"[a-z0-9]+"
_MARKET_RE: Final = re.compile(rf"^(?P<exchange>{_PART}):(?P<base>{_PART})-(?P<quote>{_PART})$")
_KINDS = "|".join(METRIC_KINDS)
_METRIC_RE: Final = re.compile(
    rf"^(?P<exchange>{_PART}):(?P<base>{_PART})-(?P<quote>{_PART}):(?P<kind>{_KINDS})$"
)
_TOPIC_RE: Final = re.compile(TICK_TOPIC_PATTERN)
# One WATCHER_MARKETS entry: a market id, or a pattern whose base or quote is `*` (any name).
MARKET_SPEC_RE: Final = re.compile(rf"^({_PART}):({_PART}|\*)-({_PART}|\*)$")
# A replay's candle file: `<exchange>_<base>-<quote>_1m.csv[.gz]`.
_CANDLE_FILE_RE: Final = re.compile(
    rf"^(?P<exchange>{_PART})_(?P<base>{_PART})-(?P<quote>{_PART})_1m\.csv(\.gz)?$"
)

REDIS_PREFIX: Final = "tickstream"


@dataclass(frozen=True, slots=True, order=True)
class Market:
    """One traded pair on one exchange, e.g. binance:btc-usdt."""

    exchange: str
    base: str
    quote: str

    @property
    def id(self) -> str:
        return f"{self.exchange}:{self.base}-{self.quote}"

    @property
    def topic(self) -> str:
        return f"{TICK_TOPIC_PREFIX}{self.exchange}.{self.base}-{self.quote}"

    def metric_id(self, kind: MetricKind) -> str:
        return f"{self.id}:{kind}"

    @classmethod
    def parse(cls, market_id: str) -> Market:
        """Parse `<exchange>:<base>-<quote>` (case-insensitive); raises BadIdentifier."""
        match = _MARKET_RE.match(market_id.strip().lower())
        if match is None:
            raise BadIdentifier(f"market id {echo(market_id)} is not <exchange>:<base>-<quote>")
        return cls(match["exchange"], match["base"], match["quote"])

    @classmethod
    def from_topic(cls, topic: str) -> Market:
        """Parse `ticks.<exchange>.<base>-<quote>`; raises BadIdentifier."""
        if _TOPIC_RE.match(topic) is None:
            raise BadIdentifier(f"topic {echo(topic)} is not ticks.<exchange>.<base>-<quote>")
        exchange, pair = topic[len(TICK_TOPIC_PREFIX) :].split(".", 1)
        base, quote = pair.split("-", 1)
        return cls(exchange, base, quote)


def candle_file_market(file_name: str) -> Market | None:
    """The market of a candle file named `<exchange>_<base>-<quote>_1m.csv[.gz]`, else None."""
    match = _CANDLE_FILE_RE.match(file_name)
    if match is None:
        return None
    return Market(match["exchange"], match["base"], match["quote"])


@dataclass(frozen=True, slots=True)
class MetricId:
    """A market's price, volume or turnover series: `<exchange>:<base>-<quote>:<kind>`."""

    market: Market
    kind: MetricKind

    def __str__(self) -> str:
        return self.market.metric_id(self.kind)

    @classmethod
    def parse(cls, metric_id: str) -> MetricId:
        """Parse a metric id; raises BadIdentifier saying what the expected shape is."""
        match = _METRIC_RE.match(metric_id.strip().lower())
        if match is None:
            raise BadIdentifier(
                f"metric id {echo(metric_id)} is not <exchange>:<base>-<quote>:<{_KINDS}>"
            )
        market = Market(match["exchange"], match["base"], match["quote"])
        return cls(market, parse_kind(match["kind"]))


def parse_kind(value: str) -> MetricKind:
    """Return the metric kind named by value; raises BadIdentifier for anything else."""
    for kind in METRIC_KINDS:
        if value == kind:
            return kind
    raise BadIdentifier(f"kind {echo(value)} is not one of {', '.join(METRIC_KINDS)}")


def parse_measure(kind: MetricKind, value: str) -> RankMeasure:
    """The rank measure named by value for `kind`; raises BadIdentifier for anything else."""
    for measure in MEASURES_BY_KIND[kind]:
        if value == measure:
            return measure
    allowed = ", ".join(MEASURES_BY_KIND[kind])
    raise BadIdentifier(f"measure {echo(value)} is not one of {allowed} for kind {kind}")


@functools.lru_cache(maxsize=8192)
def market_of(market_id: str) -> Market:
    """`Market.parse` cached per id: hot paths look markets up per message, not per parse.

    Raises BadIdentifier (never cached, so bad ids cannot fill the cache; good ones are
    bounded by maxsize).
    """
    return Market.parse(market_id)


def stats_key(metric_id: str) -> str:
    """Redis hash holding the latest window stats of one metric."""
    return f"{REDIS_PREFIX}:stats:{metric_id}"


def rank_key(kind: MetricKind, measure: RankMeasure) -> str:
    """Redis sorted set of every live (not stale) metric of one kind, scored by `measure`."""
    return f"{REDIS_PREFIX}:rank:{kind}:{measure}"


# Redis set of every metric id stats has written, stale or not (the /api/metrics listing).
METRICS_KEY: Final = f"{REDIS_PREFIX}:metrics"
# Redis sorted set holding the event-time clock (member "minute"), raised with ZADD GT so
# every stats instance shares the newest minute any of them has seen.
CLOCK_KEY: Final = f"{REDIS_PREFIX}:clock"
CLOCK_MEMBER: Final = "minute"
