"""Alerts lifecycle: consume ticks, evaluate the minute spike rule, store and publish, commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from tickstream_alerts.detector import SpikeDetector
from tickstream_shared import alert_store, db
from tickstream_shared.consuming import ConsumerRuntime, DecodedBatch, retry_until_done
from tickstream_shared.deadletter import DeadLetterSender
from tickstream_shared.kafka import Message, RenewableProducer, ensure_topics, make_consumer
from tickstream_shared.naming import (
    ALERT_KINDS,
    ALERTS_GROUP,
    ALERTS_TOPIC,
    DEADLETTER_TOPIC,
    STATS_GROUP,
    TICK_TOPIC_PATTERN,
    Market,
    market_of,
)
from tickstream_shared.schemas import MINUTE_MS, Alert, Tick
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.alerts")
_REPORT_EVERY_S = 30.0


class _AlertsHandler:
    """Alerts' part of each batch (see ConsumerRuntime): judge, store, publish.

    A market's rule state is built lazily at its first tick (see `_warm_new_markets`) and
    forgotten when its partition leaves. `raised`, `confirmed` and `retracted` count what the
    store changed (so a re-delivered batch counts nothing twice): exported by the runtime.
    """

    def __init__(
        self,
        pool: Any,
        producer: RenewableProducer,
        detector: SpikeDetector,
        stored_by_stats: StatsProgress,
    ) -> None:
        self.pool = pool
        self.producer = producer
        self.detector = detector
        self.stored_by_stats = stored_by_stats
        self.raised = 0
        self.confirmed = 0
        self.retracted = 0
        self._next_report = time.monotonic() + _REPORT_EVERY_S

    async def assigned(self, markets: set[Market]) -> None:
        """Nothing yet: warmed at each market's first tick."""

    @property
    def left_provisional(self) -> int:
        return self.detector.left_provisional

    def revoked(self, markets: set[Market]) -> None:
        for market in markets:
            self.detector.forget(market.id)

    async def idle(self, stop: asyncio.Event) -> bool:
        return True

    async def handle(self, batch: DecodedBatch, stop: asyncio.Event) -> bool:
        ticks = batch.ticks
        new = {t.market for t in ticks if t.market not in self.detector}
        # A market's rule is rebuilt from the bars stats stored before its first tick here:
        # wait until stats has stored everything before that tick, or the hour would miss
        # minutes and the rule judge against data that is not there yet.
        for market_id in sorted(new):
            tp, offset = batch.first_offsets[market_id]
            if not await self.stored_by_stats.wait_until_stored(tp, offset, stop):
                return False

        async def warm() -> bool:
            await _warm_new_markets(self.pool, self.detector, ticks)
            return True

        if await retry_until_done("warm rules", warm, stop) is None:
            return False
        alerts = self.detector.observe(ticks)
        if alerts:

            async def store() -> alert_store.Stored:
                return await alert_store.store_alerts(self.pool, alerts)

            stored = await retry_until_done("store alerts", store, stop)
            if stored is None:
                return False
            # Published (this batch's changes and any left by an earlier failure) before the
            # batch is committed: a crash in between publishes them at the next start.
            if await _publish_pending(self.pool, self.producer, stop) is None:
                return False
            self.raised += stored.raised
            self.confirmed += stored.confirmed
            self.retracted += stored.retracted
            for alert in alerts:
                log.debug(
                    "alert %s %s value=%.6g mean=%.6g ratio=%.1fx final=%s",
                    alert.alert_id,
                    alert.status,
                    alert.value,
                    alert.mean,
                    alert.ratio,
                    alert.final_value,
                )
        if time.monotonic() >= self._next_report:
            self._next_report = time.monotonic() + _REPORT_EVERY_S
            log.info(
                "alerts raised=%d confirmed=%d retracted=%d left_provisional=%d skipped_stale=%d",
                self.raised,
                self.confirmed,
                self.retracted,
                self.detector.left_provisional,
                self.detector.skipped_stale,
            )
        return True


class StatsProgress:
    """What stats has stored, from its consumer group's committed offsets (it commits after
    storing). A consumer of that group that never joins it only reads those offsets."""

    _POLL_S = 0.5
    _WARN_EVERY_S = 10.0

    def __init__(self, settings: ServiceSettings) -> None:
        self._consumer = make_consumer(
            settings.kafka, group_id=STATS_GROUP, client_id="tickstream-alerts-stats-progress"
        )

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def wait_until_stored(self, tp: Any, offset: int, stop: asyncio.Event) -> bool:
        """Wait until stats has stored the records of `tp` before `offset`; False if stopped."""
        warn_at = time.monotonic()  # say at once that it waits, then every _WARN_EVERY_S
        while offset > 0:

            async def committed() -> int:
                return int(await self._consumer.committed(tp) or 0)

            done = await retry_until_done("read stats progress", committed, stop)
            if done is None:
                return False
            if done >= offset:
                break
            if time.monotonic() >= warn_at:
                warn_at = time.monotonic() + self._WARN_EVERY_S
                log.warning(
                    "waiting for stats to store %s up to offset %d (at %d)", tp, offset, done
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._POLL_S)
            if stop.is_set():
                return False
        return True


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Consume until `stop`; offsets are committed after alerts are stored and published."""
    pool = await db.create_pool(settings.database)
    consumer = make_consumer(
        settings.kafka, group_id=ALERTS_GROUP, client_id="tickstream-alerts", role="batch"
    )
    producer = RenewableProducer(settings.kafka, client_id="tickstream-alerts")
    detector = SpikeDetector(settings.alerts)
    stats_progress = StatsProgress(settings)
    runtime = ConsumerRuntime(
        consumer,
        _AlertsHandler(pool, producer, detector, stats_progress),
        DeadLetterSender(producer, ALERTS_GROUP),
        batch_max=settings.alerts.batch_max,
        batch_wait_ms=200,
        stop=stop,
    )
    try:
        await db.ensure_schema(pool, settings.database)
        await ensure_topics(settings.kafka, [ALERTS_TOPIC, DEADLETTER_TOPIC])
        await producer.start()
        await stats_progress.start()
        consumer.subscribe(pattern=TICK_TOPIC_PATTERN, listener=runtime.listener)
        await consumer.start()
        # Alerts stored by an earlier run that crashed before publishing them go out first.
        if await _publish_pending(pool, producer, stop) is None:
            return
        await runtime.run()
    finally:
        await consumer.stop()
        await stats_progress.stop()
        await producer.stop()
        await pool.close()


async def _warm_new_markets(pool: Any, detector: SpikeDetector, ticks: list[Tick]) -> None:
    """Rebuild a market's trailing minutes, open alerts and cooldown at its first consumed tick.

    With m that tick's minute and c = correction_minutes: the bars are those before m
    (m - window - c .. m - 1, so that minutes from m - c on can be judged again with whole
    windows), as stats stored them, keeping only updates older than the tick (lower seq):
    stats may have stored updates this service has not evaluated yet, and those must still be
    evaluated, not skipped. The open alerts are every stored alert of the market's metrics from
    m - c on (m itself included, so a minute that alerted before a restart does not alert
    again, and a provisional alert is confirmed or retracted by the closed bar still to come);
    the cooldown runs on from them or from the last alert before them that is not retracted.
    """
    first: dict[str, Tick] = {}
    for tick in ticks:
        if tick.market not in detector and tick.market not in first:
            first[tick.market] = tick
    settings = detector.settings
    correction_ms = settings.correction_minutes * MINUTE_MS
    reach_ms = settings.window_minutes * MINUTE_MS + correction_ms
    for market_id, tick in first.items():
        bars = await db.bars_between(
            pool, market_id, tick.minute - reach_ms, tick.minute - MINUTE_MS
        )
        metric_ids = [market_of(market_id).metric_id(kind) for kind in ALERT_KINDS]
        first_open = tick.minute - correction_ms
        open_alerts = await alert_store.alerts_since(pool, metric_ids, first_open)
        last_alerts = await alert_store.last_alert_minutes(pool, metric_ids, first_open)
        detector.warm(
            market_id, (bar for bar in bars if bar.seq < tick.seq), last_alerts, open_alerts
        )


async def _publish_pending(
    pool: Any, producer: RenewableProducer, stop: asyncio.Event
) -> int | None:
    """Publish every stored-but-unpublished alert state, then mark them; None if stopped first.

    Keyed by metric, so one alert's states stay in order on one partition.
    """

    async def attempt() -> int:
        pending = await alert_store.unpublished_alerts(pool)
        if not pending:
            return 0
        await producer.send_all(
            Message(ALERTS_TOPIC, a.encode(), a.metric.encode(), timestamp_ms=_changed_at(a))
            for a in pending
        )
        await alert_store.mark_published(pool, pending)
        return len(pending)

    return await retry_until_done("publish alerts", attempt, stop)


def _changed_at(alert: Alert) -> int:
    """The record timestamp: event time of the update that set the alert's current status."""
    return alert.exchange_ts if alert.status_ts is None else alert.status_ts
