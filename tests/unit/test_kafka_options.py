"""Consumer fetch options and topic configs, all from settings."""

from __future__ import annotations

import pytest

from tickstream_shared.errors import ConfigError
from tickstream_shared.kafka import config_drift, consumer_options, topic_config
from tickstream_shared.naming import ALERTS_TOPIC, DEADLETTER_TOPIC
from tickstream_shared.settings import ServiceSettings


def test_batching_and_live_consumers_fetch_as_configured() -> None:
    """Stats/alerts wait for bytes up to their longer wait; the gateway's feed answers at 1 byte."""
    kafka = ServiceSettings.from_env(
        {
            "KAFKA_FETCH_MAX_WAIT_MS": "40",
            "KAFKA_BATCH_FETCH_MAX_WAIT_MS": "300",
            "KAFKA_BATCH_FETCH_MIN_BYTES": "2048",
            "KAFKA_MAX_PARTITION_FETCH_BYTES": "65536",
            "KAFKA_FETCH_MAX_BYTES": "1048576",
            "KAFKA_METADATA_MAX_AGE_MS": "700",
        }
    ).kafka
    sizes = {
        "metadata_max_age_ms": 700,
        "max_partition_fetch_bytes": 65536,
        "fetch_max_bytes": 1048576,
    }
    assert consumer_options(kafka, "batch") == {
        **sizes,
        "fetch_max_wait_ms": 300,
        "fetch_min_bytes": 2048,
    }
    assert consumer_options(kafka, "live") == {
        **sizes,
        "fetch_max_wait_ms": 40,
        "fetch_min_bytes": 1,
    }


def test_each_topic_family_gets_its_retention() -> None:
    """Ticks, alerts and dead letters are kept by their own settings, segments a quarter of it."""
    kafka = ServiceSettings.from_env(
        {
            "KAFKA_TICKS_RETENTION_MS": "3600000",
            "KAFKA_TICKS_RETENTION_BYTES": "33554432",
            "KAFKA_ALERTS_RETENTION_MS": "86400000",
            "KAFKA_ALERTS_RETENTION_BYTES": "65536",
            "KAFKA_DEADLETTER_RETENTION_MS": "604800000",
            "KAFKA_DEADLETTER_RETENTION_BYTES": "1099511627776",
        }
    ).kafka
    assert topic_config(kafka, "ticks.binance.btc-usdt") == {
        "cleanup.policy": "delete",
        "retention.ms": "3600000",
        "retention.bytes": "33554432",
        "segment.ms": "900000",
        "segment.bytes": "8388608",
    }
    # Kafka 4 refuses segments under 1 MiB; none is worth more than 1 GiB or 7 days.
    assert topic_config(kafka, ALERTS_TOPIC) == {
        "cleanup.policy": "delete",
        "retention.ms": "86400000",
        "retention.bytes": "65536",
        "segment.ms": "21600000",
        "segment.bytes": "1048576",
    }
    assert topic_config(kafka, DEADLETTER_TOPIC) == {
        "cleanup.policy": "delete",
        "retention.ms": "604800000",
        "retention.bytes": "1099511627776",
        "segment.ms": "151200000",
        "segment.bytes": "1073741824",
    }
    # A topic of no family (made by hand or by a test) is kept as ticks are.
    assert topic_config(kafka, "scratch") == topic_config(kafka, "ticks.binance.btc-usdt")


def test_retention_out_of_bounds_is_refused() -> None:
    """A retention below a second or above a year, or bytes below 64 KiB, stop the start."""
    for env, value in (
        ("KAFKA_TICKS_RETENTION_MS", "999"),
        ("KAFKA_ALERTS_RETENTION_MS", str(366 * 86_400_000)),
        ("KAFKA_DEADLETTER_RETENTION_BYTES", "65535"),
        ("TICKSTREAM_BROKER_STORAGE", "disk"),
    ):
        with pytest.raises(ConfigError) as raised:
            ServiceSettings.from_env({env: value})
        assert raised.value.variable == env


def test_config_drift_names_only_what_differs() -> None:
    """Keys missing or different are to be set; extra keys on the broker are not ours."""
    wanted = {"retention.ms": "1000", "retention.bytes": "65536"}
    assert config_drift(wanted, {"retention.ms": "1000", "min.insync.replicas": "2"}) == {
        "retention.bytes": "65536"
    }
    assert config_drift(wanted, {"retention.ms": "1000", "retention.bytes": "65536"}) == {}
