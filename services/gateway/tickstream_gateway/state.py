"""The gateway's resources, opened by the lifespan and shared by every request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as redis

from tickstream_gateway.history import MarketHistory
from tickstream_gateway.httpcache import (
    LISTING_MAX_AGE_S,
    READINESS_MAX_AGE_S,
    READINESS_SERVE_STALE_S,
    EncodedBody,
    SharedRefresh,
)
from tickstream_gateway.hub import Hub
from tickstream_gateway.listing import MetricsListing
from tickstream_gateway.rankboard import RankBoard
from tickstream_gateway.ranks import RANKINGS, Ranking
from tickstream_gateway.selection import Selection
from tickstream_shared.naming import MetricKind, RankMeasure
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.gateway")

# `/api/ranks` query strings held parsed (each entry ~300 bytes): past this, forgotten at once.
MAX_RANK_QUERIES: Final = 1024
# What an `/api/ranks` query string asks for: which ranking, which part of it.
RankQuery = tuple[MetricKind, RankMeasure, Selection]


class ResponseCache:
    """One gateway's cached answers: each rank snapshot, the metrics and feeds listings, readiness.

    The rank poller stores every snapshot it reads (each GATEWAY_RANK_INTERVAL_MS); one older
    than twice that (the poller is behind or cannot read Redis) is read again by a request.
    """

    def __init__(self, rank_interval_s: float) -> None:
        self.ranks: dict[Ranking, SharedRefresh[RankBoard]] = {
            key: SharedRefresh(2 * rank_interval_s) for key in RANKINGS
        }
        self.listing: SharedRefresh[MetricsListing] = SharedRefresh(LISTING_MAX_AGE_S)
        self.feeds: SharedRefresh[EncodedBody] = SharedRefresh(LISTING_MAX_AGE_S)
        self.readiness: SharedRefresh[tuple[int, bytes]] = SharedRefresh(
            READINESS_MAX_AGE_S, serve_stale_s=READINESS_SERVE_STALE_S
        )
        self.rank_queries: dict[bytes, RankQuery] = {}

    def remember_rank_query(self, query: bytes, parsed: RankQuery) -> None:
        """Hold a valid query string parsed. Bounded: clients choose the strings, so past
        MAX_RANK_QUERIES all are forgotten (parsing again costs what the first time did)."""
        if len(self.rank_queries) >= MAX_RANK_QUERIES:
            self.rank_queries.clear()
        self.rank_queries[query] = parsed

    async def aclose(self) -> None:
        """Cancel every load in flight. Idempotent."""
        for board in self.ranks.values():
            await board.aclose()
        await self.listing.aclose()
        await self.feeds.aclose()
        await self.readiness.aclose()


class WritesDue:
    """Connections' writes due this loop turn, run by one callback: a batch of updates
    fanned out to 10,000 clients schedules one, not one handle per client."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: list[Callable[[], None]] = []

    def add(self, write: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        if not self._due:
            loop.call_soon(self._run)
        self._due.append(write)

    def _run(self) -> None:
        due, self._due = self._due, []
        for write in due:
            try:
                write()
            except Exception:  # one connection's failure must not cost the others their turn
                log.exception("a write to a client failed")


@dataclass
class GatewayState:
    settings: ServiceSettings
    redis: redis.Redis
    pool: Any  # asyncpg.Pool
    hub: Hub
    history: MarketHistory
    feed_ready: asyncio.Event
    # The newest failure of a background task (each is supervised and restarted).
    last_task_failure: str | None = None
    task_failures: int = 0
    # Encoded HTTP answers, refreshed when they change or age (the rank poller fills ranks).
    cache: ResponseCache = field(init=False)
    writes_due: WritesDue = field(default_factory=WritesDue)

    def __post_init__(self) -> None:
        self.cache = ResponseCache(self.settings.gateway.rank_interval_ms / 1000)

    def task_failed(self, error: BaseException) -> None:
        """Remember a background task's failure for /readyz; the supervisor restarts it."""
        self.task_failures += 1
        self.last_task_failure = repr(error)[:200]
