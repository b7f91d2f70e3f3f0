"""The live source against a local Coinbase replaying the recorded `matches` session, end to end.

The real trades of SKL-USD and DASH-BTC from ../shared/data/captures/COINBASE.ws.28.0 are
re-sent in Coinbase's format with their times moved to the last minutes, so the watcher
aggregates them into minute bars now; the test aggregates the same frames independently. REST
candles fill the minutes before, in pages of Coinbase's 300 rows. A second test takes one
market through a dropped and a silent connection, rate limits, bad frames and a refused product.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

from tests.conftest import SHARED_DATA
from tests.e2e.exchange_fakes import (
    Answer,
    BarValues,
    Outage,
    Throttle,
    assert_no_gap,
    assert_waited_out,
    closed_once,
    history,
    keep_sending,
    live_watcher,
    read_all,
    read_topic,
    topic_of,
)
from tickstream_shared.local_infra import LocalInfra
from tickstream_shared.schemas import Tick

pytestmark = pytest.mark.e2e

M = 60_000
PRODUCTS = {"SKL-USD": "coinbase:skl-usd", "DASH-BTC": "coinbase:dash-btc"}
# Coinbase answers at most this many candles and refuses a longer span.
MAX_CANDLES = 300


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


def ms_of(text: str) -> int:
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(moment.replace(microsecond=0).timestamp()) * 1000 + moment.microsecond // 1000


def products(ids: list[str]) -> list[dict[str, Any]]:
    """`/products` entries of `ids`, all online."""
    return [
        {
            "id": p,
            "base_currency": p[: p.index("-")],
            "quote_currency": p[p.index("-") + 1 :],
            "status": "online",
        }
        for p in ids
    ]


def candles(query: dict[str, str], rows: dict[int, list[float]], before: int) -> Answer:
    """Coinbase's answer to a candles request: the `[time, low, high, open, close, volume]`
    rows from start to end (both in) and before `before`, newest first; a span of more than
    MAX_CANDLES minutes is refused, as Coinbase refuses it."""
    start, end = (
        int(datetime.strptime(query[k], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
        * 1000
        for k in ("start", "end")
    )
    if query.get("granularity") != "60" or (end - start) // M + 1 > MAX_CANDLES:
        return 400, {"message": "granularity too small for the requested time range"}
    minutes = [m for m in sorted(rows, reverse=True) if start <= m <= end and m < before]
    return 200, [[m // 1000, *rows[m]] for m in minutes]


@dataclass
class FakeCoinbase:
    """`/products`, candles before the trades, and the feed replaying `trades` (re-timed)."""

    trades: list[dict[str, Any]]
    rows: dict[str, dict[int, list[float]]]  # product -> minute -> low, high, open, close, volume
    before: int  # REST has nothing from this minute on (first: the trades' first minute)
    subscribed: list[dict[str, Any]] = field(default_factory=list)
    candle_requests: dict[str, int] = field(default_factory=dict)

    def route(self, path: str, query: dict[str, str]) -> Answer:
        if path == "/products":
            return 200, products(list(PRODUCTS))
        product = path.removeprefix("/products/").removesuffix("/candles")
        self.candle_requests[product] = self.candle_requests.get(product, 0) + 1
        return candles(query, self.rows[product], self.before)

    async def ws(self, connection: ServerConnection) -> None:
        async with asyncio.timeout(5):  # Coinbase drops clients that do not subscribe in 5 s
            self.subscribed.append(json.loads(await connection.recv()))
        await connection.send(json.dumps({"type": "subscriptions", "channels": []}))
        for trade in self.trades:
            await connection.send(json.dumps(trade))
        # From now on REST has the candles of the trades' minutes (Coinbase's own aggregation),
        # which the watcher asks for the first minute it saw (its earlier trades were missed).
        now = time.time_ns() // 1_000_000
        for (product, minute), bar in aggregate(self.trades).items():
            open_, high, low, close, volume = bar[:5]
            self.rows[product][minute] = [low, high, open_, close, volume]
        self.before = now - now % M
        await connection.wait_closed()


def aggregate(trades: list[dict[str, Any]]) -> dict[tuple[str, int], BarValues]:
    """(product, minute) -> the bar of its matches, by a plain loop; `last_match` (a trade from
    before the subscription) and a trade sent twice are not counted."""
    bars: dict[tuple[str, int], list[Any]] = {}
    seen: dict[str, int] = {}
    for trade in trades:
        if trade["type"] != "match" or trade["trade_id"] <= seen.get(trade["product_id"], -1):
            continue
        seen[trade["product_id"]] = trade["trade_id"]
        ms = ms_of(trade["time"])
        key = (trade["product_id"], ms - ms % M)
        price, size = float(trade["price"]), float(trade["size"])
        bar = bars.get(key)
        if bar is None:
            bars[key] = [price, price, price, price, size, 1, ms]
        else:
            bar[1], bar[2], bar[3] = max(bar[1], price), min(bar[2], price), price
            bar[4] += size
            bar[5] += 1
            bar[6] = max(bar[6], ms)
    return {key: tuple(bar) for key, bar in bars.items()}  # type: ignore[misc]


def candle_rows(start: int, before: int, level: float) -> dict[int, list[float]]:
    """Candles every 7th minute from `start`, and in the minute just before `before`."""
    rows = {}
    for minute in [*range(start, before - M, 7 * M), before - M]:
        p = round(level * (1 + (minute // M) % 89 / 1000), 8)
        rows[minute] = [round(p * 0.99, 8), round(p * 1.02, 8), p, round(p * 1.01, 8), 3.25]
    return rows


def rest_bar(minute: int, row: list[float]) -> BarValues:
    """What a backfilled bar of candle `row` carries: no trade count, stamped at its end."""
    low, high, open_, close, volume = row
    return (open_, high, low, close, volume, None, minute + M)


async def test_live_coinbase_backfills_and_aggregates_recorded_trades_into_bars(
    infra: LocalInfra,
) -> None:
    """Closed bars equal an independent aggregation of the trades sent, minute by minute, after
    the REST candles of the 7 hours before, fetched in pages Coinbase accepts."""
    matches = captured_matches()
    now = time.time_ns() // 1_000_000
    # Spread the recorded trades, in their order, over the two minutes before this one, and
    # end with one trade per product in this minute, which closes the earlier bars.
    current = now - now % M
    first = current - 2 * M
    step = (2 * M - 1) // len(matches)
    trades = [{**m, "time": iso(first + i * step)} for i, m in enumerate(matches)]
    last_ids = {}
    for m in matches:
        last_ids[m["product_id"]] = max(last_ids.get(m["product_id"], 0), m["trade_id"])
    closing = {"type": "match", "time": iso(current + 1)}
    trades += [
        {**matches[0], **closing, "product_id": p, "trade_id": last_ids[p] + 1} for p in PRODUCTS
    ]
    # Candles from 410 minutes ago: two pages of the 420 minutes the watcher asks for.
    rows = {
        product: candle_rows(current - 410 * M, first, level)
        for product, level in (("SKL-USD", 0.79), ("DASH-BTC", 0.0062))
    }
    exchange = FakeCoinbase(trades, rows, before=first)
    expected = {
        product: {minute: rest_bar(minute, row) for minute, row in rows[product].items()}
        for product in PRODUCTS
    }
    for (product, minute), bar in aggregate(trades).items():
        expected[product][minute] = bar
    results: dict[str, list[Tick]] = {}
    async with live_watcher(
        infra,
        "coinbase",
        exchange.route,
        exchange.ws,
        WATCHER_MARKETS=",".join(PRODUCTS.values()),
        WATCHER_BACKFILL_MINUTES="420",
    ):
        for product, market in PRODUCTS.items():
            wanted = {m for m in expected[product] if m < current}

            def done(ticks: list[Tick], wanted: set[int] = wanted) -> bool:
                return wanted <= {t.minute for t in ticks if t.closed}

            await read_topic(infra.kafka_bootstrap_servers, topic_of(market), done, 60)
    for product, market in PRODUCTS.items():
        results[product] = await read_all(infra.kafka_bootstrap_servers, topic_of(market))
    assert exchange.subscribed == [
        {"type": "subscribe", "product_ids": sorted(PRODUCTS), "channels": ["matches", "heartbeat"]}
    ]
    # Two pages of backfill, then the repair of the first minute seen.
    assert exchange.candle_requests == {"SKL-USD": 3, "DASH-BTC": 3}
    for product, ticks in results.items():
        # The minute of the closing trades may close too if the test runs past its end. The
        # first minute seen is closed from REST: its trades before the connection were missed.
        closed = closed_once(ticks)
        assert assert_no_gap(closed, expected[product], current, repairable=True) >= 1
        assert closed[first].trades is None


OUTAGE_PRODUCT = "BAND-BTC"
OUTAGE_MARKET = "coinbase:band-btc"


def history_trades(outage: Outage, level: float) -> list[dict[str, Any]]:
    """The exchange's BAND-BTC trades, oldest first, ids rising by one: a trade in each minute
    a connection streams before the current one (so no clock can split them), several in the
    current one, two in every other minute of `history` (only REST tells those)."""
    now = time.time_ns() // 1_000_000
    trades = []
    for minute, bar in sorted(history(outage.now_minute, level).items()):
        if minute == outage.now_minute:
            prices = [bar.open, bar.high, bar.low, bar.close]
            times = [minute + i * (now - minute) // len(prices) for i in range(len(prices))]
        elif minute in outage.streamed_minutes():
            prices, times = [bar.close], [minute + 30_000]
        else:
            prices, times = [bar.open, bar.close], [minute + 10_000, minute + 50_000]
        for price, ms in zip(prices, times, strict=True):
            trade_id = 5_000 + len(trades)
            trades.append(match(trade_id, price, 0.25 + trade_id % 7 / 8, ms))
    return trades


def match(trade_id: int, price: float, size: float, ms: int) -> dict[str, Any]:
    return {
        "type": "match",
        "trade_id": trade_id,
        "maker_order_id": "27fff20b-af29-4f45-8744-56dd1ef57dc0",
        "taker_order_id": "1da6ce16-c8da-4732-9f71-6049f4c6aaf8",
        "side": "sell",
        "size": f"{size:.8f}",
        "price": f"{price:.8f}",
        "product_id": OUTAGE_PRODUCT,
        "sequence": 333_938_798 + trade_id,
        "time": iso(ms),
    }


@dataclass
class CoinbaseOutages:
    """Coinbase REST and feed playing the `Outage` script for BAND-BTC; OLD-USD is listed but
    refused when subscribed (a product being delisted), and Coinbase then ignores the whole
    subscribe. Every subscription starts with `last_match`: the newest trade before it."""

    outage: Outage
    trades: list[dict[str, Any]]
    sent: list[dict[str, Any]] = field(default_factory=list)
    subscribed: list[list[str]] = field(default_factory=list)

    def route(self, path: str, query: dict[str, str]) -> Answer:
        if path == "/products":
            return 200, products([OUTAGE_PRODUCT, "OLD-USD"])
        if path == f"/products/{OUTAGE_PRODUCT}/candles":
            return candles(query, self.rows(), self.outage.rest_before)
        return 404, {"message": "NotFound"}

    def rows(self) -> dict[int, list[float]]:
        """The candle of every minute with trades: low, high, open, close, volume."""
        out = {}
        for (_, minute), bar in aggregate(self.trades).items():
            open_, high, low, close, volume = bar[:5]
            out[minute] = [low, high, open_, close, volume]
        return out

    async def send(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        self.sent.append(message)
        await connection.send(json.dumps(message))

    async def ws(self, connection: ServerConnection) -> None:
        # The watcher's first subscribe names OLD-USD; the script starts with the next one,
        # and its clock moves before the watcher can ask REST anything.
        step = self.outage.connect() if self.subscribed else None
        async with asyncio.timeout(5):  # Coinbase drops clients that do not subscribe in 5 s
            request = json.loads(await connection.recv())
        self.subscribed.append(request["product_ids"])
        if step is None:
            reason = "OLD-USD is not a valid product"
            error = {"type": "error", "message": "Failed to subscribe", "reason": reason}
            await connection.send(json.dumps(error))
            await connection.wait_closed()  # nothing else comes: the subscribe was ignored
            return
        await connection.send(json.dumps({"type": "subscriptions", "channels": []}))
        newest = [t for t in self.trades if ms_of(t["time"]) < step.minute][-1]
        await self.send(connection, {**newest, "type": "last_match"})
        for trade in self.trades:
            if step.minute <= ms_of(trade["time"]) < step.minute + M:
                await self.send(connection, trade)
        if step.end == "drop":
            bad = {**self.trades[0], "trade_id": 1, "price": "NaN"}
            await connection.send(json.dumps(bad))  # malformed: not a decimal
            await connection.send('{"type":"match","trade_id":')
            return
        if step.end == "silence":
            await connection.wait_closed()
            return
        await keep_sending(connection, lambda: self.heartbeat(self.sent[-1]["trade_id"]))

    @staticmethod
    def heartbeat(last_trade_id: int) -> str:
        beat = {"type": "heartbeat", "sequence": 1, "last_trade_id": last_trade_id}
        now = time.time_ns() // 1_000_000
        return json.dumps({**beat, "product_id": OUTAGE_PRODUCT, "time": iso(now)})

    def expected(self) -> dict[int, BarValues]:
        """Minutes of matches sent as their aggregation, the others as REST's candles."""
        out = {minute: rest_bar(minute, row) for minute, row in self.rows().items()}
        for (_, minute), bar in aggregate(self.sent).items():
            out[minute] = bar
        return out


async def test_live_coinbase_repairs_drops_silence_and_rate_limits(infra: LocalInfra) -> None:
    """Through a dropped and a silent connection, and 429s on listing and candles, every
    minute Coinbase traded is closed exactly once, with its values; bad frames are skipped,
    and a refused and an unlisted product do not stop the others."""
    now = time.time_ns() // 1_000_000
    outage = Outage(now - now % M, asks_reconnect=False)
    exchange = CoinbaseOutages(outage, history_trades(outage, 0.00033458))
    candles_path = f"/products/{OUTAGE_PRODUCT}/candles"
    rest = Throttle(exchange.route, frozenset({"/products", candles_path}))
    topic = topic_of(OUTAGE_MARKET)
    async with live_watcher(
        infra,
        "coinbase",
        rest,
        exchange.ws,
        WATCHER_MARKETS=f"{OUTAGE_MARKET},coinbase:old-usd,coinbase:zzz-usd",
        WATCHER_BACKFILL_MINUTES="30",
        WATCHER_FEED_SILENCE_MS="2000",
    ) as watcher:
        past = {m for m in exchange.rows() if m < outage.now_minute}

        def done(ticks: list[Tick]) -> bool:
            # Every connection's backfill has answered, and every past minute is closed.
            backfills = watcher.log().count(f"backfilled {OUTAGE_MARKET}:")
            closed = {t.minute for t in ticks if t.closed}
            connections = len(exchange.subscribed)
            return outage.finished and backfills == connections and past <= closed

        await read_topic(infra.kafka_bootstrap_servers, topic, done, within=45)
    ticks = await read_all(infra.kafka_bootstrap_servers, topic)
    log = watcher.log_text
    assert outage.connections == len(outage.steps) == 3
    # Minutes whose trades the watcher cannot know complete (the first seen, those a trade-id
    # jump spans) are closed from REST's candle of the same trades; at least the first is.
    repaired = assert_no_gap(
        closed_once(ticks), exchange.expected(), outage.now_minute, repairable=True
    )
    assert repaired >= 1
    assert log.count("coinbase feed: skipping bad frame") == 2
    # The silent connection only: the refused subscribe was renewed at once, not by the watchdog.
    assert log.count("coinbase feed: TimeoutError: no frame for 2s") == 1
    assert "coinbase feed: OLD-USD refused, skipped" in log
    assert "coinbase:zzz-usd is not listed" in log
    assert exchange.subscribed == [[OUTAGE_PRODUCT, "OLD-USD"]] + [[OUTAGE_PRODUCT]] * 3
    assert_waited_out(log, rest, "/products", f"{candles_path}?granularity=60&", OUTAGE_MARKET)
