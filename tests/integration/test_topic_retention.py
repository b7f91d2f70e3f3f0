"""Topics get their family's retention from the settings, at creation and when they exist."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import unique_exchange
from tickstream_shared.kafka import ensure_topics, topic_config, topic_configs
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.settings import KafkaSettings


async def _configs(kafka: KafkaSettings, topics: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        return await topic_configs(admin, topics)
    finally:
        await admin.close()


async def test_created_topics_carry_their_familys_retention(infra: LocalInfra) -> None:
    """A tick topic is created with the tick retention, as the broker describes it."""
    kafka = KafkaSettings(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        ticks_retention_ms=90_000,
        ticks_retention_bytes=8 * 1024 * 1024,
    )
    topic = Market(unique_exchange(), "btc", "usdt").topic
    assert await ensure_topics(kafka, [topic]) == [topic]
    described = (await _configs(kafka, [topic]))[topic]
    assert described == {
        "cleanup.policy": "delete",
        "retention.ms": "90000",
        "retention.bytes": "8388608",
        "segment.ms": "22500",
        "segment.bytes": "2097152",
    }


async def test_existing_topic_gets_the_configured_retention(infra: LocalInfra) -> None:
    """A topic created without retention, or with another one, gets the settings' values."""
    kafka = KafkaSettings(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        ticks_retention_ms=120_000,
        ticks_retention_bytes=4 * 1024 * 1024,
    )
    bare = Market(unique_exchange(), "btc", "usdt").topic
    other = Market(unique_exchange(), "eth", "usdt").topic
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(bare, 1, 1),
                NewTopic(
                    other, 1, 1, topic_configs={"retention.ms": "5", "min.insync.replicas": "1"}
                ),
            ]
        )
    finally:
        await admin.close()
    assert await ensure_topics(kafka, [bare, other]) == []
    described = await _configs(kafka, [bare, other])
    assert described[bare] == topic_config(kafka, bare)
    # Keys tickstream does not own are left as they were.
    assert described[other] == {**topic_config(kafka, other), "min.insync.replicas": "1"}
