"""The watcher group's lease and checkpoints against the real Redis."""

from __future__ import annotations

import asyncio
import uuid

from tickstream_shared.feed_status import FEEDS_KEY, FeedStatus, decode_feed_status
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.redis_client import connect
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import RedisSettings
from tickstream_watcher.checkpoints import ResumePoint
from tickstream_watcher.leadership import LEASE_SAFETY, GroupState, Lease, wait_for_lease

M = 60_000
T0 = 1_700_000_040_000


def bar(market: str, minute: int, seq: int) -> Tick:
    return Tick(market, minute, seq, minute + M, minute + M, 1.0, 1.0, 1.0, 1.0, 2.0, 3, True)


class FakeClock:
    """A monotonic clock the test moves, so the safety margin is passed without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_one_holder_at_a_time_release_hands_over_and_expiry_frees_it(
    infra: LocalInfra,
) -> None:
    """Only one lease holder; a release or an expiry lets the other take it; the old one knows."""
    client = connect(RedisSettings(url=infra.redis_url))
    group = f"g{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    # A long lease in Redis: nothing here depends on how fast this machine is.
    first, second = Lease(client, group, 60_000, clock), Lease(client, group, 60_000, clock)
    try:
        assert await first.try_acquire() and first.held()
        assert not await second.try_acquire()
        assert await first.renew()
        await first.release()
        assert not first.held()
        assert await second.try_acquire()
        # The holder stops counting on it after LEASE_SAFETY of the lease, before Redis frees it.
        clock.now += 60 * LEASE_SAFETY - 0.001
        assert second.held()
        clock.now += 0.002
        assert not second.held()
        assert not await first.try_acquire()
        # Redis expires the key (its expiry set in the past rather than waited for): free.
        await client.pexpireat(first.key, 1)
        assert await first.try_acquire()
        assert not await second.renew() and not second.held()
    finally:
        await client.aclose()


async def test_standby_waits_until_the_lease_is_free_or_it_is_stopped(infra: LocalInfra) -> None:
    """wait_for_lease returns True once the holder releases, False when stopped first."""
    client = connect(RedisSettings(url=infra.redis_url))
    group = f"g{uuid.uuid4().hex[:8]}"
    # The holder's lease outlives any stall of this machine; the standby polls every 0.4 s.
    holder, standby = Lease(client, group, 60_000), Lease(client, group, 2000)
    stop = asyncio.Event()
    try:
        assert await holder.try_acquire()
        waiting = asyncio.create_task(wait_for_lease(standby, stop))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await holder.release()
        assert await asyncio.wait_for(waiting, 10) is True
        stop.set()
        assert await wait_for_lease(holder, stop) is False
    finally:
        await client.aclose()


async def test_checkpoints_give_a_resume_plan_and_bad_entries_are_ignored(
    infra: LocalInfra,
) -> None:
    """Acknowledged and pending closes load back as a plan; foreign values do not break it."""
    client = connect(RedisSettings(url=infra.redis_url))
    group = f"g{uuid.uuid4().hex[:8]}"
    state = GroupState(client, group)
    a, b, c = "binance:btc-usdt", "binance:eth-usdt", "binance:sol-usdt"
    try:
        await state.closed({a: ResumePoint(T0, 10), b: ResumePoint(T0, 20)})
        await state.closing([bar(a, T0 - M, 5), bar(a, T0, 10), bar(b, T0 + M, 30)])
        await client.hset(f"tickstream:watcher:{group}:closed", c, "not a point")
        await client.hset(f"tickstream:watcher:{group}:closing", c, "{]")
        plan = await state.load([a, b, c, "kraken:btc-usd"])
        assert plan.points == {a: ResumePoint(T0, 10), b: ResumePoint(T0, 20)}
        assert plan.republish == {b: bar(b, T0 + M, 30)}  # a's newest close was acknowledged
    finally:
        await client.aclose()


async def test_feed_reports_replace_the_previous_ones(infra: LocalInfra) -> None:
    """A report of fewer markets leaves no entry of the ones gone."""
    client = connect(RedisSettings(url=infra.redis_url))
    state = GroupState(client, "g-feeds")
    live = FeedStatus("live", "binance", "live", T0, T0 - 5)
    try:
        await state.report_feeds({"binance:btc-usdt": live, "binance:eth-usdt": live})
        await state.report_feeds({"binance:btc-usdt": live})
        raw = await client.hgetall(FEEDS_KEY)
        assert {k: decode_feed_status(v) for k, v in raw.items()} == {"binance:btc-usdt": live}
        assert 0 < await client.ttl(FEEDS_KEY) <= 3600
    finally:
        await client.delete(FEEDS_KEY)
        await client.aclose()
