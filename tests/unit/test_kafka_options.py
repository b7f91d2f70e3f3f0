"""Consumer fetch options: waits chosen by role, sizes shared, all from settings."""

from __future__ import annotations

from tickstream_shared.kafka import consumer_options
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
