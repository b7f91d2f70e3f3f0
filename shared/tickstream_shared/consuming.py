"""Batch decoding and retry helpers for the consuming services (stats, alerts)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from tickstream_shared.errors import BadMessage
from tickstream_shared.schemas import Tick, decode_tick

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_MAX_DELAY_S = 5.0


@dataclass
class DecodeCounters:
    decoded: int = 0
    skipped_bad: int = 0


def decode_batch(records: Iterable[Any], counters: DecodeCounters) -> list[Tick]:
    """Decode consumer records in order; bad ones are counted, logged with their key, skipped."""
    ticks = []
    for record in records:
        try:
            tick = decode_tick(record.value)
            if tick.market.topic != record.topic:
                raise BadMessage(f"tick of {tick.market.id} on topic {record.topic}")
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
    """Run `attempt` until it succeeds, backing off on errors; None if `stop` is set first.

    Used for writes that must not be skipped: the batch is retried, never dropped, and its
    offsets are not committed until the write succeeds.
    """
    delay = 0.1
    while True:
        try:
            return await attempt()
        except (OSError, ConnectionError, TimeoutError) as exc:
            failure: BaseException = exc
        except Exception as exc:  # driver errors (asyncpg, redis) have no common base
            failure = exc
        log.warning("%s failed, retrying in %.1fs: %r", what, delay, failure)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
            return None
        except TimeoutError:
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
