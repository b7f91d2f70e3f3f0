"""TickPublisher: sends ticks to their market's topic in batches, with a bound on unacknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final

from aiokafka.partitioner import DefaultPartitioner

from tickstream_shared.kafka import NotAppended, appended
from tickstream_shared.naming import market_of
from tickstream_shared.observability import READINGS, Family, Reading
from tickstream_shared.schemas import Tick

log = logging.getLogger(__name__)

TICKS_PUBLISHED: Final = Family(
    "tickstream_ticks_published_total", "Ticks the broker acknowledged.", "counter"
)


class PublishedCount:
    """Ticks acknowledged; kept apart from the publisher so the metric outlives it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def readings(self) -> list[Reading]:
        return [(TICKS_PUBLISHED, (), self.value)]


class _Route:
    """One market's destination, computed once, with its batch being filled and the one sent."""

    __slots__ = (
        "batch",
        "batch_close",
        "count",
        "key",
        "market_id",
        "partition",
        "sending",
        "sending_close",
        "topic",
    )

    def __init__(self, market_id: str, topic: str, partition: int) -> None:
        self.market_id = market_id
        self.topic = topic
        self.partition = partition
        self.key = market_id.encode()
        self.batch: Any = None  # aiokafka BatchBuilder being filled, not yet sent
        self.count = 0  # ticks in `batch`
        self.sending = 0  # ticks of the batch sent and not yet acknowledged (0 = none)
        self.batch_close: Tick | None = None  # the newest closed bar in `batch`
        self.sending_close: Tick | None = None  # the newest closed bar in the batch sent


class TickPublisher:
    """Publishes ticks keyed by market id, with at most `max_in_flight` not yet acknowledged.

    Each market's ticks are appended to one open batch (they all go to one partition), and the
    producer gets whole batches: no per-message future, coroutine or key hash as with
    `producer.send()`. A market has at most one batch on its way; while it is, new ticks
    collect in the open batch, which is sent the moment the previous one is acknowledged (so
    a slow broker gets fewer, larger batches). A market with nothing on its way has its batch
    sent at the end of every `publish`, so no tick waits for later ticks.

    Policy when full: once `max_in_flight` ticks are handed over and not yet acknowledged (open
    or sent), `publish` waits for acknowledgements (back-pressure on the source), rather than
    buffering without bound or dropping. A send that fails after the producer's own retries
    (acks=all) is fatal: `publish` and `flush` raise it from then on, so the
    watcher stops loudly instead of losing ticks silently.

    Use as `async with`: it runs the task that sends batches whose predecessor was acknowledged
    between `publish` calls.
    """

    def __init__(self, producer: Any, max_in_flight: int) -> None:
        self._producer = producer
        self._max_in_flight = max_in_flight
        self._routes: dict[str, _Route] = {}
        self._open: dict[str, _Route] = {}  # markets with an open batch, by topic
        self._unacknowledged = 0  # ticks handed over: in open batches or sent
        self._deliveries: set[asyncio.Future[Any]] = set()
        self._acknowledged = asyncio.Event()  # set on every delivery (or failure)
        self._freed: list[_Route] = []  # acknowledged markets whose open batch can go now
        self._wake_sender = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._acknowledged_closes: dict[str, Tick] = {}
        self._published = PublishedCount()
        READINGS.track(self, totals=self._published.readings)

    @property
    def published(self) -> int:
        """Ticks acknowledged by the broker so far."""
        return self._published.value

    async def __aenter__(self) -> TickPublisher:
        self._sender = asyncio.create_task(self._send_freed(), name="tick-publisher-sender")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the background sender; does not flush. Safe to call twice."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None

    async def publish(self, ticks: Sequence[Tick]) -> None:
        """Hand `ticks` to the producer, in order per market; raises a send failure.

        Returns once every tick is in a batch that is sent or will be as soon as its market's
        previous batch is acknowledged; `flush` waits for the acknowledgements. Cancelling
        it loses the ticks of this call not appended yet; `flush` still sends the others.
        """
        self._raise_failure()
        routes = self._routes
        for tick in ticks:
            if self._unacknowledged >= self._max_in_flight:
                await self._wait_for_room()
            route = routes.get(tick.market) or await self._add_route(tick.market)
            value = tick.encode()
            batch = route.batch
            if (
                batch is None
                or batch.append(timestamp=tick.exchange_ts, key=route.key, value=value) is None
            ):
                if batch is not None:
                    await self._send_when_free(route)  # full in bytes
                batch = route.batch = self._producer.create_batch()
                self._open[route.topic] = route
                if batch.append(timestamp=tick.exchange_ts, key=route.key, value=value) is None:
                    raise ValueError(f"a tick of {len(value)} bytes does not fit in a batch")
            route.count += 1
            if tick.closed:
                route.batch_close = tick
            self._unacknowledged += 1
        await self._send_idle()
        # Let the producer's sender take the batches now, while the source makes the next ones.
        await asyncio.sleep(0)

    async def flush(self) -> None:
        """Send every open batch and wait until every tick is acknowledged; raise a failure.

        Safe to call twice and after a failure (it raises the same failure again).
        """
        while self._unacknowledged and self._failure is None:
            await self._wait_for_acknowledgement()
        self._raise_failure()

    def take_acknowledged_closes(self) -> dict[str, Tick]:
        """Per market, the newest closed bar acknowledged since the last call."""
        closes, self._acknowledged_closes = self._acknowledged_closes, {}
        return closes

    async def _add_route(self, market_id: str) -> _Route:
        topic = market_of(market_id).topic
        # Chosen as `producer.send()` would choose it (murmur2 of the key), but only once.
        partitions = sorted(await self._producer.partitions_for(topic))
        partition = DefaultPartitioner()(market_id.encode(), partitions, partitions)
        route = self._routes[market_id] = _Route(market_id, topic, partition)
        return route

    async def _wait_for_room(self) -> None:
        while self._unacknowledged >= self._max_in_flight:
            await self._wait_for_acknowledgement()
            self._raise_failure()

    async def _send_when_free(self, route: _Route) -> None:
        """Send the market's (full) open batch once its previous batch is acknowledged."""
        while route.batch is not None:
            if route.sending:
                await self._wait_for_acknowledgement()
                self._raise_failure()
            else:
                await self._send(route)

    async def _wait_for_acknowledgement(self) -> None:
        """Send the open batches of idle markets, then wait for the next acknowledgement.

        Sending first matters: if every unacknowledged tick sat in an open batch, nothing
        would ever be acknowledged.
        """
        self._acknowledged.clear()
        await self._send_idle()
        if not self._deliveries and self._failure is None:
            raise RuntimeError(f"{self._unacknowledged} ticks unacknowledged, none on their way")
        await self._acknowledged.wait()

    async def _send_idle(self) -> None:
        for route in list(self._open.values()):
            if not route.sending:
                await self._send(route)

    async def _send_freed(self) -> None:
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            freed, self._freed = self._freed, []
            for route in freed:
                if route.batch is not None and not route.sending:
                    try:
                        await self._send(route)
                    except Exception:
                        return  # recorded by _send: publish and flush raise it

    async def _send(self, route: _Route) -> None:
        batch, count, close = route.batch, route.count, route.batch_close
        route.batch, route.count, route.sending = None, 0, count
        route.batch_close, route.sending_close = None, close
        del self._open[route.topic]
        try:
            delivery = await self._producer.send_batch(
                batch, route.topic, partition=route.partition
            )
        except asyncio.CancelledError:
            # Not handed over (only possible on shutdown): keep it for `flush` if nothing newer
            # is open, so that no count of unacknowledged ticks is left waiting forever.
            route.sending, route.sending_close = 0, None
            if route.batch is None:
                route.batch, route.count, route.batch_close = batch, count, close
                self._open[route.topic] = route
            else:
                self._unacknowledged -= count
                log.warning("%d ticks of %s not sent: cancelled", count, route.topic)
            raise
        except Exception as exc:
            self._fail(exc, count)
            raise
        self._deliveries.add(delivery)
        delivery.add_done_callback(lambda done: self._delivered(route, done))

    def _delivered(self, route: _Route, delivery: asyncio.Future[Any]) -> None:
        self._deliveries.discard(delivery)
        count, route.sending = route.sending, 0
        close, route.sending_close = route.sending_close, None
        self._unacknowledged -= count
        if delivery.cancelled():
            self._fail(RuntimeError("tick batch delivery was cancelled"), count)
        elif (error := delivery.exception()) is not None:
            self._fail(error, count)
        elif not appended(metadata := delivery.result()):
            self._fail(NotAppended(metadata), count)
        else:
            self._published.value += count
            if close is not None:
                self._acknowledged_closes[route.market_id] = close
            if route.batch is not None:
                self._freed.append(route)
                self._wake_sender.set()
        self._acknowledged.set()

    def _fail(self, error: BaseException, count: int) -> None:
        if self._failure is None:
            log.error("tick batch send failed (%d ticks): %r", count, error)
            self._failure = error
        self._acknowledged.set()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
