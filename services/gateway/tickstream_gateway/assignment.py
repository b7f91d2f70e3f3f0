"""The feed consumer's partitions: `alerts` and the tick topics of the markets clients watch."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from tickstream_gateway.bars import RecentBars
from tickstream_gateway.interest import MarketInterest, plan
from tickstream_shared.naming import ALERTS_TOPIC, Market

log = logging.getLogger("tickstream.gateway.feed")

# Assignment changes are coalesced: at most one per this interval (a burst of subscribers,
# a page of markets opened at once, costs one change).
MIN_CHANGE_INTERVAL_S: Final = 0.2
# The broker's topics are listed again this often; and every KAFKA_METADATA_MAX_AGE_MS while
# a wanted market's topic (one the watcher is about to create) or `alerts` is not among them,
# as often as the pattern subscription this replaces looked for new topics.
METADATA_REFRESH_S: Final = 30.0


class FeedAssignment:
    """Keeps the consumer assigned (no group) to what MarketInterest wants; owned by the feed.

    aiokafka's `assign()` replaces the whole assignment and forgets every position, so the
    partitions kept across a change have their positions (the next record the feed would
    have been given) read before and sought after: nothing skipped, nothing given twice.

    A partition added for a market starts at its newest record (end - 1), not after it: the
    feed then gives that record first, so RecentBars knows the seq from which the feed
    delivers everything (its `first_live_seq`), and a history read from storage afterwards
    is complete once it reaches that seq (MarketHistory). The market is settled once the
    feed has passed that record. A market whose topic the last listing did not name when it
    was first wanted (its subscriber did not wait: MarketInterest.wait_settled) is read from
    the topic's beginning when the topic appears: all of it is new.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        interest: MarketInterest,
        recent: RecentBars,
        *,
        missing_refresh_s: float,
    ) -> None:
        self._consumer = consumer
        self._missing_refresh_s = missing_refresh_s
        self._interest = interest
        self._recent = recent
        self._partitions: dict[str, list[int]] = {}
        self._listed_at = -math.inf
        self._changed_at = -math.inf
        self._seen_changes = -1
        self._missing: frozenset[str] = frozenset()
        self._boundary: dict[TopicPartition, int] = {}  # added, not yet passed: end offset

    async def update(self, now: float) -> None:
        """Apply what changed in the interest (coalesced), then settle the markets caught up.

        Raises aiokafka errors (the feed is then restarted by its supervisor).
        """
        if self._due(now):
            await self._apply(now)
        if self._boundary:
            await self._settle_passed()

    def _due(self, now: float) -> bool:
        if now - self._changed_at < MIN_CHANGE_INTERVAL_S:
            return False
        expiry = self._interest.next_expiry()
        return (
            self._interest.changes != self._seen_changes
            or (expiry is not None and now >= expiry)
            or (self._lacking() and now - self._listed_at >= self._missing_refresh_s)
            or now - self._listed_at >= METADATA_REFRESH_S
        )

    async def _apply(self, now: float) -> None:
        listed = False
        if now - self._listed_at >= METADATA_REFRESH_S or (
            self._lacking_now(now) and now - self._listed_at >= self._missing_refresh_s
        ):
            await self._list_topics(now)
            listed = True
        # From here to the first await of _reassign nothing yields: a client subscribing
        # meanwhile is either in `wanted` or finds its market unsettled and waits.
        self._seen_changes = self._interest.changes
        wanted = self._interest.wanted(now)
        wanted_plan = plan(wanted, self._partitions)
        self._missing = wanted_plan.missing
        if listed:
            # Checked against a listing made now: those without a topic (one deleted since
            # their subscriber began to wait) wait no longer.
            self._interest.mark_unwaited(wanted_plan.missing)
            self._interest.settle(wanted_plan.missing)
        self._interest.forget_unwanted(wanted)
        target = {TopicPartition(topic, p) for topic, p in wanted_plan.partitions}
        current = set(self._consumer.assignment())
        if target != current:
            await self._reassign(current, target)
            self._changed_at = now
        ticks = [tp for tp in self._consumer.assignment() if tp.topic != ALERTS_TOPIC]
        self._interest.assigned_partitions = len(ticks)
        self._interest.assigned_topics = frozenset(tp.topic for tp in ticks)

    def _lacking(self) -> bool:
        return bool(self._missing) or ALERTS_TOPIC not in self._partitions

    def _lacking_now(self, now: float) -> bool:
        """Whether a market wanted now, or `alerts`, has no topic in the last listing."""
        missing = plan(self._interest.wanted(now), self._partitions).missing
        return bool(missing) or ALERTS_TOPIC not in self._partitions

    async def _list_topics(self, now: float) -> None:
        # The consumer's public `topics()` lists names only; the partitions come with the
        # same metadata answer.
        try:
            cluster = await self._consumer._client.fetch_all_metadata()
        except KafkaError as exc:
            # A busy or restarting broker: the last listing stands until the next attempt
            # (the feed need not restart, and lose every market's position, for this).
            log.warning("listing the broker's topics failed: %r", exc)
            self._listed_at = now
            return
        self._partitions = {
            topic: sorted(cluster.partitions_for_topic(topic) or ()) for topic in cluster.topics()
        }
        self._listed_at = now
        self._interest.listed_topics = frozenset(self._partitions)

    async def _reassign(self, current: set[TopicPartition], target: set[TopicPartition]) -> None:
        consumer = self._consumer
        added = sorted(tp for tp in target - current if tp.topic != ALERTS_TOPIC)
        dropped = {tp for tp in current - target if tp.topic != ALERTS_TOPIC}
        if dropped:
            # Before any await: a subscriber arriving while this runs must not take a market
            # about to be dropped for loaded and settled (it would miss what comes before the
            # market is added again); it waits for that instead.
            for tp in dropped:
                self._boundary.pop(tp, None)
            markets = _markets(dropped)
            self._recent.restart_feed(markets)
            self._interest.unsettle(markets)
        kept = current & target
        positions = {tp: await consumer.position(tp) for tp in kept}
        consumer.assign(sorted(target))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        # `alerts`, new to the assignment, starts from the newest offset (offset_reset).
        if added:
            begins = await consumer.beginning_offsets(added)
            ends = await consumer.end_offsets(added)
            for tp in added:
                newest = max(begins[tp], ends[tp] - 1)
                from_start = self._interest.read_from_start(_market(tp))
                consumer.seek(tp, begins[tp] if from_start else newest)
                self._boundary[tp] = ends[tp]
            self._recent.restart_feed(_markets(added))
        log.info(
            "feed assignment: %d tick partitions (+%d -%d)",
            sum(1 for tp in target if tp.topic != ALERTS_TOPIC),
            len(added),
            len(dropped),
        )

    async def _settle_passed(self) -> None:
        passed = [
            tp for tp, end in self._boundary.items() if await self._consumer.position(tp) >= end
        ]
        for tp in passed:
            del self._boundary[tp]
        pending = _markets(self._boundary)
        self._interest.settle(m for m in _markets(passed) if m not in pending)


def _market(tp: TopicPartition) -> str:
    return Market.from_topic(tp.topic).id


def _markets(tps: Iterable[TopicPartition]) -> set[str]:
    return {_market(tp) for tp in tps}
