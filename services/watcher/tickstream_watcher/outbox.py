"""TickOutbox: the live source's ticks waiting for the publisher, one per market and minute."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

from tickstream_shared.schemas import Tick


class TickOutbox:
    """Ticks waiting for the publisher, at most one per (market, minute), in the order made.

    The stream `put`s without ever waiting, so reading a connection never waits on the
    publisher: a newer tick of a minute replaces the one still waiting (latest wins, as stats
    and the gateway take a minute's largest seq) and goes behind every other waiting tick, so
    each market's ticks still leave in the order of their seq. What the stream alone can hold
    is therefore bounded by markets x minutes of a publisher stall (per market its forming
    minute and the minutes that closed meanwhile), never by the update rate.

    REST producers (backfill, repairs, reconciliation) make hours of minutes at once: they
    `await wait_for_room()` before making their ticks (so that none is made with a seq older
    than a stream tick already waiting), and it returns only while fewer than `rest_room`
    ticks wait. Cancelling a wait loses nothing. Not thread-safe (one event loop).
    """

    def __init__(self, rest_room: int) -> None:
        self._rest_room = rest_room
        self._waiting: dict[tuple[str, int], Tick] = {}
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._waiting)

    def put(self, ticks: Iterable[Tick]) -> None:
        """Queue `ticks` (made in seq order per market); never waits."""
        waiting = self._waiting
        for tick in ticks:
            key = (tick.market, tick.minute)
            # Removed first: a replacement goes to the end, behind the market's other ticks.
            waiting.pop(key, None)
            waiting[key] = tick
        if waiting:
            self._ready.set()
            if len(waiting) >= self._rest_room:
                self._room.clear()

    def take(self, most: int) -> list[Tick]:
        """The oldest `most` waiting ticks (or all), removed, in the order they were put."""
        waiting = self._waiting
        keys = list(itertools.islice(waiting, most))
        out = [waiting.pop(key) for key in keys]
        if not waiting:
            self._ready.clear()
        if len(waiting) < self._rest_room:
            self._room.set()
        return out

    async def wait_ready(self) -> None:
        """Return once a tick waits (at once if one does)."""
        await self._ready.wait()

    async def wait_for_room(self) -> None:
        """Return once fewer than `rest_room` ticks wait; safe to cancel."""
        while len(self._waiting) >= self._rest_room:
            self._room.clear()
            await self._room.wait()
