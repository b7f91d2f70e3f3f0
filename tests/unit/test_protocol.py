"""The WebSocket protocol, sans I/O: command parsing, parameter checks and frame encoding."""

from __future__ import annotations

import json

import pytest

from tickstream_gateway.protocol import (
    MAX_FRAME_BYTES,
    MAX_JSON_DEPTH,
    BarPoint,
    Ping,
    ProtocolError,
    Subscribe,
    Subscription,
    Unsubscribe,
    bar_frame,
    encode,
    error_frame,
    gap_frame,
    history_frame,
    nesting_exceeds,
    parse_by,
    parse_command,
    parse_since,
    parse_statuses,
    ranks_frame,
    status_frame,
)
from tickstream_gateway.selection import Selection
from tickstream_shared.errors import MAX_ECHO_CHARS, echo
from tickstream_shared.naming import Market
from tickstream_shared.schemas import MAX_TS_MS, MIN_TS_MS, Tick

BTC = Market("binance", "btc", "usdt")
MINUTE = 1_680_000_000_000

# The largest history frame the schema allows: 1,441 bars whose five floats each take the
# longest encoding msgspec produces for a finite positive double (23 characters, e.g. a
# SHIB-like price 0.000026853072854336854), seq 2**62, trades 2**40, `closed` false, and a
# market id of the schema's 120-character limit. docs/protocol.md quotes this number.
LONGEST_FLOAT = 0.000026853072854336854
LARGEST_HISTORY_FRAME_BYTES = 451_214


def bar(
    seq: int,
    minute: int = MINUTE,
    *,
    close: float = 2.0,
    closed: bool = False,
    quote_volume: float | None = None,
) -> Tick:
    return Tick(
        market=BTC.id,
        minute=minute,
        seq=seq,
        exchange_ts=minute + 1000,
        received_ts=minute + 1100,
        open=1.5,
        high=3.0,
        low=1.0,
        close=close,
        volume=0.25,
        trades=None,
        closed=closed,
        quote_volume=quote_volume,
    )


def test_parse_valid_commands() -> None:
    """Subscribe, unsubscribe and ping frames parse into commands with their defaults."""
    assert parse_command('{"op":"ping"}') == Ping()
    assert parse_command(
        '{"op":"subscribe","channel":"market","market":"binance:btc-usdt"}'
    ) == Subscribe(Subscription("market", market=BTC), since=None)
    assert parse_command('{"op":"subscribe","channel":"ranks","kind":"volume"}') == Subscribe(
        Subscription("ranks", kind="volume", measure="cv", selection=Selection(limit=20))
    )
    assert parse_command('{"op":"unsubscribe","channel":"ranks","kind":"price"}') == Unsubscribe(
        Subscription("ranks", kind="price")
    )
    assert parse_command('{"op":"subscribe","channel":"alerts"}') == Subscribe(
        Subscription("alerts")
    )


def test_subscribe_carries_since_and_by() -> None:
    """A market subscribe keeps `since`; a ranks subscribe keeps `by`."""
    market = parse_command(
        f'{{"op":"subscribe","channel":"market","market":"binance:btc-usdt","since":{MINUTE}}}'
    )
    assert market == Subscribe(Subscription("market", market=BTC), since=MINUTE)
    ranks = parse_command('{"op":"subscribe","channel":"ranks","kind":"price","by":"logret"}')
    assert ranks == Subscribe(
        Subscription("ranks", kind="price", measure="logret", selection=Selection(limit=20))
    )
    # One rank subscription per kind: unsubscribe ignores `by`.
    assert parse_command(
        '{"op":"unsubscribe","channel":"ranks","kind":"volume","by":"nonsense"}'
    ) == Unsubscribe(Subscription("ranks", kind="volume"))


def test_a_ranks_subscribe_carries_its_page_and_filters() -> None:
    """`limit` (default 20, at most 100), `offset`, `exchange`, `quote` and `q` are kept."""
    command = parse_command(
        '{"op":"subscribe","channel":"ranks","kind":"volume","limit":5,"offset":10,'
        '"exchange":"Binance","quote":"usdt","q":" BTC "}'
    )
    assert command == Subscribe(
        Subscription(
            "ranks",
            kind="volume",
            measure="cv",
            selection=Selection("binance", "usdt", "btc", offset=10, limit=5),
        )
    )


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ('"limit":101', "bad_limit", "limit must be between 1 and 100, not 101"),
        ('"limit":0', "bad_limit", "limit must be between 1 and 100, not 0"),
        ('"limit":"5"', "bad_limit", "limit must be an integer"),
        ('"limit":true', "bad_limit", "limit must be an integer"),
        ('"offset":-1', "bad_offset", "offset '-1' is not an integer in 0..100000"),
        ('"quote":7', "bad_quote", "quote must be a string"),
        ('"quote":"us dt"', "bad_quote", "quote 'us dt' must be 1 to 32 of a-z and 0-9"),
        ('"exchange":""', "bad_exchange", "exchange '' must be 1 to 32 of a-z and 0-9"),
        ('"q":"b%"', "bad_query", "q 'b%' must be 1 to 64 of a-z, 0-9, ':' and '-'"),
    ],
)
def test_a_bad_ranks_page_or_filter_is_refused(fields: str, code: str, message: str) -> None:
    """Each bad field of a ranks subscribe names itself and what is allowed."""
    with pytest.raises(ProtocolError) as info:
        parse_command(f'{{"op":"subscribe","channel":"ranks","kind":"price",{fields}}}')
    assert (info.value.code, info.value.message) == (code, message)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{", "bad_json"),
        ("[]", "bad_request"),
        ('{"op":"dance"}', "bad_request"),
        ('{"op":"subscribe","channel":"weather"}', "bad_request"),
        ('{"op":"subscribe","channel":"market"}', "bad_request"),
        ('{"op":"subscribe","channel":"market","market":"btc"}', "bad_market"),
        ('{"op":"subscribe","channel":"ranks","kind":"spread"}', "bad_kind"),
        ('{"op":"subscribe","channel":"ranks"}', "bad_kind"),
        ('{"op":"subscribe","channel":"ranks","kind":"volume","by":"logret"}', "bad_measure"),
        ('{"op":"subscribe","channel":"ranks","kind":"price","by":"sharpe"}', "bad_measure"),
        ('{"op":"subscribe","channel":"ranks","kind":"price","by":1}', "bad_measure"),
        ('{"op":"subscribe","channel":"market","market":"a:b-c","since":"x"}', "bad_since"),
        ('{"op":"subscribe","channel":"market","market":"a:b-c","since":1.5e12}', "bad_since"),
        ('{"op":"subscribe","channel":"market","market":"a:b-c","since":true}', "bad_since"),
        ('{"op":"subscribe","channel":"market","market":"a:b-c","since":-60000}', "bad_since"),
        ("x" * (MAX_FRAME_BYTES + 1), "frame_too_large"),
        ("[" * 2048 + "]" * 2048, "bad_json"),  # 4 KB of nesting: once a RecursionError
        ('{"op":"ping","x":' + "[" * (MAX_JSON_DEPTH) + "]" * MAX_JSON_DEPTH + "}", "bad_json"),
        (b'{"op":"ping"}', "bad_request"),  # binary frames are refused, whatever they hold
        ('{"op":"subscribe","channel":"market","market":"a:b-' + "c" * 200 + '"}', "bad_market"),
    ],
)
def test_bad_frames_get_a_code(frame: str | bytes, code: str) -> None:
    """Every malformed frame raises ProtocolError with a specific code."""
    with pytest.raises(ProtocolError) as info:
        parse_command(frame)
    assert info.value.code == code


def test_frame_limit_counts_utf8_bytes() -> None:
    """4096 bytes of UTF-8 pass, one more fails, though multibyte text has fewer characters."""
    padding = 4096 - len('{"op":"ping","pad":""}')
    assert padding % 2 == 0
    fits = '{"op":"ping","pad":"' + "é" * (padding // 2) + '"}'
    assert (len(fits), len(fits.encode())) == (2059, 4096)
    assert parse_command(fits) == Ping()
    with pytest.raises(ProtocolError) as info:
        parse_command('{"op":"ping","pad":"' + "€" * (padding // 3 + 1) + '"}')
    assert (info.value.code, info.value.message) == (
        "frame_too_large",
        "frames are limited to 4096 bytes",
    )


def test_nesting_is_counted_outside_strings() -> None:
    """Brackets inside strings, escaped quotes included, do not count as nesting."""
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert not nesting_exceeds(deep, MAX_JSON_DEPTH)
    assert nesting_exceeds("[" + deep + "]", MAX_JSON_DEPTH)
    quoted = '{"op":"ping","pad":"\\"' + "[{" * 100 + '"}'
    assert nesting_exceeds(quoted.replace('"', ""), MAX_JSON_DEPTH)
    assert not nesting_exceeds(quoted, MAX_JSON_DEPTH)
    assert parse_command(quoted) == Ping()


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            '{"op":"subscribe","channel":"ranks","kind":"price","by":"' + "b" * 3000 + '"}',
            f"measure {echo('b' * 3000)} is not one of std, cv, logret for kind price",
        ),
        (
            '{"op":"subscribe","channel":"ranks","kind":"' + "k" * 3000 + '"}',
            f"channel 'ranks' needs 'kind': kind {echo('k' * 3000)} is not one of "
            "price, volume, turnover",
        ),
        (
            '{"op":"subscribe","channel":"market","market":"a:b-c","since":"' + "9" * 3000 + '"}',
            f"since {echo('9' * 3000)} is not an integer (ms)",
        ),
        (
            '{"op":"subscribe","channel":"market","market":"' + "M" * 100 + '"}',
            f"market id {echo('M' * 100)} is not <exchange>:<base>-<quote>",
        ),
    ],
)
def test_error_messages_echo_a_short_prefix(frame: str, expected: str) -> None:
    """Errors quote at most MAX_ECHO_CHARS characters of what the client sent."""
    with pytest.raises(ProtocolError) as info:
        parse_command(frame)
    assert info.value.message == expected
    assert len(info.value.message) < MAX_ECHO_CHARS + 80


def test_echo_cuts_long_input_and_marks_it() -> None:
    """Short input is quoted whole; long input is cut to its first characters and marked."""
    assert echo("abc") == "'abc'"
    assert echo("x" * MAX_ECHO_CHARS) == repr("x" * MAX_ECHO_CHARS)
    assert echo("x" * 5000) == repr("x" * MAX_ECHO_CHARS) + "…"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        (MIN_TS_MS, MIN_TS_MS),
        (MAX_TS_MS, MAX_TS_MS),
        (str(MINUTE), MINUTE),
        (MINUTE + 1, MINUTE + 1),  # not a multiple of a minute: bars with minute >= it
    ],
)
def test_since_accepts_plausible_times(raw: object, expected: int | None) -> None:
    """`since` is an int or a digit string within 2010..2100 in ms; absent means no filter."""
    assert parse_since(raw) == expected


@pytest.mark.parametrize(
    "raw", ["soon", "", " 1680000000000", "1_680_000_000_000", "99999999999999999999", 0, 12.0]
)
def test_since_refuses_anything_else(raw: object) -> None:
    """Non-integers and times outside the plausible range are `bad_since`."""
    with pytest.raises(ProtocolError) as info:
        parse_since(raw)
    assert info.value.code == "bad_since"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("retracted", ("retracted",)),
        ("provisional,confirmed,provisional", ("provisional", "confirmed")),
    ],
)
def test_statuses_filter_alerts_by_comma_separated_names(
    raw: str | None, expected: tuple[str, ...] | None
) -> None:
    """`/api/alerts?status=` names statuses once each, in order; absent means all of them."""
    assert parse_statuses(raw) == expected


@pytest.mark.parametrize("raw", ["", "withdrawn", "confirmed,", "Confirmed", "confirmed retracted"])
def test_statuses_refuse_anything_else(raw: str) -> None:
    """An empty name or one that is not a status is `bad_status`, echoing the word."""
    with pytest.raises(ProtocolError) as info:
        parse_statuses(raw)
    assert info.value.code == "bad_status"
    assert "is not one of: provisional, confirmed, retracted" in info.value.message


def test_by_defaults_to_a_measure_that_compares_and_depends_on_kind() -> None:
    """`by` is logret for price and cv for volume when absent; logret exists only for price."""
    assert parse_by("price", None) == "logret"
    assert parse_by("volume", None) == "cv"
    assert parse_by("price", "std") == "std"
    assert parse_by("volume", "cv") == "cv"
    assert parse_by("price", "logret") == "logret"
    with pytest.raises(ProtocolError) as info:
        parse_by("volume", "logret")
    assert info.value.code == "bad_measure"


def test_bar_frame_carries_every_bar_field() -> None:
    """A `bar` frame is the market, the bar fields and received_ts, and nothing else."""
    frame = json.loads(bar_frame(bar(7, close=2.5, closed=True, quote_volume=0.625)).text)
    assert frame == {
        "type": "bar",
        "market": "binance:btc-usdt",
        "minute": MINUTE,
        "seq": 7,
        "exchange_ts": MINUTE + 1000,
        "received_ts": MINUTE + 1100,
        "open": 1.5,
        "high": 3.0,
        "low": 1.0,
        "close": 2.5,
        "volume": 0.25,
        "quote_volume": 0.625,
        "trades": None,
        "closed": True,
    }
    # Unknown (a Coinbase REST-repaired minute): null, never 0.
    assert json.loads(bar_frame(bar(7)).text)["quote_volume"] is None


def test_history_frame_lists_bars_oldest_first() -> None:
    """A `history` frame names the market and `since` and holds one point per minute, its
    quote volume null where unknown."""
    bars = [bar(1), bar(5, MINUTE + 60_000, quote_volume=0.5)]
    frame = json.loads(history_frame(BTC.id, bars, MINUTE).text)
    assert frame["type"] == "history"
    assert (frame["market"], frame["since"]) == ("binance:btc-usdt", MINUTE)
    assert frame["bars"][1] == {
        "minute": MINUTE + 60_000,
        "seq": 5,
        "exchange_ts": MINUTE + 61_000,
        "open": 1.5,
        "high": 3.0,
        "low": 1.0,
        "close": 2.0,
        "volume": 0.25,
        "quote_volume": 0.5,
        "trades": None,
        "closed": False,
    }
    assert frame["bars"][0]["quote_volume"] is None
    assert [p["seq"] for p in frame["bars"]] == [1, 5]


def test_status_and_error_frames() -> None:
    """Subscribed frames echo the subscription (with `by` for ranks); errors carry a code."""
    ranks = Subscription("ranks", kind="price", measure="cv", selection=Selection(quote="usd"))
    assert json.loads(status_frame("subscribed", ranks).text) == {
        "type": "subscribed",
        "channel": "ranks",
        "kind": "price",
        "by": "cv",
        "quote": "usd",
        "offset": 0,
        "limit": 100,
    }
    assert json.loads(error_frame("bad_since", "no").text) == {
        "type": "error",
        "code": "bad_since",
        "message": "no",
    }


def test_largest_history_frame_size() -> None:
    """1,441 bars with the longest encodings the schema allows make the documented frame size."""
    market_id = f"{'x' * 100}:{'y' * 9}-{'z' * 9}"
    assert len(market_id) == 120
    assert len(encode(LONGEST_FLOAT)) == 23
    bars = [
        Tick(
            market=market_id,
            minute=MINUTE + i * 60_000,
            seq=2**62,
            exchange_ts=MINUTE + i * 60_000 + 59_999,
            received_ts=MINUTE,
            open=LONGEST_FLOAT,
            high=LONGEST_FLOAT,
            low=LONGEST_FLOAT,
            close=LONGEST_FLOAT,
            volume=LONGEST_FLOAT,
            trades=2**40,
            closed=False,
            quote_volume=LONGEST_FLOAT,
        )
        for i in range(1441)
    ]
    frame = history_frame(market_id, bars, MINUTE)
    assert len(frame.text.encode()) == frame.size == LARGEST_HISTORY_FRAME_BYTES


def test_history_of_encoded_points_is_what_msgspec_writes() -> None:
    """Joining cached points gives byte for byte the encoding of the whole history frame."""
    bars = [bar(1), bar(5, MINUTE + 60_000, close=0.1 + 0.2, closed=True)]
    for since in (None, MINUTE):
        whole = {
            "type": "history",
            "market": BTC.id,
            "since": since,
            "bars": [BarPoint(*(getattr(t, f) for f in BarPoint.__struct_fields__)) for t in bars],
        }
        assert history_frame(BTC.id, bars, since).text.encode() == encode(whole)
    assert json.loads(history_frame(BTC.id, [], None).text)["bars"] == []


def test_frames_say_what_may_replace_them_in_a_slow_client_queue() -> None:
    """Forming bars and ranks are newest-state frames; closed bars, gaps and alerts are not."""
    forming, closed = bar_frame(bar(1)), bar_frame(bar(2, closed=True))
    assert (forming.stream, forming.key, forming.latest) == (BTC.id, MINUTE, True)
    assert (closed.stream, closed.key, closed.latest) == (BTC.id, MINUTE, False)
    ranks = ranks_frame({"kind": "price", "by": "cv", "total": 0, "ranks": []})
    assert (ranks.stream, ranks.key, ranks.latest) == ("ranks:price", "cv", True)
    gap = gap_frame(BTC.id, MINUTE, MINUTE + 60_000)
    assert json.loads(gap.text) == {
        "type": "gap",
        "market": BTC.id,
        "since": MINUTE,
        "until": MINUTE + 60_000,
    }
    assert (gap.stream, gap.key, gap.latest) == (BTC.id, None, False)
    market_sub = Subscription("market", market=BTC)
    assert status_frame("unsubscribed", market_sub).stream == BTC.id
    assert all(f.size == len(f.text.encode()) for f in (forming, closed, ranks, gap))
