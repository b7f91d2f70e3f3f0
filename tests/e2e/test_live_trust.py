"""The trust rules end to end against a local Binance: the exchange's final word, frames dated
ahead, implausible values, a bad REST row and reconciliation, all visible in /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

from tests.conftest import deadline
from tests.e2e.exchange_fakes import (
    final_bars,
    free_port,
    live_watcher,
    read_all,
    read_topic,
    topic_of,
)
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import Tick

pytestmark = pytest.mark.e2e

M = 60_000
MARKET = "binance:trst-usdt"
HISTORY = 20  # minutes REST has before the streamed ones


@dataclass
class TrustedBinance:
    """REST candles as ground truth, and a stream that lies in the ways the issue lists.

    Minutes (C = the current minute at the start): C-3 streams volume 1.0, then C-2 starts,
    then C-3's final kline says 1.2 (the final word, REST agrees); C-2's final kline says 2.0
    where REST says 2.5 (reconciliation corrects it); a kline dated C+4 (refused); C-1 first
    with a price 10^6 times the market's (held), then its real values (REST confirms those).
    The first REST page has one invalid row, C-10, and the first page holding C-2 too; later
    pages have them right.
    """

    now_minute: int
    truth: dict[int, tuple[str, str]] = field(default_factory=dict)  # minute -> (close, volume)
    klines_requests: int = 0
    # Minutes whose row is invalid the first time it is served: C-10 in the backfill's page,
    # C-2 in the reconciliation that must correct it (so it has to ask again).
    bad_once: set[int] = field(default_factory=set)
    backfilled: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        c = self.now_minute
        for ago in range(HISTORY, 0, -1):
            self.truth[c - ago * M] = ("0.35000000", f"{10 + ago}.00000000")
        self.truth[c - 3 * M] = ("0.35000000", "1.20000000")
        self.truth[c - 2 * M] = ("0.35000000", "2.50000000")
        self.truth[c - M] = ("0.36000000", "3.00000000")
        self.bad_once = {c - 10 * M, c - 2 * M}

    def row(self, minute: int) -> list[Any]:
        close, volume = self.truth[minute]
        return [minute, close, close, close, close, volume, minute + M - 1, "1", 7, "0", "0", "0"]

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/exchangeInfo":
            trst = {
                "symbol": "TRSTUSDT",
                "status": "TRADING",
                "baseAsset": "TRST",
                "quoteAsset": "USDT",
            }
            return 200, {"symbols": [trst]}
        if path == "/api/v3/klines" and query.get("symbol") == "TRSTUSDT":
            self.klines_requests += 1
            start, end = int(query["startTime"]), int(query["endTime"])
            rows = [self.row(m) for m in sorted(self.truth) if start <= m <= end]
            for row in rows:
                if row[0] in self.bad_once:
                    self.bad_once.discard(row[0])
                    row[1] = "nan"
            if self.klines_requests == 1:
                asyncio.get_running_loop().call_later(0.2, self.backfilled.set)
            return 200, rows
        return 400, {"code": -1121, "msg": "Invalid symbol."}

    def kline(self, minute: int, close: str, volume: str, *, final: bool, at: int) -> str:
        k = {
            "t": minute,
            "T": minute + M - 1,
            "s": "TRSTUSDT",
            "i": "1m",
            "o": close,
            "c": close,
            "h": close,
            "l": close,
            "v": volume,
            "n": 7,
            "x": final,
        }
        data = {"e": "kline", "E": at, "s": "TRSTUSDT", "k": k}
        return json.dumps({"stream": "trstusdt@kline_1m", "data": data})

    async def ws(self, connection: ServerConnection) -> None:
        c, now = self.now_minute, time.time_ns() // 1_000_000
        send = connection.send
        await send(self.kline(c - 3 * M, "0.35000000", "1.00000000", final=False, at=now))
        await send(self.kline(c - 2 * M, "0.35000000", "0.50000000", final=False, at=now))
        await send(self.kline(c - 3 * M, "0.35000000", "1.20000000", final=True, at=now))
        await send(self.kline(c - 2 * M, "0.35000000", "2.00000000", final=True, at=now))
        await send(self.kline(c + 4 * M, "0.35000000", "0.20000000", final=False, at=now + 4 * M))
        await asyncio.wait_for(self.backfilled.wait(), deadline(30))  # a reference exists now
        now = time.time_ns() // 1_000_000
        await send(self.kline(c - M, "350000.00000000", "3.00000000", final=False, at=now))
        await send(self.kline(c - M, "0.36000000", "2.90000000", final=False, at=now + 1))
        await send(self.kline(c - M, "0.36000000", "3.00000000", final=True, at=now + 2))
        await connection.wait_closed()


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("tickstream_live_") and 'exchange="binance"' in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values


async def test_the_exchanges_word_is_what_is_stored_and_every_rule_is_counted(
    infra: LocalInfra,
) -> None:
    """Every stored minute equals REST's candle; the lies were refused, held or corrected,
    and /metrics counts each of them."""
    now = time.time_ns() // 1_000_000
    if now % M > 45_000:  # the script needs its minutes to stay where they are for a while
        await asyncio.sleep((M - now % M) / 1000 + 0.5)
        now = time.time_ns() // 1_000_000
    exchange = TrustedBinance(now_minute=now - now % M)
    port = free_port()
    async with live_watcher(
        infra,
        "binance",
        exchange.route,
        exchange.ws,
        WATCHER_MARKETS=MARKET,
        WATCHER_BACKFILL_MINUTES="30",
        WATCHER_RECONCILE_AFTER_MS="1000",
        WATCHER_RECONCILE_SETTLE_MS="0",
        WATCHER_METRICS_PORT=str(port),
    ):
        truth = {m: (float(c), float(v)) for m, (c, v) in exchange.truth.items()}

        def stored_equals_truth(ticks: list[Tick]) -> bool:
            final = final_bars(ticks)
            return {m: (t.close, t.volume) for m, t in final.items() if m in truth} == truth

        ticks = await read_topic(
            infra.kafka_bootstrap_servers, topic_of(MARKET), stored_equals_truth, within=90
        )
        counters = await asyncio.to_thread(_scrape, port)
    ticks = await read_all(infra.kafka_bootstrap_servers, topic_of(MARKET))
    final = final_bars(ticks)
    assert {m: (t.close, t.volume) for m, t in final.items()} == truth
    assert max(t.close for t in ticks) < 1.0, "the implausible price was published"
    assert exchange.now_minute + 4 * M not in {t.minute for t in ticks}
    # Event time never runs ahead of the watcher's clock: the shared clock cannot jump.
    assert all(t.exchange_ts <= t.received_ts for t in ticks)
    seqs = [t.seq for t in ticks]
    assert seqs == sorted(set(seqs))
    assert counters["tickstream_live_ahead_total"] == 1
    assert counters["tickstream_live_implausible_total"] == 1
    assert counters["tickstream_live_bad_rest_rows_total"] == 2
    assert counters["tickstream_live_filled_total"] == 1  # C-10, after the bad row
    # C-3 by its final kline, C-2 by reconciliation.
    assert counters["tickstream_live_corrected_total"] == 2
    assert counters["tickstream_live_repaired_total"] == 1  # C-1, confirmed by REST
