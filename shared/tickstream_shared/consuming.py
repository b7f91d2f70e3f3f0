"""The consumer runtime of stats and alerts: batches decoded, dead-lettered, handled, committed."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import asyncpg.exceptions as pg_errors
import redis.exceptions as redis_errors
from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, KafkaTimeoutError

from tickstream_shared.deadletter import DeadLetter, DeadLetterSender
from tickstream_shared.errors import BadMessage
from tickstream_shared.naming import Market, market_of
from tickstream_shared.observability import (
    ALERTS_CONFIRMED,
    ALERTS_LEFT_PROVISIONAL,
    ALERTS_RAISED,
    ALERTS_RETRACTED,
    BATCH_SECONDS,
    BATCHES,
    COMMITS_REFUSED,
    CONSUMER_LAG,
    MARKETS_ARRIVING,
    MARKETS_FORGOTTEN,
    MARKETS_KEPT,
    MARKETS_WARMED,
    READINGS,
    RECORDS_DEAD_LETTERED,
    RECORDS_DECODED,
    RECORDS_SKIPPED_BAD,
    RECORDS_SKIPPED_UNOWNED,
    Reading,
)
from tickstream_shared.schemas import Tick, decode_tick

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_MAX_DELAY_S = 5.0
_REPORT_EVERY_S = 30.0
# Markets prepared per turn of the loop (one `assigned` call: one stored-bars query for stats).
# Bounds the rows of one query (8 x 1,440 minutes) and how long the lock is held between two
# batches of the markets already owned, or before a rebalance listener gets the lock (about
# 0.3 s for stats; 32 held it 1.2 s for no gain: see bench/bench_warmup.py).
WARM_BATCH_MARKETS = 8

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
    # asyncpg raises this when a pooled connection's server went away under it (a restart).
    pg_errors.InternalClientError,
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


def decode_readings(*counters: DecodeCounters) -> list[Reading]:
    """The metrics of decode counters (added up), for `observability.READINGS`."""
    return [
        (RECORDS_DECODED, (), sum(c.decoded for c in counters)),
        (RECORDS_SKIPPED_BAD, (), sum(c.skipped_bad for c in counters)),
    ]


@functools.lru_cache(maxsize=8192)
def _topic_of(market_id: str) -> str:
    return market_of(market_id).topic


def decode_batch(
    records: Iterable[Any], counters: DecodeCounters, dead: list[DeadLetter] | None = None
) -> list[Tick]:
    """Decode consumer records in order; bad ones are counted, logged, skipped (into `dead`)."""
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
            if dead is not None:
                dead.append(DeadLetter.of(record, exc.problem))
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
    except KafkaError as exc:
        # The broker or the group coordinator is away: the effects are durable and
        # idempotent, so the batch is simply read again if nothing later gets committed.
        log.warning("commit failed (%r): the batch may be read again", exc)
        return False
    return True


class BatchHandler(Protocol):
    """What a consuming service does with its batches; the runtime does the rest.

    `assigned` prepares markets that arrived, at most WARM_BATCH_MARKETS per call (warm-up;
    transient errors are retried by the runtime, others stop the service); `revoked` forgets
    markets that left (only those: markets kept across a rebalance keep their state). `handle`
    makes one batch's effects durable and returns False only when `stop` interrupted it
    (nothing is committed then); `idle` runs when a poll returned nothing (same convention).
    None of them runs concurrently with another: the runtime holds one lock around each.
    """

    async def assigned(self, markets: set[Market]) -> None: ...

    def revoked(self, markets: set[Market]) -> None: ...

    async def handle(self, batch: DecodedBatch, stop: asyncio.Event) -> bool: ...

    async def idle(self, stop: asyncio.Event) -> bool: ...


@runtime_checkable
class RaisesAlerts(Protocol):
    """A handler that counts alerts: newly stored (`raised`), stored as confirmed or retracted,
    and left provisional; exported as tickstream_alerts_<name>_total."""

    raised: int
    confirmed: int
    retracted: int

    @property
    def left_provisional(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A batch's good ticks, in order per partition, and where each market's records began.

    `first_offsets[market_id]` is (TopicPartition, offset) of the market's first record in the
    batch: everything of that market before it was consumed in earlier batches.
    """

    ticks: list[Tick]
    first_offsets: dict[str, tuple[Any, int]]


@dataclass
class RuntimeCounters:
    batches: int = 0
    commits_refused: int = 0
    skipped_unowned: int = 0  # records of partitions not owned when their batch was handled
    markets_warmed: int = 0  # markets prepared by the handler as they arrived
    markets_kept: int = 0  # markets kept with their state across a rebalance (not warmed)
    markets_forgotten: int = 0  # markets whose state was dropped as their partition left


class ConsumerRuntime:
    """The one consume loop of stats and alerts: poll a batch, make it durable, commit.

    Per batch, under one lock: only records of partitions this instance owns (assigned and
    prepared) are used; bad records are sent to the dead-letter topic and acknowledged; the
    handler makes the batch's effects durable; then exactly the offsets of the records used
    are committed. A refused commit (the group rebalanced under the batch) is logged, not
    fatal: the owner reads those records again and the handlers' effects are idempotent (rows
    upserted by seq, alerts keyed by minute, ticks at or below a market's last seq skipped).

    Rebalances (aiokafka's eager protocol revokes every partition, then assigns the new set):
    the revoke waits for the lock, so the batch in flight commits first, and then processing
    stops, but the handler's state is held. At the assignment, a partition both revoked and
    assigned keeps its state (counted as kept) if the group generation went from g to g + 1:
    this member was in both generations, each generation has one owner per partition, so no
    one else read it in between; it resumes from the committed offset, and anything handled
    after that offset is skipped by seq. Otherwise (the member was expelled and rejoined, so
    others may have owned it) it counts as an arrival. Departures are forgotten; arrivals are
    paused and prepared by the loop, WARM_BATCH_MARKETS markets per turn with batches of the
    owned partitions in between, then resumed. The listener itself only does set arithmetic,
    so it never holds the group up: aiokafka sends no heartbeat while it runs.

    aiokafka (0.14) calls the rebalance listener from its coordination task, concurrently with
    the loop; the lock cannot deadlock with the loop's commit(), which takes only the
    coordinator's commit lock, not held while the coordinator awaits the listener.
    """

    def __init__(
        self,
        consumer: Any,
        handler: BatchHandler,
        dead_letters: DeadLetterSender,
        *,
        batch_max: int,
        batch_wait_ms: int,
        stop: asyncio.Event,
    ) -> None:
        self.consumer = consumer
        self.stop = stop
        self.handler = handler
        self.dead_letters = dead_letters
        self.batch_max = batch_max
        self.batch_wait_ms = batch_wait_ms
        self.owned: set[Any] = set()  # TopicPartitions assigned and prepared
        # Assigned, paused, waiting to be prepared (insertion order: sorted by topic).
        self.arriving: dict[Any, None] = {}
        # Revoked partitions whose handler state is held until the assignment tells whether
        # they stay, and the group generation they were owned in.
        self._held: set[Any] = set()
        self._held_generation = -1
        self.decode = DecodeCounters()
        self.counters = RuntimeCounters()
        self.lock = asyncio.Lock()
        self.listener = _RebalanceListener(self)
        # aiokafka only logs what a listener raises; the loop re-raises it, so a bug in the
        # rebalance bookkeeping stops the service instead of leaving partitions unowned.
        self._failure: Exception | None = None
        # Per owned partition, the offset after the last record handled: the consumer lag
        # metric is the partition's highwater minus this.
        self.handled: dict[Any, int] = {}
        READINGS.track(
            self,
            totals=functools.partial(
                _runtime_totals, self.decode, self.counters, dead_letters, handler
            ),
            current=ConsumerRuntime._lag_readings,
        )

    async def run(self) -> None:
        """Consume until `stop`; raises what the handler or a preparation raised."""
        stop = self.stop
        next_report = time.monotonic() + _REPORT_EVERY_S
        while not stop.is_set():
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + _REPORT_EVERY_S
                self._report()
            if self.arriving:
                async with self.lock:
                    if self._failure is not None:
                        raise self._failure
                    if not await self._prepare_some(stop):
                        return
            # While markets wait to be prepared, poll without waiting: the owned ones get a
            # batch between two warm-ups, and the warm-up is not slowed by the fetch wait.
            batch = await self.consumer.getmany(
                timeout_ms=0 if self.arriving else self.batch_wait_ms, max_records=self.batch_max
            )
            async with self.lock:
                if self._failure is not None:
                    raise self._failure
                if not batch:
                    if not await self.handler.idle(stop):
                        return
                    continue
                if not await self._handle(batch, stop):
                    return

    def _report(self) -> None:
        log.info(
            "batches=%d ticks decoded=%d skipped_bad=%d dead_lettered=%d commits_refused=%d"
            " skipped_unowned=%d markets warmed=%d kept=%d forgotten=%d arriving=%d",
            self.counters.batches,
            self.decode.decoded,
            self.decode.skipped_bad,
            self.dead_letters.sent,
            self.counters.commits_refused,
            self.counters.skipped_unowned,
            self.counters.markets_warmed,
            self.counters.markets_kept,
            self.counters.markets_forgotten,
            len(self.arriving),
        )

    async def _prepare_some(self, stop: asyncio.Event) -> bool:
        """Prepare up to WARM_BATCH_MARKETS arriving markets, then own and resume them.

        Returns False only if `stop` came first (they stay arriving). Raises what the handler
        raises that is not transient.
        """
        partitions = list(itertools.islice(self.arriving, WARM_BATCH_MARKETS))
        markets = {Market.from_topic(tp.topic) for tp in partitions}
        # A market already owned through another of its topic's partitions keeps its state.
        markets -= {Market.from_topic(tp.topic) for tp in self.owned}

        async def prepare() -> bool:
            if markets:
                await self.handler.assigned(markets)
            return True

        if await retry_until_done("prepare markets", prepare, stop) is None:
            return False
        for tp in partitions:
            del self.arriving[tp]
        self.owned.update(partitions)
        self.consumer.resume(*partitions)
        self.counters.markets_warmed += len(markets)
        if not self.arriving:
            log.info(
                "all assigned markets prepared: %d owned, %d warmed so far",
                len(self.owned),
                self.counters.markets_warmed,
            )
        return True

    async def _handle(self, batch: dict[Any, list[Any]], stop: asyncio.Event) -> bool:
        used = {tp: records for tp, records in batch.items() if tp in self.owned and records}
        skipped = sum(len(records) for tp, records in batch.items() if tp not in used)
        if skipped:
            # Revoked while this batch was fetched: its owner reads these records again from
            # the committed offset.
            self.counters.skipped_unowned += skipped
            log.info("skipped %d records of partitions not owned (mid-rebalance)", skipped)
            for tp, records in batch.items():
                if tp in self.arriving and records:
                    # Fetched before its pause took effect: this instance owns it and must
                    # read these records again once the market is prepared.
                    self.consumer.seek(tp, records[0].offset)
        if not used:
            return True
        started = time.perf_counter()
        dead: list[DeadLetter] = []
        ticks = decode_batch(records_in_order(used), self.decode, dead)
        if dead:

            async def send_dead() -> bool:
                await self.dead_letters.send(dead)
                return True

            if await retry_until_done("send dead letters", send_dead, stop) is None:
                return False
        first_offsets = {
            Market.from_topic(tp.topic).id: (tp, records[0].offset) for tp, records in used.items()
        }
        if not await self.handler.handle(DecodedBatch(ticks, first_offsets), stop):
            return False
        self.counters.batches += 1
        offsets = {tp: records[-1].offset + 1 for tp, records in used.items()}
        self.handled.update(offsets)
        if not await commit_batch(self.consumer, offsets):
            self.counters.commits_refused += 1
        BATCH_SECONDS.observe(time.perf_counter() - started)
        return True

    def _lag_readings(self) -> list[Reading]:
        readings: list[Reading] = [(MARKETS_ARRIVING, (), len(self.arriving))]
        for tp, handled in self.handled.items():
            if tp not in self.owned:
                continue  # held during a rebalance: reported again if it stays
            try:
                highwater = self.consumer.highwater(tp)
            except Exception:  # aiokafka asserts: the partition left, its revoke is on its way
                continue
            if highwater is not None:
                lag = max(highwater - handled, 0)
                readings.append((CONSUMER_LAG, (tp.topic, str(tp.partition)), lag))
        return readings

    async def _revoked(self, partitions: set[Any]) -> None:
        async with self.lock:
            # Processing stops (the batch in flight has committed: it held the lock), but the
            # state stays until the assignment says whether each partition stays here.
            self._held |= self.owned & partitions
            self._held_generation = _generation(self.consumer)
            self.owned -= partitions
            for tp in partitions:
                self.arriving.pop(tp, None)  # never prepared: nothing to forget

    async def _assigned(self, partitions: set[Any]) -> None:
        async with self.lock:
            generation = _generation(self.consumer)
            held, self._held = self._held, set()
            if self._held_generation >= 0 and generation == self._held_generation + 1:
                kept = held & partitions
            else:
                kept = set()  # expelled and rejoined (or no generation known): warm again
                if held:
                    log.info(
                        "group generation %d after %d: no partition's state is kept",
                        generation,
                        self._held_generation,
                    )
            departed = held - kept
            for tp in departed:
                self.handled.pop(tp, None)
            still_here = {Market.from_topic(tp.topic) for tp in kept | self.owned}
            gone = {Market.from_topic(tp.topic) for tp in departed} - still_here
            self.handler.revoked(gone)
            self.owned |= kept
            arrivals = sorted(partitions - self.owned, key=lambda tp: (tp.topic, tp.partition))
            for tp in arrivals:
                self.arriving[tp] = None
            if arrivals:
                self.consumer.pause(*arrivals)
            kept_markets = len({Market.from_topic(tp.topic) for tp in kept})
            self.counters.markets_kept += kept_markets
            self.counters.markets_forgotten += len(gone)
            log.info(
                "assigned %d partitions (generation %d): %d markets kept, %d forgotten,"
                " %d partitions to prepare",
                len(partitions),
                generation,
                kept_markets,
                len(gone),
                len(self.arriving),
            )


def _generation(consumer: Any) -> int:
    """The consumer's current group generation, or -1 if it has none.

    aiokafka has no public accessor; its coordinator keeps the generation of the last join
    and resets it to -1 when the group no longer knows the member (expelled).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    generation = getattr(coordinator, "generation", -1)
    return generation if isinstance(generation, int) else -1


def _runtime_totals(
    decode: DecodeCounters,
    counters: RuntimeCounters,
    dead_letters: DeadLetterSender,
    handler: BatchHandler,
) -> list[Reading]:
    readings = [
        *decode_readings(decode),
        (RECORDS_DEAD_LETTERED, (), dead_letters.sent),
        (RECORDS_SKIPPED_UNOWNED, (), counters.skipped_unowned),
        (BATCHES, (), counters.batches),
        (COMMITS_REFUSED, (), counters.commits_refused),
        (MARKETS_WARMED, (), counters.markets_warmed),
        (MARKETS_KEPT, (), counters.markets_kept),
        (MARKETS_FORGOTTEN, (), counters.markets_forgotten),
    ]
    if isinstance(handler, RaisesAlerts):
        readings += [
            (ALERTS_RAISED, (), handler.raised),
            (ALERTS_CONFIRMED, (), handler.confirmed),
            (ALERTS_RETRACTED, (), handler.retracted),
            (ALERTS_LEFT_PROVISIONAL, (), handler.left_provisional),
        ]
    return readings


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self.runtime._revoked(set(revoked))
        except Exception as exc:
            self.runtime._failure = exc
            raise

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            await self.runtime._assigned(set(assigned))
        except Exception as exc:
            self.runtime._failure = exc
            raise
