"""KrakenProtocol: WS v2 ohlc/heartbeat/status/ack frames and REST bodies, as documented."""

from __future__ import annotations

import calendar
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickstream_shared.naming import Market
from tickstream_watcher.exchange import (
    MAX_FRAME_BYTES,
    BadFrame,
    CandleUpdate,
    Heartbeat,
    Reconnect,
    Rejected,
)
from tickstream_watcher.kraken import KrakenProtocol, rest_pair, v2_symbol

BTC = Market("kraken", "btc", "usd")
XMR = Market("kraken", "xmr", "usd")
DOGE = Market("kraken", "doge", "eur")
KRAKEN = KrakenProtocol({"BTC/USD": BTC, "XMR/USD": XMR, "DOGE/EUR": DOGE})


def ms(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) * 1000


# A documented v2 ohlc frame (exchange-formats.md) with prices of the recorded v1 sessions.
UPDATE = """{"channel":"ohlc","type":"update","timestamp":"2021-04-17T16:49:02.557535914Z",
"data":[{"symbol":"XMR/USD","open":354.11,"high":354.55,"low":353.81,"close":354.04,
"trades":4,"volume":4.12,"vwap":354.2,"interval_begin":"2021-04-17T16:49:00.000000000Z",
"interval":1}]}"""


def ohlc(entry: str, *, kind: str = "update", stamp: str = "2021-04-17T16:49:02.5Z") -> str:
    """An ohlc frame of one entry given as the JSON text of its fields after `symbol`."""
    head = f'"channel":"ohlc","type":"{kind}","timestamp":"{stamp}"'
    return f'{{{head},"data":[{{"symbol":"XMR/USD",{entry}}}]}}'


GOOD = (
    '"open":354.11,"high":354.55,"low":353.81,"close":354.04,"trades":4,"volume":4.12,'
    '"vwap":354.2,"interval_begin":"2021-04-17T16:49:00.000000000Z","interval":1'
)


def test_ohlc_update_gives_the_candle_stamped_with_the_frame_time() -> None:
    """An update entry becomes a not-closed CandleUpdate at its frame's time in whole ms."""
    minute = ms(2021, 4, 17, 16, 49)
    assert KRAKEN.parse(UPDATE) == [
        CandleUpdate(
            XMR, minute, 354.11, 354.55, 353.81, 354.04, 4.12, 4, False, minute + 2557, 354.2 * 4.12
        )
    ]
    assert KRAKEN.parse(UPDATE.encode()) == KRAKEN.parse(UPDATE)


def test_ohlc_snapshot_gives_one_candle_per_entry() -> None:
    """A snapshot of two symbols gives both candles; XBT-era BTC/USD and DOGE keep v2 names."""
    frame = """{"channel":"ohlc","type":"snapshot","timestamp":"2021-04-17T16:50:10.000001Z",
    "data":[{"symbol":"BTC/USD","open":61250.1,"high":61300,"low":61200.5,"close":61299.9,
    "trades":57,"volume":3.5,"vwap":61260.0,"interval_begin":"2021-04-17T16:50:00Z",
    "interval":1},{"symbol":"DOGE/EUR","open":0.3,"high":0.31,"low":0.29,"close":0.305,
    "trades":0,"volume":0,"vwap":0.3,"interval_begin":"2021-04-17T16:45:00.000Z",
    "interval":1}]}"""
    stamp = ms(2021, 4, 17, 16, 50, 10)
    assert KRAKEN.parse(frame) == [
        CandleUpdate(
            BTC, ms(2021, 4, 17, 16, 50), 61250.1, 61300.0, 61200.5, 61299.9, 3.5, 57, False, stamp,
            214410.0,
        ),
        CandleUpdate(
            DOGE, ms(2021, 4, 17, 16, 45), 0.3, 0.31, 0.29, 0.305, 0.0, 0, False, stamp, 0.0
        ),
    ]  # fmt: skip


def test_ohlc_snapshot_without_timestamp_is_stamped_with_its_minute() -> None:
    """A snapshot without a frame time is dated at its candle's open, never later."""
    frame = '{"channel":"ohlc","type":"snapshot","data":[{"symbol":"XMR/USD",' + GOOD + "}]}"
    minute = ms(2021, 4, 17, 16, 49)
    assert KRAKEN.parse(frame) == [
        CandleUpdate(XMR, minute, 354.11, 354.55, 353.81, 354.04, 4.12, 4, False, minute, 1459.304)
    ]


def test_quote_volume_is_kraken_vwap_times_volume_and_unknown_without_vwap() -> None:
    """Kraken gives no quote volume: it is its own vwap x volume; an entry without vwap, unknown."""
    (candle,) = KRAKEN.parse(ohlc(GOOD))
    assert isinstance(candle, CandleUpdate) and candle.quote_volume == 354.2 * 4.12 == 1459.304
    (bare,) = KRAKEN.parse(ohlc(GOOD.replace('"vwap":354.2,', "")))
    assert isinstance(bare, CandleUpdate) and bare.quote_volume is None


@pytest.mark.parametrize(
    "frame",
    [
        '{"channel":"heartbeat"}',
        '{"method":"pong","req_id":7,"time_in":"2023-09-25T09:04:31.742599Z",'
        '"time_out":"2023-09-25T09:04:31.742648Z"}',
        '{"method":"subscribe","req_id":1,"result":{"channel":"ohlc","symbol":"BTC/USD",'
        '"interval":1,"snapshot":true},"success":true,"time_in":"2023-09-25T09:04:31.742599Z",'
        '"time_out":"2023-09-25T09:04:31.742648Z"}',
        '{"channel":"status","type":"update","data":[{"system":"online","api_version":"v2",'
        '"connection_id":12393906104898154338,"version":"2.0.10"}]}',
        '{"channel":"status","type":"update","data":[{"system":"cancel_only"}]}',
        '{"channel":"status","type":"update","data":[{"system":"post_only"}]}',
    ],
)
def test_liveness_frames_are_heartbeats(frame: str) -> None:
    """Heartbeat, pong, a successful ack and a status other than maintenance say: alive."""
    assert KRAKEN.parse(frame) == [Heartbeat()]


def test_maintenance_status_asks_for_a_reconnect() -> None:
    """System status maintenance is a Reconnect, whatever else the frame lists."""
    frame = '{"channel":"status","type":"update","data":[{"system":"maintenance"}]}'
    assert KRAKEN.parse(frame) == [Reconnect("Kraken system status: maintenance")]


@pytest.mark.parametrize(
    ("frame", "symbol"),
    [
        (
            '{"error":"Currency pair not supported FOO/USD","method":"subscribe",'
            '"result":{"channel":"ohlc","symbol":"FOO/USD"},"success":false,"req_id":1}',
            "FOO/USD",
        ),
        (
            '{"error":"Currency pair not supported FOO/USD","method":"subscribe",'
            '"success":false,"symbol":"FOO/USD","time_in":"2023-09-25T09:04:31.742599Z"}',
            "FOO/USD",
        ),
        (
            '{"error":"Currency pair not supported FOO/USD","method":"subscribe",'
            '"success":false,"req_id":1}',
            "FOO/USD",
        ),
        ('{"error":"Malformed request","method":"subscribe","success":false}', ""),
    ],
)
def test_failed_ack_is_rejected_with_its_symbol(frame: str, symbol: str) -> None:
    """A refused subscription names its symbol from result, the top level or the error text."""
    reason = json.loads(frame)["error"]
    assert KRAKEN.parse(frame) == [Rejected(symbol, reason)]


@pytest.mark.parametrize(
    "frame",
    [
        '{"channel":"ticker","type":"update","data":[{"symbol":"ALGO/USD","bid":0.10025,'
        '"bid_qty":740.0,"ask":0.10036,"ask_qty":1361.44,"last":0.10035,"volume":997038.98,'
        '"vwap":0.10148,"low":0.09979,"high":0.10285,"change":-0.00017,"change_pct":-0.17,'
        '"timestamp":"2023-09-25T09:04:31.742648Z"}]}',
        '{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"buy",'
        '"price":0.5147,"qty":6423.46,"ord_type":"limit","trade_id":4665846,'
        '"timestamp":"2023-09-25T07:48:36.925533Z"}]}',
        '{"channel":"book","type":"update","data":[{"symbol":"BTC/USD","bids":[],"asks":[]}]}',
    ],
)
def test_other_channels_give_nothing(frame: str) -> None:
    """Ticker, trade and book frames carry nothing the watcher uses."""
    assert KRAKEN.parse(frame) == []


DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        b"\xff\xfe",
        '{"channel":"ohlc"',
        "{}",
        "[]",
        DEEP,
        '{"channel":"heartbeat","x":' + DEEP + "}",
        '{"channel":"ohlc","type":"update","timestamp":"2021-04-17T16:49:02Z","data":' + DEEP + "}",
        '{"channel":"ohlc","type":"update","timestamp":"2021-04-17T16:49:02Z"}',
        ohlc(GOOD.replace('"close":354.04,', "")),
        ohlc(GOOD.replace('"trades":4,', "")),
        ohlc(GOOD, kind="partial"),
        '{"channel":"ohlc","type":"update","data":[{"symbol":"XMR/USD",' + GOOD + "}]}",
        ohlc(GOOD, stamp="2021-04-17 16:49:02Z"),
        ohlc(GOOD, stamp="2021-04-17T16:49:02.1234567890Z"),
        ohlc(GOOD, stamp="2021-02-30T16:49:02Z"),
        ohlc(GOOD, stamp="2101-01-01T00:00:00Z"),
        ohlc(GOOD.replace('"high":354.55', '"high":1e400')),
        ohlc(GOOD.replace('"open":354.11', '"open":-354.11')),
        ohlc(GOOD.replace('"low":353.81', '"low":0')),
        ohlc(GOOD.replace('"low":353.81', '"low":354.6')),
        ohlc(GOOD.replace('"close":354.04', '"close":355')),
        ohlc(GOOD.replace('"high":354.55', '"high":2e12')),
        ohlc(GOOD.replace('"volume":4.12', '"volume":-1')),
        ohlc(GOOD.replace('"vwap":354.2', '"vwap":-354.2')),
        ohlc(GOOD.replace('"vwap":354.2', '"vwap":1e400')),
        ohlc(GOOD.replace('"vwap":354.2', '"vwap":3e17')),
        ohlc(GOOD.replace('"vwap":354.2', '"vwap":"354.2"')),
        ohlc(GOOD.replace('"trades":4', '"trades":-1')),
        ohlc(GOOD.replace('"open":354.11', '"open":"354.11"')),
        ohlc(GOOD.replace('"interval":1', '"interval":5')),
        ohlc(GOOD.replace("16:49:00.000000000Z", "16:49:30.000000000Z")),
        ohlc(GOOD.replace("16:49:00.000000000Z", "16:49:00.000000001Z")),
        ohlc(GOOD.replace("2021-04-17T16:49:00.000000000Z", "2009-12-31T23:59:00Z")),
        ohlc(GOOD).replace("XMR/USD", "XMR/EUR"),
        ohlc(GOOD).replace("XMR/USD", "XMRUSD"),
        '{"method":"subscribe","result":{"symbol":"BTC/USD"}}',
        '{"channel":"status","type":"update","data":[{"system":"sleeping"}]}',
        '{"channel":"status","type":"update"}',
        " " * (MAX_FRAME_BYTES - 1) + '{"channel":"heartbeat"}',
    ],
)
def test_malformed_frames_are_bad(frame: str | bytes) -> None:
    """Undecodable, incomplete, out-of-bounds, misaligned, unknown or oversized: BadFrame."""
    with pytest.raises(BadFrame):
        KRAKEN.parse(frame)


def test_bad_frame_carries_the_start_of_the_frame() -> None:
    """A BadFrame keeps the frame's first bytes for the log line."""
    frame = ohlc(GOOD.replace('"interval":1', '"interval":5'))
    with pytest.raises(BadFrame) as caught:
        KRAKEN.parse(frame)
    assert caught.value.raw == frame.encode()[:200]


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_parse_raises_nothing_but_bad_frame(frame: str | bytes) -> None:
    """Arbitrary input gives a list or BadFrame, never another exception."""
    with contextlib.suppress(BadFrame):
        assert isinstance(KRAKEN.parse(frame), list)


@given(st.lists(st.sampled_from(["{", "}", "[", "]", ",", ":", '"a"', "1", "null"]), max_size=60))
def test_parse_of_json_like_noise_raises_nothing_but_bad_frame(parts: list[str]) -> None:
    """Token soup close to JSON gives a list or BadFrame, never another exception."""
    frame = '{"channel":"ohlc","type":"update","data":' + "".join(parts)
    for text in (frame, "".join(parts)):
        with contextlib.suppress(BadFrame):
            KRAKEN.parse(text)


def test_symbols_map_between_legacy_and_v2_names() -> None:
    """XBT↔BTC and XDG↔DOGE both ways; other assets and partial matches stay as they are."""
    assert v2_symbol("XBT/USD") == "BTC/USD"
    assert v2_symbol("XDG/XBT") == "DOGE/BTC"
    assert v2_symbol("ETH/EUR") == "ETH/EUR"
    assert v2_symbol("XBTC/USD") == "XBTC/USD"
    assert rest_pair("BTC/USD") == "XBTUSD"
    assert rest_pair("DOGE/EUR") == "XDGEUR"
    assert rest_pair("ETH/BTC") == "ETHXBT"
    assert rest_pair("XMR/USD") == "XMRUSD"


LISTING = b"""{"error":[],"result":{
"XXBTZUSD":{"altname":"XBTUSD","wsname":"XBT/USD","aclass_base":"currency","base":"XXBT",
  "aclass_quote":"currency","quote":"ZUSD","lot":"unit","status":"online"},
"XDGEUR":{"altname":"XDGEUR","wsname":"XDG/EUR","base":"XXDG","quote":"ZEUR","status":"online"},
"XXMRZUSD":{"altname":"XMRUSD","wsname":"XMR/USD","base":"XXMR","quote":"ZUSD","status":"online"},
"OMGUSD":{"altname":"OMGUSD","wsname":"OMG/USD","base":"OMG","quote":"ZUSD","status":"delisted"},
"WAVESEUR":{"altname":"WAVESEUR","wsname":"WAVES/EUR","base":"WAVES","quote":"ZEUR",
  "status":"cancel_only"},
"XETHZUSD.d":{"altname":"XETHZUSD.d","base":"XETH","quote":"ZUSD","status":"online"},
"ETH2.SETH":{"altname":"ETH2.SETH","wsname":"ETH2.S/ETH","base":"ETH2.S","quote":"XETH",
  "status":"online"},
"KSMXBT":{"altname":"KSMXBT","wsname":"KSM/XBT","base":"KSM","quote":"XXBT"}
}}"""


def test_listing_gives_online_pairs_with_v2_symbols() -> None:
    """Online pairs with a wsname and plain asset names, keyed by market, in v2 spelling."""
    assert KRAKEN.listing_path() == "/0/public/AssetPairs"
    listing = KRAKEN.parse_listing(LISTING)
    assert listing == {
        Market("kraken", "btc", "usd"): "BTC/USD",
        Market("kraken", "doge", "eur"): "DOGE/EUR",
        Market("kraken", "xmr", "usd"): "XMR/USD",
    }
    protocol = KrakenProtocol.from_listing(listing)
    assert protocol.parse(UPDATE)[0] == KRAKEN.parse(UPDATE)[0]


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":["EGeneral:Temporary lockout"]}',
        b'{"error":[],"result":{"XXBTZUSD":{"wsname":7,"status":"online"}}}',
        b"<html>503</html>",
        b" " * (16 << 20) + b"{}",
    ],
)
def test_bad_listing_is_a_bad_frame(body: bytes) -> None:
    """A listing with an error list, of the wrong shape or oversized is a BadFrame."""
    with pytest.raises(BadFrame):
        KRAKEN.parse_listing(body)


def test_candles_path_asks_for_one_minute_candles_of_the_rest_pair() -> None:
    """The REST pair is the legacy name; `since` is a second before the start minute."""
    start = ms(2021, 4, 17, 16, 0)
    path = KRAKEN.candles_path("BTC/USD", start, start + 3_600_000)
    assert path == f"/0/public/OHLC?pair=XBTUSD&interval=1&since={start // 1000 - 1}"
    assert KRAKEN.ws_url("wss://ws.kraken.com/v2", ["BTC/USD"]) == "wss://ws.kraken.com/v2"


OHLC_BODY = b"""{"error":[],"result":{"XXMRZUSD":[
[1618678020,"353.50","354.20","353.40","354.00","353.90","1.25000000",3],
[1618678080,"354.00","354.00","354.00","354.00","354.00","0.00000000",0],
[1618678140,"354.11","354.55","353.81","354.04","354.20","4.12000000",4]
],"last":1618678080}}"""


def test_rest_candles_are_closed_oldest_first_without_the_forming_one() -> None:
    """Every row but the last (forming) one, closed, stamped with the end of its minute."""
    first, second = ms(2021, 4, 17, 16, 47), ms(2021, 4, 17, 16, 48)
    assert KRAKEN.parse_candles(XMR, OHLC_BODY).candles == [
        CandleUpdate(
            XMR, first, 353.5, 354.2, 353.4, 354.0, 1.25, 3, True, first + 60_000, 353.9 * 1.25
        ),
        CandleUpdate(XMR, second, 354.0, 354.0, 354.0, 354.0, 0.0, 0, True, second + 60_000, 0.0),
    ]
    empty = KRAKEN.parse_candles(XMR, b'{"error":[],"result":{"XXMRZUSD":[],"last":0}}')
    assert (empty.candles, empty.bad_rows) == ([], [])


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":["EQuery:Unknown asset pair"]}',
        b'{"error":[],"result":{"last":1618678080}}',
        b'{"error":[],"result":{"A":[],"B":[],"last":1}}',
        b'{"error":[],"result":{"XXMRZUSD":5,"last":[]}}',
    ],
)
def test_bad_rest_answers_are_a_bad_frame(body: bytes) -> None:
    """An error list, or not exactly one pair's list of rows: BadFrame."""
    with pytest.raises(BadFrame):
        KRAKEN.parse_candles(XMR, body)


@pytest.mark.parametrize(
    ("body", "kept"),
    [
        (OHLC_BODY.replace(b"1618678080,", b"1618678050,"), [1618678020]),
        (OHLC_BODY.replace(b"1618678080,", b"1618678020,"), [1618678020]),
        (OHLC_BODY.replace(b'"353.40"', b'"nan"'), [1618678080]),
        (OHLC_BODY.replace(b'"353.40"', b'"x"'), [1618678080]),
        (OHLC_BODY.replace(b'"354.20","353.40"', b'"353.20","353.40"'), [1618678080]),
        (OHLC_BODY.replace(b'"1.25000000"', b'"-1"'), [1618678080]),
        (OHLC_BODY.replace(b'"353.90"', b'"nan"'), [1618678080]),
        (OHLC_BODY.replace(b'"353.90"', b'"-353.90"'), [1618678080]),
        (OHLC_BODY.replace(b'"353.90"', b'"inf"'), [1618678080]),
        (OHLC_BODY.replace(b"[1618678020,", b"[1618678020.5,"), [1618678080]),
        (OHLC_BODY.replace(b",3],", b"],"), [1618678080]),
    ],
)
def test_a_bad_rest_row_costs_only_its_own_minute(body: bytes, kept: list[int]) -> None:
    """A misordered, unaligned or invalid row is skipped and named; the other row is kept."""
    page = KRAKEN.parse_candles(XMR, body)
    assert [c.minute // 1000 for c in page.candles] == kept
    assert len(page.bad_rows) == 1 and page.bad_rows[0].startswith("row "), page.bad_rows


def test_subscribe_frames_carry_at_most_100_symbols_each() -> None:
    """250 symbols go out as ohlc interval 1 subscriptions of 100, 100 and 50 symbols."""
    symbols = [f"S{i}/USD" for i in range(250)]
    frames = [json.loads(frame) for frame in KRAKEN.subscribe_frames(symbols)]
    assert frames == [
        {
            "method": "subscribe",
            "params": {"channel": "ohlc", "symbol": symbols[a:b], "interval": 1, "snapshot": True},
            "req_id": req_id,
        }
        for req_id, (a, b) in enumerate([(0, 100), (100, 200), (200, 250)], start=1)
    ]
    (exactly_100,) = KRAKEN.subscribe_frames(symbols[:100])
    assert json.loads(exactly_100)["params"]["symbol"] == symbols[:100]
    assert KRAKEN.subscribe_frames([]) == []
