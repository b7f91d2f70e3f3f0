"""Batch decoding and retry helpers for the consuming services (stats, alerts)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg.exceptions as pg_errors
import redis.exceptions as redis_errors
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, KafkaTimeoutError

from tickstream_shared.errors import BadMessage
from tickstream_shared.naming import market_of
from tickstream_shared.schemas import Tick, decode_tick

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_MAX_DELAY_S = 5.0

# Failures of a server or the network, worth waiting out. Anything else (a bug, a constraint
# violation) is raised: the service stops loudly, and uncommitted offsets lose nothing.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    KafkaTimeoutError,
    pg_errors.PostgresConnectionError,
    pg_errors.CannotConnectNowError,
    pg_errors.InterfaceError,  # connection lost mid-operation
    pg_errors.InsufficientResourcesError,  # too many connections, disk full
    pg_errors.OperatorInterventionError,  # server shutting down
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
)


def is_transient(error: BaseException) -> bool:
    """True for errors a retry can outlive: lost connections, timeouts, retriable Kafka errors."""
    if isinstance(error, KafkaError):
        return bool(error.retriable) or isinstance(error, KafkaTimeoutError)
    return isinstance(error, _TRANSIENT)


@dataclass
class DecodeCounters:
    decoded: int = 0
    skipped_bad: int = 0


@functools.lru_cache(maxsize=8192)
def _topic_of(market_id: str) -> str:
    return market_of(market_id).topic


def decode_batch(records: Iterable[Any], counters: DecodeCounters) -> list[Tick]:
    """Decode consumer records in order; bad ones are counted, logged with their key, skipped."""
    ticks = []
    now_ms = time.time_ns() // 1_000_000
    for record in records:
        try:
            if record.value is None:
                raise BadMessage("record has no value")
            tick = decode_tick(record.value, now_ms=now_ms)
            if _topic_of(tick.market) != record.topic:
                raise BadMessage(f"tick of {tick.market} on topic {record.topic}")
            ticks.append(tick)
        except BadMessage as exc:
            counters.skipped_bad += 1
            log.warning(
                "skipping bad tick topic=%s partition=%s offset=%s key=%r: %s",
                record.topic,
                record.partition,
                record.offset,
                record.key,
                exc.problem,
            )
    counters.decoded += len(ticks)
    return ticks


def records_in_order(batch: dict[Any, list[Any]]) -> list[Any]:
    """Flatten a getmany() result; each partition's records stay in offset order."""
    return [record for records in batch.values() for record in records]


async def retry_until_done(
    what: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event
) -> T | None:
    """Run `attempt` until it succeeds, backing off on transient errors; None if stopped first.

    Used for writes that must not be skipped: the batch is retried, never dropped, and its
    offsets are not committed until the write succeeds. Other errors are raised at once.
    """
    delay = 0.1
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("%s failed, retrying in %.1fs: %r", what, delay, exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
            return None
        except TimeoutError:
            delay = min(delay * 2, RETRY_MAX_DELAY_S)


async def commit_batch(consumer: Any, offsets: dict[Any, int] | None = None) -> bool:
    """Commit a batch's offsets (all consumed positions when None); False if refused.

    A commit is refused when the group rebalanced under the batch (CommitFailedError) or a
    new topic changed the pattern subscription, which drops the assignment until the group is
    joined again (IllegalStateError). Neither is an error of the batch: it is logged, and the
    partition's owner reads the batch again and skips by seq what was already applied.
    """
    try:
        await consumer.commit(offsets)
    except (CommitFailedError, IllegalStateError) as exc:
        log.warning("commit refused during a rebalance, the batch will be re-read: %s", exc)
        return False
    return True
