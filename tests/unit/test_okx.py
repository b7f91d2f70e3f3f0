"""OkxProtocol: v5 candle1m pushes, events, ping/pong and REST bodies, as documented."""

from __future__ import annotations

import calendar
import contextlib
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import SHARED_DATA
from tickstream_shared.naming import Market
from tickstream_watcher.exchange import (
    MAX_FRAME_BYTES,
    BadFrame,
    CandleUpdate,
    Heartbeat,
    Reconnect,
    Rejected,
)
from tickstream_watcher.okx import (
    MAX_SUBSCRIBE_BYTES,
    SPEC,
    OkxProtocol,
    rest_throttled,
)

M = 60_000
BTC = Market("okx", "btc", "usdt")
ETH = Market("okx", "eth", "usdt")


def ms(year: int, month: int, day: int, hour: int, minute: int) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0, 0, 0, 0)) * 1000


MINUTE = ms(2024, 3, 1, 12, 30)
NOW = MINUTE + 5 * M + 1234  # the clock of OKX below: 5 minutes after MINUTE
OKX = OkxProtocol({"BTC-USDT": BTC, "ETH-USDT": ETH}, clock_ms=lambda: NOW)


def row(
    minute: int = MINUTE,
    prices: tuple[str, str, str, str] = ("61250.1", "61300", "61200.5", "61299.9"),
    volume: str = "3.5",
    quote: str = "214462.5",
    confirm: str = "0",
) -> list[str]:
    return [str(minute), *prices, volume, quote, quote, confirm]


def push(*rows: list[Any], inst: str = "BTC-USDT", channel: str = "candle1m") -> str:
    return json.dumps({"arg": {"channel": channel, "instId": inst}, "data": list(rows)})


def test_a_forming_candle_is_stamped_at_its_open_and_a_confirmed_one_at_its_end() -> None:
    """confirm "0" is a forming CandleUpdate as of its open; "1" a closed one as of its end."""
    assert OKX.parse(push(row(), row(MINUTE + M, confirm="1"), inst="ETH-USDT")) == [
        CandleUpdate(
            ETH, MINUTE, 61250.1, 61300.0, 61200.5, 61299.9, 3.5, None, False, MINUTE, 214462.5
        ),
        CandleUpdate(
            ETH,
            MINUTE + M,
            *(61250.1, 61300.0, 61200.5, 61299.9, 3.5, None, True, MINUTE + 2 * M, 214462.5),
        ),
    ]
    assert OKX.parse(push(row()).encode()) == OKX.parse(push(row()))


def test_the_documented_push_parses() -> None:
    """The example push of exchange-formats.md, on a whole minute, gives its candle; the
    quote volume is volCcyQuote (the 8th field), not volCcy (the 7th)."""
    frame = (
        '{"arg":{"channel":"candle1m","instId":"BTC-USDT"},"data":[["1597026360000",'
        '"8533.02","8553.74","8527.17","8548.26","45247","529.5858061","5529.5858061","0"]]}'
    )
    minute = 1597026360000
    assert OKX.parse(frame) == [
        CandleUpdate(
            BTC,
            *(minute, 8533.02, 8553.74, 8527.17, 8548.26, 45247.0, None, False, minute),
            quote_volume=5529.5858061,
        )
    ]


@pytest.mark.parametrize(
    "frame",
    [
        "pong",
        b"pong",
        '{"id":"1","event":"subscribe","arg":{"channel":"candle1m","instId":"BTC-USDT"},'
        '"connId":"a4d3ae55"}',
        '{"event":"subscribe","arg":{"channel":"candle1m","instId":"BTC-USDT"}}',
        '{"event":"unsubscribe","arg":{"channel":"candle1m","instId":"BTC-USDT"},"connId":"1"}',
    ],
)
def test_pong_and_acks_are_heartbeats(frame: str | bytes) -> None:
    """The text pong (not JSON) and each subscribe answer say: alive."""
    assert OKX.parse(frame) == [Heartbeat()]


def test_notice_64008_asks_for_a_reconnect() -> None:
    """The service-upgrade notice is a Reconnect now, ahead of the close."""
    frame = (
        '{"event":"notice","code":"64008","msg":"The connection will soon be closed for a'
        ' service upgrade. Please reconnect.","connId":"a4d3ae55"}'
    )
    assert OKX.parse(frame) == [
        Reconnect(
            "okx notice 64008: The connection will soon be closed for a service upgrade."
            " Please reconnect."
        )
    ]


def test_a_refused_instrument_is_rejected_and_the_rest_resubscribed() -> None:
    """60018 names the instId in its text: Rejected, then Reconnect without it."""
    msg = (
        "Wrong URL or channel:candle1m,instId:OLD-USDT doesn't exist. Please use the correct"
        " URL, channel and parameters referring to API document."
    )
    frame = json.dumps({"id": "1", "event": "error", "code": "60018", "msg": msg, "connId": "x"})
    assert OKX.parse(frame) == [
        Rejected("OLD-USDT", msg[:200]),
        Reconnect("subscribe refused for OLD-USDT"),
    ]


@pytest.mark.parametrize(
    ("code", "message", "problem"),
    [
        ("60012", 'Invalid request: {"op":"subscribe"}', "okx error 60012: Invalid request"),
        (
            "64001",
            "This channel has been migrated to the '/business' URL. Please subscribe using the"
            " new URL.",
            "okx error 64001: channel not served on this URL (OKX_WS_URL)",
        ),
        ("64002", "This channel is not supported by business URL.", "okx error 64002"),
        (
            "60018",
            "Wrong URL or channel:candle1m doesn't exist.",
            "okx error 60018 naming no instId",
        ),
        ("60004", "Invalid timestamp", "okx error 60004: Invalid timestamp"),
    ],
)
def test_other_errors_are_bad_frames_with_okx_code(code: str, message: str, problem: str) -> None:
    """Errors that no reconnect fixes are BadFrames saying OKX's code and message."""
    frame = json.dumps({"id": "1", "event": "error", "code": code, "msg": message})
    with pytest.raises(BadFrame, match="^" + problem.replace("(", r"\(").replace(")", r"\)")):
        OKX.parse(frame)


def captured_frames() -> list[str]:
    """Every frame received in the recorded OKX v5 public session (tickers, trades, books)."""
    path = SHARED_DATA / "captures" / "OKX.ws.1.0"
    if not path.exists():
        pytest.skip(f"capture not found at {path}")
    frames = []
    for line in path.read_text().splitlines()[1:]:
        head, _, frame = line.partition(": ")
        if "<-" not in head:  # frames the client sent are marked `URL <- time`
            frames.append(frame)
    assert len(frames) > 400
    return frames


def test_captured_session_parses_to_acks_and_nothing_else() -> None:
    """Real OKX frames of other channels give nothing; its acks are heartbeats."""
    events = [OKX.parse(frame) for frame in captured_frames()]
    acks = sum(frame.startswith('{"event":"subscribe"') for frame in captured_frames())
    assert acks == 18
    assert [e for e in events if e] == [[Heartbeat()]] * acks


@pytest.mark.parametrize(
    "frame",
    [
        '{"event":"notice","code":"64009","msg":"something else"}',
        '{"event":"channel-conn-count","channel":"candle1m","connCount":"2","connId":"x"}',
        '{"event":"login","code":"0","msg":""}',
        push(row(), channel="candle5m"),
        push(row(), channel="tickers"),
    ],
)
def test_other_events_and_channels_give_nothing(frame: str) -> None:
    """Other notices, connection counts and channels carry nothing the watcher uses."""
    assert OKX.parse(frame) == []


DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize(
    "frame",
    [
        "ping",
        "PONG",
        "not json",
        b"\xff\xfe",
        "\udcff",
        "{}",
        "[]",
        DEEP,
        '{"arg":{"channel":"candle1m","instId":"BTC-USDT"},"data":' + DEEP + "}",
        '{"arg":{"channel":"candle1m","instId":"BTC-USDT"}}',
        '{"arg":{"channel":"candle1m","instId":"BTC-USDT"},"data":5}',
        push(row(), inst="XYZ-USDT"),
        push(row()[:8]),  # 8 elements
        push([*row(), "extra"]),
        push(row(confirm="2")),
        push(row(confirm="true")),
        push([MINUTE, *row()[1:]]),  # ts as a number
        push(row(minute=MINUTE + 30_000)),  # not a minute start
        push(row(minute=ms(2009, 12, 31, 23, 59))),
        push(row(minute=ms(2100, 1, 1, 0, 0))),
        push(row(prices=("1", "2", "0.5", "3"))),  # close above high
        push(row(prices=("1", "2", "3", "1.5"))),  # low above high
        push(row(prices=("0", "2", "0", "1"))),  # a zero price
        push(row(prices=("1", "2e12", "0.5", "1"))),
        push(row(prices=("nan", "2", "0.5", "1"))),
        push(row(prices=("-1", "2", "0.5", "1"))),
        push(row(prices=("1", "2", "0.5", "1e3"))),
        push(row(volume="-1")),
        push(row(volume="1" * 20)),
        push(row(quote="1" * 20)),  # quote volume beyond 1e18
        push(row(quote="inf")),
        push([1, 2, 3, 4, 5, 6, 7, 8, 9]),
        '{"event":"error","msg":"no code"}',
        '{"event":"notice"',
        " " * (MAX_FRAME_BYTES - 3) + "pong",
    ],
)
def test_malformed_frames_are_bad(frame: str | bytes) -> None:
    """Undecodable, incomplete, out-of-bounds, misaligned, unknown or oversized: BadFrame."""
    with pytest.raises(BadFrame):
        OKX.parse(frame)


def test_bad_frame_carries_the_start_of_the_frame() -> None:
    """A BadFrame keeps the frame's first bytes for the log line."""
    frame = push(row(confirm="2"))
    with pytest.raises(BadFrame) as caught:
        OKX.parse(frame)
    assert caught.value.raw == frame.encode()[:200]


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_parse_raises_nothing_but_bad_frame(frame: str | bytes) -> None:
    """Arbitrary input gives a list or BadFrame, never another exception."""
    with contextlib.suppress(BadFrame):
        assert isinstance(OKX.parse(frame), list)


@given(st.lists(st.sampled_from(["{", "}", "[", "]", ",", ":", '"1"', "1", "null"]), max_size=60))
def test_parse_of_json_like_noise_raises_nothing_but_bad_frame(parts: list[str]) -> None:
    """Token soup close to a candle push gives a list or BadFrame, never another exception."""
    frame = '{"arg":{"channel":"candle1m","instId":"BTC-USDT"},"data":' + "".join(parts)
    for text in (frame, "".join(parts)):
        with contextlib.suppress(BadFrame):
            OKX.parse(text)


def test_subscribe_frames_name_candle1m_and_stay_within_4096_bytes() -> None:
    """Every symbol is subscribed once, in order, in frames of at most 4096 bytes."""
    symbols = [f"COIN{i:04d}-USDT" for i in range(300)]
    frames = OKX.subscribe_frames(symbols)
    assert len(frames) == 4
    subscribed = []
    for number, frame in enumerate(frames, start=1):
        assert len(frame.encode()) <= MAX_SUBSCRIBE_BYTES
        request = json.loads(frame)
        assert request["id"] == str(number) and request["op"] == "subscribe"
        assert {arg["channel"] for arg in request["args"]} == {"candle1m"}
        subscribed += [arg["instId"] for arg in request["args"]]
    assert subscribed == symbols
    assert OKX.subscribe_frames(["BTC-USDT"]) == [
        '{"id":"1","op":"subscribe","args":[{"channel":"candle1m","instId":"BTC-USDT"}]}'
    ]
    assert OKX.subscribe_frames([]) == []


def test_ws_url_is_the_business_endpoint_as_configured() -> None:
    """Channels go in subscribe frames: the URL is the configured one, unchanged."""
    url = "wss://ws.okx.com:8443/ws/v5/business"
    assert OKX.ws_url(url, ["BTC-USDT"]) == url


def envelope(data: Any, code: str = "0", msg: str = "") -> bytes:
    return json.dumps({"code": code, "msg": msg, "data": data}).encode()


def instrument(inst: str, base: str, quote: str, state: str = "live", kind: str = "SPOT") -> Any:
    return {
        "instType": kind,
        "instId": inst,
        "baseCcy": base,
        "quoteCcy": quote,
        "tickSz": "0.1",
        "lotSz": "0.00000001",
        "minSz": "0.00001",
        "listTime": "1606468572000",
        "state": state,
    }


def test_listing_keeps_live_spot_instruments_by_their_currencies() -> None:
    """Only `live` SPOT entries with usable names count; the market is baseCcy/quoteCcy."""
    body = envelope(
        [
            instrument("BTC-USDT", "BTC", "USDT"),
            instrument("ETH-USD", "ETH", "USD"),
            instrument("NEW-USDT", "NEW", "USDT", state="preopen"),
            instrument("OLD-USDT", "OLD", "USDT", state="suspend"),
            instrument("TST-USDT", "TST", "USDT", state="test"),
            instrument("BTC-USDT-SWAP", "BTC", "USDT", kind="SWAP"),
            instrument("A.B-USDT", "A.B", "USDT"),
            instrument("btc-usdc", "BTC", "USDC"),
            {"instId": "XRP-USDT"},  # no state: not known to trade
        ]
    )
    assert OKX.parse_listing(body) == {BTC: "BTC-USDT", Market("okx", "eth", "usd"): "ETH-USD"}
    assert OKX.listing_path() == "/api/v5/public/instruments?instType=SPOT"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (envelope([], code="50011", msg="Rate limit reached."), "okx error 50011: Rate limit"),
        (envelope([], code="51001", msg="Instrument ID does not exist"), "okx error 51001"),
        (b'{"msg":"","data":[]}', "invalid"),
        (b"<html>busy</html>", "not JSON"),
        (envelope({"instId": "BTC-USDT"}), "invalid"),
        (envelope([{"state": "live"}]), "invalid"),
    ],
)
def test_bad_listings_are_bad_frames(body: bytes, problem: str) -> None:
    """An error code, a non-envelope or data that is not a list of instruments: BadFrame."""
    with pytest.raises(BadFrame, match=problem):
        OKX.parse_listing(body)


def query_of(path: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(path)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_candles_path_asks_recent_minutes_of_candles_and_older_of_history() -> None:
    """Within the latest 24 h (less a margin) candles is asked for up to 300 rows, before it
    history-candles for up to 100, each for the open times start..end through the exclusive
    `before` and `after`."""
    current = NOW - NOW % M
    start, end = current - 300 * M, current - M
    assert query_of(OKX.candles_path("BTC-USDT", start, end)) == (
        "/api/v5/market/candles",
        {
            "instId": "BTC-USDT",
            "bar": "1m",
            "after": str(end + 1),
            "before": str(start - 1),
            "limit": "300",
        },
    )
    edge = current - 1435 * M
    assert query_of(OKX.candles_path("ETH-USDT", edge, edge + 99 * M))[0] == (
        "/api/v5/market/candles"
    )
    path, query = query_of(OKX.candles_path("ETH-USDT", edge - M, edge + 98 * M))
    assert path == "/api/v5/market/history-candles"
    assert (query["after"], query["before"]) == (str(edge + 98 * M + 1), str(edge - M - 1))
    assert query["limit"] == "100"


def test_rest_candles_are_closed_oldest_first_without_the_forming_one() -> None:
    """Rows newest first become closed candles oldest first, stamped at their minute's end;
    the confirm "0" row (the minute still forming) is left out and is not a bad row."""
    body = envelope(
        [
            row(MINUTE + 2 * M, confirm="0"),
            row(MINUTE + M, prices=("2", "3", "1", "2.5"), volume="7", quote="17.5", confirm="1"),
            row(MINUTE, confirm="1"),
        ]
    )
    page = OKX.parse_candles(BTC, body)
    assert page.bad_rows == []
    assert page.candles == [
        CandleUpdate(
            BTC, MINUTE, 61250.1, 61300.0, 61200.5, 61299.9, 3.5, None, True, MINUTE + M, 214462.5
        ),
        CandleUpdate(BTC, MINUTE + M, 2.0, 3.0, 1.0, 2.5, 7.0, None, True, MINUTE + 2 * M, 17.5),
    ]
    assert OKX.parse_candles(BTC, envelope([])).candles == []


@pytest.mark.parametrize(
    ("rows", "kept", "problem"),
    [
        ([row(MINUTE + M, confirm="1"), row(MINUTE, volume="-1", confirm="1")], [1], "invalid"),
        ([row(MINUTE + M, confirm="1"), row(MINUTE, confirm="1")[:8]], [1], "invalid"),
        ([row(MINUTE + M, confirm="1"), "x", row(MINUTE, confirm="1")], [0, 1], "invalid"),
        # newest first expected: the older row given first ends up after the newer one
        ([row(MINUTE, confirm="1"), row(MINUTE + M, confirm="1")], [1], "not after"),
        (
            [row(MINUTE + M, confirm="1"), row(MINUTE + 7, confirm="1")],
            [1],
            "not a plausible minute",
        ),
        ([row(MINUTE + M, quote="1e3", confirm="1"), row(MINUTE, confirm="1")], [0], "invalid"),
    ],
)
def test_a_bad_rest_row_costs_only_its_own_minute(
    rows: list[Any], kept: list[int], problem: str
) -> None:
    """An invalid or misordered row is skipped and named; the others are kept."""
    page = OKX.parse_candles(BTC, envelope(rows))
    assert [(c.minute - MINUTE) // M for c in page.candles] == kept
    assert len(page.bad_rows) == 1 and problem in page.bad_rows[0]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            envelope([], code="50011", msg="Rate limit reached. Please refer to API document"),
            "okx error 50011: Rate limit reached",
        ),
        (envelope([], code="51000", msg="Parameter bar error"), "okx error 51000"),
        (b'{"code":"0","msg":"","data":{"ts":"1"}}', "invalid"),
        (b"[]", "invalid"),
        (b"", "not JSON"),
    ],
)
def test_bad_rest_answers_are_a_bad_frame(body: bytes, problem: str) -> None:
    """An error code or a body that is not a list of rows is a BadFrame."""
    with pytest.raises(BadFrame, match=problem):
        OKX.parse_candles(BTC, body)


@pytest.mark.parametrize(
    ("body", "throttled"),
    [
        (envelope([], code="50011", msg="Rate limit reached."), True),
        (envelope([], code="50013", msg="Systems are busy."), True),
        (b'{"code":50011,"msg":"Too Many Requests"}', True),
        (envelope([], code="0"), False),
        (envelope([], code="51000"), False),
        (b"not json", False),
        (b"[1,2]", False),
    ],
)
def test_rate_limit_codes_are_throttling_whatever_the_status(body: bytes, throttled: bool) -> None:
    """50011 and 50013 ask the paced client to wait and retry; other bodies do not."""
    assert rest_throttled(body) is throttled
    assert SPEC.rest_throttled is rest_throttled


def test_instids_must_be_spot_instids() -> None:
    """A protocol is never built for something that is not `BASE-QUOTE` upper case."""
    for bad in ("btc-usdt", "BTC-USDT-SWAP", "BTCUSDT", "BTC-USDT&x=1"):
        with pytest.raises(ValueError, match="not OKX spot instIds"):
            OkxProtocol({bad: BTC})


def test_spec_keeps_within_okx_limits() -> None:
    """Pages fit the endpoint that serves them (history-candles 100, candles 300 within its
    latest 1,440 rows less a margin), REST stays within each endpoint's limit (candles 40 per
    2 s, the others 20), the text ping comes before OKX's 30 s, and a connection carries a
    bounded number of channels."""
    assert SPEC.page_minutes == 100 and SPEC.rest_interval_s >= 0.1
    assert SPEC.recent_pages is not None
    assert SPEC.recent_pages.page_minutes == 300 and SPEC.recent_pages.horizon_minutes < 1440
    assert all(interval >= 0.05 for interval in SPEC.rest_paces.values())
    assert SPEC.limits.keepalive_frame == "ping"
    assert SPEC.limits.keepalive_s is not None
    assert SPEC.limits.keepalive_s < 30 <= SPEC.limits.silence_s
    assert SPEC.limits.min_reconnect_s >= 1.0 and SPEC.markets_per_connection == 200
