"""The Starlette application: routes, error handlers and the lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from tickstream_gateway import api, telemetry
from tickstream_gateway.access import AccessControl
from tickstream_gateway.bars import RecentBars
from tickstream_gateway.feed import run_feed, run_rank_poller
from tickstream_gateway.history import MarketHistory
from tickstream_gateway.httpcache import GZIP_MIN_BYTES
from tickstream_gateway.hub import Hub
from tickstream_gateway.interest import MarketInterest
from tickstream_gateway.state import GatewayState
from tickstream_gateway.ws import websocket_endpoint
from tickstream_shared import db, redis_client
from tickstream_shared.errors import MAX_ECHO_CHARS, DependencyUnavailable
from tickstream_shared.lifecycle import supervise
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger("tickstream.gateway")

STATIC_DIR = Path(__file__).parent / "static"
# How long a market's first subscriber may wait for storage to reach the feed's first update
# of the market (stats stores a batch a few hundred ms after the watcher published it).
HISTORY_CATCH_UP_S = 1.5


def create_app(settings: ServiceSettings, pool: Any | None = None) -> Starlette:
    """The gateway's app; its lifespan closes `pool` (an asyncpg pool on a database with the
    schema, see `db.open_pool`), or opens and closes one of its own without it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        nonlocal pool
        if pool is None:
            pool = await db.create_pool(settings.database, max_size=8)
            await db.ensure_schema(pool)
        redis = redis_client.connect(settings.redis)
        minutes = settings.gateway.history_minutes
        recent = RecentBars(max_bars=minutes + 1)
        hub = Hub(
            settings.gateway.client_queue_bytes,
            recent=recent,
            interest=MarketInterest(settings.gateway.feed_grace_ms / 1000),
        )
        history = MarketHistory(
            recent,
            lambda market_id: db.recent_bars(pool, market_id, minutes),
            catch_up_s=HISTORY_CATCH_UP_S,
        )
        telemetry.track_hub(hub, history)
        state = GatewayState(settings, redis, pool, hub, history, asyncio.Event())
        tasks: list[asyncio.Task[None]] = []
        try:
            # Each background task is restarted with backoff if it fails or ends: one bad
            # moment (a broker restart, a bug hit by one record) never leaves clients without
            # live data until the process restarts.
            work = {
                "gateway feed": lambda: run_feed(settings, state.hub, state.feed_ready),
                "rank poller": lambda: run_rank_poller(
                    settings, state.hub, redis, state.cache.ranks
                ),
            }
            for name, run in work.items():
                supervised = supervise(name, run, on_failure=state.task_failed)
                tasks.append(asyncio.create_task(supervised, name=name))
            yield {"gateway": state}
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.error("background task failed: %r", result)
            await history.aclose()
            await state.cache.aclose()
            await redis.aclose()
            await pool.close()
            pool = None

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        path = request.url.path  # the client's input: quote only its start
        if len(path) > MAX_ECHO_CHARS:
            path = f"{path[:MAX_ECHO_CHARS]}…"
        response = api.error(exc.status_code, code, f"{exc.detail}: {request.method} {path}")
        for name, value in (exc.headers or {}).items():
            if name.lower() == "allow":  # a 405's; Starlette lists a set: sort it, keep it stable
                value = ", ".join(sorted(m.strip() for m in value.split(",")))
            response.headers[name] = value
        return response

    async def dependency_down(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DependencyUnavailable)
        return api.unavailable(exc)

    routes = [
        # Starlette tries routes in order, a regex each: the routes polled most come first.
        Route("/api/ranks", api.get_ranks),
        Route("/api/metrics", api.list_metrics),
        Route("/", index),
        Route("/healthz", api.readyz),
        Route("/livez", api.livez),
        Route("/readyz", api.readyz),
        Route("/metrics", api.prometheus_metrics),
        Route("/api/metrics/{metric_id:str}", api.get_metric),
        Route("/api/feeds", api.list_feeds),
        Route("/api/kinds", api.list_kinds),
        Route("/api/alerts", api.get_alerts),
        WebSocketRoute("/ws", websocket_endpoint),
        # The dashboard's files, gzipped per request (a few loads per page view, ~70 KB
        # before and ~20 KB after); JSON bodies are gzipped once per body by api.py instead.
        Mount(
            "/static",
            GZipMiddleware(StaticFiles(directory=STATIC_DIR), minimum_size=GZIP_MIN_BYTES),
            name="static",
        ),
    ]
    return Starlette(
        routes=routes,
        # Outermost first: refused requests are counted too.
        middleware=[
            Middleware(
                telemetry.ObserveRequests,
                access_log=telemetry.AccessLog.of(settings.gateway),
            ),
            Middleware(AccessControl, settings=settings.gateway),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, DependencyUnavailable: dependency_down},
    )
