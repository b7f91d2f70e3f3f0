"""Producers made before the memory-only broker restarted: nothing they send is lost.

The restarted broker (Tansu, memory-only) hands out producer ids from 1 again. A producer
made before the restart whose id is handed to a new one has its records taken for that one's
duplicates: acknowledged without an offset and dropped. The senders must notice and send again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError

from tests.conftest import running_infra
from tickstream_shared.kafka import (
    Message,
    RenewableProducer,
    ensure_topics,
    make_producer,
    stop_producer,
)
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.settings import KafkaSettings

TOPIC = "restart-check"
KEY = b"k"  # one partition for every record: where sequences collide


@pytest.fixture
def own_infra() -> Iterator[LocalInfra]:
    """A broker of its own: this test restarts it."""
    with running_infra("tickstream-producer-restart-") as running:
        yield running


async def read_all(bootstrap: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest", metadata_max_age_ms=500
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        for _ in range(40):
            batch = await consumer.getmany(timeout_ms=250)
            values += [r.value for records in batch.values() for r in records if r.value]
            if len(values) >= count:
                break
    finally:
        await consumer.stop()
    return values


async def test_a_producer_whose_id_was_handed_out_again_sends_again(
    own_infra: LocalInfra,
) -> None:
    """The old producer's send is acknowledged without an offset; it is replaced, sends
    again, and the record is there next to the new producer's."""
    kafka = KafkaSettings(bootstrap_servers=own_infra.kafka_bootstrap_servers)
    await ensure_topics(kafka, [TOPIC])
    old = RenewableProducer(kafka, client_id="old")
    await old.start()
    new = make_producer(kafka, client_id="new")
    try:
        await old.send_all([Message(TOPIC, b"old-before", KEY)])
        own_infra.stop_server("broker")
        own_infra.start_server("broker")
        await ensure_topics(kafka, [TOPIC])
        await new.start()  # the restarted broker's first id: the old producer's
        for i in range(3):
            await new.send_and_wait(TOPIC, f"new-{i}".encode(), key=KEY)
        sent = False
        for _ in range(5):  # as the services do: a lost producer state is a transient error
            try:
                await old.send_all([Message(TOPIC, b"old-after", KEY)])
                sent = True
                break
            except KafkaConnectionError as exc:
                assert "producer replaced" in str(exc)
        assert sent
        assert old.renewals == 1
    finally:
        await stop_producer(new)
        await old.stop()
    values = await read_all(kafka.bootstrap_servers, 4)
    assert sorted(values) == [b"new-0", b"new-1", b"new-2", b"old-after"]
