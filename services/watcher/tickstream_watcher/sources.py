"""Tick sources: async iterators that pace the pure models in wall-clock time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from tickstream_shared.naming import Market
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import WatcherSettings
from tickstream_watcher.candles import find_candle_files, merged_candles
from tickstream_watcher.synthetic import SyntheticMarket

# Pacing sleeps only when the source is this far ahead of schedule; sleeping per tick at
# tens of thousands of ticks a second would cost more than the ticks.
_PACING_SLACK_S = 0.005


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class TickSource(Protocol):
    markets: list[Market]

    def ticks(self) -> AsyncIterator[Tick]: ...


class SyntheticSource:
    """Random-walk ticks for each configured market, every `tick_interval_ms` of wall time."""

    def __init__(self, settings: WatcherSettings) -> None:
        self.markets = [Market.parse(m) for m in settings.markets]
        self._interval_s = settings.tick_interval_ms / 1000
        self._models = [
            SyntheticMarket.create(m.base, settings.seed, i) for i, m in enumerate(self.markets)
        ]

    async def ticks(self) -> AsyncIterator[Tick]:
        seq = 0
        next_at = time.monotonic()
        while True:
            for market, model in zip(self.markets, self._models, strict=True):
                price, volume = model.step()
                ts = now_ms()
                yield Tick(market.exchange, market.base, market.quote, seq, ts, ts, price, volume)
            seq += 1
            next_at += self._interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


class ReplaySource:
    """Real 1-minute candles from CSV files, merged by event time, at a chosen speed."""

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

    async def ticks(self) -> AsyncIterator[Tick]:
        start_wall = time.monotonic()
        first_ts: int | None = None
        for count, candle in enumerate(merged_candles(self._files, self._limit)):
            if first_ts is None:
                first_ts = candle.close_ts
            if self._speed > 0:
                due = start_wall + (candle.close_ts - first_ts) / 1000 / self._speed
                ahead = due - time.monotonic()
                if ahead > _PACING_SLACK_S:
                    await asyncio.sleep(ahead)
            elif count % 1000 == 0:
                await asyncio.sleep(0)  # unthrottled: still let the producer and signals run
            m = candle.market
            yield Tick(
                m.exchange,
                m.base,
                m.quote,
                candle.index,
                candle.close_ts,
                now_ms(),
                candle.close,
                candle.volume,
            )


def make_source(settings: WatcherSettings) -> TickSource:
    """The source named by WATCHER_SOURCE; ValueError for an unknown name."""
    if settings.source == "synthetic":
        return SyntheticSource(settings)
    if settings.source == "replay":
        return ReplaySource(settings)
    raise ValueError(f"WATCHER_SOURCE {settings.source!r} is not one of: synthetic, replay")
