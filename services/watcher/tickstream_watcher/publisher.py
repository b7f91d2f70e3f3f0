"""TickPublisher: sends ticks to their per-pair topic with a bounded number in flight."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tickstream_shared.schemas import Tick

log = logging.getLogger(__name__)


class TickPublisher:
    """Publishes ticks keyed by market; at most `max_in_flight` unacknowledged at a time.

    Policy when full: `publish` waits (back-pressure on the source) rather than buffering
    without bound or dropping. A send that fails after the producer's own retries is fatal:
    `flush` re-raises it, so the watcher stops loudly instead of losing ticks silently.
    """

    def __init__(self, producer: Any, max_in_flight: int) -> None:
        self._producer = producer
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: set[asyncio.Future[Any]] = set()
        self._failure: BaseException | None = None
        self.published = 0

    async def publish(self, tick: Tick) -> None:
        """Hand one tick to the producer; raises the first earlier send failure, if any."""
        if self._failure is not None:
            raise self._failure
        await self._slots.acquire()
        market = tick.market
        try:
            delivery = await self._producer.send(
                market.topic,
                value=tick.encode(),
                key=market.id.encode(),
                timestamp_ms=tick.exchange_ts,
            )
        except BaseException:
            self._slots.release()
            raise
        self._pending.add(delivery)
        delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Future[Any]) -> None:
        self._pending.discard(delivery)
        self._slots.release()
        if delivery.cancelled():
            return
        error = delivery.exception()
        if error is not None:
            if self._failure is None:
                log.error("tick send failed: %r", error)
                self._failure = error
        else:
            self.published += 1

    async def flush(self) -> None:
        """Wait until every tick handed over is acknowledged; re-raise a send failure."""
        await self._producer.flush()
        if self._pending:
            await asyncio.wait(set(self._pending))
        if self._failure is not None:
            raise self._failure
