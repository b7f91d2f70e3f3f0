"""Kafka client helpers: one place that builds producers, consumers and topics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaConnectionError,
    OutOfOrderSequenceNumber,
    TopicAlreadyExistsError,
    UnknownProducerId,
)
from aiokafka.structs import RecordMetadata

from tickstream_shared import kafka_compat
from tickstream_shared.naming import topic_family
from tickstream_shared.settings import KafkaSettings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno


def make_producer(
    settings: KafkaSettings, client_id: str, *, idempotent: bool = True
) -> AIOKafkaProducer:
    """A producer with acks=all, idempotent unless asked not to be; caller owns start()/stop().

    `idempotent=False` is for a producer whose every record is keyed by a sequence its readers
    deduplicate (the watcher's ticks: a larger `seq` is newer, the same `seq` again changes
    nothing): a duplicate from a retried send is then harmless, and order per partition holds
    without idempotence because aiokafka has at most one produce request per broker in flight.
    The local broker (Tansu 0.6) spends 4 to 5 times the CPU on an idempotent producer's
    batches (1,000 topics at 0.5 records/s each: 75-85% of a core against 16-19%, see
    docs/performance.md), and that producer writes one small batch per partition.
    """
    kafka_compat.install()
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        enable_idempotence=idempotent,
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
    )


# How a consumer uses what it fetches. A live consumer (the gateway's feed) forwards each
# update at once: its fetches are answered as soon as one byte is there. A batching consumer
# (stats, alerts) handles batches anyway: its fetches wait at the broker for some bytes, up to
# a longer wait, so a broker answering fetches of every partition does so less often.
ConsumerRole = Literal["live", "batch"]


def consumer_options(settings: KafkaSettings, role: ConsumerRole) -> dict[str, int]:
    """The fetch options of a consumer in `role`: waits by role, sizes shared."""
    if role == "batch":
        wait_ms, min_bytes = settings.batch_fetch_max_wait_ms, settings.batch_fetch_min_bytes
    else:
        wait_ms, min_bytes = settings.fetch_max_wait_ms, 1
    return {
        # New per-pair topics must be seen quickly by regex subscriptions.
        "metadata_max_age_ms": settings.metadata_max_age_ms,
        # aiokafka's default wait is 500 ms; a polling broker answers up to half of it late.
        "fetch_max_wait_ms": wait_ms,
        "fetch_min_bytes": min_bytes,
        # A catch-up of a thousand partitions buffers at most fetch_max_bytes per response.
        "max_partition_fetch_bytes": settings.max_partition_fetch_bytes,
        "fetch_max_bytes": settings.fetch_max_bytes,
    }


def make_consumer(
    settings: KafkaSettings,
    *,
    group_id: str | None,
    client_id: str,
    offset_reset: str = "earliest",
    role: ConsumerRole = "live",
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits: offsets are committed after the work is durable.

    `role` picks the fetch waits (see ConsumerRole); how many records one poll returns is
    each caller's `getmany(max_records=...)` (STATS_BATCH_MAX, ALERTS_BATCH_MAX).
    """
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=offset_reset,
        **consumer_options(settings, role),
    )


# Kafka deletes whole segments and never the active one: segments of a quarter of the
# retention keep a log within 1.25 times it, in time and in bytes. Kafka 4 refuses segments
# under 1 MiB; above 1 GiB (its default) a segment only delays deletion.
_SEGMENTS_PER_RETENTION: Final = 4
_MIN_SEGMENT_BYTES: Final = 1024 * 1024
_MAX_SEGMENT_BYTES: Final = 1024 * 1024 * 1024
_MAX_SEGMENT_MS: Final = 7 * 24 * 3_600_000


def topic_config(settings: KafkaSettings, topic: str) -> dict[str, str]:
    """The topic configs tickstream gives `topic`: deletion by the retention of its family."""
    retention_ms, retention_bytes = settings.retention(topic_family(topic))
    segment_bytes = retention_bytes // _SEGMENTS_PER_RETENTION
    return {
        "cleanup.policy": "delete",
        "retention.ms": str(retention_ms),
        "retention.bytes": str(retention_bytes),
        "segment.ms": str(min(max(retention_ms // _SEGMENTS_PER_RETENTION, 1), _MAX_SEGMENT_MS)),
        "segment.bytes": str(min(max(segment_bytes, _MIN_SEGMENT_BYTES), _MAX_SEGMENT_BYTES)),
    }


def config_drift(wanted: dict[str, str], actual: dict[str, str]) -> dict[str, str]:
    """The keys of `wanted` whose value `actual` lacks or differs from."""
    return {k: v for k, v in wanted.items() if actual.get(k) != v}


async def ensure_topics(settings: KafkaSettings, topics: Iterable[str]) -> list[str]:
    """Create the topics that do not exist yet, with `topic_config`; returns the names created.

    Topics that exist already get the keys of `topic_config` they lack or differ in set
    (IncrementalAlterConfigs), so a topic created before its retention was configured, or with
    another, is bounded by the settings too; a broker that refuses that is logged, not raised:
    the topic still works. Idempotent and safe to call from several services at once. Raises
    aiokafka errors other than "already exists".
    """
    wanted = sorted(set(topics))
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created = await _create_topics(admin, settings, missing) if missing else []
        present = [t for t in wanted if t in existing]
        if present:
            await _align_configs(admin, {t: topic_config(settings, t) for t in present})
        return created
    finally:
        await admin.close()


async def _create_topics(
    admin: AIOKafkaAdminClient, settings: KafkaSettings, names: list[str]
) -> list[str]:
    response = await admin.create_topics(
        [
            NewTopic(
                t,
                settings.topic_partitions,
                settings.replication_factor,
                topic_configs=topic_config(settings, t),
            )
            for t in names
        ]
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


async def topic_configs(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, dict[str, str]]:
    """Every config key and value the broker reports for each of `topics`."""
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
    )
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for code, _message, _type, name, entries in response.resources:
            if code == 0:
                configs[name] = {entry[0]: entry[1] for entry in entries}
    return configs


async def _align_configs(admin: AIOKafkaAdminClient, wanted: dict[str, dict[str, str]]) -> None:
    actual = await topic_configs(admin, list(wanted))
    changes = {t: config_drift(c, actual.get(t, {})) for t, c in wanted.items()}
    changes = {t: c for t, c in changes.items() if c}
    if not changes:
        return
    kafka_compat.install()
    response = await admin._send_request(kafka_compat.IncrementalAlterConfigsRequest(changes))
    for code, message, _type, topic in response.responses:
        if code == 0:
            log.info("topic %s: configs set to %s", topic, changes.get(topic))
        else:
            log.error(
                "topic %s: cannot set configs %s: error %d %s",
                topic,
                changes.get(topic),
                code,
                message,
            )


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] | None = None
    timestamp_ms: int | None = None


# The broker no longer knows this producer's id or sequence (it restarted, or its memory-only
# state is gone): the idempotent producer cannot go on, a new one must be made.
_PRODUCER_STATE_ERRORS: Final = (
    UnknownProducerId,
    OutOfOrderSequenceNumber,
    InvalidProducerIdMapping,
    InvalidProducerEpoch,
)


class NotAppended(KafkaConnectionError):  # type: ignore[misc]  # aiokafka is untyped
    """The broker acknowledged a send without appending it (offset -1).

    Seen with the memory-only local broker (Tansu) after a restart: it hands out producer ids
    from 1 again, so a producer made before the restart may carry the id of one made after,
    and its records are then taken for that one's duplicates, acknowledged and dropped. Kafka
    keeps its id counter across restarts, so there an append always has an offset. Treated as
    the producer's broker state being lost: replace the producer, send again."""

    def __init__(self, metadata: RecordMetadata) -> None:
        super().__init__(f"{metadata.topic}[{metadata.partition}] acknowledged without an offset")


def appended(metadata: RecordMetadata) -> bool:
    """Whether acknowledged records were appended at an offset (see NotAppended)."""
    return bool(metadata.offset >= 0)


# Stopping a producer flushes what it holds; with the broker gone that would never end.
_STOP_TIMEOUT_S: Final = 10.0


class RenewableProducer:
    """An idempotent producer (see `make_producer`) that replaces itself when it must.

    `send_all` sends messages and waits for every acknowledgement. When the broker has lost
    the producer's state (after a restart), the producer is replaced by a new one and the call
    raises KafkaConnectionError, which `is_transient` callers retry: the retried messages get
    a new producer id, and consumers' idempotent effects absorb any that had arrived.
    """

    def __init__(self, settings: KafkaSettings, client_id: str) -> None:
        self._settings = settings
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self.renewals = 0

    async def start(self) -> None:
        self._producer = make_producer(self._settings, self._client_id)
        await self._producer.start()

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_producer(producer)

    async def send_all(self, messages: Iterable[Message]) -> None:
        producer = self._producer
        if producer is None:
            raise RuntimeError("producer not started")
        try:
            deliveries = [
                await producer.send(
                    m.topic,
                    value=m.value,
                    key=m.key,
                    headers=m.headers,
                    timestamp_ms=m.timestamp_ms,
                )
                for m in messages
            ]
            for metadata in await asyncio.gather(*deliveries):
                if not appended(metadata):
                    raise NotAppended(metadata)
        except (*_PRODUCER_STATE_ERRORS, NotAppended) as exc:
            log.warning(
                "producer %s lost its broker state (%r): replacing it", self._client_id, exc
            )
            self.renewals += 1
            await self.stop()
            await self.start()
            raise KafkaConnectionError(f"producer replaced after {exc!r}") from exc


async def stop_producer(producer: AIOKafkaProducer) -> None:
    """Stop `producer`, giving up on what it still holds after _STOP_TIMEOUT_S."""
    try:
        async with asyncio.timeout(_STOP_TIMEOUT_S):
            await producer.stop()
    except TimeoutError:
        log.error(
            "producer did not flush within %.0fs (broker gone?): closed anyway", _STOP_TIMEOUT_S
        )
