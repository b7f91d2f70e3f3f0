"""Tick sources: async iterators that pace the pure models (candle files, synthetic walks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from tickstream_shared.feed_status import FeedSource, FeedStatus, ReportedState
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MINUTE_MS, Tick
from tickstream_shared.settings import ExchangeSettings, WatcherSettings
from tickstream_watcher.candles import Candle, find_candle_files, merged_candles
from tickstream_watcher.checkpoints import ResumePlan
from tickstream_watcher.synthetic import SyntheticMarket

log = logging.getLogger(__name__)

# Most ticks handed over at once when a source is not waiting for its clock (unthrottled
# replay, backfill): large enough that per-batch costs vanish, small enough to stay far under
# WATCHER_MAX_IN_FLIGHT's default and to keep signals and the producer served.
CHUNK_TICKS: Final = 2000
# Pacing sleeps only when the source is this far ahead of schedule; sleeping per tick at
# tens of thousands of ticks a second would cost more than the ticks.
_PACING_SLACK_S = 0.005
_PROGRESS_EVERY_S = 5.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class TickSource(Protocol):
    """Yields lists of ticks that are due together; the publisher sends each list at once.

    `markets` is complete once `start` has returned (a live source adds the markets of new
    listings to it while it runs; their first ticks come after that). A source with
    `resumable` continues a previous publisher's markets from a `ResumePlan` (given to
    `resume` before `chunks`); the others start afresh. `feed_reports` says, per market id,
    how its feed is doing.
    """

    markets: list[Market]
    resumable: bool

    async def start(self) -> None: ...

    def resume(self, plan: ResumePlan) -> None: ...

    def chunks(self) -> AsyncGenerator[list[Tick]]: ...

    def feed_reports(self, now_ms: int) -> dict[str, FeedStatus]: ...


def _reports(
    markets: list[Market], source: FeedSource, state: ReportedState, now: int, last: int | None
) -> dict[str, FeedStatus]:
    return {m.id: FeedStatus(source, source, state, now, last) for m in markets}


class SyntheticSource:
    """Random-walk bars for each configured market, updated every `tick_interval_ms` of wall time.

    First WATCHER_SYNTHETIC_BACKFILL_MINUTES closed bars for the minutes before the start
    (oldest first, all markets per minute), with seqs just below the start time in
    microseconds; then live updates whose seqs are the wall clock in microseconds (or one
    more than the market's last seq), so seqs grow across restarts too.

    Every minute's bar is a function of the seed, the market and the minute (see
    SyntheticMarket), so minutes generated again are the same bars. Resumable too: a
    restarted watcher, or a standby taking over, backfills only the minutes after each
    market's newest closed bar published before (the group's checkpoints), with seqs above
    its seqs, instead of all WATCHER_SYNTHETIC_BACKFILL_MINUTES again.
    """

    resumable = True

    def __init__(self, settings: WatcherSettings) -> None:
        self.markets = [Market.parse(m) for m in settings.markets]
        self._last_ms: int | None = None
        self._interval_s = settings.tick_interval_ms / 1000
        self._backfill_minutes = settings.synthetic_backfill_minutes
        self._models = [
            SyntheticMarket(m.id, m.base, settings.seed, i) for i, m in enumerate(self.markets)
        ]
        # Per model: the first minute it may generate (after what was published before).
        self._first_minute: list[int | None] = [None] * len(self._models)

    async def start(self) -> None:
        """Nothing to resolve: the markets are the configured ones."""

    def resume(self, plan: ResumePlan) -> None:
        """Continue each market after its newest closed bar published before, if any."""
        for i, model in enumerate(self._models):
            point, again = plan.points.get(model.market), plan.republish.get(model.market)
            done = max(point.minute if point else -1, again.minute if again else -1)
            model.seq = max(model.seq, point.seq if point else 0, again.seq if again else 0)
            if done >= 0:
                self._first_minute[i] = done + MINUTE_MS

    def feed_reports(self, now_ms: int) -> dict[str, FeedStatus]:
        # `live` once the first bars (backfill or walk) have been handed over.
        state: ReportedState = "connecting" if self._last_ms is None else "live"
        return _reports(self.markets, "synthetic", state, now_ms, self._last_ms)

    async def chunks(self) -> AsyncGenerator[list[Tick]]:
        start_ns = time.time_ns()
        for chunk in self._backfill(start_ns // 1_000_000, start_ns // 1000):
            yield chunk
            self._last_ms = now_ms()
        next_at = time.monotonic()
        while True:
            wall_ns = time.time_ns()
            wall_ms, wall_us = wall_ns // 1_000_000, wall_ns // 1000
            self._last_ms = wall_ms
            yield [tick for model in self._models for tick in model.update(wall_ms, wall_us)]
            now = time.monotonic()
            next_at = max(next_at + self._interval_s, now)
            # Wake at the minute's end too, so bars close on time even with a long interval.
            to_minute_end = (MINUTE_MS - now_ms() % MINUTE_MS + 1) / 1000
            await asyncio.sleep(min(next_at - now, to_minute_end))

    def _backfill(self, start_ms: int, start_us: int) -> Iterator[list[Tick]]:
        count = self._backfill_minutes
        first_minute = start_ms - start_ms % MINUTE_MS - count * MINUTE_MS
        chunk: list[Tick] = []
        for i in range(count):
            minute = first_minute + i * MINUTE_MS
            received = now_ms()
            chunk.extend(
                m.backfill_bar(minute, start_us - count + i, received)
                for m, first in zip(self._models, self._first_minute, strict=True)
                if first is None or minute >= first
            )
            if len(chunk) >= CHUNK_TICKS:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class ReplayProgress:
    """Logs the event time reached and the rate, every few seconds of wall time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self._count = 0

    def emitted(self, count: int, event_ms: int) -> None:
        """Count `count` ticks emitted up to event time `event_ms`; log if it is time to."""
        self._count += count
        elapsed = self._clock() - self._since
        if elapsed >= _PROGRESS_EVERY_S:
            reached = datetime.fromtimestamp(event_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            log.info("replay at %s, %.0f ticks/s", reached, self._count / elapsed)
            self._since += elapsed
            self._count = 0


class ReplaySource:
    """Real 1-minute candles from CSV files as closed bars, merged by event time, at a set speed.

    A bar's seq is its data row number in its file, so a re-run emits identical keys (and a
    standby taking over replays from the start: the same ticks again, absorbed downstream).
    """

    resumable = False

    def __init__(self, settings: WatcherSettings) -> None:
        folder = Path(settings.replay_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"WATCHER_REPLAY_DIR {folder} is not a folder")
        self._files = find_candle_files(folder, settings.replay_markets)
        if not self._files:
            raise FileNotFoundError(f"no <exchange>_<base>-<quote>_1m.csv[.gz] files in {folder}")
        self.markets = list(self._files)
        self._speed = settings.replay_speed
        self._limit = settings.replay_limit_minutes
        # connecting until the first candles are sent, live while sending, then finished.
        self._state: ReportedState = "connecting"
        self._last_ms: int | None = None

    async def start(self) -> None:
        """Nothing to resolve: the markets are the files found."""

    def resume(self, plan: ResumePlan) -> None:
        """Not resumable: a replay starts from the first row."""

    def feed_reports(self, now_ms: int) -> dict[str, FeedStatus]:
        return _reports(self.markets, "replay", self._state, now_ms, self._last_ms)

    async def chunks(self) -> AsyncGenerator[list[Tick]]:
        progress = ReplayProgress()
        candles = merged_candles(self._files, self._limit)
        paced = self._paced(candles) if self._speed > 0 else _in_chunks(candles)
        async for chunk in paced:
            yield [_closed_bar(candle) for candle in chunk]
            self._last_ms = now_ms()
            self._state = "live"
            progress.emitted(len(chunk), chunk[-1].minute + MINUTE_MS)
        self._state = "finished"

    async def _paced(self, candles: Iterator[Candle]) -> AsyncIterator[list[Candle]]:
        start_wall = time.monotonic()
        first_minute: int | None = None
        chunk: list[Candle] = []
        for candle in candles:
            if first_minute is None:
                first_minute = candle.minute
            due = start_wall + (candle.minute - first_minute) / 1000 / self._speed
            ahead = due - time.monotonic()
            if ahead > _PACING_SLACK_S or len(chunk) >= CHUNK_TICKS:
                if chunk:
                    yield chunk
                    chunk = []
                await asyncio.sleep(ahead)
            chunk.append(candle)
        if chunk:
            yield chunk


async def _in_chunks(candles: Iterator[Candle]) -> AsyncIterator[list[Candle]]:
    chunk: list[Candle] = []
    for candle in candles:
        chunk.append(candle)
        if len(chunk) >= CHUNK_TICKS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _closed_bar(candle: Candle) -> Tick:
    """The candle as one closed bar update, received now; its event time is the bar's end."""
    return Tick(
        candle.market,
        candle.minute,
        candle.row_number,
        candle.minute + MINUTE_MS,
        time.time_ns() // 1_000_000,
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
        None,
        True,
        candle.quote_volume,
    )


def make_source(settings: WatcherSettings, exchanges: ExchangeSettings) -> TickSource:
    """The source named by WATCHER_SOURCE; ValueError for an unknown name."""
    if settings.source == "synthetic":
        return SyntheticSource(settings)
    if settings.source == "replay":
        return ReplaySource(settings)
    if settings.source == "live":
        from tickstream_watcher.live import LiveSource  # the exchange stack only when used

        return LiveSource(settings, exchanges)
    raise ValueError(f"WATCHER_SOURCE {settings.source!r} is not one of: synthetic, replay, live")
