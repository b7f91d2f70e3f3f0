"""Coinbase Exchange sans-I/O protocol: the recorded feed, bad frames, listing and REST candles."""

from __future__ import annotations

import calendar
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tickstream_shared.naming import Market
from tickstream_watcher.coinbase import MAX_CANDLES_PER_REQUEST, CoinbaseProtocol
from tickstream_watcher.exchange import (
    MAX_FRAME_BYTES,
    MAX_REST_BYTES,
    BadFrame,
    CandleUpdate,
    Heartbeat,
    Reconnect,
    Rejected,
    Trade,
)

CAPTURES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "captures"
CAPTURE = CAPTURES / "COINBASE.ws.28.0"
BTC = Market("coinbase", "btc", "usd")
PROTOCOL = CoinbaseProtocol({"BTC-USD": BTC})
# The documented match example, with a plausible recent time.
MATCH: dict[str, Any] = {
    "type": "match",
    "trade_id": 10,
    "sequence": 50,
    "maker_order_id": "ac928c66-ca53-498f-9c13-a110027a60e8",
    "taker_order_id": "132fb6ae-456b-4654-b4e0-d681ac05cea1",
    "time": "2024-11-07T08:19:27.028459Z",
    "product_id": "BTC-USD",
    "size": "5.23512",
    "price": "400.23",
    "side": "sell",
}
MATCH_MS = 1_730_967_567_028  # 2024-11-07T08:19:27.028Z
# Coinbase quantities are plain decimal strings: every other spelling fails the decoder's pattern.
DECIMAL = "Expected `str` matching regex"


@dataclass(frozen=True)
class Capture:
    product_ids: list[str]  # what the recording subscribed to
    frames: list[str]  # every received frame, in order


@pytest.fixture(scope="module")
def capture() -> Capture:
    if not CAPTURE.is_file():
        pytest.skip(f"capture not found at {CAPTURE} (the shared/ folder beside the repo)")
    product_ids: list[str] = []
    frames: list[str] = []
    for line in CAPTURE.read_text().splitlines():
        if not line.strip():
            continue
        # Lines starting with wss:// are connection events ("<->") or sent frames ("<-").
        _, _, payload = line.partition(": ")
        if line.startswith("wss://"):
            if payload:
                product_ids = json.loads(payload)["product_ids"]
            continue
        frames.append(payload)
    return Capture(product_ids, frames)


def capture_protocol(capture: Capture) -> CoinbaseProtocol:
    return CoinbaseProtocol({pid: market_of_product(pid) for pid in capture.product_ids})


def market_of_product(product_id: str) -> Market:
    base, quote = product_id.lower().split("-")
    return Market("coinbase", base, quote)


def ms_of(rfc3339: str) -> int:
    parsed = datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ")
    return calendar.timegm(parsed.timetuple()) * 1000 + parsed.microsecond // 1000


def frame(**changes: Any) -> str:
    return json.dumps({**MATCH, **changes})


def test_capture_matches_are_exact_trades(capture: Capture) -> None:
    """Every match of the recorded session becomes the Trade its fields say; every last_match
    (a trade before the subscription) a Heartbeat with its trade id."""
    protocol = capture_protocol(capture)
    seen: defaultdict[str, int] = defaultdict(int)
    for text in capture.frames:
        message = json.loads(text)
        if message["type"] == "last_match":
            market = market_of_product(message["product_id"])
            assert protocol.parse(text) == [Heartbeat(market, message["trade_id"])]
        elif message["type"] == "match":
            assert protocol.parse(text) == [
                Trade(
                    market=market_of_product(message["product_id"]),
                    trade_id=message["trade_id"],
                    price=float(message["price"]),
                    size=float(message["size"]),
                    exchange_ts=ms_of(message["time"]),
                )
            ]
        else:
            continue
        seen[message["type"]] += 1
    assert seen == {"last_match": 10, "match": 97}


def test_capture_other_frames_carry_nothing_or_a_heartbeat(capture: Capture) -> None:
    """Subscription acks become Heartbeat(); ticker, snapshot and l2update frames give []."""
    protocol = capture_protocol(capture)
    seen: defaultdict[str, int] = defaultdict(int)
    for text in capture.frames:
        kind = json.loads(text)["type"]
        if kind in ("match", "last_match"):
            continue
        seen[kind] += 1
        expected = [Heartbeat()] if kind == "subscriptions" else []
        assert protocol.parse(text) == expected
        assert protocol.parse(text.encode()) == expected
    assert seen == {"subscriptions": 3, "snapshot": 10, "l2update": 9719, "ticker": 107}


def test_capture_trade_ids_are_continuous_per_product(capture: Capture) -> None:
    """Per product, last_match comes first and trade ids then rise by exactly one: no gap."""
    protocol = capture_protocol(capture)
    ids: defaultdict[Market, list[int]] = defaultdict(list)
    first_types: dict[str, str] = {}
    for text in capture.frames:
        message = json.loads(text)
        if message["type"] in ("match", "last_match"):
            first_types.setdefault(message["product_id"], message["type"])
        for event in protocol.parse(text):
            if isinstance(event, Trade):
                ids[event.market].append(event.trade_id)
            elif message["type"] == "last_match":
                assert isinstance(event, Heartbeat) and event.market is not None
                assert event.last_trade_id is not None
                ids[event.market].append(event.last_trade_id)
    assert set(first_types.values()) == {"last_match"}
    assert len(ids) == len(capture.product_ids) == 10
    for trade_ids in ids.values():
        assert trade_ids == list(range(trade_ids[0], trade_ids[0] + len(trade_ids)))


def test_match_from_bytes_and_str() -> None:
    """A documented match frame gives the same exact Trade from str and from bytes."""
    expected = [Trade(BTC, 10, 400.23, 5.23512, MATCH_MS)]
    assert PROTOCOL.parse(frame()) == expected
    assert PROTOCOL.parse(frame().encode()) == expected
    assert PROTOCOL.parse(frame(type="last_match")) == [Heartbeat(BTC, 10)]


def test_heartbeat_carries_last_trade_id() -> None:
    """A heartbeat becomes Heartbeat with its market and last_trade_id, for the gap check."""
    text = (
        '{"type":"heartbeat","sequence":90,"last_trade_id":20,"product_id":"BTC-USD",'
        '"time":"2024-11-07T08:19:28.464459Z"}'
    )
    assert PROTOCOL.parse(text) == [Heartbeat(BTC, 20)]


def test_error_naming_a_product_is_rejected() -> None:
    """An error naming a product rejects it and asks to reconnect: Coinbase ignores the whole
    subscribe, so the other products are subscribed again without it."""
    text = json.dumps(
        {
            "type": "error",
            "message": "Failed to subscribe",
            "reason": "XYZ-USD is not a valid product",
        }
    )
    assert PROTOCOL.parse(text) == [
        Rejected("XYZ-USD", "Failed to subscribe: XYZ-USD is not a valid product"),
        Reconnect("subscribe refused for XYZ-USD"),
    ]


def test_error_naming_no_product_is_bad_frame() -> None:
    """An error that names no product is a BadFrame carrying the exchange's text."""
    with pytest.raises(BadFrame, match="Failed to subscribe: channel is not valid"):
        PROTOCOL.parse(
            '{"type":"error","message":"Failed to subscribe","reason":"channel is not valid"}'
        )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("not json", "not JSON: JSON is malformed", id="not-json"),
        pytest.param('{"type":"match"', "not JSON: Input data was truncated", id="truncated"),
        pytest.param(
            "[" * 10_000 + "]" * 10_000, "Expected `object`, got `array`", id="deep-array"
        ),
        pytest.param('{"x":' * 10_000 + "1" + "}" * 10_000, "maximum recursion", id="deep-object"),
        pytest.param(
            '{"type":"ticker","x":' + "[" * 10_000 + "]" * 10_000 + "}",
            "maximum recursion",
            id="deep-field",
        ),
        pytest.param('{"product_id":"BTC-USD"}', "missing required field `type`", id="no-type"),
        pytest.param('{"type":7}', r"got `int` - at `\$.type`", id="type-not-string"),
        pytest.param(
            '{"type":"match","product_id":"BTC-USD"}', "missing required field", id="missing-fields"
        ),
        pytest.param(
            '{"type":"heartbeat","product_id":"BTC-USD"}',
            "missing required field `last_trade_id`",
            id="heartbeat-no-id",
        ),
        pytest.param(frame(price="nan"), DECIMAL, id="nan-price"),
        pytest.param(frame(price="inf"), DECIMAL, id="inf-price"),
        pytest.param(frame(price="1e400"), DECIMAL, id="huge-exponent-price"),
        pytest.param(frame(price="-1"), DECIMAL, id="negative-price"),
        pytest.param(frame(price="0"), r"price 0 is not in \(0, 1e\+12\]", id="zero-price"),
        pytest.param(frame(price="1000000000001"), "price 1000000000001 is not", id="over-1e12"),
        pytest.param(frame(price=400.23), r"got `float` - at `\$.price`", id="number-price"),
        pytest.param(frame(size="0"), r"size 0 is not in \(0, 1e\+18\]", id="zero-size"),
        pytest.param(frame(size="1_0"), DECIMAL, id="underscore-size"),
        pytest.param(frame(size="1" * 20), "size 1{20} is not", id="size-over-1e18"),
        pytest.param(frame(trade_id=-1), "Expected `int` >= 0", id="negative-trade-id"),
        pytest.param(frame(trade_id="10"), r"got `str` - at `\$.trade_id`", id="string-trade-id"),
        pytest.param(
            frame(time="2009-12-31T23:59:59.999999Z"), "not between 2010 and 2100", id="pre-2010"
        ),
        pytest.param(
            frame(time="2100-01-01T00:00:00.001Z"), "not between 2010 and 2100", id="after-2100"
        ),
        pytest.param(
            frame(time="2024-11-07T08:19:27.028459"), "with a timezone", id="time-without-zone"
        ),
        pytest.param(frame(product_id="ETH-USD"), "unknown product 'ETH-USD'", id="unknown"),
        pytest.param(
            frame(maker_order_id="x" * MAX_FRAME_BYTES), "exceeds 1048576 bytes", id="oversized"
        ),
    ],
)
def test_malformed_frames_are_bad_frames(text: str, problem: str) -> None:
    """Frames that are not JSON, too deep, too big, incomplete or out of bounds are BadFrame."""
    with pytest.raises(BadFrame, match=problem):
        PROTOCOL.parse(text)
    with pytest.raises(BadFrame, match=problem):
        PROTOCOL.parse(text.encode())


def test_subscribe_frame_and_url() -> None:
    """One subscribe frame asks for matches and heartbeat; the URL is the base URL unchanged."""
    url = "wss://ws-feed.exchange.coinbase.com"
    assert PROTOCOL.ws_url(url, ["BTC-USD"]) == url
    [sent] = PROTOCOL.subscribe_frames(["BTC-USD", "ETH-USD"])
    assert json.loads(sent) == {
        "type": "subscribe",
        "product_ids": ["BTC-USD", "ETH-USD"],
        "channels": ["matches", "heartbeat"],
    }
    assert PROTOCOL.subscribe_frames([]) == []


def test_listing_keeps_online_products() -> None:
    """The listing maps every online, enabled, well-named product to its id; others are skipped."""
    products = [
        {
            "id": "BTC-USD",
            "base_currency": "BTC",
            "quote_currency": "USD",
            "status": "online",
            "display_name": "BTC/USD",
            "trading_disabled": False,
            "base_increment": "0.00000001",
        },
        {"id": "ETH-EUR", "base_currency": "ETH", "quote_currency": "EUR", "status": "online"},
        {"id": "OLD-USD", "base_currency": "OLD", "quote_currency": "USD", "status": "offline"},
        {"id": "DEL-USD", "base_currency": "DEL", "quote_currency": "USD", "status": "delisted"},
        {
            "id": "OFF-USD",
            "base_currency": "OFF",
            "quote_currency": "USD",
            "status": "online",
            "trading_disabled": True,
        },
        {"id": "B.X-USD", "base_currency": "B.X", "quote_currency": "USD", "status": "online"},
        {"id": "ABC-USD/X", "base_currency": "ABC", "quote_currency": "USD", "status": "online"},
    ]
    listing = PROTOCOL.parse_listing(json.dumps(products).encode())
    assert PROTOCOL.listing_path() == "/products"
    assert listing == {BTC: "BTC-USD", Market("coinbase", "eth", "eur"): "ETH-EUR"}
    built = CoinbaseProtocol.from_listing(listing)
    assert built.parse(frame(product_id="ETH-EUR")) == [
        Trade(Market("coinbase", "eth", "eur"), 10, 400.23, 5.23512, MATCH_MS)
    ]


@pytest.mark.parametrize(
    "body",
    [b"{", b'{"message":"x"}', b'[{"id":"BTC-USD"}]', b"[" * 10_000, b" " * (MAX_REST_BYTES + 1)],
)
def test_bad_listing_is_bad_frame(body: bytes) -> None:
    """A listing that is not the documented list of products is a BadFrame."""
    with pytest.raises(BadFrame):
        PROTOCOL.parse_listing(body)


def test_candles_path_is_iso_utc() -> None:
    """The candles path asks for one-minute granularity between ISO 8601 UTC times."""
    start = 1_700_000_040_000  # 2023-11-14T22:14:00Z
    end = start + (MAX_CANDLES_PER_REQUEST - 1) * 60_000
    assert PROTOCOL.candles_path("BTC-USD", start, end) == (
        "/products/BTC-USD/candles?granularity=60"
        "&start=2023-11-14T22:14:00Z&end=2023-11-15T03:13:00Z"
    )


def test_candles_newest_first_become_closed_oldest_first() -> None:
    """REST rows newest first become closed CandleUpdates oldest first, ending a minute later."""
    rows = [
        [1_700_000_100, 36990.5, 37010, 37000.25, 37005, 1.5],
        [1_700_000_040, 36980, 37001, 36985, 37000, 0],
    ]
    candles = PROTOCOL.parse_candles(BTC, json.dumps(rows).encode()).candles
    assert candles == [
        CandleUpdate(
            BTC,
            1_700_000_040_000,
            36985.0,
            37001.0,
            36980.0,
            37000.0,
            0.0,
            None,
            True,
            1_700_000_100_000,
        ),
        CandleUpdate(
            BTC,
            1_700_000_100_000,
            37000.25,
            37010.0,
            36990.5,
            37005.0,
            1.5,
            None,
            True,
            1_700_000_160_000,
        ),
    ]
    # Coinbase candles carry base volume only: their quote volume is unknown, not estimated.
    assert [c.quote_volume for c in candles] == [None, None]
    assert PROTOCOL.parse_candles(BTC, b"[]").candles == []


def test_candles_error_body_is_bad_frame_with_message() -> None:
    """An error object from the candles endpoint is a BadFrame carrying Coinbase's message."""
    with pytest.raises(BadFrame, match="granularity too small for the requested time range"):
        PROTOCOL.parse_candles(
            BTC, b'{"message":"granularity too small for the requested time range"}'
        )


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([[1_700_000_040, 36980, 37001, 36985, 37000, 0]] * 2, id="repeated"),
        pytest.param(
            [[1_700_000_040, 1, 2, 1, 2, 0], [1_700_000_100, 1, 2, 1, 2, 0]], id="oldest-first"
        ),
        pytest.param([[1_700_000_041, 1, 2, 1, 2, 0]], id="not-a-minute"),
        pytest.param([[1_000_000_020, 1, 2, 1, 2, 0]], id="before-2010"),
        pytest.param([[1_700_000_040, 0, 2, 1, 2, 0]], id="zero-low"),
        pytest.param([[1_700_000_040, 1, 2e12, 1, 2, 0]], id="high-over-1e12"),
        pytest.param([[1_700_000_040, 1, 2, 3, 2, 0]], id="open-above-high"),
        pytest.param([[1_700_000_040, 1, 2, 1, 2, -1]], id="negative-volume"),
        pytest.param([[1_700_000_040, 1, 2, 1, 2]], id="short-row"),
        pytest.param([[1_700_000_040, "1", 2, 1, 2, 0]], id="string-number"),
    ],
)
def test_a_bad_candle_row_costs_only_its_own_minute(rows: list[list[Any]]) -> None:
    """A misordered, misaligned, out-of-bounds or malformed row is skipped and named; a good
    row of another minute beside it is kept."""
    good = [1_699_999_980, 1, 2, 1, 2, 0]  # the minute before every row above
    page = PROTOCOL.parse_candles(BTC, json.dumps([*rows, good]).encode())
    assert page.candles[0].minute == 1_699_999_980_000
    assert len(page.candles) == len(rows) and len(page.bad_rows) == 1, page


def test_a_candle_number_beyond_a_double_is_a_bad_row() -> None:
    """A candle number beyond a double (1e400) is a bad row, not an infinite price."""
    huge = PROTOCOL.parse_candles(BTC, b"[[1700000040, 1, 1e400, 1, 2, 0]]")
    assert (huge.candles, len(huge.bad_rows)) == ([], 1)
    beside = PROTOCOL.parse_candles(BTC, b"[5, [1700000040, 1, 2, 1, 2, 0]]")
    assert ([c.minute for c in beside.candles], len(beside.bad_rows)) == ([1700000040000], 1)
