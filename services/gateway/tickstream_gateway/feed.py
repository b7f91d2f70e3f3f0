"""Background tasks owned by the gateway's lifespan: the Kafka feed and the rank poller."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping

import redis.asyncio as redis
from aiokafka.errors import KafkaError

from tickstream_gateway.assignment import FeedAssignment
from tickstream_gateway.httpcache import SharedRefresh
from tickstream_gateway.hub import Hub, newest_per_bar
from tickstream_gateway.rankboard import RankBoard
from tickstream_gateway.ranks import Ranking, read_boards
from tickstream_shared.consuming import (
    DecodeCounters,
    decode_batch,
    decode_readings,
    is_transient,
)
from tickstream_shared.deadletter import DeadLetter, DeadLetterSender
from tickstream_shared.errors import BadMessage
from tickstream_shared.kafka import RenewableProducer, ensure_topics, make_consumer
from tickstream_shared.naming import ALERTS_TOPIC, DEADLETTER_TOPIC
from tickstream_shared.observability import READINGS
from tickstream_shared.schemas import decode_alert
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.gateway.feed")

_DEAD_LETTER_TIMEOUT_S = 10.0
# How long one poll waits for records: assignment changes wait at most this (plus coalescing).
_POLL_MS = 100
_FANOUT_SLICE_S = 0.005
FULL_READ_EVERY = 60


async def run_feed(settings: ServiceSettings, hub: Hub, ready: asyncio.Event) -> None:
    """Forward live bar updates and alerts to the hub until cancelled.

    No consumer group: every gateway instance assigns itself `alerts` and the tick topics of
    the markets its clients watch (FeedAssignment, hub.interest), each from its newest record
    (history comes from PostgreSQL). Nothing is committed because nothing is owned. A bad
    alert record is skipped and dead-lettered (no group reads `alerts`, so the gateways are
    the ones to report it: one dead letter per gateway instance); bad tick records are
    dead-lettered by stats and alerts and only counted here.
    """
    consumer = make_consumer(
        settings.kafka, group_id=None, client_id="tickstream-gateway", offset_reset="latest"
    )
    # Assigned (to nothing yet) before anything else: aiokafka's getmany without any
    # subscription waits for one without a timeout.
    consumer.assign([])
    producer = RenewableProducer(settings.kafka, client_id="tickstream-gateway")
    dead_letters = DeadLetterSender(producer, "gateway")
    try:
        await ensure_topics(settings.kafka, [DEADLETTER_TOPIC])
        await producer.start()
        await consumer.start()
    except BaseException:
        await consumer.stop()
        await producer.stop()
        raise
    # Started from the newest offsets: what came before is in storage only.
    hub.feed_started()
    assignment = FeedAssignment(
        consumer,
        hub.interest,
        hub.recent,
        missing_refresh_s=settings.kafka.metadata_max_age_ms / 1000,
    )
    counters = DecodeCounters()
    alert_counters = DecodeCounters()
    # Exported while the consumer lives, and added to the totals when it is gone.
    READINGS.track(consumer, totals=functools.partial(decode_readings, counters, alert_counters))
    try:
        await assignment.update(time.monotonic())
        hub.interest.feed_running = True
        ready.set()
        while True:
            batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=5000)
            for tp, records in batch.items():
                if tp.topic == ALERTS_TOPIC:
                    bad: list[DeadLetter] = []
                    for record in records:
                        try:
                            hub.publish_alert(decode_alert(record.value))
                            alert_counters.decoded += 1
                        except BadMessage as exc:
                            alert_counters.skipped_bad += 1
                            bad.append(DeadLetter.of(record, exc.problem))
                            log.warning("skipping bad alert offset=%s: %s", record.offset, exc)
                    await _send_dead_letters(dead_letters, bad)
                    continue
                now = slice_start = time.monotonic()
                for tick in newest_per_bar(decode_batch(records, counters)):
                    hub.publish_tick(tick, now)
                    # A batch fanned out to many clients would hold the loop for its whole
                    # length: writers, health probes and commands wait at most one slice.
                    if time.monotonic() - slice_start >= _FANOUT_SLICE_S:
                        await asyncio.sleep(0)
                        now = slice_start = time.monotonic()
            # After the batch: the positions read for kept partitions are past every record
            # given so far.
            await assignment.update(time.monotonic())
    finally:
        ready.clear()  # /readyz says the feed is down until the supervisor has restarted it
        hub.interest.feed_running = False
        hub.interest.assigned_partitions = 0
        hub.interest.assigned_topics = frozenset()
        hub.interest.unsettle_all()
        await consumer.stop()
        await producer.stop()


async def _send_dead_letters(sender: DeadLetterSender, letters: list[DeadLetter]) -> None:
    """Dead-letter bad alerts without holding up live data for long: the record stays in
    `alerts` anyway, so a failure is logged and the feed goes on."""
    if not letters:
        return
    try:
        async with asyncio.timeout(_DEAD_LETTER_TIMEOUT_S):
            while True:
                try:
                    await sender.send(letters)
                    return
                except KafkaError as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("dead-lettering bad alerts failed, retrying: %r", exc)
                    await asyncio.sleep(0.2)
    except (TimeoutError, KafkaError) as exc:
        log.error("could not dead-letter %d bad alerts: %r", len(letters), exc)


def _stop_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop: redis-py (8.2) can turn a
    cancellation that lands mid-command into a connection error it retries, so the
    CancelledError never reaches this loop, which then polled on and held up shutdown."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def run_rank_poller(
    settings: ServiceSettings,
    hub: Hub,
    client: redis.Redis,
    boards: Mapping[Ranking, SharedRefresh[RankBoard]],
) -> None:
    """Read every ranking each interval, push those that changed to the hub, and store each
    board for `GET /api/ranks` (an unchanged one is the same object, views and ETags kept).

    What a poll costs is bounded by the ranked metrics, never by the update rate: see
    read_boards. The mean and count of a metric whose values did not move are read again
    every FULL_READ_EVERY polls, so they are at most that many intervals old.

    Runs until cancelled. Errors (Redis restarting) are logged and retried on the next tick
    of the interval.
    """
    interval = settings.gateway.rank_interval_ms / 1000
    held: dict[Ranking, RankBoard] = {}
    polls = 0
    while True:
        _stop_if_cancelled()
        started = time.monotonic()
        try:
            read = await read_boards(client, held, reread_all=polls % FULL_READ_EVERY == 0)
        except (OSError, redis.RedisError) as exc:
            log.warning("reading the rank sets failed: %r", exc)
        else:
            polls += 1
            for key, board in read.items():
                if board is not held.get(key):
                    hub.publish_ranks(board)
                boards[key].store(board, at=started)
            held = read
        # Each round starts one interval after the last began: a slow read (a busy Redis)
        # does not stretch the period, and one longer than the interval is followed at once.
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
