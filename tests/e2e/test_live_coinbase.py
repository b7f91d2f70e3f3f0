"""The live source against a local Coinbase replaying the recorded `matches` session, end to end.

The real trades of SKL-USD and DASH-BTC from ../shared/data/captures/COINBASE.ws.28.0 are
re-sent in Coinbase's format with their times moved to the last minutes, so the watcher
aggregates them into minute bars now; the test aggregates the same frames independently.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import SHARED_DATA, make_data_dir
from tests.e2e.exchange_fakes import read_topic, rest_server
from tests.e2e.harness import Services
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import Tick

pytestmark = pytest.mark.e2e

M = 60_000
PRODUCTS = {"SKL-USD": "coinbase:skl-usd", "DASH-BTC": "coinbase:dash-btc"}


def captured_matches() -> list[dict[str, Any]]:
    """The recorded `last_match` and `match` messages of PRODUCTS, in the order received."""
    path = SHARED_DATA / "captures" / "COINBASE.ws.28.0"
    if not path.exists():
        pytest.skip(f"capture not found at {path}")
    messages = []
    for line in path.read_text().splitlines():
        _, _, frame = line.partition(": ")
        if '"match"' not in frame and '"last_match"' not in frame:
            continue
        message = json.loads(frame)
        if message["type"] in ("match", "last_match") and message["product_id"] in PRODUCTS:
            messages.append(message)
    return messages


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakeCoinbase:
    """`/products`, empty candles, and the feed replaying `trades` (already re-timed)."""

    trades: list[dict[str, Any]]
    subscribed: list[dict[str, Any]] = field(default_factory=list)

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/products":
            return 200, [
                {
                    "id": p,
                    "base_currency": p[: p.index("-")],
                    "quote_currency": p[p.index("-") + 1 :],
                    "status": "online",
                }
                for p in PRODUCTS
            ]
        return 200, []  # no candles: the minutes before the trades stay without bars

    async def ws(self, connection: ServerConnection) -> None:
        async with asyncio.timeout(5):  # Coinbase drops clients that do not subscribe in 5 s
            self.subscribed.append(json.loads(await connection.recv()))
        await connection.send(json.dumps({"type": "subscriptions", "channels": []}))
        for trade in self.trades:
            await connection.send(json.dumps(trade))
        await connection.wait_closed()


def aggregate(trades: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, ...]]:
    """(market, minute) -> (open, high, low, close, volume, count), by a plain loop; `last_match`
    (a trade from before the subscription) and a trade sent twice are not counted."""
    bars: dict[tuple[str, int], list[Any]] = {}
    seen: dict[str, int] = {}
    for trade in trades:
        if trade["type"] != "match" or trade["trade_id"] <= seen.get(trade["product_id"], -1):
            continue
        seen[trade["product_id"]] = trade["trade_id"]
        moment = datetime.strptime(trade["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        ms = int(moment.replace(microsecond=0).timestamp()) * 1000 + moment.microsecond // 1000
        key = (PRODUCTS[trade["product_id"]], ms - ms % M)
        price, size = float(trade["price"]), float(trade["size"])
        bar = bars.get(key)
        if bar is None:
            bars[key] = [price, price, price, price, size, 1]
        else:
            bar[1], bar[2], bar[3] = max(bar[1], price), min(bar[2], price), price
            bar[4] += size
            bar[5] += 1
    return {key: tuple(bar) for key, bar in bars.items()}


async def test_live_coinbase_aggregates_recorded_trades_into_bars(infra: LocalInfra) -> None:
    """Closed bars equal an independent aggregation of the trades sent, minute by minute."""
    matches = captured_matches()
    now = time.time_ns() // 1_000_000
    # Spread the recorded trades, in their order, over the two minutes before this one, and
    # end with one trade per product in this minute, which closes the earlier bars.
    first = now - now % M - 2 * M
    step = (2 * M - 1) // len(matches)
    trades = [{**m, "time": iso(first + i * step)} for i, m in enumerate(matches)]
    last_ids = {}
    for m in matches:
        last_ids[m["product_id"]] = max(last_ids.get(m["product_id"], 0), m["trade_id"])
    closing = now - now % M + 1
    trades += [
        {**matches[0], "type": "match", "product_id": p, "trade_id": last_ids[p] + 1}
        | {"time": iso(closing)}
        for p in PRODUCTS
    ]
    exchange = FakeCoinbase(trades)
    data_dir = make_data_dir("tickstream-live-cb-logs-")
    async with (
        rest_server(exchange.route) as rest_url,
        serve(exchange.ws, "127.0.0.1", 0) as ws_server,
    ):
        env = {
            **os.environ,
            **infra.environment(),
            "WATCHER_SOURCE": "live",
            "WATCHER_MARKETS": ",".join(PRODUCTS.values()),
            "WATCHER_BACKFILL_MINUTES": "10",
            "COINBASE_WS_URL": f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}",
            "COINBASE_REST_URL": rest_url,
        }
        services = Services(env, data_dir)
        services.start("watcher")
        expected = aggregate(trades)
        closed_wanted = {key for key in expected if key[1] < first + 2 * M}
        results: dict[str, list[Tick]] = {}
        try:
            for market in PRODUCTS.values():
                topic = f"ticks.{market.replace(':', '.')}"

                def done(ticks: list[Tick], market: str = market) -> bool:
                    closed = {(t.market, t.minute) for t in ticks if t.closed}
                    return {k for k in closed_wanted if k[0] == market} <= closed

                results[market] = await read_topic(infra.kafka_bootstrap_servers, topic, done, 60)
            services.assert_running()
        finally:
            codes = services.stop_all()
            log = services.tail("watcher")
            shutil.rmtree(data_dir, ignore_errors=True)
    assert codes == {"watcher": 0}, log
    assert exchange.subscribed == [
        {"type": "subscribe", "product_ids": sorted(PRODUCTS), "channels": ["matches", "heartbeat"]}
    ]
    for market, ticks in results.items():
        closed = [t for t in ticks if t.closed]
        assert len({t.minute for t in closed}) == len(closed), "a minute closed twice"
        assert {(t.market, t.minute) for t in closed} >= {
            k for k in closed_wanted if k[0] == market
        }
        for tick in closed:
            # The minute of the closing trades may close too if the test runs past its end.
            assert (
                tick.open,
                tick.high,
                tick.low,
                tick.close,
                tick.volume,
                tick.trades,
            ) == expected[tick.market, tick.minute]
        seqs = [t.seq for t in ticks]
        assert seqs == sorted(set(seqs))
