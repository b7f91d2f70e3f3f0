"""Topics get their family's retention from the settings; the local durable log honours it."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import deadline, make_data_dir, unique_exchange
from tickstream_shared.kafka import ensure_topics, make_producer, topic_config, topic_configs
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.log_trim import META_LOG_DIR, LogTrimmer
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


@pytest.fixture(scope="module")
def s3_broker() -> Iterator[LocalInfra]:
    """A broker whose log is in SeaweedFS, trimmed every half second; no Redis or PostgreSQL."""
    data_dir = make_data_dir("tickstream-s3-")
    infra = LocalInfra(data_dir, broker_storage="s3", trim_interval_s=0.5)
    try:
        infra.start_server("objectstore")
        infra.start_server("broker")
        yield infra
    finally:
        infra.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _stored(infra: LocalInfra, topic: str) -> list[tuple[int, int]]:
    """(base offset, bytes) of every record batch object of partition 0, oldest first."""
    folder = f"{infra.filer_url}/buckets/tansu/clusters/tansu_cluster/topics/{topic}"
    url = f"{folder}/partitions/0000000000/records/?limit=100000"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        entries = json.loads(response.read()).get("Entries") or []
    return [(int(e["FullPath"].rsplit("/", 1)[1][:20]), int(e["FileSize"])) for e in entries]


async def _earliest(consumer: AIOKafkaConsumer, topic: str) -> int:
    partition = TopicPartition(topic, 0)
    offsets: dict[TopicPartition, int] = await consumer.beginning_offsets([partition])
    return offsets[partition]


async def test_durable_log_is_trimmed_to_its_retention(s3_broker: LocalInfra) -> None:
    """Under a fast producer the earliest offset moves and the log's bytes stay bounded; once
    idle past retention.ms only the newest batch is left."""
    retention_bytes = 256 * 1024
    kafka = KafkaSettings(
        bootstrap_servers=s3_broker.kafka_bootstrap_servers,
        ticks_retention_ms=3000,
        ticks_retention_bytes=retention_bytes,
    )
    topic = Market(unique_exchange(), "btc", "usdt").topic
    await ensure_topics(kafka, [topic])
    producer = make_producer(kafka, client_id="retention-test", idempotent=False)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    await consumer.start()
    try:
        payload = b"x" * 200
        written = 0
        largest_log = 0
        earliest_seen = 0
        last_base = -1
        started = time.monotonic()
        while time.monotonic() - started < deadline(15):
            # Fifty records sent together make one batch object of about 12 KB.
            sends = [await producer.send(topic, payload) for _ in range(50)]
            last_base = (await asyncio.gather(*sends))[0].offset
            written += 50 * len(payload)
            if last_base % 1000 == 0:
                largest_log = max(largest_log, sum(size for _, size in _stored(s3_broker, topic)))
                earliest_seen = max(earliest_seen, await _earliest(consumer, topic))
        per_second = written / (time.monotonic() - started)
        assert written > 8 * retention_bytes, "too few records to show a bound"
        # Between two trims (0.5 s apart, each taking a moment) the log grows by what about a
        # second of producing brings, at most.
        assert 0 < largest_log < retention_bytes + per_second
        assert 0 < earliest_seen < last_base

        async def one_batch_left() -> bool:
            return len(_stored(s3_broker, topic)) == 1

        limit = time.monotonic() + deadline(15)
        while not await one_batch_left():
            assert time.monotonic() < limit, f"log not trimmed: {len(_stored(s3_broker, topic))}"
            await asyncio.sleep(0.2)
        [(newest, _)] = _stored(s3_broker, topic)
        assert newest == last_base
        assert await _earliest(consumer, topic) == last_base
    finally:
        await consumer.stop()
        await producer.stop()


async def test_durable_log_survives_a_broker_restart(s3_broker: LocalInfra) -> None:
    """On s3 storage a restarted broker still has the topic, its records and its configs."""
    kafka = KafkaSettings(bootstrap_servers=s3_broker.kafka_bootstrap_servers)
    topic = Market(unique_exchange(), "btc", "usdt").topic
    await ensure_topics(kafka, [topic])
    producer = make_producer(kafka, client_id="durable-test")
    await producer.start()
    try:
        sends = [await producer.send(topic, f"r{i}".encode()) for i in range(300)]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    s3_broker.stop_server("broker")
    s3_broker.start_server("broker")
    assert await ensure_topics(kafka, [topic]) == []
    assert (await _configs(kafka, [topic]))[topic] == topic_config(kafka, topic)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        limit = time.monotonic() + deadline(20)
        while len(values) < 300 and time.monotonic() < limit:
            batches = await consumer.getmany(timeout_ms=500)
            values += [r.value for records in batches.values() for r in records]
        assert values == [f"r{i}".encode() for i in range(300)]
    finally:
        await consumer.stop()


def _meta_log_minutes(infra: LocalInfra) -> list[tuple[str, float]]:
    """(path, last written) of every minute file of the filer's metadata change log."""
    found: list[tuple[str, float]] = []
    for day in _listing(f"{infra.filer_url}{META_LOG_DIR}/"):
        for minute in _listing(f"{infra.filer_url}{day['FullPath']}/"):
            found.append((minute["FullPath"], datetime.fromisoformat(minute["Mtime"]).timestamp()))
    return found


def _listing(url: str) -> list[dict[str, str]]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return list(json.loads(response.read()).get("Entries") or [])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise


async def test_object_store_purges_its_metadata_log_and_vacuums(s3_broker: LocalInfra) -> None:
    """SeaweedFS logs every metadata change (one file a minute) and keeps it forever, and gives
    deleted objects' disk back only when vacuumed: the trimmer deletes the log's minutes older
    than it keeps and asks for vacuums, so the store's disk is bounded too."""
    kafka = KafkaSettings(
        bootstrap_servers=s3_broker.kafka_bootstrap_servers, ticks_retention_bytes=64 * 1024
    )
    topic = Market(unique_exchange(), "btc", "usdt").topic
    await ensure_topics(kafka, [topic])
    producer = make_producer(kafka, client_id="meta-log-test", idempotent=False)
    await producer.start()
    sent = 0
    try:
        # The filer writes its log once a minute: keep it busy until a minute is written.
        limit = time.monotonic() + deadline(90)
        while not _meta_log_minutes(s3_broker) or sent < 2 * 1024 * 1024:
            assert time.monotonic() < limit, "the filer wrote no metadata log"
            await (await producer.send(topic, b"x" * 4096))
            sent += 4096
            await asyncio.sleep(0.02)
    finally:
        await producer.stop()
    trimmer = LogTrimmer(
        s3_broker.filer_url,
        "tansu",
        "tansu_cluster",
        interval_s=60.0,
        meta_log_keep_s=0.0,
        master_url=s3_broker.object_store_master_url,
    )
    purged_before = time.time()
    trimmer.trim_once()
    assert trimmer.stats.deleted_meta_logs >= 1
    assert [path for path, written in _meta_log_minutes(s3_broker) if written < purged_before] == []
    # The fixture's trimmer kept the topic's log near 64 KiB of the 2 MiB sent; the volume
    # holding the batches shrinks to about that once vacuumed.
    trimmer.vacuum()
    stored = sum(f.stat().st_size for f in (s3_broker.data_dir / "seaweedfs").glob("tansu_*.dat"))
    assert stored < sent // 2, (stored, sent)
