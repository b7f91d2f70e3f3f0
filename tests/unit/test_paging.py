"""REST paging and pacing without I/O: pages planned per range, requests paced per endpoint."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tickstream_watcher.exchange import RecentPages, plan_pages, recent_from
from tickstream_watcher.okx import SPEC as OKX
from tickstream_watcher.okx import OkxProtocol
from tickstream_watcher.registry import EXCHANGES
from tickstream_watcher.rest import Pacer

M = 60_000
CURRENT = 28_333_334 * M  # a minute's open
NOW = CURRENT + 12_345  # within that minute
DAY = 1440


def test_okx_plans_a_day_as_one_history_page_and_five_candles_pages() -> None:
    """A day of closed minutes: the 5 oldest (beyond the latest 1,435) in one history page,
    the 1,435 recent ones in 300-minute pages; each page within one endpoint's reach."""
    pages = OKX.pages(CURRENT - DAY * M, CURRENT, NOW)
    boundary = CURRENT - 1435 * M
    assert pages == [
        (CURRENT - DAY * M, boundary - M),
        (boundary, boundary + 299 * M),
        (boundary + 300 * M, boundary + 599 * M),
        (boundary + 600 * M, boundary + 899 * M),
        (boundary + 900 * M, boundary + 1199 * M),
        (boundary + 1200 * M, CURRENT - M),
    ]
    protocol = OkxProtocol({}, clock_ms=lambda: NOW)
    paths = [protocol.candles_path("BTC-USDT", first, last) for first, last in pages]
    assert [path.split("?")[0].rsplit("/", 1)[1] for path in paths] == [
        "history-candles",
        *["candles"] * 5,
    ]
    assert "limit=100" in paths[0] and all("limit=300" in path for path in paths[1:])


def test_the_horizon_boundary_is_exact_to_the_minute() -> None:
    """A range starting one minute before the horizon asks that minute alone from the old
    pages; one starting at the horizon is all recent; the horizon moves with the minute."""
    boundary = recent_from(NOW, 1435)
    assert boundary == CURRENT - 1435 * M == recent_from(CURRENT, 1435)
    assert recent_from(CURRENT + M, 1435) == boundary + M
    assert OKX.pages(boundary - M, boundary + 10 * M, NOW) == [
        (boundary - M, boundary - M),
        (boundary, boundary + 9 * M),
    ]
    assert OKX.pages(boundary, boundary + 10 * M, NOW) == [(boundary, boundary + 9 * M)]
    # A minute later the same first minute is beyond the horizon: an old page of 100 at most.
    assert OKX.pages(boundary, boundary + 400 * M, NOW + M) == [
        (boundary, boundary),
        (boundary + M, boundary + 300 * M),
        (boundary + 301 * M, boundary + 399 * M),
    ]


def test_a_range_entirely_older_than_the_horizon_is_paged_by_the_old_size() -> None:
    """Two days back: old pages of 100 up to the horizon, then the recent size."""
    pages = OKX.pages(CURRENT - 2 * DAY * M, CURRENT - 1500 * M, NOW)
    assert pages[0] == (CURRENT - 2 * DAY * M, CURRENT - 2 * DAY * M + 99 * M)
    assert all(last - first <= 99 * M for first, last in pages)
    assert pages[-1][1] == CURRENT - 1501 * M


def test_okx_candles_path_never_cuts_a_long_page_planned_a_minute_earlier() -> None:
    """A 300-minute page planned at the horizon just before a minute began is asked from
    candles (which still holds it: the margin), never from history-candles' 100 rows."""
    boundary = recent_from(NOW, 1435)
    later = OkxProtocol({}, clock_ms=lambda: NOW + M)
    path = later.candles_path("BTC-USDT", boundary, boundary + 299 * M)
    assert path.startswith("/api/v5/market/candles?") and "limit=300" in path
    short = later.candles_path("BTC-USDT", boundary, boundary + 99 * M)
    assert short.startswith("/api/v5/market/history-candles?") and "limit=100" in short


def test_exchanges_with_one_page_size_page_as_before() -> None:
    """Binance, Coinbase and Kraken: the range in pages of their one size, from its start."""
    for name in ("binance", "coinbase", "kraken"):
        spec = EXCHANGES[name]
        assert spec.recent_pages is None and not spec.rest_paces
        size = spec.page_minutes * M
        first, end = CURRENT - DAY * M, CURRENT
        expected = [(s, min(s + size, end) - M) for s in range(first, end, size)]
        assert spec.pages(first, end, NOW) == expected


@given(
    first=st.integers(0, 3 * DAY),
    length=st.integers(1, 3 * DAY),
    horizon=st.integers(0, 2 * DAY),
    old=st.integers(1, 1000),
    recent=st.integers(1, 1000),
    shift=st.integers(0, M - 1),
)
def test_pages_cover_the_range_once_and_never_straddle_the_horizon(
    first: int, length: int, horizon: int, old: int, recent: int, shift: int
) -> None:
    """Contiguous pages, oldest first, exactly covering the range, each of its side's size."""
    start, end = CURRENT - first * M, CURRENT - first * M + length * M
    now = CURRENT + shift
    pages = plan_pages(old, RecentPages(horizon, recent), start, end, now)
    boundary = recent_from(now, horizon)
    assert pages[0][0] == start and pages[-1][1] == end - M
    for (_, last), (next_first, _) in itertools.pairwise(pages):
        assert next_first == last + M
    for page_first, page_last in pages:
        assert page_first <= page_last
        if page_first >= boundary:
            assert page_last - page_first < recent * M
        else:
            assert page_last < boundary and page_last - page_first < old * M


def test_pacer_spaces_each_endpoint_class_on_its_own() -> None:
    """Named paths keep their own interval; all other paths share the default one (intervals
    exact in binary, so the delays are exact)."""
    pacer = Pacer(0.25, {"/api/v5/market/candles": 0.125})
    candles = "/api/v5/market/candles?instId=BTC-USDT&limit=300"
    history = "/api/v5/market/history-candles?instId=BTC-USDT"
    listing = "/api/v5/public/instruments?instType=SPOT"
    assert [pacer.reserve(candles, 8.0) for _ in range(3)] == [0.0, 0.125, 0.25]
    assert pacer.reserve(history, 8.0) == 0.0  # not behind the candles queue
    assert pacer.reserve(listing, 8.0) == 0.25  # shares the default class with history
    assert pacer.reserve(history, 8.0) == 0.5
    # Time passing frees the slots: a request later than every booking waits for none.
    assert pacer.reserve(candles, 9.0) == 0.0
    assert pacer.reserve(candles, 9.0) == 0.125


def test_pacer_with_one_pace_spaces_every_path_alike() -> None:
    """Without named paths every request shares one interval (Binance, Coinbase, Kraken)."""
    pacer = Pacer(0.25)
    delays = [pacer.reserve(path, 4.0) for path in ("/a?x=1", "/b", "/a?x=2")]
    assert delays == [0.0, 0.25, 0.5]
    assert pacer.reserve("/c", 4.5) == 0.25


def test_okx_paces_candles_at_20_per_s_and_its_other_endpoints_at_10() -> None:
    """OKX's documented per-endpoint limits: candles 40 per 2 s, the others 20 per 2 s."""
    assert OKX.rest_paces == {
        "/api/v5/market/candles": 0.05,
        "/api/v5/market/history-candles": 0.1,
    }
    assert OKX.rest_interval_s == 0.1  # instruments, the other endpoint used
