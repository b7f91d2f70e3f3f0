"""The live source against a local OKX (v5 REST and the business WebSocket in OKX's formats).

The real watcher process resolves `okx:*-usdt` from the fake instruments (live SPOT only),
backfills a day of closed minutes from candles and, for the oldest page, history-candles,
streams candle1m pushes (forming, then confirmed), survives bad frames, a close with 4004, a
silent connection, notice 64008 and rate limits (HTTP 429 and OKX's HTTP 200 with code 50011),
and publishes to the real broker; the test reads the topics back.
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

import pytest

from tests.e2e.exchange_fakes import (
    FakeOkx,
    Outage,
    Throttle,
    assert_no_gap,
    closed_once,
    history,
    live_watcher,
    okx_instrument,
    read_all,
    read_through_outage,
    topic_of,
)
from tickstream_shared.local_infra import LocalInfra

pytestmark = pytest.mark.e2e

M = 60_000
MARKETS = {"BTC-USDT": "okx:btc-usdt", "ETH-USDT": "okx:eth-usdt"}
INSTRUMENTS = "/api/v5/public/instruments"
CANDLES = "/api/v5/market/candles"
HISTORY = "/api/v5/market/history-candles"


async def test_live_okx_backfills_a_day_streams_and_recovers(infra: LocalInfra) -> None:
    """Through a 4004 close with bad frames, a silent connection, notice 64008 and rate limits,
    every minute OKX traded of each `okx:*-usdt` market is closed exactly once, with its
    values: confirmed pushes and REST rows, never a forming row as if closed."""
    now = time.time_ns() // 1_000_000
    outage = Outage(now - now % M, asks_reconnect=True)
    exchange = FakeOkx(
        outage,
        {
            "BTC-USDT": history(outage.now_minute, 61_000.0),
            "ETH-USDT": history(outage.now_minute, 3_400.0),
        },
        others=[
            okx_instrument("NEW-USDT", state="preopen"),
            okx_instrument("OLD-USDT", state="suspend"),
            okx_instrument("BTC-USDC"),
            okx_instrument("BTC-USDT-SWAP", inst_type="SWAP"),
        ],
        rate_limited=frozenset({CANDLES}),
    )
    rest = Throttle(exchange.route, frozenset({INSTRUMENTS}))
    async with live_watcher(
        infra,
        "okx",
        rest,
        exchange.ws,
        WATCHER_MARKETS="okx:*-usdt",
        WATCHER_BACKFILL_MINUTES="1440",
        WATCHER_FEED_SILENCE_MS="2000",
    ) as watcher:
        for inst, market in MARKETS.items():
            bars = exchange.bars[inst]
            await read_through_outage(
                infra.kafka_bootstrap_servers, watcher, outage, bars, market, 60
            )
    log = watcher.log_text
    for inst, market in MARKETS.items():
        ticks = await read_all(infra.kafka_bootstrap_servers, topic_of(market))
        assert_no_gap(closed_once(ticks), exchange.expected(inst), outage.now_minute)
    assert "watching 2 live markets: ['okx:btc-usdt', 'okx:eth-usdt']" in log
    assert outage.connections == len(outage.steps) == 4
    assert exchange.subscribed == [list(MARKETS)] * 4
    assert log.count("okx feed: skipping bad frame") == 2
    assert log.count("okx feed: ConnectionClosedError: received 4004") == 1
    assert log.count("okx feed: TimeoutError: no frame for 2s") == 1  # the silent one only
    assert log.count("okx feed: exchange asks to reconnect: okx notice 64008") == 1
    # Both rate limits waited out and asked again; no backfill given up.
    assert log.count(f"{INSTRUMENTS}?{urlencode({'instType': 'SPOT'})}: HTTP 429, waiting") == 1
    assert log.count("HTTP 200, rate limit in the body, waiting 1.0s") == 1
    assert "backfill of okx:btc-usdt stopped" not in log
    assert "backfill of okx:eth-usdt stopped" not in log
    # A day back: the page reaching past OKX's latest 1,440 rows (less a margin) went to
    # history-candles for at most 100 minutes, every other to candles for at most 300.
    oldest_recent = outage.now_minute - 1435 * M
    asked = [(path, q) for path, q in exchange.requests if path in (CANDLES, HISTORY)]
    assert {q["instId"] for path, q in asked if path == HISTORY} == set(MARKETS)
    for path, query in asked:
        first, last = int(query["before"]) + 1, int(query["after"]) - 1
        size = 300 if path == CANDLES else 100
        assert query["limit"] == str(size) and query["bar"] == "1m"
        assert last - first <= (size - 1) * M
        assert (path == HISTORY) == (first < oldest_recent), (path, query)
