"""HTTP endpoints: metrics, one metric's 24h, rank snapshots, alerts, health."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from tickstream_gateway.ranks import metric_rank, rank_label, rank_snapshot, ranked_metrics
from tickstream_gateway.state import GatewayState
from tickstream_shared import alert_store, db
from tickstream_shared.errors import BadIdentifier
from tickstream_shared.naming import METRIC_KINDS, MetricId, MetricKind, parse_kind, stats_key

MAX_ALERTS = 1000


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state


def _stats_fields(raw: dict[Any, Any]) -> dict[str, Any]:
    return {
        "count": int(raw["count"]),
        "mean": float(raw["mean"]),
        "std": float(raw["std"]),
        "min": float(raw["min"]),
        "max": float(raw["max"]),
        "last": float(raw["last"]),
        "last_ts": int(raw["last_ts"]),
    }


async def list_metrics(request: Request) -> JSONResponse:
    client = _state(request).redis
    ranked: list[tuple[str, MetricKind, int, int]] = []  # (metric, kind, position, total)
    for kind in METRIC_KINDS:
        members = await ranked_metrics(client, kind)
        ranked += [(m, kind, i + 1, len(members)) for i, m in enumerate(members)]
    async with client.pipeline(transaction=False) as pipe:
        for metric, *_ in ranked:
            pipe.hgetall(stats_key(metric))
        hashes = await pipe.execute() if ranked else []
    metrics = [
        {
            "id": metric,
            "market": MetricId.parse(metric).market.id,
            "kind": kind,
            **_stats_fields(raw),
            "position": position,
            "total": total,
            "rank": rank_label(position, total),
        }
        for (metric, kind, position, total), raw in zip(ranked, hashes, strict=True)
        if raw
    ]
    metrics.sort(key=lambda m: m["id"])
    return JSONResponse({"metrics": metrics})


async def get_metric(request: Request) -> JSONResponse:
    state = _state(request)
    raw_id = request.path_params["metric_id"]
    try:
        metric = MetricId.parse(raw_id)
    except BadIdentifier as exc:
        return error(400, "bad_metric_id", str(exc))
    metric_id = str(metric)
    raw = await state.redis.hgetall(stats_key(metric_id))
    if not raw:
        return error(404, "unknown_metric", f"no metric {metric_id!r}; see GET /api/metrics")
    position, total = await metric_rank(state.redis, metric_id, metric.kind)
    span_ms = state.settings.gateway.history_seconds * 1000
    ticks = await db.recent_ticks(state.pool, metric.market.id, span_ms)
    return JSONResponse(
        {
            "id": metric_id,
            "market": metric.market.id,
            "kind": metric.kind,
            **_stats_fields(raw),
            "position": position,
            "total": total,
            "rank": rank_label(position, total),
            "window_seconds": state.settings.stats.window_seconds,
            "values": [[t.exchange_ts, t.value(metric.kind)] for t in ticks],
        }
    )


async def get_ranks(request: Request) -> JSONResponse:
    kind_param = request.query_params.get("kind")
    if kind_param is None:
        return error(400, "missing_kind", "query parameter 'kind' is required: price or volume")
    try:
        kind = parse_kind(kind_param)
    except BadIdentifier as exc:
        return error(400, "bad_kind", str(exc))
    return JSONResponse(await rank_snapshot(_state(request).redis, kind))


async def get_alerts(request: Request) -> JSONResponse:
    raw_limit = request.query_params.get("limit", "50")
    try:
        limit = int(raw_limit)
    except ValueError:
        return error(400, "bad_limit", f"limit {raw_limit!r} is not an integer")
    if not 1 <= limit <= MAX_ALERTS:
        return error(400, "bad_limit", f"limit must be between 1 and {MAX_ALERTS}")
    alerts = await alert_store.recent_alerts(_state(request).pool, limit)
    return JSONResponse({"alerts": [a.as_json() for a in alerts]})


async def healthz(request: Request) -> JSONResponse:
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
    return JSONResponse(
        {"status": "ok" if healthy else "unhealthy", **checks},
        status_code=200 if healthy else 503,
    )
