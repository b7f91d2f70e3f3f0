"""Ids, topic names, settings parsing and the tick/alert schemas."""

from __future__ import annotations

import json

import pytest

from tickstream_shared.errors import BadIdentifier, BadMessage, ConfigError
from tickstream_shared.naming import Market, MetricId, parse_kind, rank_key, stats_key
from tickstream_shared.schemas import Alert, Tick, alert_id, decode_alert, decode_tick
from tickstream_shared.settings import ServiceSettings, documented_settings

TICK = Tick("binance", "btc", "usdt", 7, 1_680_000_060_000, 1_680_000_060_123, 28455.92, 20.3)


def test_market_topic_and_metric_ids() -> None:
    """A market names its per-pair topic and its two metric ids."""
    market = Market.parse("Binance:BTC-USDT")
    assert market == Market("binance", "btc", "usdt")
    assert market.topic == "ticks.binance.btc-usdt"
    assert market.metric_id("price") == "binance:btc-usdt:price"
    assert Market.from_topic("ticks.binance.btc-usdt") == market
    assert str(MetricId.parse("binance:btc-usdt:volume")) == "binance:btc-usdt:volume"


@pytest.mark.parametrize("bad", ["", "binance", "binance:btcusdt", "bin ance:btc-usdt", "a:b-c:d"])
def test_bad_market_ids_are_rejected(bad: str) -> None:
    """Malformed market ids raise BadIdentifier."""
    with pytest.raises(BadIdentifier):
        Market.parse(bad)


@pytest.mark.parametrize("bad", ["binance:btc-usdt", "binance:btc-usdt:spread", "x"])
def test_bad_metric_ids_are_rejected(bad: str) -> None:
    """Metric ids need a kind of price or volume."""
    with pytest.raises(BadIdentifier):
        MetricId.parse(bad)


def test_topic_parsing_rejects_other_topics() -> None:
    """Only ticks.<exchange>.<base>-<quote> topics are tick topics."""
    for topic in ("alerts", "ticks.binance", "ticks.binance.btc_usdt"):
        with pytest.raises(BadIdentifier):
            Market.from_topic(topic)


def test_kinds_and_redis_keys() -> None:
    """Redis keys are built in one place with the tickstream prefix."""
    assert parse_kind("price") == "price"
    with pytest.raises(BadIdentifier):
        parse_kind("PRICE ")
    assert stats_key("binance:btc-usdt:price") == "tickstream:stats:binance:btc-usdt:price"
    assert rank_key("volume") == "tickstream:rank:volume"


def test_tick_round_trip() -> None:
    """A tick decodes to exactly what was encoded."""
    assert decode_tick(TICK.encode()) == TICK
    assert TICK.value("price") == 28455.92 and TICK.value("volume") == 20.3


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "not JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"exchange":"binance"}', "missing field 'base'"),
        (json.dumps({**json.loads(TICK.encode()), "price": "1"}).encode(), "must be float"),
        (json.dumps({**json.loads(TICK.encode()), "seq": True}).encode(), "must be int"),
        (json.dumps({**json.loads(TICK.encode()), "price": -1.0}).encode(), "price must be > 0"),
        (json.dumps({**json.loads(TICK.encode()), "base": "BT C"}).encode(), "market id"),
        (json.dumps({**json.loads(TICK.encode()), "base": "BTC"}).encode(), "lower case"),
    ],
)
def test_bad_ticks_say_what_is_wrong(raw: bytes, problem: str) -> None:
    """Malformed ticks raise BadMessage naming the problem."""
    with pytest.raises(BadMessage, match=problem):
        decode_tick(raw)


def test_nan_price_is_rejected() -> None:
    """Non-finite numbers never reach the windows."""
    raw = TICK.encode().replace(b"28455.92", b"NaN")
    with pytest.raises(BadMessage, match="finite"):
        decode_tick(raw)


def test_alert_round_trip_and_id() -> None:
    """Alert ids are unique per metric and tick; alerts decode to what was encoded."""
    ident = alert_id("binance:btc-usdt:volume", 5, 9)
    assert ident == "binance:btc-usdt:volume@5#9"
    alert = Alert(ident, "binance:btc-usdt:volume", "volume", 5, 9, 40.0, 10.0, 3.0, 4.0, 3600, 59)
    assert decode_alert(alert.encode()) == alert
    with pytest.raises(BadMessage):
        decode_alert(b'{"kind": "volume"}')


def test_settings_from_env_converts_types() -> None:
    """Settings are read once from the environment into typed fields."""
    settings = ServiceSettings.from_env(
        {"GATEWAY_PORT": "9001", "ALERTS_FACTOR": "2.5", "WATCHER_MARKETS": "a:b-c, d:e-f"}
    )
    assert settings.gateway.port == 9001
    assert settings.alerts.factor == 2.5
    assert settings.watcher.markets == ("a:b-c", "d:e-f")
    assert settings.stats.window_seconds == 86400


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
