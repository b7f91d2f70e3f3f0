"""Watcher lifecycle: create topics, then stream ticks from the source until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tickstream_shared.kafka import ensure_topics, make_producer
from tickstream_shared.settings import ServiceSettings
from tickstream_watcher.publisher import TickPublisher
from tickstream_watcher.sources import TickSource, make_source

log = logging.getLogger("tickstream.watcher")


async def run(settings: ServiceSettings, stop: asyncio.Event) -> None:
    """Publish ticks until `stop` is set; a send failure or source error ends it by raising."""
    source = make_source(settings.watcher, settings.exchanges)
    await source.start()
    await ensure_topics(settings.kafka, [m.topic for m in source.markets])
    producer = make_producer(settings.kafka, client_id="tickstream-watcher")
    await producer.start()
    try:
        async with TickPublisher(producer, settings.watcher.max_in_flight) as publisher:
            pump = asyncio.create_task(_pump(source, publisher))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({pump, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and pump.exception() is None:
                # A finite source (replay) ended: stay up until stopped, so that a supervisor
                # (compose, Kubernetes, `tickstream up`) does not restart and replay it again.
                await stopper
            stopper.cancel()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump  # surfaces a send failure or a source error
            await publisher.flush()
            log.info("published %d ticks", publisher.published)
    finally:
        await producer.stop()


async def _pump(source: TickSource, publisher: TickPublisher) -> None:
    started = time.monotonic()
    # aclosing: the source's own tasks (live feeds) end with the pump, even when it is cancelled.
    async with contextlib.aclosing(source.chunks()) as chunks:
        async for chunk in chunks:
            await publisher.publish(chunk)
    await publisher.flush()
    log.info("source finished: %d ticks in %.1fs", publisher.published, time.monotonic() - started)
