"""HTTP endpoints: metrics, feeds, one metric's bars, rank snapshots, alerts, health, Prometheus."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from tickstream_gateway import metrics
from tickstream_gateway.bars import merge_history
from tickstream_gateway.httpcache import EncodedBody, accepts_gzip, not_modified
from tickstream_gateway.protocol import (
    ProtocolError,
    encode,
    parse_by,
    parse_since,
    parse_statuses,
)
from tickstream_gateway.rankboard import RankBoard
from tickstream_gateway.ranks import read_boards
from tickstream_gateway.selection import parse_selection
from tickstream_gateway.state import GatewayState, RankQuery
from tickstream_shared import alert_store, db, health, observability
from tickstream_shared.consuming import is_transient
from tickstream_shared.errors import BadIdentifier, DependencyUnavailable, echo
from tickstream_shared.naming import (
    DEFAULT_MEASURE_BY_KIND,
    MEASURES_BY_KIND,
    METRIC_KINDS,
    MetricId,
    MetricKind,
    RankMeasure,
    parse_kind,
)

log = logging.getLogger("tickstream.gateway")

MAX_ALERTS = 1000
# What a 503 for a dependency that is down tells clients to wait before trying again.
RETRY_AFTER_S: Final = 5
# At most one log line per dependency this often: an outage under load is one line, not
# one per request.
_UNAVAILABLE_LOG_EVERY_S: Final = 10.0
_unavailable_logged: dict[str, float] = {}


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded by the gateway's one encoder (the same as WebSocket frames)."""
    return Response(encode(body), status_code=status, media_type="application/json")


def fresh_json(request: Request, body: Any) -> Response:
    """A 200 JSON body read for this request alone: gzipped when large and accepted."""
    return _send(request, EncodedBody.of(encode(body)), {})


def cached_json(request: Request, cached: EncodedBody) -> Response:
    """200 with the cached body, or 304 without one when If-None-Match names its ETag.

    `no-cache`: clients and proxies may keep the body but must revalidate it each time. The
    gzip form (when the client accepts it and the body is large) has its own tag; a request
    naming either tag is answered 304: both are the same content.
    """
    gzipped = cached.compressible and accepts_gzip(request.headers.get("accept-encoding"))
    headers = {"ETag": cached.gzip_etag if gzipped else cached.etag, "Cache-Control": "no-cache"}
    if_none_match = request.headers.get("if-none-match")
    if not_modified(if_none_match, cached.etag) or not_modified(if_none_match, cached.gzip_etag):
        return Response(status_code=304, headers=headers | {"Vary": "Accept-Encoding"})
    return _send(request, cached, headers)


def _send(request: Request, encoded: EncodedBody, headers: dict[str, str]) -> Response:
    # Every JSON route answers by this one path: a body's gzip form is made once per
    # EncodedBody, so a cached body is compressed once, whatever the number of requests.
    headers = headers | {"Vary": "Accept-Encoding"}
    if encoded.compressible and accepts_gzip(request.headers.get("accept-encoding")):
        body = encoded.gzipped()
        headers["Content-Encoding"] = "gzip"
    else:
        body = encoded.body
    return Response(body, headers=headers, media_type="application/json")


def error(status: int, code: str, message: str) -> Response:
    return json_response({"error": code, "message": message}, status)


@contextlib.contextmanager
def needs(dependency: str) -> Iterator[None]:
    """Turn a transient failure of `dependency` (see `is_transient`) under it into
    DependencyUnavailable, which the app answers with 503; other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        if is_transient(exc):
            raise DependencyUnavailable(dependency, exc) from exc
        raise


def unavailable(exc: DependencyUnavailable) -> Response:
    """503 with a JSON error body and Retry-After; logged once per dependency and period."""
    now = time.monotonic()
    if now - _unavailable_logged.get(exc.dependency, -_UNAVAILABLE_LOG_EVERY_S) >= (
        _UNAVAILABLE_LOG_EVERY_S
    ):
        _unavailable_logged[exc.dependency] = now
        log.warning("answering 503: %s", exc)
    response = error(503, "unavailable", f"{exc.dependency} is unavailable; try again later")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state


async def list_metrics(request: Request) -> Response:
    try:
        selection = parse_selection(request.query_params)
    except ProtocolError as exc:
        return error(400, exc.code, exc.message)
    state = _state(request)
    with needs("Redis"):
        listing = await state.cache.listing.get(
            functools.partial(metrics.read_listing, state.redis)
        )
    return cached_json(request, listing.body(selection))


async def list_feeds(request: Request) -> Response:
    state = _state(request)
    with needs("Redis"):
        listing = await state.cache.feeds.get(functools.partial(_feeds_body, state.redis))
    return cached_json(request, listing)


async def _feeds_body(client: Redis) -> EncodedBody:
    return EncodedBody.of(encode(await metrics.feeds_listing(client)))


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
    with needs("Redis"):
        body = await metrics.metric_detail(state.redis, metric)
    if body is None:
        return error(404, "unknown_metric", f"no metric {echo(str(metric))}; see GET /api/metrics")
    minutes = state.settings.gateway.history_minutes
    market_id = metric.market.id
    with needs("PostgreSQL"):
        stored = await db.recent_bars(state.pool, market_id, minutes, since_minute=since)
    bars = merge_history(stored, state.hub.recent.of(market_id), minutes, since)
    body["window_minutes"] = state.settings.stats.window_minutes
    # A minute whose value is unknown (turnover without a quote volume) is left out, not zero.
    values = ((bar.minute, bar.value(metric.kind)) for bar in bars)
    body["values"] = [(minute, value) for minute, value in values if value is not None]
    return fresh_json(request, body)


async def get_ranks(request: Request) -> Response:
    state = _state(request)
    # The same few query strings come again and again (the dashboard's, a client's poll):
    # each is parsed once, then found by its bytes (a bounded memo: any string still works).
    query: bytes = request.scope["query_string"]
    parsed = state.cache.rank_queries.get(query)
    if parsed is None:
        try:
            parsed = _parse_rank_query(request.query_params)
        except BadIdentifier as exc:
            return error(400, "bad_kind", str(exc))
        except ProtocolError as exc:
            return error(400, exc.code, exc.message)
        state.cache.remember_rank_query(query, parsed)
    kind, measure, selection = parsed
    load = functools.partial(_read_board, state.redis, kind, measure)
    with needs("Redis"):
        board = await state.cache.ranks[kind, measure].get(load)
    return cached_json(request, board.body(selection))


def _parse_rank_query(params: Mapping[str, str]) -> RankQuery:
    """(kind, measure, selection) of `/api/ranks`; raises BadIdentifier (the kind) or
    ProtocolError (`missing_kind`, a bad measure or selection)."""
    kind_param = params.get("kind")
    if kind_param is None:
        kinds = ", ".join(METRIC_KINDS)
        raise ProtocolError("missing_kind", f"query parameter 'kind' is required: one of {kinds}")
    kind = parse_kind(kind_param)
    return kind, parse_by(kind, params.get("by")), parse_selection(params)


async def _read_board(client: Redis, kind: MetricKind, measure: RankMeasure) -> RankBoard:
    # Only when the rank poller's board is too old: it normally stores every one it reads.
    return (await read_boards(client, {}))[kind, measure]


KINDS_BODY: Final = EncodedBody.of(
    encode(
        {
            "kinds": [
                {
                    "kind": kind,
                    "measures": MEASURES_BY_KIND[kind],
                    "default": DEFAULT_MEASURE_BY_KIND[kind],
                }
                for kind in METRIC_KINDS
            ]
        }
    )
)


async def list_kinds(request: Request) -> Response:
    """Every metric kind, the measures it is ranked by and its default: what clients offer."""
    return cached_json(request, KINDS_BODY)


async def get_alerts(request: Request) -> Response:
    raw_limit = request.query_params.get("limit", "50")
    try:
        limit = int(raw_limit)
    except ValueError:
        return error(400, "bad_limit", f"limit {echo(raw_limit)} is not an integer")
    if not 1 <= limit <= MAX_ALERTS:
        return error(400, "bad_limit", f"limit must be between 1 and {MAX_ALERTS}")
    try:
        # Retracted alerts are listed too unless asked otherwise: marked, not silently gone.
        statuses = parse_statuses(request.query_params.get("status"))
    except ProtocolError as exc:
        return error(400, exc.code, exc.message)
    with needs("PostgreSQL"):
        alerts = await alert_store.recent_alerts(_state(request).pool, limit, statuses)
    return fresh_json(request, {"alerts": alerts})


async def readyz(request: Request) -> Response:
    """Ready: broker, Redis and PostgreSQL answer, the feed runs (also served as /healthz).

    The exchanges' feeds are not checked: an exchange that is down is down for every
    gateway, and taking them all out of service would hide the dashboard that says so
    (`/api/feeds` and the watcher's `tickstream_feed_markets` show the feeds).

    Concurrent probes share one check, so a load balancer probing often, or a gateway busy
    with clients, costs one check a second; a probe gets the held answer at once while it is
    at most READINESS_MAX_AGE_S + READINESS_SERVE_STALE_S old (the next check runs meanwhile).
    """
    state = _state(request)
    status, body = await state.cache.readiness.get(functools.partial(_readiness, state))
    return Response(body, status_code=status, media_type="application/json")


async def _readiness(state: GatewayState) -> tuple[int, bytes]:
    timeout_s = state.settings.observability.readiness_timeout_ms / 1000
    broker, redis, database = await asyncio.gather(
        health.outcome(functools.partial(health.check_broker, state.settings), timeout_s),
        health.outcome(state.redis.ping, timeout_s),
        health.outcome(functools.partial(_select_one, state.pool), timeout_s),
    )
    checks = {"broker": broker, "redis": redis, "database": database, "feed": _feed_check(state)}
    status, body = health.health_body(checks)
    return status, encode(body)


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
