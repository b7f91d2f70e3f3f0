"""Watcher lifecycle: stand by until the group's lease is ours, then publish ticks while it is."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as redis
from aiokafka.errors import KafkaError

from tickstream_shared.feed_status import REPORT_INTERVAL_S
from tickstream_shared.kafka import ensure_topics, make_producer, stop_producer
from tickstream_shared.naming import market_of
from tickstream_shared.redis_client import connect
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import KafkaSettings, ServiceSettings
from tickstream_watcher.checkpoints import ResumePlan, ResumePoint
from tickstream_watcher.exchange import BadFrame
from tickstream_watcher.feed_markets import FeedMarkets
from tickstream_watcher.leadership import GroupState, Lease, wait_for_lease
from tickstream_watcher.publisher import TickPublisher
from tickstream_watcher.rest import RestUnavailable
from tickstream_watcher.sources import TickSource, make_source

log = logging.getLogger("tickstream.watcher")

# Waits between attempts to resolve the markets while an exchange's listing is unreachable.
_START_RETRY_S: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
_REDIS_ERRORS: Final = (redis.RedisError, OSError, TimeoutError)
_BROKER_ERRORS: Final = (KafkaError,)
_SOURCE_FILE_ERRORS: Final = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_BROKER_RETRY_S: Final = 2.0
# How long a stopping watcher waits for the broker to acknowledge what it handed over; with
# the release of the lease and the producer's stop it keeps the whole stop under 10 s.
_FLUSH_AT_STOP_S: Final = 5.0
# How long a term may take to end by itself once stop is set before it is cancelled: a step
# waiting on an unreachable broker (creating topics, starting the producer) does not see `stop`.
_STOP_GRACE_S: Final = 7.0


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Publish while holding the lease, stand by otherwise, until `stop` is set.

    A send failure or a source error ends it by raising.
    """
    client = connect(settings.redis)
    lease = Lease(client, settings.watcher.group, settings.watcher.lease_ms)
    group = GroupState(client, settings.watcher.group)
    try:
        while await wait_for_lease(lease, stop):
            log.info("took the lease %s: publishing", lease.key)
            try:
                if await _until_stopped(_term(settings, lease, group, stop), stop):
                    break
                log.warning("lost the lease %s: stopped publishing, standing by", lease.key)
                # Still ours in Redis if Redis failed under it (not taken): freed, so that
                # this watcher, or another, takes it again instead of waiting for expiry.
                with contextlib.suppress(*_REDIS_ERRORS):
                    async with asyncio.timeout(2):
                        await lease.release()
            except _BROKER_ERRORS as exc:
                # The broker is down or lost the producer's state: hand the lease on (a standby
                # may do better), wait a little, and stand by for it again with a new producer.
                log.error("publishing stopped by the broker: %r; standing by", exc)
                with contextlib.suppress(*_REDIS_ERRORS):
                    await lease.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=_BROKER_RETRY_S)
    finally:
        # Released on the way out, so that a standby takes over now rather than at expiry.
        with contextlib.suppress(*_REDIS_ERRORS):
            async with asyncio.timeout(2):
                await lease.release()
        await client.aclose()


async def _until_stopped(term: Coroutine[None, None, bool], stop: asyncio.Event) -> bool:
    """What `term` returns; True (stopped) if it was still running _STOP_GRACE_S after `stop`
    was set, and was cancelled then. Raises what `term` raises."""
    task = asyncio.ensure_future(term)
    try:
        await _wait_any(stop, also=task)
        if not task.done():
            await asyncio.wait({task}, timeout=_STOP_GRACE_S)
    finally:
        if not task.done():
            log.warning("stopping: cancelling what still waits for the broker")
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return True
    return task.result()


@dataclass
class _Term:
    """What one holding of the lease publishes with; the keeper reads it as it fills in."""

    source: TickSource | None = None
    publisher: TickPublisher | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    unsaved_closes: dict[str, Tick] = field(default_factory=dict)
    feed_markets: FeedMarkets = field(default_factory=FeedMarkets)


async def _term(
    settings: ServiceSettings, lease: Lease, group: GroupState, stop: asyncio.Event
) -> bool:
    """Publish until `stop` (True) or until the lease is lost (False).

    Redis failing under it counts as losing the lease: the watcher stands by again.
    """
    term = _Term()
    keeper = asyncio.create_task(_keep(lease, group, term), name="watcher-lease-keeper")
    try:
        source = await _start_source(settings, term, stop)
        if source is None:
            return stop.is_set()
        plan = await group.load(m.id for m in source.markets) if source.resumable else None
        if plan is not None:
            source.resume(plan)
        await ensure_topics(settings.kafka, [m.topic for m in source.markets])
        # Not idempotent: every tick carries its market's seq, which every reader deduplicates by;
        # the broker's idempotence costs it 4-5x the CPU per batch (see make_producer).
        producer = make_producer(settings.kafka, client_id="tickstream-watcher", idempotent=False)
        await producer.start()
        try:
            async with TickPublisher(producer, settings.watcher.max_in_flight) as publisher:
                term.publisher = publisher
                pump = _pump(source, publisher, group, plan, settings.kafka)
                await _publish(pump, term.lost, stop)
                if term.lost.is_set():
                    return False
                try:
                    async with asyncio.timeout(_FLUSH_AT_STOP_S):
                        await publisher.flush()  # the keeper still renews the lease meanwhile
                except TimeoutError:
                    # The broker does not answer: stop anyway. Live closes not acknowledged
                    # are not in the `closed` checkpoint, so the next holder publishes them.
                    log.error("ticks not acknowledged within %.0fs of stopping", _FLUSH_AT_STOP_S)
                await _stop_keeper(keeper)
                await _save_closes(group, term)  # so that the next holder resumes after them
                log.info("published %d ticks", publisher.published)
        finally:
            await stop_producer(producer)
        return True
    except _SOURCE_FILE_ERRORS:
        # The source's files (a replay folder gone since the settings were checked): for the
        # operator to fix, not Redis; run_until_stopped ends the process with it.
        raise
    except _REDIS_ERRORS as exc:
        log.error("Redis failed under the lease: %r", exc)
        return False
    finally:
        await _stop_keeper(keeper)
        term.feed_markets.clear()  # a standby reports no markets


async def _stop_keeper(keeper: asyncio.Task[None]) -> None:
    """Cancel the keeper and wait until it has ended; safe to call twice."""
    # Cancelled again until it ends: a cancellation swallowed by a Redis call under it must
    # not leave the watcher waiting for a keeper that sleeps on (a stop needing SIGKILL).
    while not keeper.done():
        keeper.cancel()
        await asyncio.wait({keeper}, timeout=1.0)
    if not keeper.cancelled() and keeper.exception() is not None:
        log.error("the lease keeper failed: %r", keeper.exception())


async def _start_source(
    settings: ServiceSettings, term: _Term, stop: asyncio.Event
) -> TickSource | None:
    """The started source; retried while a listing is unreachable. None if stopped or lost."""
    for attempt in itertools.count():
        source = make_source(settings.watcher, settings.exchanges)
        # Reported while it starts too: a source that cannot start says why (unreachable).
        term.source = source
        try:
            await source.start()
        except (RestUnavailable, BadFrame) as exc:
            delay = _START_RETRY_S[min(attempt, len(_START_RETRY_S) - 1)]
            log.error("cannot resolve the markets: %s; retrying in %.0fs", exc, delay)
            await _wait_any(stop, term.lost, within=delay)
            if stop.is_set() or term.lost.is_set():
                return None
            continue
        term.source = source
        return source
    raise AssertionError("unreachable")


async def _publish(
    pumping: Coroutine[None, None, None], lost: asyncio.Event, stop: asyncio.Event
) -> None:
    """Run the pump until `stop` or `lost`; a finite source's end keeps it waiting for those."""
    pump = asyncio.create_task(pumping)
    try:
        await _wait_any(stop, lost, also=pump)
        if pump.done() and pump.exception() is None:
            # A finite source (replay) ended: stay up until stopped, so that a supervisor
            # (compose, Kubernetes, `tickstream up`) does not restart and replay it again.
            await _wait_any(stop, lost)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump  # surfaces a send failure or a source error


async def _pump(
    source: TickSource,
    publisher: TickPublisher,
    group: GroupState,
    plan: ResumePlan | None,
    kafka: KafkaSettings,
) -> None:
    started = time.monotonic()
    # Markets whose topic exists: those of the start, and those joining later (a live
    # source's new listings), created before their first tick is handed to the producer.
    with_topic = {market.id for market in source.markets}
    if plan is not None and plan.republish:
        # The previous holder's last closes, maybe never acknowledged: as they were, first.
        await publisher.publish(list(plan.republish.values()))
    # aclosing: the source's own tasks (live feeds) end with the pump, even when it is cancelled.
    async with contextlib.aclosing(source.chunks()) as chunks:
        async for chunk in chunks:
            joined = {tick.market for tick in chunk} - with_topic
            if joined:
                await ensure_topics(kafka, [market_of(market).topic for market in joined])
                with_topic |= joined
            if source.resumable:
                await group.closing(chunk)  # before the producer has it: see `leadership`
            await publisher.publish(chunk)
    await publisher.flush()
    log.info("source finished: %d ticks in %.1fs", publisher.published, time.monotonic() - started)


async def _keep(lease: Lease, group: GroupState, term: _Term) -> None:
    """Renew the lease, save acknowledged closes and report the feeds, until cancelled.

    Sets `term.lost` once the lease is not ours any more (taken, or not renewed in time).
    """
    interval = min(lease.renew_interval_s, REPORT_INTERVAL_S)
    while True:
        try:
            async with asyncio.timeout(interval):
                if not await lease.renew():
                    log.error("the lease %s is held by another watcher", lease.key)
                    term.lost.set()
                    return
        except _REDIS_ERRORS as exc:
            _raise_if_cancelling()
            log.warning("cannot renew the lease: %r", exc)
        if not lease.held():
            term.lost.set()
            return
        try:
            async with asyncio.timeout(interval):
                await _save_closes(group, term)
                if term.source is not None:
                    now_ms = time.time_ns() // 1_000_000
                    reports = term.source.feed_reports(now_ms)
                    # Before the write: the gauge says what this watcher sees, Redis or not.
                    term.feed_markets.reported(reports, now_ms)
                    await group.report_feeds(reports)
        except _REDIS_ERRORS as exc:
            log.warning("cannot save checkpoints or feed reports: %r", exc)
        _raise_if_cancelling()
        await asyncio.sleep(interval)


def _raise_if_cancelling() -> None:
    """Raise CancelledError if the current task was asked to stop: the Redis client may end a
    cancelled call with another error (or none) and leave the task running on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _save_closes(group: GroupState, term: _Term) -> None:
    """Checkpoint the closes acknowledged since the last save; kept for the next try on error."""
    if term.publisher is None or term.source is None or not term.source.resumable:
        return
    term.unsaved_closes.update(term.publisher.take_acknowledged_closes())
    if term.unsaved_closes:
        points = {m: ResumePoint(t.minute, t.seq) for m, t in term.unsaved_closes.items()}
        await group.closed(points)
        term.unsaved_closes.clear()


async def _wait_any(
    *events: asyncio.Event, also: asyncio.Future[Any] | None = None, within: float | None = None
) -> None:
    """Return when any event is set, `also` is done, or `within` seconds pass."""
    waiters = {asyncio.ensure_future(event.wait()) for event in events}
    try:
        await asyncio.wait(
            waiters | ({also} if also else set()),
            timeout=within,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
