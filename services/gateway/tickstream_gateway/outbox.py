"""A client's outgoing frames: bounded in bytes, and in age where a newer state is pending."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tickstream_gateway.protocol import Frame

# Counted per held frame on top of its size (its place in a slot or the queue), so that many
# tiny frames are bounded in memory as well as on the wire.
SLOT_BYTES: Final = 64
# At most this many pending updates of one stream's state are kept before the newest replaces
# them all: without it, a burst of one market (updates read together, all younger than the
# age bound) would be held per update rather than per stream.
MAX_STATE_FRAMES: Final = 16


@dataclass
class FanoutCounters:
    """Totals over every client, kept by the outboxes and the hub, exported as metrics."""

    conflated_frames: int = 0  # pending frames dropped because a newer one of their stream was
    slow_clients_closed: int = 0  # clients closed (1013) because their outbox was full


class _Slot:
    """One place in the queue: a must-deliver frame, or a stream's pending states (all of one
    key, oldest first, each with the time it was queued)."""

    __slots__ = ("frames", "key", "stream", "times")

    def __init__(self, frame: Frame, now: float) -> None:
        self.frames = [frame]
        self.times = [now]
        self.stream = frame.stream
        self.key = frame.key


class Outbox:
    """The frames queued for one client, at most `max_bytes` of them.

    Two kinds of frame: must-deliver frames (closed bars, history, gaps, alerts, replies: no
    `latest`), each sent once, in the order queued; and states (`latest`: a forming bar, keyed
    by its minute; a rank snapshot, keyed by its measure), of which a client needs only the
    newest. A stream's states of one key share one slot in the queue, placed where the first
    of them was queued, so a client holds O(streams) states however many updates arrive.

    The freshness rule, applied when the writer takes the next frame (at send time, not when
    frames are queued, so how far behind each client is decides): a state that has waited
    `max_age` seconds or more is not sent while a newer one of its stream and key is pending;
    the newest is. Once the oldest state of a slot is that old, the slot is cut to its newest:
    a client that far behind wants the newest, not the updates between. A client that keeps
    up gets every update, also several updates of one market read together; one that falls
    behind gets each stream's newest state. A must-deliver frame with the key of its stream's
    pending slot (a minute's closed bar) supersedes the slot's states and takes their place.
    Anything else queued in a stream seals its slot: later states start a new slot behind
    it, so each stream's frames go out in the order they were made (every bar's seq above
    the ones before); a stale sealed slot with a newer slot of its key behind it is skipped.
    Dropped states are counted in `conflated_frames`.

    Policy when full: open slots are cut to their newest state first; a frame that still does
    not fit is refused and the outbox is `overflowed` for good (refusing everything after):
    what must be delivered exceeds the bound, so the owner closes the connection. Not
    thread-safe; one reader (`get`) at a time.
    """

    def __init__(
        self,
        max_bytes: int,
        counters: FanoutCounters | None = None,
        *,
        max_age: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.counters = counters if counters is not None else FanoutCounters()
        self.max_age = max_age
        self._clock = clock
        self.queued_bytes = 0
        self.overflowed = False
        self._count = 0  # frames held
        self._queue: deque[_Slot] = deque()
        # Per stream, its slot of states that newer states of the same key still join (never
        # a None key: frames without a stream have no states).
        self._open: dict[str | None, _Slot] = {}
        # How many queued slots hold each (stream, key): a stale state whose minute has a
        # newer slot behind it (after a late update of another minute sealed it) is skipped.
        self._keyed: dict[tuple[str | None, int | str | None], int] = {}
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return self._count

    def put(self, frame: Frame, now: float | None = None) -> bool:
        """Queue `frame`; False if it does not fit (overflow). O(1) but when cutting to fit.

        `now` is `time.monotonic()` if the caller has read it (the hub, once per batch).
        """
        if self.overflowed:
            return False
        stream = frame.stream
        slot = self._open.get(stream)
        if slot is not None and frame.key is not None and slot.key == frame.key:
            if now is None:
                now = self._clock()
            if not (
                frame.latest
                and len(slot.frames) < MAX_STATE_FRAMES
                and now - slot.times[0] < self.max_age
            ):
                # Every pending state is older than the bound (or there are many), or the
                # minute's closed bar supersedes them: this frame takes their place.
                self._keep_newest(slot, 0)
                if not frame.latest:
                    del self._open[stream]
            slot.frames.append(frame)
            slot.times.append(now)
            self._hold(frame)
            # Over the bound it stays held: the outbox is overflowed and its owner closes it.
            return self._fits()
        if slot is not None:
            del self._open[stream]
        self._hold(frame)
        if not self._fits():
            self.queued_bytes -= frame.size + SLOT_BYTES
            self._count -= 1
            return False
        slot = _Slot(frame, (self._clock() if now is None else now) if frame.latest else 0.0)
        self._queue.append(slot)
        if frame.key is not None:
            keyed = (stream, frame.key)
            self._keyed[keyed] = self._keyed.get(keyed, 0) + 1
        if frame.latest and stream is not None:
            self._open[stream] = slot
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def _hold(self, frame: Frame) -> None:
        self.queued_bytes += frame.size + SLOT_BYTES
        self._count += 1

    def _fits(self) -> bool:
        """Whether what is held fits, after cutting every open slot to its newest state."""
        if self.queued_bytes <= self.max_bytes:
            return True
        for slot in self._open.values():  # O(streams), only when over the bound
            self._keep_newest(slot, 1)
        if self.queued_bytes <= self.max_bytes:
            return True
        self.overflowed = True
        return False

    def _keep_newest(self, slot: _Slot, keep: int) -> None:
        """Drop all but the newest `keep` frames of `slot` (all of them with 0)."""
        cut = len(slot.frames) - keep
        if cut <= 0:
            return
        for frame in slot.frames[:cut]:
            self.queued_bytes -= frame.size + SLOT_BYTES
        del slot.frames[:cut]
        del slot.times[:cut]
        self._count -= cut
        self.counters.conflated_frames += cut

    def get_nowait(self, now: float | None = None) -> Frame:
        """The next frame to send; raises IndexError when there is none."""
        # Decided now, at send time: how far behind the client is says what is stale.
        while True:
            slot = self._queue[0]
            frames = slot.frames
            if not frames[0].latest:
                break
            if now is None:
                now = self._clock()
            if (
                now - slot.times[-1] >= self.max_age
                and self._keyed.get((slot.stream, slot.key), 0) > 1
            ):
                self._keep_newest(slot, 0)  # a newer slot of the same minute is queued
                self._pop_slot()
                continue
            if len(frames) > 1 and now - slot.times[0] >= self.max_age:
                self._keep_newest(slot, 1)
            break
        if len(frames) == 1:
            self._pop_slot()
        frame = frames.pop(0)
        del slot.times[0]
        self.queued_bytes -= frame.size + SLOT_BYTES
        self._count -= 1
        return frame

    def _pop_slot(self) -> None:
        slot = self._queue.popleft()
        if self._open.get(slot.stream) is slot:
            del self._open[slot.stream]
        if slot.key is not None:
            keyed = (slot.stream, slot.key)
            left = self._keyed[keyed] - 1
            if left:
                self._keyed[keyed] = left
            else:
                del self._keyed[keyed]

    async def get(self) -> Frame:
        """Wait for the next frame to send. Safe to cancel: nothing is taken then."""
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()
