"""A watcher whose source fails unexpectedly stops loudly and hands its lease on at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator

import pytest

from tests.conftest import deadline
from tickstream_shared.feed_status import FeedStatus
from tickstream_shared.lifecycle import run_until_stopped
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.naming import Market
from tickstream_shared.redis_client import connect
from tickstream_shared.schemas import Tick
from tickstream_shared.settings import RedisSettings, ServiceSettings
from tickstream_watcher import service
from tickstream_watcher.checkpoints import ResumePlan
from tickstream_watcher.leadership import Lease

M = 60_000


class BrokenSource:
    """Publishes one bar, then fails as a live source's task group does on a bug."""

    resumable = False

    def __init__(self, market: Market) -> None:
        self.markets = [market]

    async def start(self) -> None:
        """Nothing to resolve."""

    def resume(self, plan: ResumePlan) -> None:
        """Not resumable."""

    def feed_reports(self, now_ms: int) -> dict[str, FeedStatus]:
        return {}

    async def chunks(self) -> AsyncGenerator[list[Tick]]:
        minute = 1_700_000_040_000
        market = self.markets[0].id
        yield [Tick(market, minute, 1, minute + M, minute + M, 1, 1, 1, 1, 1, 1, True)]
        raise ExceptionGroup("live source", [RuntimeError("a bug in a feed task")])


async def test_a_failing_source_ends_the_watcher_and_releases_its_lease(
    infra: LocalInfra, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error ends `run` (not retried as transient, so the process exits and its
    supervisor restarts it) and the lease is free at once for a standby."""
    group = f"f{uuid.uuid4().hex[:8]}"
    market = Market("binance", f"x{uuid.uuid4().hex[:6]}", "usdt")
    monkeypatch.setattr(service, "make_source", lambda *_: BrokenSource(market))
    settings = ServiceSettings.from_env({**infra.environment(), "WATCHER_GROUP": group})
    stop = asyncio.Event()
    with pytest.raises(ExceptionGroup) as failed:
        async with asyncio.timeout(deadline(30)):
            await run_until_stopped("watcher", service.run, settings, stop)
    assert failed.group_contains(RuntimeError, match="a bug in a feed task")
    client = connect(RedisSettings(url=infra.redis_url))
    try:
        standby = Lease(client, group, 60_000)
        assert await standby.try_acquire()  # released, not left to expire
        await standby.release()
    finally:
        await client.aclose()
