"""Ids, topic names, settings parsing and the tick/alert schemas."""

from __future__ import annotations

import json

import msgspec
import pytest

from tickstream_shared.errors import BadIdentifier, BadMessage, ConfigError
from tickstream_shared.naming import (
    ALERT_KINDS,
    DEFAULT_MEASURE_BY_KIND,
    MEASURES_BY_KIND,
    METRIC_KINDS,
    Market,
    MetricId,
    market_of,
    parse_kind,
    parse_measure,
    rank_key,
    stats_key,
)
from tickstream_shared.schemas import Alert, Tick, alert_id, decode_alert, decode_tick
from tickstream_shared.settings import ServiceSettings, documented_settings

MINUTE = 1_680_000_000_000
NOW = MINUTE + 61_000
TICK = Tick(
    market="binance:btc-usdt",
    minute=MINUTE,
    seq=7,
    exchange_ts=MINUTE + 59_000,
    received_ts=MINUTE + 59_123,
    open=28450.0,
    high=28460.5,
    low=28440.25,
    close=28455.92,
    volume=20.3,
    trades=312,
    closed=True,
)


def test_market_topic_and_metric_ids() -> None:
    """A market names its per-pair topic and its two metric ids."""
    market = Market.parse("Binance:BTC-USDT")
    assert market == Market("binance", "btc", "usdt")
    assert market.topic == "ticks.binance.btc-usdt"
    assert market.metric_id("price") == "binance:btc-usdt:price"
    assert Market.from_topic("ticks.binance.btc-usdt") == market
    assert str(MetricId.parse("binance:btc-usdt:volume")) == "binance:btc-usdt:volume"
    turnover = MetricId.parse("Kraken:ETH-USD:Turnover")
    assert (turnover.market, turnover.kind) == (Market("kraken", "eth", "usd"), "turnover")
    assert str(turnover) == "kraken:eth-usd:turnover"


@pytest.mark.parametrize("bad", ["", "binance", "binance:btcusdt", "bin ance:btc-usdt", "a:b-c:d"])
def test_bad_market_ids_are_rejected(bad: str) -> None:
    """Malformed market ids raise BadIdentifier."""
    with pytest.raises(BadIdentifier):
        Market.parse(bad)


@pytest.mark.parametrize("bad", ["binance:btc-usdt", "binance:btc-usdt:spread", "x"])
def test_bad_metric_ids_are_rejected(bad: str) -> None:
    """Metric ids need one of the kinds (price, volume, turnover)."""
    with pytest.raises(BadIdentifier):
        MetricId.parse(bad)


def test_topic_parsing_rejects_other_topics() -> None:
    """Only ticks.<exchange>.<base>-<quote> topics are tick topics."""
    for topic in ("alerts", "ticks.binance", "ticks.binance.btc_usdt"):
        with pytest.raises(BadIdentifier):
            Market.from_topic(topic)


def test_kinds_measures_and_redis_keys() -> None:
    """Redis keys are built in one place; each kind has its own rank measures."""
    assert parse_kind("price") == "price"
    with pytest.raises(BadIdentifier):
        parse_kind("PRICE ")
    assert stats_key("binance:btc-usdt:price") == "tickstream:stats:binance:btc-usdt:price"
    assert rank_key("volume", "std") == "tickstream:rank:volume:std"
    assert rank_key("price", "logret") == "tickstream:rank:price:logret"
    assert parse_measure("price", "logret") == "logret"
    assert parse_measure("volume", "cv") == "cv"
    assert METRIC_KINDS == ("price", "volume", "turnover") and ALERT_KINDS == ("price", "volume")
    assert parse_kind("turnover") == "turnover"
    assert rank_key("turnover", "cv") == "tickstream:rank:turnover:cv"
    with pytest.raises(BadIdentifier, match="std, cv for kind turnover"):
        parse_measure("turnover", "logret")
    with pytest.raises(BadIdentifier, match="std, cv for kind volume"):
        parse_measure("volume", "logret")
    assert market_of("binance:btc-usdt") is market_of("binance:btc-usdt")


def test_every_kind_has_a_default_measure_of_its_own() -> None:
    """Defaults compare across markets: logret where a kind has it, else cv; never std."""
    assert (DEFAULT_MEASURE_BY_KIND["price"], DEFAULT_MEASURE_BY_KIND["volume"]) == ("logret", "cv")
    for kind in METRIC_KINDS:
        assert DEFAULT_MEASURE_BY_KIND[kind] in MEASURES_BY_KIND[kind]
        assert DEFAULT_MEASURE_BY_KIND[kind] != "std"


def test_tick_round_trip() -> None:
    """A bar update decodes to exactly what was encoded, trade count and flag included."""
    assert decode_tick(TICK.encode(), now_ms=NOW) == TICK
    assert TICK.value("price") == 28455.92 and TICK.value("volume") == 20.3
    bare = json.loads(TICK.encode())
    del bare["trades"], bare["closed"]
    assert decode_tick(json.dumps(bare).encode(), now_ms=NOW) == msgspec.structs.replace(
        TICK, trades=None, closed=False
    )


def test_quote_volume_round_trip_and_old_messages() -> None:
    """quote_volume decodes as sent; a message from before it decodes with it unknown (None)."""
    priced = msgspec.structs.replace(TICK, quote_volume=577_655.125)
    assert decode_tick(priced.encode(), now_ms=NOW) == priced
    assert priced.value("turnover") == 577_655.125 and priced.value("volume") == 20.3
    old = json.loads(TICK.encode())
    del old["quote_volume"]
    decoded = decode_tick(json.dumps(old).encode(), now_ms=NOW)
    assert decoded == TICK and decoded.quote_volume is None and decoded.value("turnover") is None


def _with(**changes: object) -> bytes:
    return json.dumps({**json.loads(TICK.encode()), **changes}).encode()


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "not JSON"),
        (b"[1,2]", "Expected `object`"),
        (b'{"market":"binance:btc-usdt"}', "missing required field `minute`"),
        (_with(close="1"), "Expected `float`, got `str`"),
        (_with(seq=True), "Expected `int`, got `bool`"),
        (_with(seq=-1), "seq"),
        (_with(close=-1.0), "close"),
        (TICK.encode().replace(b":28455.92", b":1e400"), "close"),
        (_with(volume=-0.5), "volume"),
        (_with(quote_volume=-0.5), "quote_volume"),
        (_with(quote_volume=1e19), "quote_volume"),
        (_with(quote_volume="12.5"), "Expected `float | null`, got `str`"),
        (_with(trades=1.5), "trades"),
        (_with(market="binance:BT C-usdt"), "is not <exchange>"),
        (_with(market="binance:BTC-usdt"), "lower case"),
        (_with(market="x" * 500), "length"),
        (_with(minute=MINUTE + 1), "not a multiple of 60000"),
        (_with(minute=10**16), "minute"),
        (_with(minute=99999999999999999999999), "minute"),
        (_with(exchange_ts=MINUTE - 1), "outside its bar"),
        (_with(exchange_ts=MINUTE + 181_000), "outside its bar"),
        (_with(high=28000.0), "within low..high"),
        (_with(nested=[[[[[[[[[[1]]]]]]]]]], closed="yes"), "Expected `bool`"),
        (b"[" * 2000 + b"]" * 2000, "not JSON|Expected `object`"),
        (b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}", "not JSON|missing required field"),
        (b'{"pad":"' + b"x" * 5000 + b'"}', "exceeds 4096"),
    ],
)
def test_bad_ticks_say_what_is_wrong(raw: bytes, problem: str) -> None:
    """Malformed or implausible ticks raise only BadMessage, naming the problem."""
    with pytest.raises(BadMessage, match=problem):
        decode_tick(raw, now_ms=NOW)


def test_ticks_from_the_future_are_refused() -> None:
    """An update stamped ahead of its receive time, or received ahead of now, is bad input."""
    ahead = MINUTE + 60 * 60_000  # an hour later, still a valid bar of its own minute
    future = _with(minute=ahead, exchange_ts=ahead + 1000)
    with pytest.raises(BadMessage, match="ahead of received_ts"):
        decode_tick(future, now_ms=NOW)
    received_late = _with(minute=ahead, exchange_ts=ahead, received_ts=ahead)
    with pytest.raises(BadMessage, match="in the future"):
        decode_tick(received_late, now_ms=NOW)
    assert decode_tick(received_late, now_ms=ahead).minute == ahead
    year_2100 = _with(minute=4_102_444_800_000, exchange_ts=4_102_444_800_000)
    with pytest.raises(BadMessage):
        decode_tick(year_2100, now_ms=NOW)


def test_alert_round_trip_and_id() -> None:
    """Alert ids are unique per metric and minute; alerts decode to what was encoded."""
    ident = alert_id("binance:btc-usdt:volume", MINUTE)
    assert ident == f"binance:btc-usdt:volume@{MINUTE}"
    alert = Alert(
        ident, "binance:btc-usdt:volume", "volume", MINUTE, MINUTE + 5, 9, 40.0, 10.0, 3.0, 4.0,
        60, 59,
    )  # fmt: skip
    assert decode_alert(alert.encode()) == alert
    assert alert.as_json()["minute"] == MINUTE
    with pytest.raises(BadMessage):
        decode_alert(b'{"kind": "volume"}')
    with pytest.raises(BadMessage, match="Expected `float`"):
        decode_alert(alert.encode().replace(b'"value":40.0', b'"value":"NaN"'))
    with pytest.raises(BadMessage):
        decode_alert(alert.encode().replace(b'"kind":"volume"', b'"kind":"spread"'))


class _AlertBeforeStatuses(msgspec.Struct):
    """The alert message as consumers written before statuses read it."""

    alert_id: str
    metric: str
    kind: str
    minute: int
    exchange_ts: int
    seq: int
    value: float
    mean: float
    factor: float
    ratio: float
    window_minutes: int
    samples: int


def test_alert_status_round_trip_and_compatibility() -> None:
    """Status fields round-trip; an alert without them decodes as never judged; a reader of
    the fields before statuses decodes a retraction as the alert it was."""
    base = Alert(
        f"binance:btc-usdt:volume@{MINUTE}", "binance:btc-usdt:volume", "volume", MINUTE,
        MINUTE + 5, 9, 1e17, 10.0, 3.0, 1e16, 60, 59,
    )  # fmt: skip
    retracted = msgspec.structs.replace(
        base, status="retracted", status_seq=12, status_ts=MINUTE + 60_000, final_value=45.0
    )
    assert decode_alert(retracted.encode()) == retracted
    assert retracted.version == 12
    # A message from before statuses has none of their fields.
    before = msgspec.json.encode(msgspec.json.decode(base.encode(), type=_AlertBeforeStatuses))
    assert b"status" not in before
    decoded = decode_alert(before)
    assert (decoded.status, decoded.status_seq, decoded.final_value, decoded.version) == (
        "provisional", None, None, 9
    )  # fmt: skip
    old = msgspec.json.decode(retracted.encode(), type=_AlertBeforeStatuses)
    assert (old.alert_id, old.seq, old.value) == (base.alert_id, 9, 1e17)
    with pytest.raises(BadMessage):
        decode_alert(retracted.encode().replace(b'"retracted"', b'"withdrawn"'))


def test_settings_from_env_converts_types() -> None:
    """Settings are read once from the environment into typed fields."""
    settings = ServiceSettings.from_env(
        {"GATEWAY_PORT": "9001", "ALERTS_FACTOR": "2.5", "WATCHER_MARKETS": "a:b-c, d:e-f"}
    )
    assert settings.gateway.port == 9001
    assert settings.alerts.factor == 2.5
    assert settings.watcher.markets == ("a:b-c", "d:e-f")
    assert settings.stats.window_minutes == 1440
    assert settings.stats.stale_seconds == 300


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"STATS_WINDOW_MINUTES": "0"}, "below the minimum"),
        ({"GATEWAY_HISTORY_MINUTES": "5000"}, "above the maximum"),
        ({"WATCHER_SOURCE": "carrier-pigeon"}, "not one of"),
        ({"ALERTS_FACTOR": "nan"}, "not a finite number"),
        ({"STORAGE_RETENTION_DAYS": "1"}, "below the minimum"),
        (
            {"STORAGE_RETENTION_DAYS": "3", "STATS_WINDOW_MINUTES": "5000"},
            "keep less than STATS_WINDOW_MINUTES",
        ),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "not a redis:// or rediss://"),
        ({"DATABASE_URL": "mysql://x"}, "not a postgresql://"),
        ({"KRAKEN_WS_URL": "https://ws.kraken.com"}, "not a ws:// or wss:// URL"),
        ({"BINANCE_REST_URL": "https://api.binance.com /x"}, "not a http:// or https:// URL"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "broker"}, "is not host:port"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "a:9092,b:99999"}, "is not host:port"),
        ({"WATCHER_GROUP": "Main Group"}, "a-z, 0-9"),
        ({"WATCHER_FEED_SILENCE_MS": "10"}, "or >= 1000"),
        ({"WATCHER_SEED": "-1"}, "below the minimum"),
    ],
)
def test_settings_out_of_bounds_are_refused(env: dict[str, str], problem: str) -> None:
    """Settings are validated at load: out-of-range numbers and unknown choices are refused."""
    with pytest.raises(ConfigError, match=problem) as caught:
        ServiceSettings.from_env(env)
    assert caught.value.variable == next(iter(env))


def test_bad_setting_names_the_variable() -> None:
    """An unparseable value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="GATEWAY_PORT"):
        ServiceSettings.from_env({"GATEWAY_PORT": "eighty"})


def test_every_setting_is_documented_in_configuration_table() -> None:
    """docs/configuration.md lists every environment variable with its default."""
    from pathlib import Path

    table = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for _section, env, _default, _doc in documented_settings():
        assert f"`{env}`" in table, f"{env} missing from docs/configuration.md"
