"""History for market subscribers: read from storage once per market, then served from memory."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from tickstream_gateway.bars import RecentBars
from tickstream_gateway.protocol import Frame, gap_frame, history_frame_of_points, point_json
from tickstream_shared.schemas import Tick

# market id -> the stored bars of its history window (db.recent_bars with the window's minutes).
Fetch = Callable[[str], Awaitable[list[Tick]]]

# Replies kept for the newest (market, since) asked: a burst of subscribers of one market gets
# one encoded history frame, shared, while the market does not change. At most this many
# frames of at most 451,214 bytes each.
CACHED_REPLIES: Final = 16
# Markets whose settled minutes (all but the newest) are kept encoded, joined: a history frame
# is then that prefix plus the newest minute's point, not 1,441 points encoded again each time
# the forming bar changes. At most this many prefixes of at most about 451,000 bytes each.
CACHED_PREFIXES: Final = 64
# The first pause before storage is read again while it is behind the feed (doubling).
_FIRST_PAUSE_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class _Prefix:
    settled: int  # RecentBars.settled_version when made
    points: bytes  # the window's points before the newest minute, joined with ","
    last_seq: int  # the largest seq among them; -1 when there are none


@dataclass(slots=True)
class ReadCount:
    """Storage reads started: kept apart from MarketHistory so that the exported counter
    outlives it (a counter must not drop when an object is collected)."""

    reads: int = 0


@dataclass(frozen=True, slots=True)
class HistoryReply:
    """What a subscriber is sent before live updates, and the seq live updates continue after."""

    frames: tuple[Frame, ...]  # a `gap` frame if `since` is before the window, then `history`
    after_seq: int  # the largest seq in the history (-1 when it is empty)


class MarketHistory:
    """Markets' history for subscribers: `load` then `reply`.

    A market's first subscriber reads its stored history (`fetch`) into RecentBars, which from
    then on keeps it up to date from the feed; later subscribers are answered from memory. The
    read is shared: however many subscribers wait for one market, storage is read once.
    """

    def __init__(self, recent: RecentBars, fetch: Fetch, *, catch_up_s: float = 0.0) -> None:
        self.recent = recent
        self._fetch = fetch
        self.catch_up_s = catch_up_s
        self._reads: dict[str, asyncio.Task[None]] = {}
        self._replies: OrderedDict[tuple[str, int | None], tuple[int, HistoryReply]] = OrderedDict()
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self.counted = ReadCount()

    @property
    def reads(self) -> int:
        """Storage reads started."""
        return self.counted.reads

    async def load(self, market_id: str) -> None:
        """Return once the market's history is in memory, reading storage unless it is loaded.

        Callers waiting for the same market share one read, and each gets its error (asyncpg,
        OSError). Safe to cancel: the read goes on for the others.
        """
        if self.recent.is_loaded(market_id):
            return
        read = self._reads.get(market_id)
        if read is None:
            read = asyncio.create_task(self._read(market_id), name=f"history of {market_id}")
            self._reads[market_id] = read
            read.add_done_callback(functools.partial(self._read_done, market_id))
        await asyncio.shield(read)

    def reply(self, market_id: str, since: int | None) -> HistoryReply | None:
        """The frames for a subscriber from memory now; None for a market with no bars.

        The caller must go live in the same step (no await in between): an update arriving
        after this call has a seq above `after_seq` or is already in the history.
        """
        recent = self.recent
        key = (market_id, since)
        version = recent.version(market_id)
        cached = self._replies.get(key)
        if cached is not None and cached[0] == version:
            self._replies.move_to_end(key)
            return cached[1]
        window_start = recent.window_start(market_id)
        newest = recent.newest_bar(market_id)
        if window_start is None or newest is None:
            return None
        if since is None or since <= window_start:
            prefix = self._prefix(market_id, window_start, newest.minute)
            points = [prefix.points, point_json(newest)] if prefix.points else [point_json(newest)]
            last_seq = max(prefix.last_seq, newest.seq)
        else:  # a reconnecting client: usually a few minutes
            bars = recent.bars_from(market_id, since)
            points = [point_json(bar) for bar in bars]
            last_seq = max((bar.seq for bar in bars), default=-1)
        frames: tuple[Frame, ...] = (history_frame_of_points(market_id, points, since),)
        if since is not None and since < window_start:
            # Minutes before the window are neither in memory nor sent: say so, not nothing.
            frames = (gap_frame(market_id, since, window_start), *frames)
        reply = HistoryReply(frames, last_seq)
        self._replies[key] = (version, reply)
        self._replies.move_to_end(key)
        while len(self._replies) > CACHED_REPLIES:
            self._replies.popitem(last=False)
        return reply

    def _prefix(self, market_id: str, window_start: int, newest_minute: int) -> _Prefix:
        settled = self.recent.settled_version(market_id)
        prefix = self._prefixes.get(market_id)
        if prefix is None or prefix.settled != settled:
            bars = self.recent.bars_from(market_id, window_start, before=newest_minute)
            prefix = _Prefix(
                settled,
                b",".join(point_json(bar) for bar in bars),
                max((bar.seq for bar in bars), default=-1),
            )
            self._prefixes[market_id] = prefix
        self._prefixes.move_to_end(market_id)
        while len(self._prefixes) > CACHED_PREFIXES:
            self._prefixes.popitem(last=False)
        return prefix

    async def aclose(self) -> None:
        """Cancel the reads in progress and wait for them. Idempotent."""
        reads = list(self._reads.values())
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)

    async def _read(self, market_id: str) -> None:
        # Storage behind the feed's first update of the market (stats a batch behind) may lack
        # updates the feed never delivered: read again, for up to catch_up_s, until it has
        # caught up. Past that the reply is what is known, and the next subscriber reads again.
        give_up = time.monotonic() + self.catch_up_s
        pause = _FIRST_PAUSE_S
        while True:
            self.counted.reads += 1
            stored = await self._fetch(market_id)
            self.recent.load(market_id, stored, time.monotonic())
            recent = self.recent
            if recent.is_loaded(market_id) or not recent.is_followed(market_id):
                return
            if time.monotonic() + pause > give_up:
                return
            await asyncio.sleep(pause)
            pause *= 2

    def _read_done(self, market_id: str, read: asyncio.Task[None]) -> None:
        if self._reads.get(market_id) is read:
            del self._reads[market_id]
        if not read.cancelled():
            read.exception()  # every waiter got it; do not report it again as never retrieved
