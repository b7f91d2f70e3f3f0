"""One market's minute window: exact count, mean, std, min, max and log-return std per metric."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Final

from tickstream_shared.moments import ExactMoments
from tickstream_shared.schemas import MINUTE_MS

# Slots per min/max block: 1440 minutes are 36 blocks, so a rescan reads 40 slots and the
# global extreme is taken over 36 block extremes.
BLOCK_SLOTS: Final = 40
# An advance passing fewer slots than this evicts minute by minute; a longer one in bulk.
_BULK_SPAN_MS: Final = 8 * MINUTE_MS


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Statistics of one metric over the minutes in its window.

    `std` is the population standard deviation, `cv` is std / |mean| (0.0 when the mean is
    0), `logret` the population std of the log returns between consecutive present minutes
    (price only, None for volume; 0.0 with fewer than two minutes).
    """

    count: int
    mean: float
    std: float
    min: float
    max: float
    cv: float
    logret: float | None


class _BlockExtremes:
    """Min and max of one value column, kept per block of slots.

    A block whose extreme leaves (evicted, or replaced by a less extreme value) is marked and
    rescanned at the next `bounds()`; a monotonic deque cannot take replacements.
    """

    __slots__ = ("_dirty", "_highs", "_lows", "_minutes", "_values")

    def __init__(self, minutes: array[int], values: array[float]) -> None:
        self._minutes = minutes
        self._values = values
        blocks = -(-len(values) // BLOCK_SLOTS)
        self._lows = array("d", [math.inf]) * blocks
        self._highs = array("d", [-math.inf]) * blocks
        self._dirty: set[int] = set()

    def put(self, slot: int, value: float) -> None:
        block = slot // BLOCK_SLOTS
        if block in self._dirty:
            return
        if value < self._lows[block]:
            self._lows[block] = value
        if value > self._highs[block]:
            self._highs[block] = value

    def take(self, slot: int, value: float) -> None:
        block = slot // BLOCK_SLOTS
        if value <= self._lows[block] or value >= self._highs[block]:
            self._dirty.add(block)

    def replace(self, slot: int, old: float, new: float) -> None:
        block = slot // BLOCK_SLOTS
        if block in self._dirty:
            return
        low, high = self._lows[block], self._highs[block]
        if (old <= low and new > old) or (old >= high and new < old):
            self._dirty.add(block)
            return
        if new < low:
            self._lows[block] = new
        if new > high:
            self._highs[block] = new

    def rescan_all(self) -> None:
        """Forget every block's extremes: the next `bounds()` reads every slot."""
        self._dirty.update(range(len(self._lows)))

    def clear(self) -> None:
        blocks = len(self._lows)
        self._lows[:] = array("d", [math.inf]) * blocks
        self._highs[:] = array("d", [-math.inf]) * blocks
        self._dirty.clear()

    def bounds(self) -> tuple[float, float]:
        """(min, max) over the present slots; rescans only the marked blocks."""
        if self._dirty:
            minutes, values = self._minutes, self._values
            for block in self._dirty:
                low, high = math.inf, -math.inf
                for slot in range(block * BLOCK_SLOTS, min((block + 1) * BLOCK_SLOTS, len(values))):
                    if minutes[slot] != -1:
                        value = values[slot]
                        if value < low:
                            low = value
                        if value > high:
                            high = value
                self._lows[block] = low
                self._highs[block] = high
            self._dirty.clear()
        return min(self._lows), max(self._highs)


_WORD_BITS: Final = 64


class _Occupancy:
    """Which slots of a ring are present, as a tree of 64-bit words.

    Level 0 has one bit per slot; each level above has one bit per non-empty word of the level
    below, up to a level of one word (2 levels for 1440 slots). The next or previous present
    slot is found by climbing to the first level with a set bit beside the path and stepping
    down along lowest or highest bits: O(log_64 n) word operations, whatever the gap, so a late
    minute needs no scan of the slots between its neighbours. 8 bytes per 64 slots per level.
    """

    __slots__ = ("_levels",)

    def __init__(self, slots: int) -> None:
        levels = []
        bits = slots
        while True:
            words = -(-bits // _WORD_BITS)
            levels.append(array("Q", [0]) * words)
            if words == 1:
                break
            bits = words
        self._levels = levels

    def add(self, slot: int) -> None:
        for words in self._levels:
            index = slot >> 6
            held = words[index]
            words[index] = held | (1 << (slot & 63))
            if held:
                return  # the levels above already mark this word as non-empty
            slot = index

    def discard(self, slot: int) -> None:
        for words in self._levels:
            index = slot >> 6
            left = words[index] & ~(1 << (slot & 63))
            words[index] = left
            if left:
                return
            slot = index

    def clear(self) -> None:
        for words in self._levels:
            words[:] = array("Q", [0]) * len(words)

    def first_from(self, slot: int) -> int:
        """The lowest present slot >= `slot`, or -1."""
        levels = self._levels
        depth, position = 0, slot
        while True:
            if depth == len(levels):
                return -1
            words = levels[depth]
            index = position >> 6
            if index >= len(words):
                return -1
            word = words[index] & (-1 << (position & 63))
            if word:
                position = (index << 6) | ((word & -word).bit_length() - 1)
                break
            position, depth = index + 1, depth + 1
        while depth:
            depth -= 1
            word = levels[depth][position]
            position = (position << 6) | ((word & -word).bit_length() - 1)
        return position

    def last_until(self, slot: int) -> int:
        """The highest present slot <= `slot`, or -1."""
        levels = self._levels
        depth, position = 0, slot
        while True:
            if depth == len(levels) or position < 0:
                return -1
            index = position >> 6
            word = levels[depth][index] & ((2 << (position & 63)) - 1)
            if word:
                position = (index << 6) | (word.bit_length() - 1)
                break
            position, depth = index - 1, depth + 1
        while depth:
            depth -= 1
            word = levels[depth][position]
            position = (position << 6) | (word.bit_length() - 1)
        return position


def log_return(previous: float, close: float) -> float:
    """ln(close / previous) for positive closes; deterministic, so a return can be removed by
    recomputing it from the same two floats."""
    ratio = close / previous
    if 0.0 < ratio < math.inf:
        return math.log(ratio)
    return math.log(close) - math.log(previous)  # the ratio under- or overflowed


class MinuteWindow:
    """A market's bars (close and volume) for the minutes m with clock - span < m <= clock.

    A ring of `window_minutes` slots, indexed by (minute // 60000) % window_minutes, holds each
    present minute (-1 = empty slot) and its close and volume: 24 bytes per slot, about 35 KB
    for 1440 minutes whatever the update rate. `set` is O(1) for the newest minute (the forming
    one, replaced by each update) and for a new newest minute; a late minute inserted into or
    replaced inside the window finds its neighbours in O(log_64 n) through an occupancy tree
    of the slots (see _Occupancy), so a backfill arriving oldest first after the live minute is
    linear in its minutes, not quadratic. `advance`
    scans the slots it moves over and then works on the smaller side, in bulk: it removes the
    minutes that leave, or, when most leave, rebuilds from those that stay; a jump past the
    newest minute clears in one step.
    Statistics are exact (see ExactMoments); min/max come from block extremes. Not thread-safe.
    """

    __slots__ = (
        "_before_newest",
        "_close_extremes",
        "_close_moments",
        "_closes",
        "_minutes",
        "_newest",
        "_occupancy",
        "_oldest",
        "_return_moments",
        "_size",
        "_span_ms",
        "_volume_extremes",
        "_volume_moments",
        "_volumes",
        "clock",
        "refused",
    )

    def __init__(self, window_minutes: int = 1440) -> None:
        if window_minutes < 1:
            raise ValueError(f"window_minutes must be at least 1, got {window_minutes}")
        self._size = window_minutes
        self._span_ms = window_minutes * MINUTE_MS
        self._minutes = array("q", [-1]) * window_minutes
        self._closes = array("d", [0.0]) * window_minutes
        self._volumes = array("d", [0.0]) * window_minutes
        self._occupancy = _Occupancy(window_minutes)
        self._close_moments = ExactMoments()
        self._volume_moments = ExactMoments()
        self._return_moments = ExactMoments()
        self._close_extremes = _BlockExtremes(self._minutes, self._closes)
        self._volume_extremes = _BlockExtremes(self._minutes, self._volumes)
        self._oldest = self._newest = self._before_newest = -1
        self.clock = -1  # the minute the window ends at; -1 until the first set or advance
        self.refused = 0  # minutes refused by `set` as older than the window

    def __len__(self) -> int:
        return self._close_moments.count

    @property
    def newest(self) -> int | None:
        """The newest minute present, or None when the window is empty."""
        return None if self._newest == -1 else self._newest

    def bar(self, minute: int) -> tuple[float, float] | None:
        """(close, volume) of `minute` if present."""
        slot = (minute // MINUTE_MS) % self._size
        if minute < 0 or self._minutes[slot] != minute:
            return None
        return self._closes[slot], self._volumes[slot]

    def set(self, minute: int, close: float, volume: float) -> bool:
        """Store the bar of `minute`, replacing what that minute held; O(1) for the newest.

        A minute after the clock advances the window to it first. Returns False, changing
        nothing but `refused`, for a minute older than the window. Raises ValueError for a
        minute that is not a multiple of 60000, a close that is not positive and finite, or a
        volume that is not finite.
        """
        if minute % MINUTE_MS or minute < 0:
            raise ValueError(f"minute {minute} is not a non-negative multiple of {MINUTE_MS}")
        if not (0.0 < close < math.inf and -math.inf < volume < math.inf):
            raise ValueError(f"bad bar values close={close!r} volume={volume!r}")
        if minute > self.clock:
            self.advance(minute)
        elif minute <= self.clock - self._span_ms:
            self.refused += 1
            return False
        slot = (minute // MINUTE_MS) % self._size
        if self._minutes[slot] == minute:
            self._replace(slot, minute, close, volume)
        else:
            # Any other minute in this slot lies a whole window away, so it was evicted.
            self._insert(slot, minute, close, volume)
        return True

    def advance(self, clock: int) -> int:
        """Move the window's end to `clock` (never back); returns how many minutes left."""
        if clock <= self.clock:
            return 0
        self.clock = clock
        cutoff = clock - self._span_ms  # minutes at or before it leave
        if self._newest == -1 or self._oldest > cutoff:
            return 0
        if self._newest <= cutoff:
            evicted = len(self)
            self._clear()
            return evicted
        if cutoff - self._oldest < _BULK_SPAN_MS:
            return self._evict_each(cutoff)  # the usual minute or two: no lists to build
        leaving = self._present(self._oldest, cutoff)
        if 2 * len(leaving) > len(self):
            # Most of the window leaves: rebuilding from the minutes that stay is cheaper.
            self._rebuild(self._present(cutoff + MINUTE_MS, self._newest))
        else:
            self._evict(leaving)
        return len(leaving)

    def stats(self) -> tuple[WindowStats, WindowStats] | None:
        """(price, volume) statistics of the minutes in the window, or None when empty."""
        if self._newest == -1:
            return None
        returns = self._return_moments
        logret = returns.std() if returns.count else 0.0
        price = _stats(self._close_moments, self._close_extremes, logret)
        volume = _stats(self._volume_moments, self._volume_extremes, None)
        return price, volume

    def _replace(self, slot: int, minute: int, close: float, volume: float) -> None:
        old_close = self._closes[slot]
        if old_close != close:
            previous = self._prev_present(minute)
            following = self._next_present(minute)
            closes, size, returns = self._closes, self._size, self._return_moments
            if previous != -1:
                before = closes[(previous // MINUTE_MS) % size]
                returns.remove(log_return(before, old_close))
                returns.add(log_return(before, close))
            if following != -1:
                after = closes[(following // MINUTE_MS) % size]
                returns.remove(log_return(old_close, after))
                returns.add(log_return(close, after))
            self._close_moments.remove(old_close)
            self._close_moments.add(close)
            closes[slot] = close
            self._close_extremes.replace(slot, old_close, close)
        old_volume = self._volumes[slot]
        if old_volume != volume:
            self._volume_moments.remove(old_volume)
            self._volume_moments.add(volume)
            self._volumes[slot] = volume
            self._volume_extremes.replace(slot, old_volume, volume)

    def _insert(self, slot: int, minute: int, close: float, volume: float) -> None:
        if self._newest == -1:
            previous = following = -1
            self._oldest = self._newest = minute
        elif minute > self._newest:
            previous, following = self._newest, -1
            self._before_newest, self._newest = self._newest, minute
        else:
            previous = self._prev_present(minute)
            following = self._next_present(minute)
            self._oldest = min(self._oldest, minute)
            self._before_newest = max(self._before_newest, minute)
        closes, size, returns = self._closes, self._size, self._return_moments
        if previous != -1:
            before = closes[(previous // MINUTE_MS) % size]
            if following != -1:
                # The late minute splits the return that bridged its gap.
                returns.remove(log_return(before, closes[(following // MINUTE_MS) % size]))
            returns.add(log_return(before, close))
        if following != -1:
            returns.add(log_return(close, closes[(following // MINUTE_MS) % size]))
        self._minutes[slot] = minute
        self._occupancy.add(slot)
        closes[slot] = close
        self._volumes[slot] = volume
        self._close_moments.add(close)
        self._volume_moments.add(volume)
        self._close_extremes.put(slot, close)
        self._volume_extremes.put(slot, volume)

    def _evict_each(self, cutoff: int) -> int:
        """Remove the minutes at or before `cutoff` one by one (a later minute stays)."""
        evicted = 0
        minute = self._oldest
        size, closes = self._size, self._closes
        while minute <= cutoff:
            following = self._next_present(minute)
            slot = (minute // MINUTE_MS) % size
            close, volume = closes[slot], self._volumes[slot]
            self._return_moments.remove(log_return(close, closes[(following // MINUTE_MS) % size]))
            self._minutes[slot] = -1
            self._occupancy.discard(slot)
            self._close_moments.remove(close)
            self._volume_moments.remove(volume)
            self._close_extremes.take(slot, close)
            self._volume_extremes.take(slot, volume)
            evicted += 1
            minute = following
        self._oldest = minute
        if minute == self._newest:
            self._before_newest = -1
        return evicted

    def _evict(self, leaving: list[int]) -> None:
        """Remove the oldest minutes `leaving` (ascending; a later minute stays), in bulk."""
        size, minutes = self._size, self._minutes
        slots = [(minute // MINUTE_MS) % size for minute in leaving]
        closes = [self._closes[slot] for slot in slots]
        volumes = [self._volumes[slot] for slot in slots]
        following = self._next_present(leaving[-1])
        # Each leaving minute takes the return to its successor with it.
        successors = [*closes[1:], self._closes[(following // MINUTE_MS) % size]]
        self._return_moments.remove_many(map(log_return, closes, successors))
        self._close_moments.remove_many(closes)
        self._volume_moments.remove_many(volumes)
        take_close, take_volume = self._close_extremes.take, self._volume_extremes.take
        discard = self._occupancy.discard
        for slot, close, volume in zip(slots, closes, volumes, strict=True):
            minutes[slot] = -1
            discard(slot)
            take_close(slot, close)
            take_volume(slot, volume)
        self._oldest = following
        if following == self._newest:
            self._before_newest = -1

    def _rebuild(self, staying: list[int]) -> None:
        """Keep only the minutes `staying` (ascending, not empty): sums and extremes anew."""
        size = self._size
        slots = [(minute // MINUTE_MS) % size for minute in staying]
        closes = [self._closes[slot] for slot in slots]
        volumes = [self._volumes[slot] for slot in slots]
        self._clear()
        minutes, occupy = self._minutes, self._occupancy.add
        for slot, minute in zip(slots, staying, strict=True):
            minutes[slot] = minute
            occupy(slot)
        self._close_moments.add_many(closes)
        self._volume_moments.add_many(volumes)
        self._return_moments.add_many(map(log_return, closes[:-1], closes[1:]))
        self._close_extremes.rescan_all()
        self._volume_extremes.rescan_all()
        self._oldest, self._newest = staying[0], staying[-1]
        self._before_newest = staying[-2] if len(staying) > 1 else -1

    def _present(self, first: int, last: int) -> list[int]:
        """The present minutes from `first` to `last` (inclusive), ascending."""
        minutes, size = self._minutes, self._size
        return [
            minute
            for minute in range(first, last + MINUTE_MS, MINUTE_MS)
            if minutes[(minute // MINUTE_MS) % size] == minute
        ]

    def _clear(self) -> None:
        self._minutes[:] = array("q", [-1]) * self._size
        self._occupancy.clear()
        for moments in (self._close_moments, self._volume_moments, self._return_moments):
            moments.clear()
        self._close_extremes.clear()
        self._volume_extremes.clear()
        self._oldest = self._newest = self._before_newest = -1

    def _prev_present(self, minute: int) -> int:
        """The present minute before `minute`, or -1; O(log_64 n) whatever the gap."""
        if minute == self._newest:
            return self._before_newest
        if minute <= self._oldest:
            return -1
        size, occupancy = self._size, self._occupancy
        slot = (minute // MINUTE_MS) % size
        found = occupancy.last_until(slot - 1)
        if found == -1:
            found = occupancy.last_until(size - 1)  # the ring wraps
        # Every present minute lies within one window of `minute`, so the nearest occupied slot
        # back round the ring is its predecessor, unless that slot holds a later minute (the
        # search went round past the newest: there is none before).
        candidate = minute - ((slot - found) % size) * MINUTE_MS
        if found == -1 or candidate == minute or self._minutes[found] != candidate:
            return -1
        return candidate

    def _next_present(self, minute: int) -> int:
        """The present minute after `minute`, or -1; O(log_64 n) whatever the gap."""
        if minute >= self._newest:
            return -1  # the forming minute, replaced by every update: no search
        size, occupancy = self._size, self._occupancy
        slot = (minute // MINUTE_MS) % size
        found = occupancy.first_from(slot + 1)
        if found == -1:
            found = occupancy.first_from(0)  # the ring wraps
        candidate = minute + ((found - slot) % size) * MINUTE_MS
        if found == -1 or candidate == minute or self._minutes[found] != candidate:
            return -1
        return candidate


def _stats(moments: ExactMoments, extremes: _BlockExtremes, logret: float | None) -> WindowStats:
    mean = moments.mean()
    std = moments.std()
    low, high = extremes.bounds()
    cv = std / abs(mean) if mean != 0.0 else 0.0
    return WindowStats(moments.count, mean, std, low, high, cv, logret)
