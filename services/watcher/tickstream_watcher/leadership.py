"""Leadership of a watcher group in Redis: the publishing lease, close checkpoints, feed reports.

Watchers configured alike (same WATCHER_GROUP, same Redis) contend for one lease; only its
holder publishes. The holder renews it every fifth of WATCHER_LEASE_MS and stops publishing
on its own once LEASE_SAFETY of the lease has passed without a renewal, so it is quiet
before the lease can expire in Redis and a standby take it (the standby can take it only
after expiry). On a clean stop the holder releases it, and a standby takes over at once.

Closed bars are checkpointed twice per market, so that whoever publishes next closes each
minute once and with the same values:
- `closing`: the newest closed bar, written *before* it is handed to the producer;
- `closed`: minute and seq of the newest closed bar the broker acknowledged.
A new holder resumes each market after its `closed` minute (backfill starts at the next one)
with seqs above every seq checkpointed, and republishes a `closing` bar newer than that exactly
as it was (same seq, same values: if the old holder had published it, this is an identical
duplicate, which every consumer's larger-seq-wins upsert absorbs); the backfill skips that
minute, so it is never closed with other values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import redis.asyncio as redis

from tickstream_shared.errors import BadMessage
from tickstream_shared.feed_status import FEEDS_KEY, FEEDS_TTL_S, FeedStatus
from tickstream_shared.naming import REDIS_PREFIX
from tickstream_shared.schemas import Tick, decode_tick
from tickstream_watcher.checkpoints import ResumePlan, ResumePoint, plan_resume

log = logging.getLogger(__name__)

# The holder stops publishing once this share of the lease has passed since the last renewal
# it sent: the rest is margin for Redis' and this host's clocks and the last in-flight sends.
LEASE_SAFETY: Final = 0.6
RENEWALS_PER_LEASE: Final = 5

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def _group_key(group: str, part: str) -> str:
    return f"{REDIS_PREFIX}:watcher:{group}:{part}"


class Lease:
    """The group's publishing lease: SET NX PX to take it, compare-and-extend to renew."""

    def __init__(
        self,
        client: redis.Redis,
        group: str,
        lease_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.key = _group_key(group, "lease")
        self.lease_ms = lease_ms
        self.token = uuid.uuid4().hex
        # Injectable so tests can pass LEASE_SAFETY without racing a loaded machine's sleeps.
        self._clock = clock
        self._valid_until = 0.0  # on _clock; this watcher may publish until then

    @property
    def renew_interval_s(self) -> float:
        return self.lease_ms / 1000 / RENEWALS_PER_LEASE

    def held(self) -> bool:
        """True while a renewal sent less than LEASE_SAFETY of the lease ago succeeded."""
        return self._clock() < self._valid_until

    async def try_acquire(self) -> bool:
        sent = self._clock()
        if await self._client.set(self.key, self.token, nx=True, px=self.lease_ms):
            self._valid_until = sent + self.lease_ms / 1000 * LEASE_SAFETY
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease if still ours; False (and not held any more) if it is not."""
        sent = self._clock()
        if await self._client.eval(_RENEW, 1, self.key, self.token, str(self.lease_ms)):
            self._valid_until = sent + self.lease_ms / 1000 * LEASE_SAFETY
            return True
        self._valid_until = 0.0
        return False

    async def release(self) -> None:
        self._valid_until = 0.0
        await self._client.eval(_RELEASE, 1, self.key, self.token)


class GroupState:
    """The group's checkpoints and feed reports in Redis (a thin adapter; no logic of its own)."""

    # Values longer than this are not ours: a checkpoint is under 300 bytes.
    _MAX_VALUE = 1024

    def __init__(self, client: redis.Redis, group: str) -> None:
        self._client = client
        self._closed_key = _group_key(group, "closed")
        self._closing_key = _group_key(group, "closing")

    async def load(self, market_ids: Iterable[str]) -> ResumePlan:
        """The resume plan of `market_ids`; entries that do not parse are logged and ignored."""
        wanted = sorted(set(market_ids))
        if not wanted:
            return ResumePlan({}, {})
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hmget(self._closed_key, wanted)
            pipe.hmget(self._closing_key, wanted)
            closed_raw, closing_raw = await pipe.execute()
        closed: dict[str, ResumePoint] = {}
        closing: dict[str, Tick] = {}
        now_ms = time.time_ns() // 1_000_000
        for market_id, raw_point, raw_tick in zip(wanted, closed_raw, closing_raw, strict=True):
            if raw_point is not None:
                point = _parse_point(raw_point)
                if point is None:
                    log.warning("ignoring a bad close checkpoint of %s", market_id)
                else:
                    closed[market_id] = point
            if raw_tick is not None and len(raw_tick) <= self._MAX_VALUE:
                try:
                    tick = decode_tick(raw_tick.encode(), now_ms=now_ms)
                except BadMessage as exc:
                    log.warning("ignoring a bad closing checkpoint of %s: %s", market_id, exc)
                else:
                    if tick.market == market_id and tick.closed:
                        closing[market_id] = tick
        return plan_resume(closed, closing)

    async def closing(self, ticks: Iterable[Tick]) -> None:
        """Record closed bars about to be handed to the producer (newest per market wins)."""
        newest: dict[str, Tick] = {}
        for tick in ticks:
            if tick.closed:
                newest[tick.market] = tick
        if newest:
            await self._client.hset(
                self._closing_key, mapping={m: t.encode().decode() for m, t in newest.items()}
            )

    async def closed(self, points: Mapping[str, ResumePoint]) -> None:
        """Record closed bars the broker acknowledged."""
        if points:
            await self._client.hset(
                self._closed_key, mapping={m: f"{p.minute} {p.seq}" for m, p in points.items()}
            )

    async def report_feeds(self, reports: Mapping[str, FeedStatus]) -> None:
        """Replace the feed reports in one transaction (readers never see it half written)."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(FEEDS_KEY)
            if reports:
                pipe.hset(FEEDS_KEY, mapping={m: s.encode().decode() for m, s in reports.items()})
                pipe.expire(FEEDS_KEY, FEEDS_TTL_S)
            await pipe.execute()


def _parse_point(raw: str) -> ResumePoint | None:
    parts = raw.split(" ")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 19 for p in parts):
        return None
    return ResumePoint(int(parts[0]), int(parts[1]))


async def wait_for_lease(lease: Lease, stop: asyncio.Event) -> bool:
    """Stand by until the lease is ours (True) or `stop` is set (False); waits out Redis."""
    announced = False
    while not stop.is_set():
        try:
            if await lease.try_acquire():
                return True
            if not announced:
                log.info("standing by: another watcher of the group holds %s", lease.key)
                announced = True
        except (redis.RedisError, OSError) as exc:
            log.warning("standing by: cannot reach Redis for the lease: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=lease.renew_interval_s)
    return False
