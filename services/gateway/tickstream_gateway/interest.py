"""Which markets' tick topics the gateway's feed reads: those watched, and those left lately."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from tickstream_shared.naming import ALERTS_TOPIC, Market

# A market nobody watches any more is read on for this long: a page reload (unsubscribe, then
# the same subscribe a second later) keeps its partitions and its loaded history.
DEFAULT_GRACE_S: Final = 10.0

TopicPartitions = frozenset[tuple[str, int]]


class MarketInterest:
    """Subscribers per market, as the feed needs them: sans I/O, the feed task polls it.

    A market is *wanted* from the moment a client starts subscribing to it (before its
    history is read) until the last such client leaves plus `grace_s`. A market is *settled*
    once the feed reads its topic from a known point (see FeedAssignment) or found that it
    has no topic: a first subscriber waits for that before reading storage, so history and
    live updates meet. `changes` grows whenever the wanted set may have changed.
    """

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.grace_s = grace_s
        self.changes = 0
        self.assigned_partitions = 0  # tick partitions the feed holds (a gauge)
        self.assigned_topics: frozenset[str] = frozenset()  # and their topics
        self.feed_running = False  # set by the feed while its consumer runs
        # Every topic the feed's last metadata listing named (set by the feed).
        self.listed_topics: frozenset[str] = frozenset()
        # Wanted markets whose first subscriber read storage without waiting for the feed
        # (their topic was not listed): the feed reads them from the topic's beginning.
        self._unwaited: set[str] = set()
        self._holders: dict[str, int] = {}
        self._left: dict[str, float] = {}  # market -> time.monotonic() its last holder left
        self._settled: dict[str, asyncio.Event] = {}

    def acquire(self, market_id: str) -> None:
        """One more holder of the market (a client subscribing or subscribed)."""
        held = self._holders.get(market_id, 0)
        self._holders[market_id] = held + 1
        if held == 0 and self._left.pop(market_id, None) is None:
            self.changes += 1

    def release(self, market_id: str, now: float, *, linger: bool = True) -> None:
        """One holder fewer; the last one leaving starts the market's grace at `now`
        (without `linger`, none: a market found unknown is not worth reading on)."""
        held = self._holders.get(market_id, 0)
        if held > 1:
            self._holders[market_id] = held - 1
        elif held == 1:
            del self._holders[market_id]
            if linger:
                self._left[market_id] = now
            self.changes += 1  # the grace's end is a change too: see next_expiry

    def holders(self, market_id: str) -> int:
        return self._holders.get(market_id, 0)

    def wanted(self, now: float) -> set[str]:
        """Markets held or left less than grace_s ago; forgets those left longer ago."""
        for market_id, left in list(self._left.items()):
            if now - left >= self.grace_s:
                del self._left[market_id]
        return {*self._holders, *self._left}

    def next_expiry(self) -> float | None:
        """When the earliest grace ends (time.monotonic()), or None when none runs."""
        first = min(self._left.values(), default=None)
        return None if first is None else first + self.grace_s

    def settle(self, market_ids: Iterable[str]) -> None:
        """The feed reads these markets from a known point, or they have no topic."""
        for market_id in market_ids:
            self._event(market_id).set()

    def unsettle(self, market_ids: Iterable[str]) -> None:
        """The feed no longer reads these markets (dropped, or the feed restarts)."""
        for market_id in market_ids:
            event = self._settled.pop(market_id, None)
            if event is not None:
                event.set()  # whoever waits goes on; the next subscriber waits anew

    def unsettle_all(self) -> None:
        self.unsettle(list(self._settled))

    def is_settled(self, market_id: str) -> bool:
        event = self._settled.get(market_id)
        return event is not None and event.is_set()

    async def wait_settled(self, market_id: str, timeout_s: float) -> bool:
        """Wait until the feed settled the market, at most `timeout_s`; returns whether it did.

        Safe to cancel. Without a running feed (restarting) there is nothing to wait for:
        the subscriber is answered from storage, and gets live updates once the feed is back.
        Nor for a market whose topic the feed's last listing did not name (a made-up market,
        or one whose topic is new): the subscriber reads storage at once, and the feed reads
        the topic from its beginning if it appears (see read_from_start).
        """
        if not self.feed_running:
            return False
        if Market.parse(market_id).topic not in self.listed_topics and not self.is_settled(
            market_id
        ):
            self._unwaited.add(market_id)
            return False
        event = self._event(market_id)
        if not event.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await event.wait()
            except TimeoutError:
                return False
        return self.is_settled(market_id)

    def _event(self, market_id: str) -> asyncio.Event:
        event = self._settled.get(market_id)
        if event is None:
            event = self._settled[market_id] = asyncio.Event()
        return event

    def read_from_start(self, market_id: str) -> bool:
        """Whether the feed, adding the market now, must read its topic from the beginning:
        a subscriber went on without waiting for the feed. Forgotten once asked."""
        if market_id in self._unwaited:
            self._unwaited.discard(market_id)
            return True
        return False

    def mark_unwaited(self, market_ids: Iterable[str]) -> None:
        """These wanted markets' subscribers go on without the feed (no topic listed)."""
        self._unwaited.update(market_ids)

    def forget_unwanted(self, wanted: set[str]) -> None:
        """Drop what is kept for markets no longer wanted (bounded by holders)."""
        for market_id in [m for m, e in self._settled.items() if m not in wanted]:
            if not self._settled[market_id].is_set():
                del self._settled[market_id]
        self._unwaited &= wanted


@dataclass(frozen=True, slots=True)
class FeedPlan:
    """The partitions the feed should hold, and the wanted markets that have no topic."""

    partitions: TopicPartitions
    missing: frozenset[str]


def plan(wanted: Iterable[str], partitions_by_topic: Mapping[str, Iterable[int]]) -> FeedPlan:
    """Every partition of `alerts` and of each wanted market's tick topic, among those known.

    `partitions_by_topic` is what the broker's metadata listed. A wanted market whose topic is
    not listed is `missing` (its history may exist; its live topic not yet, or not any more).
    """
    held: set[tuple[str, int]] = {
        (ALERTS_TOPIC, p) for p in partitions_by_topic.get(ALERTS_TOPIC, ())
    }
    missing: set[str] = set()
    for market_id in wanted:
        topic = Market.parse(market_id).topic
        parts = partitions_by_topic.get(topic)
        if parts is None:
            missing.add(market_id)
        else:
            held.update((topic, p) for p in parts)
    return FeedPlan(frozenset(held), frozenset(missing))
