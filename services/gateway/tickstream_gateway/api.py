"""HTTP endpoints: metrics, one metric's bars, rank snapshots, alerts, health."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tickstream_gateway import metrics
from tickstream_gateway.bars import merge_history
from tickstream_gateway.protocol import ProtocolError, encode, parse_by, parse_since
from tickstream_gateway.ranks import rank_snapshot
from tickstream_gateway.state import GatewayState
from tickstream_shared import alert_store, db
from tickstream_shared.errors import BadIdentifier
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
        return error(404, "unknown_metric", f"no metric {str(metric)!r}; see GET /api/metrics")
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
        return error(400, "bad_limit", f"limit {raw_limit!r} is not an integer")
    if not 1 <= limit <= MAX_ALERTS:
        return error(400, "bad_limit", f"limit must be between 1 and {MAX_ALERTS}")
    alerts = await alert_store.recent_alerts(_state(request).pool, limit)
    return json_response({"alerts": alerts})


async def healthz(request: Request) -> Response:
    state = _state(request)
    checks: dict[str, str] = {}
    try:
        await state.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # any failure means unhealthy; the reason is reported
        checks["redis"] = f"error: {exc!r}"
    try:
        async with state.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc!r}"
    if state.failed_tasks:
        checks["feed"] = f"error: {state.failed_tasks[0]}"
    else:
        checks["feed"] = "ok" if state.feed_ready.is_set() else "starting"
    healthy = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ok" if healthy else "unhealthy", **checks}, 200 if healthy else 503
    )
