"""BinanceProtocol: kline frames, listing and REST klines parsed without I/O, bad input refused."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tickstream_shared.naming import Market
from tickstream_watcher.binance import BinanceProtocol
from tickstream_watcher.exchange import (
    MAX_FRAME_BYTES,
    MAX_REST_BYTES,
    BadFrame,
    CandlePage,
    CandleUpdate,
    Heartbeat,
    Reconnect,
)

CAPTURE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "captures" / "BINANCE.ws.1.0"
)
M = 60_000
MINUTE = 28_333_334 * M  # 2023-11-14 22:14 UTC
BTC = Market("binance", "btc", "usdt")
# The four markets of the recorded session (its URL names them), plus one of our own.
MARKETS = {
    "NKNUSDT": Market("binance", "nkn", "usdt"),
    "BLZETH": Market("binance", "blz", "eth"),
    "LRCBTC": Market("binance", "lrc", "btc"),
    "RUNEEUR": Market("binance", "rune", "eur"),
    "BTCUSDT": BTC,
}
PROTOCOL = BinanceProtocol(MARKETS)


def capture_frames() -> list[str]:
    if not CAPTURE.is_file():
        pytest.skip(f"capture not found at {CAPTURE} (the shared/ folder beside the repo)")
    lines = CAPTURE.read_text().splitlines()[1:]  # the first line is the URL
    return [line.split(": ", 1)[1] for line in lines if line.strip()]


def kline(**changes: Any) -> dict[str, Any]:
    """A valid kline event of BTCUSDT in MINUTE; `changes` replace (None: remove) `k` fields."""
    k: dict[str, Any] = {
        "t": MINUTE,
        "T": MINUTE + 59_999,
        "s": "BTCUSDT",
        "i": "1m",
        "f": 100,
        "L": 200,
        "o": "100.50000000",
        "c": "101.00000000",
        "h": "102.25000000",
        "l": "99.75000000",
        "v": "12.50000000",
        "n": 101,
        "x": False,
        "q": "1262.50000000",
        "V": "6.00000000",
        "Q": "606.00000000",
        "B": "0",
    }
    k.update(changes)
    return {"e": "kline", "E": MINUTE + 1_500, "s": "BTCUSDT", "k": _drop_none(k)}


def event(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`base` with top-level fields replaced (None: removed)."""
    return _drop_none({**base, **changes})


def wrapped(data: Any, stream: str = "btcusdt@kline_1m") -> str:
    return json.dumps({"stream": stream, "data": data})


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def test_capture_klines_parse_to_exactly_their_candle_updates() -> None:
    """Each recorded kline frame gives one CandleUpdate with its symbol's market and fields."""
    frames = capture_frames()
    got, expected = [], []
    for frame in frames:
        data = json.loads(frame)["data"]
        if data.get("e") != "kline":
            continue
        k = data["k"]
        open_, high, low, close, volume = (float(k[f]) for f in ("o", "h", "l", "c", "v"))
        market = MARKETS[data["s"]]
        expected.append(
            CandleUpdate(
                market, k["t"], open_, high, low, close, volume, k["n"], k["x"], data["E"],
                float(k["q"]),
            )
        )  # fmt: skip
        got += PROTOCOL.parse(frame)
    assert [c.market for c in expected] == [MARKETS["NKNUSDT"], MARKETS["LRCBTC"]]
    assert got == expected
    assert got[0] == CandleUpdate(
        MARKETS["NKNUSDT"], 1633998480000, 0.3527, 0.3528, 0.3522, 0.3528, 25877.0, 30, False,
        1633998523963, 9116.046,
    )  # fmt: skip


def test_capture_other_frames_parse_to_nothing() -> None:
    """Every recorded depthUpdate, bookTicker and aggTrade frame parses to [] without error."""
    others = [f for f in capture_frames() if json.loads(f)["data"].get("e") != "kline"]
    assert len(others) == 263
    assert [PROTOCOL.parse(frame) for frame in others] == [[]] * len(others)


def test_bytes_and_bare_events_parse_like_wrapped_text() -> None:
    """A frame as bytes, or a bare event without the combined-stream wrapper, parses the same."""
    expected = [
        CandleUpdate(
            BTC, MINUTE, 100.5, 102.25, 99.75, 101.0, 12.5, 101, False, MINUTE + 1_500, 1262.5
        )
    ]
    assert PROTOCOL.parse(wrapped(kline())) == expected
    assert PROTOCOL.parse(wrapped(kline()).encode()) == expected
    assert PROTOCOL.parse(json.dumps(kline())) == expected
    closed = PROTOCOL.parse(json.dumps(event(kline(x=True, n=0, v="0", q="0"), E=MINUTE + M)))
    assert closed == [
        CandleUpdate(BTC, MINUTE, 100.5, 102.25, 99.75, 101.0, 0.0, 0, True, MINUTE + M, 0.0)
    ]


def test_quote_volume_is_binance_q_and_unknown_without_it() -> None:
    """`k.q` is the candle's quote volume, exactly; a kline without `q` has it unknown (None)."""
    (candle,) = PROTOCOL.parse(wrapped(kline(q="1262.12345678")))
    assert isinstance(candle, CandleUpdate) and candle.quote_volume == 1262.12345678
    (bare,) = PROTOCOL.parse(wrapped(kline(q=None)))
    assert isinstance(bare, CandleUpdate) and bare.quote_volume is None


def test_server_shutdown_asks_to_reconnect() -> None:
    """`serverShutdown`, wrapped or bare, is a Reconnect."""
    shutdown = {"e": "serverShutdown", "E": MINUTE}
    assert PROTOCOL.parse(json.dumps(shutdown)) == [Reconnect("serverShutdown")]
    assert PROTOCOL.parse(wrapped(shutdown, "btcusdt@kline_1m")) == [Reconnect("serverShutdown")]


def test_answers_to_requests_are_heartbeats() -> None:
    """The answer to SUBSCRIBE (and to LIST_SUBSCRIPTIONS) is a Heartbeat."""
    assert PROTOCOL.parse('{"result":null,"id":1}') == [Heartbeat()]
    assert PROTOCOL.parse('{"result":["btcusdt@kline_1m"],"id":"a"}') == [Heartbeat()]


@pytest.mark.parametrize(
    "frame",
    [
        '{"code":2,"msg":"Invalid request: invalid stream","id":3}',
        '{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":3}',
    ],
)
def test_error_answers_are_bad_frames_with_binance_message(frame: str) -> None:
    """An error answer, in the documented flat or the nested shape, is a BadFrame with its text."""
    with pytest.raises(BadFrame, match=r"^binance error 2: Invalid request: invalid stream$"):
        PROTOCOL.parse(frame)


@pytest.mark.parametrize(
    "data",
    [
        {"e": "aggTrade", "E": MINUTE, "s": "BTCUSDT", "a": 1, "p": "1.0", "q": "2", "T": MINUTE},
        {"u": 400900217, "s": "BNBUSDT", "b": "25.35", "B": "31.2", "a": "25.36", "A": "40.6"},
        {"e": "24hrTicker", "E": MINUTE, "s": "XYZUSDT", "c": "0.0025", "v": "10000", "x": "1"},
        [{"e": "24hrMiniTicker", "E": MINUTE, "s": "BNBBTC", "c": "0.0025"}],
    ],
    ids=["aggTrade", "bookTicker", "24hrTicker", "miniTicker-arr"],
)
def test_events_we_do_not_use_parse_to_nothing(data: Any) -> None:
    """Events other than kline, even of symbols we do not know, give []."""
    assert PROTOCOL.parse(wrapped(data, "x")) == []


DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        pytest.param("not json", "not JSON", id="not-json"),
        pytest.param('{"stream":"x","data":{"e":"kline"', "not JSON", id="truncated"),
        pytest.param("\ud800", "not JSON", id="lone-surrogate"),
        pytest.param(DEEP, "Expected `object`, got `array`", id="deep-list"),
        pytest.param(
            '{"stream":"x","data":{"e":"depthUpdate","b":' + DEEP + "}}", "recursion", id="deep"
        ),
        pytest.param("[]", "Expected `object`", id="array"),
        pytest.param("42", "Expected `object`", id="number"),
        pytest.param('{"stream":"btcusdt@kline_1m"}', "without data", id="no-data"),
        pytest.param(wrapped(event(kline(), k=None)), "without", id="no-k"),
        pytest.param(wrapped(event(kline(), E=None)), "without", id="no-E"),
        pytest.param(wrapped(event(kline(), s=None)), "without", id="no-s"),
        pytest.param(wrapped(kline(o=None)), "missing required field `o`", id="no-open"),
        pytest.param(wrapped(kline(x=None)), "missing required field `x`", id="no-closed"),
        pytest.param(wrapped(kline(o="nan")), r"\$\.data\.k\.o", id="nan"),
        pytest.param(wrapped(kline(c="NaN")), r"\$\.data\.k\.c", id="NaN"),
        pytest.param(wrapped(kline(h="inf")), r"\$\.data\.k\.h", id="inf"),
        pytest.param(wrapped(kline(l="-1")), r"\$\.data\.k\.l", id="negative"),
        pytest.param(wrapped(kline(h="1e400")), r"\$\.data\.k\.h", id="1e400"),
        pytest.param(wrapped(kline(v="abc")), r"\$\.data\.k\.v", id="abc"),
        pytest.param(wrapped(kline(q="-1")), r"\$\.data\.k\.q", id="negative-quote"),
        pytest.param(wrapped(kline(q="nan")), r"\$\.data\.k\.q", id="nan-quote"),
        pytest.param(wrapped(kline(q=1262.5)), r"\$\.data\.k\.q", id="number-quote"),
        pytest.param(wrapped(kline(q="1" * 19)), "quote volume not in", id="huge-quote"),
        pytest.param(wrapped(kline(o="")), r"\$\.data\.k\.o", id="empty"),
        pytest.param(wrapped(kline(o=100.5)), r"Expected `str`, got `float`", id="number-price"),
        pytest.param(wrapped(kline(n="101")), r"\$\.data\.k\.n", id="string-count"),
        pytest.param(wrapped(kline(n=-1)), r"\$\.data\.k\.n", id="negative-count"),
        pytest.param(wrapped(kline(x="false")), r"\$\.data\.k\.x", id="string-bool"),
        pytest.param(wrapped(event(kline(), E="1")), r"\$\.data\.E", id="string-E"),
        pytest.param(wrapped(kline(l="0", o="0", c="0")), r"prices not in", id="zero-price"),
        pytest.param(wrapped(kline(h="1000000000001")), r"prices not in", id="price-1e12"),
        pytest.param(wrapped(kline(v="1" + "0" * 19)), r"volume in", id="volume-1e19"),
        pytest.param(wrapped(kline(l="103", h="102.25")), "within low..high", id="low-above-high"),
        pytest.param(wrapped(kline(c="99")), "within low..high", id="close-below-low"),
        pytest.param(wrapped(kline(o="103")), "within low..high", id="open-above-high"),
        pytest.param(
            wrapped(kline(t=MINUTE + 1, T=MINUTE + 60_000)), "plausible minute", id="unaligned"
        ),
        pytest.param(wrapped(kline(T=MINUTE + 60_000)), "does not end the minute", id="close-time"),
        pytest.param(wrapped(kline(i="5m")), "interval '5m' is not 1m", id="interval"),
        pytest.param(
            wrapped(event(kline(t=0, T=59_999), E=1_000)), "outside 2010..2100", id="epoch"
        ),
        pytest.param(wrapped(kline(t=0, T=59_999)), "plausible minute", id="minute-1970"),
        pytest.param(
            wrapped(event(kline(), E=4_102_444_800_001)), "outside 2010..2100", id="E-after-2100"
        ),
        pytest.param(
            wrapped(event(kline(), E=MINUTE - 1)), "before its minute", id="E-before-minute"
        ),
        pytest.param(
            wrapped(event(kline(s="ETHUSDT"), s="ETHUSDT")),
            "unknown symbol 'ETHUSDT'",
            id="unknown",
        ),
        pytest.param(wrapped(kline(s="NKNUSDT")), "kline of 'NKNUSDT'", id="symbol-mismatch"),
    ],
)
def test_malformed_frames_are_bad_frames(frame: str, problem: str) -> None:
    """A frame that is not a valid kline of a known symbol raises BadFrame saying why."""
    with pytest.raises(BadFrame, match=problem):
        PROTOCOL.parse(frame)


def test_oversized_frames_are_refused_unread() -> None:
    """A frame over MAX_FRAME_BYTES is a BadFrame, as text or bytes, valid JSON or not."""
    padding = " " * MAX_FRAME_BYTES
    for frame in (wrapped(kline()) + padding, (wrapped(kline()) + padding).encode()):
        with pytest.raises(BadFrame, match=f"exceeds {MAX_FRAME_BYTES} bytes"):
            PROTOCOL.parse(frame)
    just_fits = wrapped(kline()).ljust(MAX_FRAME_BYTES)
    assert PROTOCOL.parse(just_fits) == PROTOCOL.parse(wrapped(kline())) != []


def exchange_info(*symbols: tuple[str, str, str, str]) -> bytes:
    """An exchangeInfo body in the documented shape (fields we do not read included)."""
    return json.dumps(
        {
            "timezone": "UTC",
            "serverTime": MINUTE,
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "limit": 6000}
            ],
            "exchangeFilters": [],
            "symbols": [
                {
                    "symbol": symbol,
                    "status": status,
                    "baseAsset": base,
                    "baseAssetPrecision": 8,
                    "quoteAsset": quote,
                    "quotePrecision": 8,
                    "orderTypes": ["LIMIT", "MARKET"],
                    "isSpotTradingAllowed": True,
                    "filters": [{"filterType": "PRICE_FILTER", "minPrice": "0.01"}],
                    "permissions": [],
                }
                for symbol, status, base, quote in symbols
            ],
        }
    ).encode()


def test_listing_maps_trading_markets_to_their_symbols() -> None:
    """TRADING symbols map by their assets; other statuses and odd names are skipped."""
    body = exchange_info(
        ("ETHBTC", "TRADING", "ETH", "BTC"),
        ("1000SATSUSDT", "TRADING", "1000SATS", "USDT"),
        ("BNBUSDT", "BREAK", "BNB", "USDT"),
        ("币安人生USDT", "TRADING", "币安人生", "USDT"),  # not [a-z0-9] once lower-cased
        ("BTC.USDT", "TRADING", "BTC", "USDT"),
    )
    eth = Market("binance", "eth", "btc")
    listing = PROTOCOL.parse_listing(body)
    assert listing == {eth: "ETHBTC", Market("binance", "1000sats", "usdt"): "1000SATSUSDT"}
    assert PROTOCOL.listing_path() == "/api/v3/exchangeInfo"
    protocol = BinanceProtocol.from_listing(listing)
    frame = wrapped(event(kline(s="ETHBTC"), s="ETHBTC"), "ethbtc@kline_1m")
    assert protocol.parse(frame) == [
        CandleUpdate(
            eth, MINUTE, 100.5, 102.25, 99.75, 101.0, 12.5, 101, False, MINUTE + 1_500, 1262.5
        )
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"code":-1003,"msg":"Too busy"}', r"^binance error -1003: Too busy$"),
        (b'{"symbols":[{"symbol":"ETHBTC","status":"TRADING"}]}', "baseAsset"),
        (b'{"symbols":{}}', "Expected `array`"),
        (b"<html>", "invalid"),
        (b" " * (MAX_REST_BYTES + 1), "exceeds"),
    ],
    ids=["error", "missing-asset", "wrong-type", "not-json", "oversized"],
)
def test_bad_listings_are_bad_frames(body: bytes, problem: str) -> None:
    """An error answer or a listing not in the documented shape is a BadFrame."""
    with pytest.raises(BadFrame, match=problem):
        PROTOCOL.parse_listing(body)


def row(
    minute: int, *prices: str, volume: str = "12.5", quote: str = "1262.5", trades: int = 7
) -> list[Any]:
    return [minute, *prices, volume, minute + 59_999, quote, trades, "6", "606", "0"]


def test_rest_klines_are_closed_candles_ending_with_their_minute() -> None:
    """Rows become closed CandleUpdates stamped with the minute's end, oldest first."""
    body = json.dumps(
        [
            row(MINUTE, "100.5", "102.25", "99.75", "101"),
            row(MINUTE + M, "101", "101", "101", "101", volume="0", quote="0", trades=0),
        ]
    ).encode()
    assert PROTOCOL.parse_candles(BTC, body).candles == [
        CandleUpdate(BTC, MINUTE, 100.5, 102.25, 99.75, 101.0, 12.5, 7, True, MINUTE + M, 1262.5),
        CandleUpdate(
            BTC, MINUTE + M, 101.0, 101.0, 101.0, 101.0, 0.0, 0, True, MINUTE + 2 * M, 0.0
        ),
    ]
    assert PROTOCOL.parse_candles(BTC, b"[]") == CandlePage([], [])


GOOD = row(MINUTE, "100.5", "102.25", "99.75", "101")


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([GOOD, row(MINUTE + M, "nan", "1", "1", "1")], r"^row 1: Expected `str` matching"),
        ([row(MINUTE, "1", "1", "2", "1"), GOOD], r"^row 0: .*within low..high"),
        ([GOOD, [*GOOD[:6], MINUTE + M, *GOOD[7:]]], r"^row 1: close time"),
        ([GOOD, [MINUTE + 1, *GOOD[1:]]], r"^row 1: open time"),
        ([GOOD, GOOD[:8]], r"^row 1: Expected `array` of at least length 9"),
        ([GOOD, {"t": MINUTE}], r"^row 1: Expected `array`"),
        ([row(MINUTE + M, "1", "1", "1", "1"), GOOD], r"^row 1: not after the row before"),
        ([GOOD, GOOD], r"^row 1: not after the row before"),
        ([GOOD, row(MINUTE + M, "1", "1", "1", "1", quote="-3")], r"^row 1: Expected `str` m"),
    ],
    ids=[
        "nan",
        "low-above-high",
        "close-time",
        "unaligned",
        "short",
        "object",
        "order",
        "dup",
        "bad-quote",
    ],
)
def test_a_bad_rest_row_costs_only_its_own_minute(rows: list[Any], problem: str) -> None:
    """An invalid or misordered row is skipped and named by index; the good row is kept."""
    page = PROTOCOL.parse_candles(BTC, json.dumps(rows).encode())
    assert len(page.candles) == 1 and page.candles[0].minute in (MINUTE, MINUTE + M)
    (bad,) = page.bad_rows
    assert re.match(problem, bad), bad


def test_rest_klines_error_answer_is_a_bad_frame() -> None:
    """Binance's error body for a klines request is a BadFrame with its message."""
    with pytest.raises(BadFrame, match=r"^binance error -1121: Invalid symbol\.$"):
        PROTOCOL.parse_candles(BTC, b'{"code":-1121,"msg":"Invalid symbol."}')


def test_candles_path_asks_for_one_page_of_minutes() -> None:
    """The klines path names the symbol, the 1m interval, the range and the 1000-row limit."""
    assert PROTOCOL.candles_path("BTCUSDT", MINUTE, MINUTE + 999 * M) == (
        f"/api/v3/klines?symbol=BTCUSDT&interval=1m&startTime={MINUTE}"
        f"&endTime={MINUTE + 999 * M}&limit=1000"
    )


def test_ws_url_names_one_kline_stream_per_symbol() -> None:
    """The combined stream URL lists `<symbol>@kline_1m`; nothing is sent after connecting."""
    url = PROTOCOL.ws_url("wss://stream.binance.com:9443/", ["BTCUSDT", "NKNUSDT"])
    assert url == "wss://stream.binance.com:9443/stream?streams=btcusdt@kline_1m/nknusdt@kline_1m"
    assert PROTOCOL.subscribe_frames(["BTCUSDT"]) == []
    assert PROTOCOL.name == "binance"


def test_ws_url_refuses_more_than_1024_streams() -> None:
    """1024 symbols fit one connection; 1025, none or an unknown symbol raise ValueError."""
    many = BinanceProtocol({f"S{i}USDT": Market("binance", f"s{i}", "usdt") for i in range(1025)})
    symbols = [f"S{i}USDT" for i in range(1025)]
    assert many.ws_url("wss://h", symbols[:1024]).count("@kline_1m") == 1024
    with pytest.raises(ValueError, match="1025 streams"):
        many.ws_url("wss://h", symbols)
    with pytest.raises(ValueError, match="0 streams"):
        many.ws_url("wss://h", [])
    with pytest.raises(ValueError, match="ETHUSDT"):
        PROTOCOL.ws_url("wss://h", ["BTCUSDT", "ETHUSDT"])


def test_symbols_must_be_binance_symbols() -> None:
    """The symbol map takes Binance's upper-case symbols only."""
    with pytest.raises(ValueError, match="btcusdt"):
        BinanceProtocol({"btcusdt": BTC})
