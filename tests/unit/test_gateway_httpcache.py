"""Cached HTTP bodies without sockets: ETags, 304s, single-flight refresh, the rank poller."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from typing import Any

import pytest
from starlette.requests import Request

from tests.conftest import deadline
from tickstream_gateway import api, feed
from tickstream_gateway.bars import RecentBars
from tickstream_gateway.history import MarketHistory
from tickstream_gateway.httpcache import (
    GZIP_MIN_BYTES,
    EncodedBody,
    SharedRefresh,
    accepts_gzip,
    not_modified,
)
from tickstream_gateway.hub import Hub
from tickstream_gateway.memo import SizedMemo
from tickstream_gateway.rankboard import RankBoard, RankEntry
from tickstream_gateway.ranks import RANKINGS, Ranking
from tickstream_gateway.selection import Selection
from tickstream_gateway.state import MAX_RANK_QUERIES, GatewayState, ResponseCache
from tickstream_shared import health
from tickstream_shared.naming import MEASURES_BY_KIND, MetricKind, RankMeasure, market_of
from tickstream_shared.settings import GatewaySettings, ServiceSettings


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(headers: dict[str, str] | None = None, state: Any = None) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    if state is not None:
        scope["state"] = {"gateway": state}
    return Request(scope)


def test_etag_is_strong_and_the_same_for_the_same_bytes() -> None:
    """Equal bytes give one quoted strong ETag, whichever object or gateway encoded them."""
    first = EncodedBody.of(b'{"ranks":[1,2]}')
    second = EncodedBody.of(bytes(bytearray(b'{"ranks":[1,2]}')))
    assert first.etag == second.etag
    assert first.etag.startswith('"') and first.etag.endswith('"') and len(first.etag) == 34
    assert not first.etag.startswith("W/")


def test_etag_changes_when_the_content_changes() -> None:
    """One changed byte gives another ETag."""
    assert EncodedBody.of(b'{"total":2}').etag != EncodedBody.of(b'{"total":3}').etag


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ('"abc"', True),
        ('"xyz"', False),
        ('"xyz", "abc"', True),
        ('"xyz","abc"', True),
        ('W/"abc"', True),  # If-None-Match compares weakly (RFC 9110 13.1.2)
        ("*", True),
        ("abc", False),  # unquoted: not the tag
        ("", False),
    ],
)
def test_if_none_match_names_the_etag(header: str | None, expected: bool) -> None:
    """A list, a weak form and `*` match; other tags and unquoted values do not."""
    assert not_modified(header, '"abc"') is expected


def test_cached_json_is_304_without_body_when_the_etag_matches() -> None:
    """A matching If-None-Match gets 304 with the ETag; any other request the body."""
    cached = EncodedBody.of(b'{"kind":"price"}')
    full = api.cached_json(request(), cached)
    assert (full.status_code, full.body) == (200, b'{"kind":"price"}')
    assert full.headers["etag"] == cached.etag
    assert full.headers["cache-control"] == "no-cache"
    assert full.headers["content-type"] == "application/json"
    hit = api.cached_json(request({"If-None-Match": cached.etag}), cached)
    assert (hit.status_code, hit.body) == (304, b"")
    assert hit.headers["etag"] == cached.etag
    assert "content-type" not in hit.headers and "content-length" not in hit.headers
    miss = api.cached_json(request({"If-None-Match": EncodedBody.of(b"{}").etag}), cached)
    assert (miss.status_code, miss.body) == (200, b'{"kind":"price"}')


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("deflate, gzip;q=1.0, br", True),
        ("GZIP", True),
        ("br, *", True),
        ("gzip;q=0", False),
        ("gzip; q=0.5", True),
        ("gzip;q=zero", False),
        ("deflate, br", False),
        ("identity", False),
    ],
)
def test_accept_encoding_names_gzip(header: str | None, expected: bool) -> None:
    """gzip (or *) with a q above 0 is accepted; q=0, a bad q or other codings are not."""
    assert accepts_gzip(header) is expected


def test_large_bodies_are_gzipped_once_when_accepted_and_keep_their_etags() -> None:
    """A body of GZIP_MIN_BYTES or more is sent gzipped to a client accepting it, with its
    own tag and Vary; compressed once; either tag revalidates; small bodies are sent as is."""
    body = json.dumps({"ranks": [{"metric": f"binance:c{i}-usdt:price"} for i in range(100)]})
    cached = EncodedBody.of(body.encode())
    assert len(cached.body) >= GZIP_MIN_BYTES
    gzipping = {"Accept-Encoding": "gzip, deflate"}
    sent = api.cached_json(request(gzipping), cached)
    assert sent.status_code == 200
    assert gzip.decompress(sent.body) == cached.body and len(sent.body) < len(cached.body) // 4
    assert sent.headers["content-encoding"] == "gzip"
    assert sent.headers["vary"] == "Accept-Encoding"
    assert sent.headers["etag"] == cached.gzip_etag == f'{cached.etag[:-1]}-gzip"'
    assert api.cached_json(request(gzipping), cached).body is sent.body  # compressed once
    plain = api.cached_json(request(), cached)
    assert (plain.body, plain.headers["etag"]) == (cached.body, cached.etag)
    assert "content-encoding" not in plain.headers and plain.headers["vary"] == "Accept-Encoding"
    for tag in (cached.etag, cached.gzip_etag):
        again = api.cached_json(request({**gzipping, "If-None-Match": tag}), cached)
        assert (again.status_code, again.body, again.headers["etag"]) == (
            304,
            b"",
            cached.gzip_etag,
        )
    small = EncodedBody.of(b'{"kind":"price"}')
    sent = api.cached_json(request(gzipping), small)
    assert (sent.body, sent.headers["etag"]) == (small.body, small.etag)
    assert "content-encoding" not in sent.headers


async def test_concurrent_gets_share_one_load() -> None:
    """Fifty callers of a stale value wait for one load and all get its value."""
    refresh: SharedRefresh[str] = SharedRefresh(1.0)
    loads: list[int] = []
    release = asyncio.Event()

    async def load() -> str:
        loads.append(len(loads))
        await release.wait()
        return f"value {len(loads)}"

    waiters = [asyncio.create_task(refresh.get(load)) for _ in range(50)]
    await asyncio.sleep(0)  # every waiter has asked
    release.set()
    assert await asyncio.gather(*waiters) == ["value 1"] * 50
    assert loads == [0]
    assert await refresh.get(load) == "value 1"  # held: no second load
    assert loads == [0]


async def test_a_value_is_loaded_again_only_once_older_than_max_age() -> None:
    """Within max age the held value is handed out; after it, the next get loads again."""
    clock = Clock()
    refresh: SharedRefresh[int] = SharedRefresh(1.0, clock=clock)
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        return loads

    assert await refresh.get(load) == 1
    clock.now += 1.0
    assert await refresh.get(load) == 1
    clock.now += 0.01
    assert await refresh.get(load) == 2
    assert loads == 2


async def test_age_counts_from_when_the_load_started() -> None:
    """A load that took longer than max age leaves a value the next get reads again."""
    clock = Clock()
    refresh: SharedRefresh[int] = SharedRefresh(1.0, clock=clock)
    loads = 0

    async def slow_load() -> int:
        nonlocal loads
        loads += 1
        clock.now += 1.5
        return loads

    assert await refresh.get(slow_load) == 1
    assert await refresh.get(slow_load) == 2


async def test_stored_values_are_served_and_an_older_store_does_not_replace_a_newer() -> None:
    """What the poller stores is handed out without a load; an older read never wins."""
    clock = Clock()
    refresh: SharedRefresh[str] = SharedRefresh(1.0, clock=clock)

    async def load() -> str:
        raise AssertionError("no load while a young value is held")

    refresh.store("read at 100")
    clock.now += 0.5
    refresh.store("read at 99.9", at=99.9)
    assert await refresh.get(load) == "read at 100"
    refresh.store("read at 100.5")
    assert await refresh.get(load) == "read at 100.5"


async def test_a_failed_load_reaches_every_waiter_and_the_next_get_loads_again() -> None:
    """All waiters of a failing load get its exception; the following get starts a new load."""
    refresh: SharedRefresh[str] = SharedRefresh(1.0)
    release = asyncio.Event()
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        await release.wait()
        if loads == 1:
            raise ConnectionError("Redis went away")
        return "back"

    waiters = [asyncio.create_task(refresh.get(load)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [repr(r) for r in results] == ["ConnectionError('Redis went away')"] * 3
    assert await refresh.get(load) == "back"
    assert loads == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_load() -> None:
    """Cancelling one waiter leaves the load running for the others, and its value is held."""
    refresh: SharedRefresh[str] = SharedRefresh(1.0)
    release = asyncio.Event()

    async def load() -> str:
        await release.wait()
        return "done"

    impatient = asyncio.create_task(refresh.get(load))
    patient = asyncio.create_task(refresh.get(load))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    release.set()
    assert await patient == "done"

    async def no_load() -> str:
        raise AssertionError("the value was held")

    assert await refresh.get(no_load) == "done"


async def test_aclose_cancels_a_load_in_flight_and_is_idempotent() -> None:
    """aclose() ends a pending load (its waiter sees the cancellation) and can be called twice."""
    refresh: SharedRefresh[str] = SharedRefresh(1.0)
    started = asyncio.Event()

    async def endless() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    waiter = asyncio.create_task(refresh.get(endless))
    await started.wait()
    await refresh.aclose()
    await refresh.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiter


class CountingRedis:
    """Answers PING and counts the calls."""

    def __init__(self) -> None:
        self.pings = 0

    async def ping(self) -> bool:
        self.pings += 1
        await asyncio.sleep(0.01)  # a round trip: concurrent probes overlap it
        return True


class DownPool:
    """A pool whose PostgreSQL is away."""

    def acquire(self) -> Any:
        raise OSError("connection refused")


async def test_readiness_is_one_check_shared_by_concurrent_probes_and_held_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty probes at once cost one check; a probe within the next second reuses it."""
    broker_checks = 0

    async def check_broker(settings: ServiceSettings) -> None:
        nonlocal broker_checks
        broker_checks += 1

    monkeypatch.setattr(health, "check_broker", check_broker)
    redis = CountingRedis()
    state = GatewayState(
        ServiceSettings(),
        redis,  # type: ignore[arg-type]
        DownPool(),
        Hub(10),
        MarketHistory(RecentBars(max_bars=10), _no_history),
        asyncio.Event(),
    )
    clock = Clock()
    state.cache.readiness = SharedRefresh(1.0, clock=clock)
    state.feed_ready.set()

    answers = await asyncio.gather(*(api.readyz(request(state=state)) for _ in range(20)))
    assert {a.status_code for a in answers} == {503}
    assert json.loads(answers[0].body) == {
        "status": "unhealthy",
        "broker": "ok",
        "redis": "ok",
        "database": "error: OSError('connection refused')",
        "feed": "ok",
    }
    assert (broker_checks, redis.pings) == (1, 1)
    clock.now += 0.9
    assert (await api.readyz(request(state=state))).status_code == 503
    assert (broker_checks, redis.pings) == (1, 1)
    clock.now += 0.2
    await api.readyz(request(state=state))
    assert (broker_checks, redis.pings) == (2, 2)


async def test_a_stale_value_is_served_at_once_while_it_is_refreshed() -> None:
    """Within `serve_stale_s` past its age, the held value is returned without waiting and one
    load starts behind it; past that, callers wait for a load again."""
    clock = Clock()
    refresh: SharedRefresh[int] = SharedRefresh(1.0, clock=clock, serve_stale_s=4.0)
    release = asyncio.Event()
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        await release.wait()
        return loads

    release.set()
    assert await refresh.get(load) == 1  # nothing held: waits
    release.clear()
    clock.now += 3.0
    # Stale: served at once, twice, by one load started in the background.
    assert [await refresh.get(load), await refresh.get(load)] == [1, 1]
    await asyncio.sleep(0)
    assert loads == 2
    release.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await refresh.get(load) == 2
    clock.now += 5.1  # too old to serve: wait for a new load
    release.clear()
    waiting = asyncio.create_task(refresh.get(load))
    await asyncio.sleep(0)
    assert not waiting.done()
    release.set()
    assert await waiting == 3


def board(kind: MetricKind, measure: RankMeasure, *metrics: str) -> RankBoard:
    """A board of `metrics` in that order, each with the same made-up stats."""
    measures = tuple((m, 1.0) for m in MEASURES_BY_KIND[kind])
    return RankBoard(
        kind,
        measure,
        tuple(RankEntry(m, market_of(m.rsplit(":", 1)[0]), measures, 1.0, 1) for m in metrics),
    )


async def test_rank_poller_stores_every_board_and_pushes_only_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each interval every board is stored anew; a changed one is pushed; a full read comes
    first and then only every FULL_READ_EVERY polls."""
    boards = {key: board(*key) for key in RANKINGS}
    reads: list[bool] = []
    read = asyncio.Condition()

    async def read_boards(
        client: object, held: dict[Ranking, RankBoard], reread_all: bool
    ) -> dict[Ranking, RankBoard]:
        reads.append(reread_all)
        async with read:
            read.notify_all()
        return dict(boards)

    monkeypatch.setattr(feed, "read_boards", read_boards)
    settings = ServiceSettings(gateway=GatewaySettings(rank_interval_ms=50))
    cache = ResponseCache(0.05)
    hub = Hub(10)
    published: list[RankBoard] = []
    publish = hub.publish_ranks

    def publish_ranks(pushed: RankBoard) -> None:
        published.append(pushed)
        publish(pushed)

    monkeypatch.setattr(hub, "publish_ranks", publish_ranks)
    price_cv = cache.ranks["price", "cv"]

    async def unread() -> RankBoard:
        raise AssertionError("the poller stored it")

    async def reads_at_least(count: int) -> None:
        async with asyncio.timeout(deadline(5)), read:
            await read.wait_for(lambda: len(reads) >= count)

    poller = asyncio.create_task(feed.run_rank_poller(settings, hub, object(), cache.ranks))  # type: ignore[arg-type]
    try:
        await reads_at_least(2)
        assert await price_cv.get(unread) is boards["price", "cv"]
        assert published == [boards[key] for key in RANKINGS]  # at the first poll only
        changed = board("price", "cv", "binance:btc-usdt:price")
        boards["price", "cv"] = changed
        await reads_at_least(len(reads) + 2)
        assert await price_cv.get(unread) is changed
        assert published[len(RANKINGS) :] == [changed]
        assert hub.latest_ranks["price", "cv"] is changed
        assert reads[:3] == [True, False, False]
    finally:
        poller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poller


async def test_rank_poller_stops_when_the_redis_client_swallows_its_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancellation caught inside a read (as redis-py's retries can) still ends the poller."""
    reading = asyncio.Event()
    swallowed = 0

    async def read_boards(
        client: object, held: dict[Ranking, RankBoard], reread_all: bool
    ) -> dict[Ranking, RankBoard]:
        nonlocal swallowed
        reading.set()
        if swallowed == 0:
            # A retried command: the caller never sees the cancellation.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            swallowed += 1
            return {key: board(*key) for key in RANKINGS}
        await asyncio.Event().wait()  # later reads: until cancelled, which they let through
        raise AssertionError("unreachable")

    monkeypatch.setattr(feed, "read_boards", read_boards)
    settings = ServiceSettings(gateway=GatewaySettings(rank_interval_ms=50))
    cache = ResponseCache(0.05)
    poller = asyncio.create_task(feed.run_rank_poller(settings, Hub(10), object(), cache.ranks))  # type: ignore[arg-type]
    await reading.wait()
    poller.cancel()
    try:
        done, _ = await asyncio.wait({poller}, timeout=deadline(5))
        assert done == {poller} and poller.cancelled()
    finally:
        poller.cancel()  # not swallowed a second time
        await asyncio.gather(poller, return_exceptions=True)


async def _no_history(market_id: str) -> list[Any]:
    """A history read these tests never make."""
    raise AssertionError("no history read expected")


def test_a_sized_memo_builds_once_and_keeps_within_its_budget() -> None:
    """A key is built once while held; past the byte budget the oldest views are dropped."""
    memo: SizedMemo[int, bytes] = SizedMemo(100, len)
    built: list[int] = []

    def build(key: int) -> bytes:
        built.append(key)
        return bytes(40)

    first = memo.get(1, lambda: build(1))
    assert memo.get(1, lambda: build(1)) is first and built == [1]
    memo.get(2, lambda: build(2))
    memo.get(3, lambda: build(3))  # 120 bytes: the oldest goes
    assert (len(memo), built) == (2, [1, 2, 3])
    memo.get(1, lambda: build(1))
    assert built == [1, 2, 3, 1]
    huge = SizedMemo[int, bytes](10, len)
    assert huge.get(1, lambda: bytes(50)) == bytes(50) and len(huge) == 1  # one entry is kept


def test_rank_queries_are_held_parsed_up_to_a_bound() -> None:
    """Parsed /api/ranks query strings are held by their bytes, all forgotten past the bound."""
    cache = ResponseCache(1.0)
    parsed = ("price", "logret", Selection())
    for number in range(MAX_RANK_QUERIES):
        cache.remember_rank_query(f"kind=price&x={number}".encode(), parsed)  # type: ignore[arg-type]
    assert len(cache.rank_queries) == MAX_RANK_QUERIES
    cache.remember_rank_query(b"kind=price", parsed)  # type: ignore[arg-type]
    assert cache.rank_queries == {b"kind=price": parsed}


async def test_ranks_answers_a_query_string_seen_before_from_its_parsed_form() -> None:
    """A valid /api/ranks query is parsed once and answered alike after; invalid ones are
    refused each time and never held."""
    state = GatewayState(
        ServiceSettings(),
        CountingRedis(),  # type: ignore[arg-type]
        DownPool(),
        Hub(10),
        MarketHistory(RecentBars(max_bars=10), _no_history),
        asyncio.Event(),
    )
    state.cache.ranks["price", "cv"].store(
        board("price", "cv", "binance:btc-usdt:price", "kraken:btc-usd:price")
    )

    def ranks(query: bytes) -> Request:
        asked = request(state=state)
        asked.scope["query_string"] = query
        return asked

    first = await api.get_ranks(ranks(b"kind=price&by=cv&quote=usdt"))
    assert list(state.cache.rank_queries) == [b"kind=price&by=cv&quote=usdt"]
    again = await api.get_ranks(ranks(b"kind=price&by=cv&quote=usdt"))
    assert (first.status_code, again.status_code) == (200, 200)
    assert first.body == again.body
    assert [r["metric"] for r in json.loads(again.body)["ranks"]] == ["binance:btc-usdt:price"]
    for bad, code in [
        (b"by=cv", "missing_kind"),
        (b"kind=nope", "bad_kind"),
        (b"kind=price&limit=0", "bad_limit"),
    ]:
        refused = await api.get_ranks(ranks(bad))
        assert (refused.status_code, json.loads(refused.body)["error"]) == (400, code)
    assert list(state.cache.rank_queries) == [b"kind=price&by=cv&quote=usdt"]
