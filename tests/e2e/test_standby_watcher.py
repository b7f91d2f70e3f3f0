"""Two watchers of one group against a local Binance: the standby takes over from a killed one.

The fake exchange runs its minutes fast (one a second, in the past), so that many bars close
in a short test: each connection gets the final kline of every minute that ends while it is
open. Its REST candles carry a different volume than its stream, so a minute closed once from
the stream (by one watcher) and again from REST (by the other) would show as a conflict.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import deadline, make_data_dir
from tests.e2e.exchange_fakes import read_topic, rest_server
from tests.e2e.harness import Services
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import Tick

pytestmark = pytest.mark.e2e

M = 60_000
TOPIC = "ticks.binance.ark-usdt"
TAKEOVER_S = 15


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def stream_volume(minute: int) -> str:
    return f"{5 + (minute // M) % 7}.0"


def rest_volume(minute: int) -> str:
    return f"{105 + (minute // M) % 7}.0"


def price(minute: int) -> str:
    return f"{0.5 + (minute // M) % 11 / 1000:.4f}"


@dataclass
class FastBinance:
    """Binance whose minutes pass once a second, starting 40 real minutes ago."""

    started: float = field(default_factory=time.monotonic)
    origin: int = field(default_factory=lambda: (now_ms() // M - 40) * M)
    connections: int = 0

    def current(self) -> int:
        """The minute forming at the exchange now."""
        return self.origin + int(time.monotonic() - self.started) * M

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/exchangeInfo":
            symbol = {"symbol": "ARKUSDT", "status": "TRADING", "baseAsset": "ARK"}
            return 200, {"symbols": [{**symbol, "quoteAsset": "USDT"}]}
        if path == "/api/v3/klines":
            first = self.origin - 10 * M  # ten minutes of history before the stream's start
            start, end = max(int(query["startTime"]), first), int(query["endTime"])
            closed_before = self.current()
            rows = []
            for minute in range(start - start % M, min(end + 1, closed_before), M):
                if minute < start:
                    continue
                p, v = price(minute), rest_volume(minute)
                rows.append([minute, p, p, p, p, v, minute + M - 1, "1", 3, "0", "0", "0"])
            return 200, rows
        return 400, {"code": -1121, "msg": "Invalid symbol."}

    def final_kline(self, minute: int) -> str:
        p = price(minute)
        k = {"t": minute, "T": minute + M - 1, "s": "ARKUSDT", "i": "1m", "f": 1, "L": 2}
        k |= {"o": p, "c": p, "h": p, "l": p, "v": stream_volume(minute), "n": 2, "x": True}
        k |= {"q": "1", "V": "0", "Q": "0", "B": "0"}
        data = {"e": "kline", "E": now_ms(), "s": "ARKUSDT", "k": k}
        return json.dumps({"stream": "arkusdt@kline_1m", "data": data})

    async def ws(self, connection: ServerConnection) -> None:
        self.connections += 1
        sent = self.current() - 2 * M
        while True:
            ended = self.current() - M
            while sent < ended:
                sent += M
                await connection.send(self.final_kline(sent))
            try:
                await asyncio.wait_for(connection.wait_closed(), timeout=0.2)
                return
            except TimeoutError:
                pass


async def test_standby_takes_over_without_a_gap_or_a_conflicting_bar(infra: LocalInfra) -> None:
    """Killed active watcher: the standby publishes within 15 s, every minute closed once."""
    exchange = FastBinance()
    data_dir = make_data_dir("tickstream-standby-logs-")
    async with (
        rest_server(exchange.route) as rest_url,
        serve(exchange.ws, "127.0.0.1", 0) as ws_server,
    ):
        env = {
            **os.environ,
            **infra.environment(),
            "WATCHER_SOURCE": "live",
            "WATCHER_MARKETS": "binance:ark-usdt",
            "WATCHER_BACKFILL_MINUTES": "60",
            # REST and stream differ on purpose (to expose a minute closed twice); with
            # reconciliation REST's word would rightly replace the stream's.
            "WATCHER_RECONCILE_AFTER_MS": "0",
            "BINANCE_WS_URL": f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}",
            "BINANCE_REST_URL": rest_url,
        }
        services = Services(env, data_dir)
        services.start("watcher", instance="first")
        try:
            # The first publishes its backfill and some streamed minutes; the second stands by.
            await read_topic(
                infra.kafka_bootstrap_servers,
                TOPIC,
                lambda ticks: sum(t.closed and t.volume < 100 for t in ticks) >= 3,
                within=deadline(30),
            )
            services.start("watcher", instance="second")
            await _log_says(services, "second", "standing by")
            first = services.processes.pop("first")
            first.send_signal(signal.SIGKILL)
            killed_ms = now_ms()
            first.wait()

            def streamed_by_second(ticks: list[Tick]) -> bool:
                later = [t for t in ticks if t.closed and t.received_ts > killed_ms]
                return sum(t.volume < 100 for t in later) >= 3

            ticks = await read_topic(
                infra.kafka_bootstrap_servers, TOPIC, streamed_by_second, within=deadline(60)
            )
            services.assert_running()
        finally:
            codes = services.stop_all()
            log = services.tail("second")
            shutil.rmtree(data_dir, ignore_errors=True)
    assert codes["second"] == 0, log
    assert exchange.connections == 2

    taken_over_ms = min(t.received_ts for t in ticks if t.received_ts > killed_ms)
    assert taken_over_ms - killed_ms <= TAKEOVER_S * 1000, log

    # Each minute is closed with one set of values; an identical copy (the previous holder's
    # last close, published again as it was) is the only repeat allowed.
    closed: dict[int, list[Tick]] = {}
    for tick in ticks:
        if tick.closed:
            closed.setdefault(tick.minute, []).append(tick)
    repeats = {minute: bars for minute, bars in closed.items() if len(bars) > 1}
    assert all(len(set(bars)) == 1 for bars in repeats.values()), repeats
    assert len(repeats) <= 1, repeats
    # No gap: every minute from the first backfilled one to the newest closed one.
    minutes = sorted(closed)
    assert minutes == list(range(minutes[0], minutes[-1] + M, M))
    assert minutes[0] == exchange.origin - 10 * M
    for minute, (bar, *_) in closed.items():
        assert bar.volume in (float(stream_volume(minute)), float(rest_volume(minute)))
        assert bar.close == float(price(minute))
    # seq grows per market, leaving out exact copies of earlier records.
    distinct: list[Tick] = []
    for tick in ticks:
        if tick not in distinct[-50:]:
            distinct.append(tick)
    seqs = [t.seq for t in distinct]
    assert seqs == sorted(set(seqs))


async def _log_says(services: Services, instance: str, text: str) -> None:
    async with asyncio.timeout(deadline(30)):
        while text not in (services.log_dir / f"{instance}.log").read_text(errors="replace"):
            services.assert_running()
            await asyncio.sleep(0.1)
