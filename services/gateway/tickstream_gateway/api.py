"""HTTP endpoints: metrics, one metric's bars, rank snapshots, alerts, health, Prometheus."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tickstream_gateway import metrics
from tickstream_gateway.bars import merge_history
from tickstream_gateway.protocol import ProtocolError, encode, parse_by, parse_since
from tickstream_gateway.ranks import rank_snapshot
from tickstream_gateway.state import GatewayState
from tickstream_shared import alert_store, db, health, observability
from tickstream_shared.errors import BadIdentifier, echo
from tickstream_shared.naming import MetricId, parse_kind

MAX_ALERTS = 1000


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded by the gateway's one encoder (the same as WebSocket frames)."""
    return Response(encode(body), status_code=status, media_type="application/json")


def error(status: int, code: str, message: str) -> Response:
    return json_response({"error": code, "message": message}, status)


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state


async def list_metrics(request: Request) -> Response:
    return json_response(await metrics.metrics_listing(_state(request).redis))


async def get_metric(request: Request) -> Response:
    state = _state(request)
    raw_id = request.path_params["metric_id"]
    try:
        metric = MetricId.parse(raw_id)
        since = parse_since(request.query_params.get("since"))
    except BadIdentifier as exc:
        return error(400, "bad_metric_id", str(exc))
    except ProtocolError as exc:
        return error(400, exc.code, exc.message)
    body = await metrics.metric_detail(state.redis, metric)
    if body is None:
        return error(404, "unknown_metric", f"no metric {echo(str(metric))}; see GET /api/metrics")
    minutes = state.settings.gateway.history_minutes
    market_id = metric.market.id
    stored = await db.recent_bars(state.pool, market_id, minutes, since_minute=since)
    bars = merge_history(stored, state.hub.recent.of(market_id), minutes, since)
    body["window_minutes"] = state.settings.stats.window_minutes
    body["values"] = [(bar.minute, bar.value(metric.kind)) for bar in bars]
    return json_response(body)


async def get_ranks(request: Request) -> Response:
    kind_param = request.query_params.get("kind")
    if kind_param is None:
        return error(400, "missing_kind", "query parameter 'kind' is required: price or volume")
    try:
        kind = parse_kind(kind_param)
        measure = parse_by(kind, request.query_params.get("by"))
    except BadIdentifier as exc:
        return error(400, "bad_kind", str(exc))
    except ProtocolError as exc:
        return error(400, exc.code, exc.message)
    return json_response(await rank_snapshot(_state(request).redis, kind, measure))


async def get_alerts(request: Request) -> Response:
    raw_limit = request.query_params.get("limit", "50")
    try:
        limit = int(raw_limit)
    except ValueError:
        return error(400, "bad_limit", f"limit {echo(raw_limit)} is not an integer")
    if not 1 <= limit <= MAX_ALERTS:
        return error(400, "bad_limit", f"limit must be between 1 and {MAX_ALERTS}")
    alerts = await alert_store.recent_alerts(_state(request).pool, limit)
    return json_response({"alerts": alerts})


async def readyz(request: Request) -> Response:
    """Ready: broker, Redis and PostgreSQL answer, the feed runs (also served as /healthz)."""
    state = _state(request)
    timeout_s = state.settings.observability.readiness_timeout_ms / 1000
    broker, redis, database = await asyncio.gather(
        health.outcome(functools.partial(health.check_broker, state.settings), timeout_s),
        health.outcome(state.redis.ping, timeout_s),
        health.outcome(functools.partial(_select_one, state.pool), timeout_s),
    )
    checks = {"broker": broker, "redis": redis, "database": database, "feed": _feed_check(state)}
    status, body = health.health_body(checks)
    return json_response(body, status)


async def livez(request: Request) -> Response:
    """Alive: the event loop answers (background tasks are supervised: they come back)."""
    return json_response({"status": "ok"})


async def prometheus_metrics(request: Request) -> Response:
    body, content_type = observability.exposition()
    return Response(body, headers={"Content-Type": content_type})


async def _select_one(pool: Any) -> None:
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")


def _feed_check(state: GatewayState) -> str:
    if state.feed_ready.is_set():
        return health.OK
    if state.last_task_failure is not None:
        return f"restarting after: {state.last_task_failure}"
    return "starting"
