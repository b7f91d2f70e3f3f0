"""A client's outgoing frames: bounded in bytes, and in age where a newer state is pending."""

from __future__ import annotations

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
    """A stream's pending states of one key: the newest (`frame`, queued at `time`) and, when
    the client has not taken them yet and they are fresh, older ones (`older`, oldest first).
    Once the minute's closed bar supersedes them, it alone."""

    __slots__ = ("frame", "older", "time")

    def __init__(self, frame: Frame, now: float) -> None:
        self.frame = frame
        self.time = now
        self.older: list[tuple[Frame, float]] | None = None  # none on the hot path: no list


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

    Policy when full: state slots are cut to their newest state first; a frame that still does
    not fit is refused and the outbox is `overflowed` for good (refusing everything after):
    what must be delivered exceeds the bound, so the owner closes the connection. Not
    thread-safe; one reader (`get_nowait`, told by `wakeup`) at a time.
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
        # Must-deliver frames as they are (no allocation per frame), states in their slots.
        self._queue: deque[Frame | _Slot] = deque()
        # Per stream, its slot of states that newer states of the same key still join.
        self._open: dict[str | None, _Slot] = {}
        # Per stream, its sealed slots still queued: rare (another minute's update or a reply
        # came between), so finding a newer slot of their key costs nothing on the hot path.
        self._sealed: dict[str | None, list[_Slot]] = {}
        # Sealed slots with a newer slot of their stream and key queued behind them.
        # (Made when first needed: most outboxes never hold one.)
        self._superseded: set[_Slot] | None = None
        # Called after every frame queued and when the outbox overflows: the connection that
        # sends these frames (websocket.py) schedules its next write. No task waits on it.
        self.wakeup: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self._count

    def put(self, frame: Frame, now: float | None = None) -> bool:
        """Queue `frame`; False if it does not fit (overflow). O(1) but when cutting to fit.

        `now` is `time.monotonic()` if the caller has read it (the hub, once per batch).
        """
        if self.overflowed:
            return False
        accepted = self._put(frame, now)
        if self.wakeup is not None:
            self.wakeup()
        return accepted

    def _put(self, frame: Frame, now: float | None) -> bool:
        stream = frame.stream
        slot = self._open.get(stream)
        if slot is not None:
            if frame.key is not None and frame.key == slot.frame.key:
                if now is None:
                    now = self._clock()
                older = slot.older
                if (
                    frame.latest
                    and (older is None or len(older) < MAX_STATE_FRAMES - 1)
                    and now - (older[0][1] if older else slot.time) < self.max_age
                ):
                    # Fresh: the client may still take each of them.
                    if older is None:
                        slot.older = [(slot.frame, slot.time)]
                    else:
                        older.append((slot.frame, slot.time))
                    self.queued_bytes += frame.size + SLOT_BYTES
                    self._count += 1
                else:
                    # Every pending state is older than the bound (or there are many), or the
                    # minute's closed bar supersedes them: this frame takes their place.
                    self._drop_older(slot)
                    self.queued_bytes += frame.size - slot.frame.size
                    self.counters.conflated_frames += 1
                    if not frame.latest:
                        del self._open[stream]
                slot.frame = frame
                slot.time = now
                # Over the bound it stays held: the outbox is overflowed and its owner closes it.
                return self.queued_bytes <= self.max_bytes or self._make_room(0)
            del self._open[stream]
            self._sealed.setdefault(stream, []).append(slot)
        if self._sealed and frame.key is not None:
            for sealed in self._sealed.get(stream, ()):
                if sealed.frame.key == frame.key:
                    if self._superseded is None:
                        self._superseded = set()
                    self._superseded.add(sealed)
        size = frame.size + SLOT_BYTES
        if self.queued_bytes + size > self.max_bytes and not self._make_room(size):
            return False
        self.queued_bytes += size
        self._count += 1
        if frame.latest and stream is not None:
            slot = _Slot(frame, self._clock() if now is None else now)
            self._queue.append(slot)
            self._open[stream] = slot
        else:
            self._queue.append(frame)
        return True

    def _drop_older(self, slot: _Slot) -> None:
        """Keep only the newest state of `slot`."""
        older = slot.older
        if older:
            self.queued_bytes -= sum(f.size for f, _ in older) + SLOT_BYTES * len(older)
            self._count -= len(older)
            self.counters.conflated_frames += len(older)
        slot.older = None

    def _make_room(self, size: int) -> bool:
        """Whether `size` more bytes fit after cutting every state slot to its newest; if not,
        the outbox is overflowed. O(streams), only when over the bound."""
        for slot in self._open.values():
            self._drop_older(slot)
        for slots in self._sealed.values():
            for slot in slots:
                self._drop_older(slot)
        if self.queued_bytes + size <= self.max_bytes:
            return True
        self.overflowed = True
        return False

    def get_nowait(self, now: float | None = None) -> Frame:
        """The next frame to send; raises IndexError when there is none."""
        while True:
            entry = self._queue[0]
            if not isinstance(entry, _Slot):
                self._queue.popleft()
                self.queued_bytes -= entry.size + SLOT_BYTES
                self._count -= 1
                return entry
            older = entry.older
            if older or self._superseded:
                # Decided now, at send time: how far behind the client is says what is stale.
                if now is None:
                    now = self._clock()
                superseded = self._superseded
                if superseded and entry in superseded and now - entry.time >= self.max_age:
                    self._drop_older(entry)
                    self.queued_bytes -= entry.frame.size + SLOT_BYTES
                    self._count -= 1
                    self.counters.conflated_frames += 1
                    self._pop_slot(entry)
                    continue
                if older and now - older[0][1] >= self.max_age:
                    self._drop_older(entry)
                    older = None
            if older:
                frame = older.pop(0)[0]
                if not older:
                    entry.older = None
            else:
                frame = entry.frame
                self._pop_slot(entry)
            self.queued_bytes -= frame.size + SLOT_BYTES
            self._count -= 1
            return frame

    def _pop_slot(self, slot: _Slot) -> None:
        self._queue.popleft()
        stream = slot.frame.stream
        if self._open.get(stream) is slot:
            del self._open[stream]
        elif self._sealed:
            sealed = self._sealed.get(stream)
            if sealed is not None and slot in sealed:
                sealed.remove(slot)
                if not sealed:
                    del self._sealed[stream]
                if self._superseded:
                    self._superseded.discard(slot)
