"""A client's outgoing frames: bounded in bytes, newest-state frames replaced while pending."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tickstream_gateway.protocol import Frame

# Counted per queued frame on top of its size (its slot and the deque's reference), so that
# many tiny frames are bounded in memory as well as on the wire.
SLOT_BYTES: Final = 64


@dataclass
class FanoutCounters:
    """Totals over every client, kept by the outboxes and the hub, exported as metrics."""

    conflated_frames: int = 0  # pending frames replaced by a newer one of their stream
    slow_clients_closed: int = 0  # clients closed (1013) because their outbox was full


class _Slot:
    __slots__ = ("frame",)

    def __init__(self, frame: Frame) -> None:
        self.frame = frame


class Outbox:
    """The frames queued for one client, in order, at most `max_bytes` of them.

    Conflation: once the client is behind, a frame with a `key` replaces, in place, the
    newest pending frame of its stream if that frame is `latest` and has the same key (a
    forming bar by a newer update of its minute, or by its closing update; a rank snapshot by
    a newer one). Behind means the oldest pending frame has waited at least `conflate_after`
    seconds (since it was queued into an empty outbox or since the client took the frame
    before it), or the outbox is half full: a client that keeps up gets every update, also the
    several updates of one market that arrive in one consumer batch; one that does not gets
    the newest. Only the newest
    pending frame of a stream can be replaced, so a client still receives each stream's
    frames in the order they were made (every bar's seq above the ones before it), and
    frames without a key (closed bars, history, alerts, replies) are never dropped.

    Policy when full: a frame that does not fit is refused and the outbox is `overflowed`
    for good (refusing everything after it): what must be delivered exceeds the bound, so
    the owner closes the connection. Not thread-safe; one reader (`get`) at a time.
    """

    def __init__(
        self,
        max_bytes: int,
        counters: FanoutCounters | None = None,
        *,
        conflate_after: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.counters = counters if counters is not None else FanoutCounters()
        self.conflate_after = conflate_after
        self._clock = clock
        self._head_since = 0.0  # when the oldest pending frame became the oldest
        self.queued_bytes = 0
        self.overflowed = False
        self._slots: deque[_Slot] = deque()
        # Per stream, its newest pending slot while that holds a `latest` frame.
        self._latest: dict[str, _Slot] = {}
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def put(self, frame: Frame) -> bool:
        """Queue `frame` or let it replace a pending one; False if it does not fit (overflow)."""
        if self.overflowed:
            return False
        stream = frame.stream
        if stream is not None:
            # Anything queued in a stream seals the stream's pending frame against later ones.
            slot = self._latest.pop(stream, None)
            if (
                slot is not None
                and frame.key is not None
                and slot.frame.key == frame.key
                and (
                    self._clock() - self._head_since >= self.conflate_after
                    # A burst can fill the outbox before anything waited that long: conflate
                    # rather than close a client while replaceable frames are pending.
                    or 2 * (self.queued_bytes + frame.size) > self.max_bytes
                )
            ):
                queued = self.queued_bytes + frame.size - slot.frame.size
                if queued > self.max_bytes:
                    self.overflowed = True
                    return False
                self.queued_bytes = queued
                slot.frame = frame
                self.counters.conflated_frames += 1
                if frame.latest:
                    self._latest[stream] = slot
                return True
        queued = self.queued_bytes + frame.size + SLOT_BYTES
        if queued > self.max_bytes:
            self.overflowed = True
            return False
        self.queued_bytes = queued
        slot = _Slot(frame)
        if not self._slots and self.conflate_after:
            self._head_since = self._clock()
        self._slots.append(slot)
        if frame.latest and stream is not None:
            self._latest[stream] = slot
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def get_nowait(self) -> Frame:
        """The oldest pending frame; raises IndexError when there is none."""
        slot = self._slots.popleft()
        frame = slot.frame
        if frame.stream is not None and self._latest.get(frame.stream) is slot:
            del self._latest[frame.stream]
        self.queued_bytes -= frame.size + SLOT_BYTES
        if self._slots and self.conflate_after:
            self._head_since = self._clock()
        return frame

    async def get(self) -> Frame:
        """Wait for the oldest pending frame. Safe to cancel: nothing is taken then."""
        while not self._slots:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()
