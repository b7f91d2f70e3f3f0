"""Local Binance, Kraken and Coinbase for the soak test: ground truth per minute, served by REST
exactly and by the stream with scripted lies (what the trust rules must catch), in each
exchange's documented format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tests.e2e.exchange_fakes import Bar

M = 60_000
# Sent on every connection now and then: JSON that no exchange format accepts.
MALFORMED = "{not json"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def current_minute() -> int:
    """The minute now is in: the clock read once (two reads may straddle a minute's end and
    give a time that is no minute's start, which every row built from it would then carry)."""
    now = now_ms()
    return now - now % M


def iso(ms: int, digits: int = 6) -> str:
    base = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{ms % 1000:03d}".ljust(digits, "0")
    return f"{base}.{fraction}Z"


def q(value: float) -> float:
    """A price or volume as the exchange writes it: 8 decimals."""
    return float(f"{value:.8f}")


def bar_values(bar: Bar) -> tuple[float, float, float, float, float]:
    return (bar.open, bar.high, bar.low, bar.close, bar.volume)


def _level_price(level: float, minute: int) -> float:
    i = minute // M
    return q(level * (1 + ((i * 7) % 13) / 1000))


def candle_truth(level: float, minute: int) -> Bar:
    """What a candle exchange's market traded in `minute` (its final candle, REST's row)."""
    p, i = _level_price(level, minute), minute // M
    return Bar(p, q(p * 1.002), q(p * 0.998), q(p * 1.001), 1.5 + i % 5, 5 + i % 3)


def candle_partial(level: float, minute: int, second: float, *, short: bool = False) -> Bar:
    """The candle as the stream shows it `second` into the minute: the final state from 55 s
    on (or, `short`, a volume 10% short of it: a close the exchange's final word corrects)."""
    truth = candle_truth(level, minute)
    if second >= 55 and not short:
        return truth
    fraction = 0.9 if short and second >= 55 else min(second, 54) / 60
    volume = q(truth.volume * fraction)
    return Bar(truth.open, truth.high, truth.low, truth.open, volume, max(1, int(5 * fraction)))


def trades_of(level: float, minute: int) -> list[tuple[int, int, float, float]]:
    """(trade id, time ms, price, size) of a trade-built market's minute: five trades, sizes
    exact in binary so their sum is the REST volume to the last bit."""
    p, i = _level_price(level, minute), minute // M
    prices = [p, q(p * 1.002), q(p * 0.998), q(p * 1.0005), q(p * 1.001)]
    sizes = [0.25, 0.5, 0.25, 0.75, 0.25 * (1 + i % 4)]
    return [(i * 5 + k, minute + 5_000 + 10_000 * k, prices[k], sizes[k]) for k in range(5)]


def trade_truth(level: float, minute: int) -> Bar:
    trades = trades_of(level, minute)
    prices = [t[2] for t in trades]
    volume = 0.0
    for trade in trades:
        volume += trade[3]
    return Bar(prices[0], max(prices), min(prices), prices[-1], volume, len(trades))


@dataclass
class Injections:
    """What a fake did to the watcher, counted by kind, and what it still has to do."""

    seed: int
    start_ms: int
    soak_s: float
    done: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def at(self, low_s: float, high_s: float) -> int:
        """A random moment between low_s and high_s into the soak (ms)."""
        return self.start_ms + int(self.rng.uniform(low_s, high_s) * 1000)

    @property
    def over(self) -> bool:
        return now_ms() >= self.start_ms + self.soak_s * 1000


class SoakExchange:
    """What the three fakes share: the market table, the lie schedule, a silenced market."""

    name = ""

    def __init__(self, markets: dict[str, float], injections: Injections) -> None:
        self.levels = markets  # exchange symbol -> price level
        self.symbols = sorted(markets)
        self.lies = injections
        soak = injections.soak_s
        rng = injections.rng
        first = injections.start_ms - injections.start_ms % M
        minutes = [first + k * M for k in range(1, max(2, int(soak // 60)))]
        # Two minutes whose REST rows are invalid the first time they are asked for.
        self.bad_rows: set[tuple[str, int]] = {
            (rng.choice(self.symbols), minute) for minute in rng.sample(minutes, 2)
        }
        self.ahead_at = sorted(injections.at(40, soak * 0.8) for _ in range(2))
        self.implausible_at = sorted(injections.at(40, soak * 0.8) for _ in range(2))
        self.malformed_at = sorted(injections.at(10, soak * 0.9) for _ in range(3))
        self.silent: tuple[str, int, int] | None = None  # (symbol, from ms, to ms)
        self.frozen = False
        # A minute the stream tells wrong to the end (a plausible close 0.01% off): only
        # reconciliation with REST can correct it.
        self.mispriced: tuple[str, int] | None = None

    def truth(self, symbol: str, minute: int) -> Bar:
        return candle_truth(self.levels[symbol], minute)

    def is_silent(self, symbol: str, at: int) -> bool:
        silent = self.silent
        return silent is not None and silent[0] == symbol and silent[1] <= at < silent[2]

    def freeze(self) -> None:
        """No more lies from now on (the counters are about to be read)."""
        self.frozen = True

    def due(self, schedule: list[int], kind: str) -> bool:
        """True once per scheduled moment that has passed (and counts the injection)."""
        if schedule and now_ms() >= schedule[0] and not self.frozen:
            schedule.pop(0)
            self.lies.done[kind] += 1
            return True
        return False

    def rest_row_bad(self, symbol: str, minute: int) -> bool:
        if (symbol, minute) in self.bad_rows and not self.frozen:
            self.bad_rows.discard((symbol, minute))
            self.lies.done["bad_rest_row"] += 1
            return True
        return False

    async def send_loop(self, connection: ServerConnection, symbols: list[str]) -> None:
        """Every half second, each market's news; lies when scheduled; until closed."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                for frame in self.frames(symbols):
                    await connection.send(frame)
                if self.due(self.malformed_at, "malformed"):
                    await connection.send(MALFORMED)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(connection.wait_closed(), timeout=0.5)
                    return

    def frames(self, symbols: list[str]) -> list[str]:
        raise NotImplementedError


class CandleSoakExchange(SoakExchange):
    """A candle exchange's stream: the forming candle twice a second; the minute's last word
    after the next minute's first update for the `late` minutes."""

    def __init__(self, markets: dict[str, float], injections: Injections) -> None:
        super().__init__(markets, injections)
        rng, soak = injections.rng, injections.soak_s
        first = injections.start_ms - injections.start_ms % M
        targets = [first + k * M for k in range(1, max(2, int(soak // 60)))]
        self.late: set[tuple[str, int]] = {
            (self.symbols[0], minute) for minute in rng.sample(targets, 2)
        }
        self.finals_sent: set[tuple[str, int]] = set()
        spare = [m for m in targets if (self.symbols[0], m) not in self.late]
        if spare:
            self.mispriced = (self.symbols[0], rng.choice(spare))
        quiet = self.symbols[-1]
        start = injections.at(60, max(61, soak - 100))
        self.silent = (quiet, start, start + 40_000)
        self.implausible_symbol = self.symbols[1]

    def told(self, symbol: str, minute: int) -> Bar:
        """The minute's final candle as the stream tells it (the truth, unless mispriced)."""
        truth = self.truth(symbol, minute)
        if (symbol, minute) != self.mispriced:
            return truth
        return Bar(truth.open, truth.high, truth.low, q(truth.close * 1.0001), truth.volume, 5)

    def frames(self, symbols: list[str]) -> list[str]:
        at = now_ms()
        minute, second = at - at % M, (at % M) / 1000
        out = []
        for symbol in symbols:
            if self.is_silent(symbol, at):
                continue
            level = self.levels[symbol]
            previous = minute - M
            late = (symbol, previous) in self.late
            final_due = (symbol, previous) not in self.finals_sent
            if final_due and not late:
                out.append(self.candle(symbol, previous, self.told(symbol, previous), at, True))
                if (symbol, previous) == self.mispriced:
                    self.lies.done["mispriced"] += 1
            bar = candle_partial(level, minute, second, short=(symbol, minute) in self.late)
            if second >= 55 and (symbol, minute) == self.mispriced:
                bar = self.told(symbol, minute)
            out.append(self.candle(symbol, minute, bar, at, False))
            if final_due and late:
                out.append(self.candle(symbol, previous, self.truth(symbol, previous), at, True))
                self.lies.done["late_final"] += 1
            self.finals_sent.add((symbol, previous))
            if symbol == self.implausible_symbol and self.due(self.implausible_at, "implausible"):
                truth = self.truth(symbol, minute)
                wild = Bar(truth.open, truth.high * 1e4, truth.low, truth.high * 1e4, 1.0, 1)
                out.append(self.candle(symbol, minute, wild, at, False))
                out.append(self.candle(symbol, minute, bar, at + 1, False))
            if symbol == self.symbols[0] and self.due(self.ahead_at, "ahead"):
                ahead = minute + 4 * M
                out.append(self.candle(symbol, ahead, self.truth(symbol, ahead), at + 4 * M, False))
        return out

    def candle(self, symbol: str, minute: int, bar: Bar, at: int, final: bool) -> str:
        raise NotImplementedError


class SoakBinance(CandleSoakExchange):
    name = "binance"

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/exchangeInfo":
            symbols = [
                {"symbol": s, "status": "TRADING", "baseAsset": s[:-4], "quoteAsset": "USDT"}
                for s in self.symbols
            ]
            return 200, {"symbols": symbols}
        symbol = query.get("symbol", "")
        if path == "/api/v3/klines" and symbol in self.levels:
            start, end = int(query["startTime"]), int(query["endTime"])
            current = current_minute()
            rows = []
            for minute in range(start, min(end, current - M) + 1, M):
                bar = self.truth(symbol, minute)
                text = [f"{v:.8f}" for v in bar_values(bar)]
                if self.rest_row_bad(symbol, minute):
                    text[0] = "nan"
                rows.append([minute, *text, minute + M - 1, "1", bar.trades, "0", "0", "0"])
            return 200, rows
        return 400, {"code": -1121, "msg": "Invalid symbol."}

    def candle(self, symbol: str, minute: int, bar: Bar, at: int, final: bool) -> str:
        text = [f"{v:.8f}" for v in bar_values(bar)]
        k = {
            "t": minute,
            "T": minute + M - 1,
            "s": symbol,
            "i": "1m",
            "o": text[0],
            "h": text[1],
            "l": text[2],
            "c": text[3],
            "v": text[4],
            "n": bar.trades,
            "x": final,
        }
        data = {"e": "kline", "E": at, "s": symbol, "k": k}
        return json.dumps({"stream": f"{symbol.lower()}@kline_1m", "data": data})

    async def ws(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        streams = parse_qs(urlsplit(connection.request.path).query)["streams"][0]
        symbols = [name.split("@")[0].upper() for name in streams.split("/")]
        await self.send_loop(connection, symbols)


class SoakKraken(CandleSoakExchange):
    name = "kraken"
    # WS v2 symbol -> (REST pair name, REST result key)
    PAIRS: ClassVar[dict[str, tuple[str, str]]] = {
        "BTC/USD": ("XBTUSD", "XXBTZUSD"),
        "ETH/USD": ("ETHUSD", "XETHZUSD"),
    }

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/0/public/AssetPairs":
            result = {
                key: {"wsname": symbol.replace("BTC", "XBT"), "status": "online"}
                for symbol, (_, key) in self.PAIRS.items()
                if symbol in self.levels
            }
            return 200, {"error": [], "result": result}
        if path == "/0/public/OHLC":
            symbol = next(
                (s for s, (pair, _) in self.PAIRS.items() if pair == query.get("pair")), ""
            )
            if symbol not in self.levels:
                return 200, {"error": ["EQuery:Unknown asset pair"]}
            current = current_minute()
            rows: list[list[Any]] = []
            for minute in range(current - 720 * M + M, current + M, M):
                bar = self.truth(symbol, minute)
                text = [f"{v:.8f}" for v in bar_values(bar)]
                row: list[Any] = [minute // 1000, *text[:4], text[3], text[4], bar.trades]
                if minute < current and self.rest_row_bad(symbol, minute):
                    row[1] = "x"
                rows.append(row)
            return 200, {"error": [], "result": {self.PAIRS[symbol][1]: rows, "last": 0}}
        return 404, {"error": ["EGeneral:Unknown method"]}

    def candle(self, symbol: str, minute: int, bar: Bar, at: int, final: bool) -> str:
        entry = {
            "symbol": symbol,
            "open": bar.open,
            "high": bar.high,
            "low": bar.low,
            "close": bar.close,
            "trades": bar.trades,
            "volume": bar.volume,
            "vwap": bar.close,
            "interval_begin": iso(minute, 9),
            "interval": 1,
        }
        frame = {"channel": "ohlc", "type": "update", "timestamp": iso(at, 9), "data": [entry]}
        return json.dumps(frame)

    def frames(self, symbols: list[str]) -> list[str]:
        # Kraken has no final flag: its "final" candle is just the newest update of the minute.
        return [*super().frames(symbols), '{"channel":"heartbeat"}']

    async def ws(self, connection: ServerConnection) -> None:
        await connection.send(
            json.dumps({"channel": "status", "type": "update", "data": [{"system": "online"}]})
        )
        request = json.loads(await connection.recv())
        symbols = list(request["params"]["symbol"])
        for symbol in symbols:
            ack = {"method": "subscribe", "result": {"channel": "ohlc", "symbol": symbol}}
            await connection.send(json.dumps({**ack, "success": True, "req_id": 1}))
        await self.send_loop(connection, symbols)


class SoakCoinbase(SoakExchange):
    """Coinbase: each minute's five trades at their times, a heartbeat per product a second;
    lies: trades skipped (a gap within a minute, and a whole minute), a trade dated ahead, an
    implausible trade taking the id of the next real one (which then arrives as a duplicate)."""

    name = "coinbase"

    def __init__(self, markets: dict[str, float], injections: Injections) -> None:
        super().__init__(markets, injections)
        rng, soak = injections.rng, injections.soak_s
        first = injections.start_ms - injections.start_ms % M
        gap_minute = first + rng.randrange(2, max(3, int(soak // 60))) * M
        gap_symbol = rng.choice(self.symbols)
        level = self.levels[gap_symbol]
        whole = [t[0] for t in trades_of(level, gap_minute)]
        part_minute = first + M if gap_minute != first + M else first + 2 * M
        part = [t[0] for t in trades_of(self.levels[self.symbols[0]], part_minute)[1:3]]
        self.skipped: dict[str, set[int]] = {s: set() for s in self.symbols}
        self.skipped[gap_symbol].update(whole)
        self.skipped[self.symbols[0]].update(part)
        self.next_trade: dict[str, int] = {}
        # Not a minute held for REST anyway (a gap's minutes and the one its next trade opens):
        # the mispriced minute must be one only reconciliation can correct.
        held = (gap_minute, gap_minute + M, part_minute)
        spare = [
            first + k * M for k in range(2, max(3, int(soak // 60))) if first + k * M not in held
        ]
        if spare:
            self.mispriced = (self.symbols[0], rng.choice(spare))
        start = injections.at(60, max(61, soak - 100))
        self.silent = (self.symbols[-1], start, start + 40_000)

    def truth(self, symbol: str, minute: int) -> Bar:
        return trade_truth(self.levels[symbol], minute)

    def route(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/products":
            products = [
                {"id": s, "base_currency": s[:3], "quote_currency": "USD", "status": "online"}
                for s in self.symbols
            ]
            return 200, products
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "products" and parts[3] == "candles":
            symbol = parts[2]
            if symbol not in self.levels:
                return 404, {"message": "NotFound"}
            start = _parse_iso(query["start"])
            end = _parse_iso(query["end"])
            current = current_minute()
            rows: list[list[Any]] = []
            for minute in range(start, min(end, current - M) + 1, M):
                bar = self.truth(symbol, minute)
                row: list[Any] = [
                    minute // 1000,
                    bar.low,
                    bar.high,
                    bar.open,
                    bar.close,
                    bar.volume,
                ]
                if self.rest_row_bad(symbol, minute):
                    row[1] = "1.0"
                rows.append(row)
            return 200, rows[::-1]
        return 404, {"message": "NotFound"}

    def frames(self, symbols: list[str]) -> list[str]:
        at = now_ms()
        out = []
        for symbol in symbols:
            level = self.levels[symbol]
            minute = at - at % M
            if symbol not in self.next_trade:  # subscribed now: trades from here on
                upcoming = [t for t in trades_of(level, minute) if t[1] > at]
                first = upcoming[0][0] if upcoming else (minute // M + 1) * 5
                self.next_trade[symbol] = first
                out.append(self.match(symbol, first - 1, at, 1.0, 0.25, "last_match"))
            while True:
                trade_id = self.next_trade[symbol]
                i, k = divmod(trade_id, 5)
                _, stamp, price, size = trades_of(level, i * M)[k]
                if stamp > at:
                    break
                skipped = trade_id in self.skipped[symbol] or self.is_silent(symbol, stamp)
                mispriced = (symbol, i * M) == self.mispriced
                # Lies only beside trades that are delivered, and not in the mispriced minute:
                # their effects stay exact.
                lead, tail = symbol == self.symbols[0], symbol == self.symbols[-1]
                honest = not skipped and not mispriced
                if honest and lead and self.due(self.implausible_at, "implausible"):
                    out.append(self.match(symbol, trade_id, stamp, price * 1e4, size))
                if honest and tail and self.due(self.ahead_at, "ahead"):
                    out.append(self.match(symbol, trade_id, stamp + 4 * M, price, size))
                if skipped:
                    self.lies.done["skipped_trade"] += 1
                elif mispriced and k == 4:
                    self.lies.done["mispriced"] += 1
                    out.append(self.match(symbol, trade_id, stamp, q(price * 1.0001), size))
                else:
                    out.append(self.match(symbol, trade_id, stamp, price, size))
                self.next_trade[symbol] = trade_id + 1
            if self.is_silent(symbol, at):
                continue  # not even a heartbeat
            last = self.next_trade[symbol] - 1
            beat = {"type": "heartbeat", "sequence": 1, "last_trade_id": last, "product_id": symbol}
            out.append(json.dumps({**beat, "time": iso(at)}))
        return out

    def match(
        self, symbol: str, trade_id: int, at: int, price: float, size: float, kind: str = "match"
    ) -> str:
        return json.dumps(
            {
                "type": kind,
                "trade_id": trade_id,
                "sequence": trade_id,
                "time": iso(at),
                "product_id": symbol,
                "size": f"{size:.8f}",
                "price": f"{price:.8f}",
                "side": "buy",
            }
        )

    async def ws(self, connection: ServerConnection) -> None:
        request = json.loads(await connection.recv())
        symbols = list(request["product_ids"])
        channels = [{"name": name, "product_ids": symbols} for name in request["channels"]]
        await connection.send(json.dumps({"type": "subscriptions", "channels": channels}))
        await self.send_loop(connection, symbols)


def _parse_iso(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()) * 1000
