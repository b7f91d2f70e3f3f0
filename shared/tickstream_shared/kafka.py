"""Kafka client helpers: one place that builds producers, consumers and topics."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from tickstream_shared import kafka_compat
from tickstream_shared.settings import KafkaSettings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno


def make_producer(settings: KafkaSettings, client_id: str) -> AIOKafkaProducer:
    """An idempotent producer with acks=all; caller owns start()/stop()."""
    kafka_compat.install()
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
    )


def make_consumer(
    settings: KafkaSettings,
    *,
    group_id: str | None,
    client_id: str,
    offset_reset: str = "earliest",
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits: offsets are committed after the work is durable."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=offset_reset,
        # New per-pair topics must be seen quickly by regex subscriptions.
        metadata_max_age_ms=settings.metadata_max_age_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )


async def ensure_topics(settings: KafkaSettings, topics: Iterable[str]) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.

    Idempotent and safe to call from several services at once. Raises aiokafka errors other
    than "already exists".
    """
    wanted = sorted(set(topics))
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(t, settings.topic_partitions, settings.replication_factor) for t in missing]
        )
        created = []
        for topic, code, message in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != _TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {topic}: error {code} {message}")
        if created:
            log.info("created topics %s", ", ".join(created))
        return created
    finally:
        await admin.close()
