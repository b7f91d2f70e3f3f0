"""ExchangeFeed: one exchange WebSocket connection kept alive forever, frames parsed to events."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from tickstream_shared.observability import READINGS, Family, Reading
from tickstream_watcher.exchange import (
    MAX_FRAME_BYTES,
    BadFrame,
    ExchangeProtocol,
    FeedEvent,
    FeedLimits,
    Reconnect,
    Rejected,
)

# FeedLimits lives with the exchange descriptions (exchange.py); importable from here too.
__all__ = ["UNREACHABLE_AFTER", "ExchangeFeed", "FeedCounters", "FeedLimits", "FeedState"]

log = logging.getLogger(__name__)

FeedState = Literal["connecting", "live", "reconnecting", "stopped"]
# Connections in a row failing before their first frame after which the exchange is shown
# unreachable (with the backoff, about half a minute to a few minutes of trying).
UNREACHABLE_AFTER: Final = 3


@dataclass
class FeedCounters:
    frames: int = 0
    bad_frames: int = 0
    rejected: int = 0
    connects: int = 0
    reconnects: int = 0


FEED_FRAMES: Final = Family(
    "tickstream_feed_frames_total", "Frames received from the exchange.", "counter", ("exchange",)
)
FEED_BAD_FRAMES: Final = Family(
    "tickstream_feed_bad_frames_total",
    "Frames that could not be parsed, skipped.",
    "counter",
    ("exchange",),
)
FEED_REJECTED: Final = Family(
    "tickstream_feed_rejected_total",
    "Subscriptions the exchange refused.",
    "counter",
    ("exchange",),
)
FEED_RECONNECTS: Final = Family(
    "tickstream_feed_reconnects_total",
    "Connections lost, dropped or renewed, and made again.",
    "counter",
    ("exchange",),
)
FEED_LIVE: Final = Family(
    "tickstream_feed_connections_live",
    "Exchange connections subscribed and reading.",
    "gauge",
    ("exchange",),
)


def _feed_totals(counters: FeedCounters, exchange: str) -> list[Reading]:
    labels = (exchange,)
    return [
        (FEED_FRAMES, labels, counters.frames),
        (FEED_BAD_FRAMES, labels, counters.bad_frames),
        (FEED_REJECTED, labels, counters.rejected),
        (FEED_RECONNECTS, labels, counters.reconnects),
    ]


@dataclass
class ExchangeFeed:
    """Keeps one connection to `url` subscribed to `symbols` and hands over parsed events.

    `deliver(events, received_us)` is awaited for every frame with events, in order; a slow
    `deliver` slows reading (back-pressure into the socket, never an unbounded buffer).
    `on_connected()` is awaited after every successful subscribe (to backfill what was
    missed). Reconnects forever with exponential backoff and full jitter within `limits`;
    reconnects at once on the exchange's request and ahead of its connection-age limit; a
    connection silent for `limits.silence_s` is dropped (where the exchange wants it,
    `limits.keepalive_frame` is sent once it has been silent for `limits.keepalive_s`, or half
    the silence bound if that is sooner; the answer counts as a frame). A bad frame is counted,
    logged once and skipped: the connection and the other markets go on. `symbols` may be
    replaced while it runs: the next connection subscribes the new ones. `run` returns when
    `stop` is set or after `retire` (safe to cancel: the connection is closed on the way out).
    """

    protocol: ExchangeProtocol
    url: str
    symbols: Sequence[str]
    limits: FeedLimits
    deliver: Callable[[list[FeedEvent], int], Awaitable[None]]
    on_connected: Callable[[], Awaitable[None]] | None = None
    rng: random.Random = field(default_factory=random.Random)
    state: FeedState = "connecting"
    counters: FeedCounters = field(default_factory=FeedCounters)
    rejected: set[str] = field(default_factory=set)
    last_delay: float = 0.0  # the wait before the latest reconnect, seconds
    # Connections in a row that failed before delivering a frame: the exchange is unreachable
    # once this reaches UNREACHABLE_AFTER.
    failures: int = 0
    _socket: ClientConnection | None = field(default=None, init=False, repr=False)
    _renew: bool = field(default=False, init=False, repr=False)
    _retired: bool = field(default=False, init=False, repr=False)
    _closing: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        READINGS.track(
            self,
            totals=functools.partial(_feed_totals, self.counters, self.protocol.name),
            current=ExchangeFeed._live_readings,
        )

    def _live_readings(self) -> list[Reading]:
        return [(FEED_LIVE, (self.protocol.name,), 1.0 if self.state == "live" else 0.0)]

    @property
    def unreachable(self) -> bool:
        """True after UNREACHABLE_AFTER connections in a row failed before any frame."""
        return self.state != "live" and self.failures >= UNREACHABLE_AFTER

    def renew(self) -> None:
        """Close the connection now and make a new one (subscribing again), as after an
        exchange's reconnect request; nothing if no connection is open. Idempotent."""
        if self._socket is not None and not self._renew:
            self._renew = True
            # Held here until done; the socket closing ends the read loop; a failure to close
            # is logged by the callback rather than lost with the task.
            self._closing = asyncio.get_running_loop().create_task(self._socket.close())
            self._closing.add_done_callback(_log_close_failure)

    def retire(self) -> None:
        """End `run` for good (its markets left the listing): the connection is closed now, or
        no new one is made after the current wait. Idempotent."""
        self._retired = True
        self.renew()

    def _ended(self, stop: asyncio.Event) -> bool:
        return stop.is_set() or self._retired

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not self._ended(stop):
                frames_before = self.counters.frames
                try:
                    await self._session(stop)
                    reason = "reconnect requested"
                except (OSError, TimeoutError, WebSocketException) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if self._ended(stop):
                    break
                # A connection that delivered data resets the backoff; one that failed before
                # any data (refused, dropped at once) keeps doubling it.
                failed = self.counters.frames == frames_before
                self.failures = self.failures + 1 if failed else 0
                delay = self.last_delay = self._delay(self.failures)
                self.state = "reconnecting"
                self.counters.reconnects += 1
                log.warning("%s feed: %s; reconnecting in %.1fs", self.protocol.name, reason, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            self.state = "stopped"

    def _delay(self, failures: int) -> float:
        """min_reconnect_s, then full jitter over an exponentially growing, capped window."""
        limits = self.limits
        ceiling = min(limits.max_reconnect_s, limits.min_reconnect_s * 2.0 ** min(failures, 30))
        return limits.min_reconnect_s + self.rng.uniform(0.0, ceiling - limits.min_reconnect_s)

    async def _session(self, stop: asyncio.Event) -> None:
        """One connection until it fails, goes silent, ages out or is asked to reconnect.

        Raises OSError/TimeoutError/WebSocketException.
        """
        self.state = "connecting"
        url = self.protocol.ws_url(self.url, [s for s in self.symbols if s not in self.rejected])
        async with connect(url, max_size=MAX_FRAME_BYTES, open_timeout=10, close_timeout=5) as ws:
            self.counters.connects += 1
            for subscribe in self.protocol.subscribe_frames(
                [s for s in self.symbols if s not in self.rejected]
            ):
                await ws.send(subscribe)
            self.state = "live"
            if self._retired:
                return
            if self.on_connected is not None:
                await self.on_connected()
            # One watcher per connection, not per frame: `stop` closes the socket, which ends
            # the pending recv (frames arrive at trade rate; per-frame futures would cost more).
            closer = asyncio.create_task(_close_on(stop, ws))
            self._socket, self._renew = ws, False
            try:
                await self._read(ws, stop)
            finally:
                self._socket = None
                closer.cancel()

    async def _read(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        opened = time.monotonic()
        max_age = self.limits.max_connection_s
        silence, keepalive = self.limits.silence_s, self.limits.keepalive_s
        if keepalive is not None:
            # A silence bound set below the exchange's keepalive (WATCHER_FEED_SILENCE_MS) still
            # leaves the answer half of it to come.
            keepalive = min(keepalive, silence / 2)
        pinged = False  # the keepalive frame was sent since the last frame received
        while not stop.is_set():
            timeout = silence
            if keepalive is not None:
                # Wait for the ping's moment, then for the rest of the silence bound.
                timeout = silence - keepalive if pinged else keepalive
            if max_age is not None:
                timeout = min(timeout, max_age - (time.monotonic() - opened))
                if timeout <= 0:
                    log.info("%s feed: connection aged out, renewing", self.protocol.name)
                    return
            try:
                async with asyncio.timeout(timeout):
                    frame = await ws.recv()
            except TimeoutError:
                if max_age is not None and time.monotonic() - opened >= max_age:
                    continue  # the age check above renews it
                if keepalive is not None and not pinged:
                    await ws.send(self.limits.keepalive_frame)
                    pinged = True
                    continue
                raise TimeoutError(f"no frame for {silence:.0f}s") from None
            except ConnectionClosed:
                if stop.is_set() or self._renew:
                    return  # closed by `_close_on` or `renew`
                raise
            pinged = False
            if await self._handle(frame):
                return

    async def _handle(self, frame: str | bytes) -> bool:
        """Parse and deliver one frame; True if the exchange asked for a reconnect."""
        received_us = time.time_ns() // 1000
        self.counters.frames += 1
        try:
            events = self.protocol.parse(frame)
        except BadFrame as exc:
            self.counters.bad_frames += 1
            log.warning("%s feed: skipping bad frame: %s", self.protocol.name, exc)
            return False
        reconnect = False
        for event in events:
            if isinstance(event, Reconnect):
                log.info(
                    "%s feed: exchange asks to reconnect: %s", self.protocol.name, event.reason
                )
                reconnect = True
            elif isinstance(event, Rejected):
                self.counters.rejected += 1
                if event.symbol:
                    self.rejected.add(event.symbol)
                log.warning(
                    "%s feed: %s refused, skipped: %s",
                    self.protocol.name,
                    event.symbol or "a subscription",
                    event.reason,
                )
        if events:
            await self.deliver(events, received_us)
        return reconnect


def _log_close_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("closing a connection to renew it failed: %r", error)


async def _close_on(stop: asyncio.Event, ws: ClientConnection) -> None:
    await stop.wait()
    await ws.close()
